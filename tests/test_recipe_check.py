"""`trb-trl train`'s checks from the option schema: recipe keys vs command-line options, closest names, values."""

import importlib.util
from pathlib import Path

import pytest
from schema_versions import schema_versions_installed

from trb_trl import cli, config_schema, recipe_check
from trb_trl.recipe_check import RecipeError, check_train_command, read_train_command


# Messages of the schema fast path (the live path has its own tests below, stale schema or not).
pytestmark = schema_versions_installed


REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


def _recipe(tmp_path: Path, text: str, base: Path = TINY_RECIPE) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(base.read_text() + "\n" + text + "\n")
    return recipe


def _check(*argv):
    check_train_command(read_train_command([str(arg) for arg in argv]))


def _error(*argv) -> str:
    with pytest.raises(RecipeError) as error:
        _check(*argv)
    return str(error.value)


@pytest.fixture
def stale_schema(monkeypatch):
    """The shipped schema as if generated with other versions of TRL/transformers/accelerate than those installed."""
    monkeypatch.setattr(config_schema, "installed_versions", lambda: {"trl": "1.16", "transformers": "9.9"})


# --- unknown keys -----------------------------------------------------------------------------------------------


def test_a_recipe_typo_is_a_recipe_key_with_the_closest_name(tmp_path):
    recipe = _recipe(tmp_path, "trb_epsilo: 0.1")
    assert _error(recipe) == f"unknown recipe key 'trb_epsilo' in {recipe}; did you mean 'trb_epsilon'?"


def test_a_launcher_key_typo_in_a_recipe_is_a_recipe_key_too(tmp_path):
    recipe = _recipe(tmp_path, "num_proceses: 2")
    assert _error(recipe) == f"unknown recipe key 'num_proceses' in {recipe}; did you mean 'num_processes'?"


def test_a_command_line_typo_is_an_option_with_the_closest_name():
    assert _error(TINY_RECIPE, "--trb_epsilo", "0.1") == "unknown option --trb_epsilo; did you mean --trb_epsilon?"
    assert _error(TINY_RECIPE, "--trb-epsilo", "0.1") == "unknown option --trb-epsilo; did you mean --trb_epsilon?"


def test_several_unknown_keys_are_named_in_one_line(tmp_path):
    recipe = _recipe(tmp_path, "trb_epsilo: 0.1\nfrobnicate: 1")
    assert _error(recipe) == (
        f"unknown recipe keys in {recipe}: 'trb_epsilo' (did you mean 'trb_epsilon'?), 'frobnicate'; "
        "see `trb-trl train --help`"
    )


def test_an_unknown_key_with_no_close_name_says_where_keys_go(tmp_path):
    message = _error(_recipe(tmp_path, "frobnicate: 1"))
    assert "neither a training option nor an `accelerate launch` option" in message


def test_a_tropd_option_in_a_trb_run_names_the_trainer(tmp_path):
    assert _error(_recipe(tmp_path, "tropd_top_k: 8")).endswith(
        "is only an option of `trainer: tropd`: set `trainer: tropd` in the recipe (or pass --trainer tropd)"
    )
    assert "only an option of `trainer: tropd`" in _error(TINY_RECIPE, "--tropd_top_k", "8")
    _check(REPO / "recipes" / "qwen3_1p7b_tropd.yaml", "--tropd_top_k", "8")


def test_an_unknown_trainer_names_the_closest():
    assert (
        _error(TINY_RECIPE, "--trainer", "trpod")
        == "trainer must be 'trb' or 'tropd', got 'trpod'; did you mean 'tropd'?"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--trb_epsilon", "0.01"],
        ["--trb-epsilon", "0.01"],
        ["--trb_epsilon=0.01"],
        ["--trb_epsilon", "-1"],  # a negative value is a value; its range is the config class's business
        ["--num_processes", "1", "--per_device_train_batch_size", "1"],
        ["--num-processes", "1", "--multi_gpu"],
        ["--accelerate_config", "ddp_cpu"],
        ["--use_cpu"],  # an on/off option with a default takes its value optionally
        ["--bf16", "false", "--use_cpu", "yes"],
        ["--label_names", "a", "b"],
        ["--report_to", "none"],
        ["--trainer", "tropd", "--rollout_policy", "trb", "--tropd_top_k", "8"],
    ],
)
def test_valid_command_lines_pass(args):
    _check(TINY_RECIPE, *args)


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_recipe_passes(recipe):
    _check(recipe)


# --- values --------------------------------------------------------------------------------------------------------


def test_a_recipe_value_outside_the_choices_is_named_with_the_closest(tmp_path):
    recipe = _recipe(tmp_path, "trb_schedule: linaer")
    assert _error(recipe) == (
        f"recipe key 'trb_schedule' in {recipe}: invalid choice 'linaer'; did you mean 'linear'? "
        "(choose from 'constant', 'linear')"
    )


def test_an_unquoted_no_is_explained(tmp_path):
    recipe = _recipe(tmp_path, "save_strategy: no")  # YAML 1.1: false
    assert _error(recipe) == (
        f"recipe key 'save_strategy' in {recipe}: got False (YAML reads an unquoted no as false: write 'no')"
    )


def test_a_command_line_value_of_the_wrong_type_is_named():
    assert _error(TINY_RECIPE, "--max_steps", "abc") == "option --max_steps: expected an integer, got 'abc'"
    assert _error(TINY_RECIPE, "--bf16", "maybe") == "option --bf16: expected true or false, got 'maybe'"
    assert _error(TINY_RECIPE, "--bf16") == "option --bf16 expects a value"  # `bool | None`: argparse wants one
    assert "41 values; see `trb-trl train --help`" in _error(TINY_RECIPE, "--optim", "adamw")


def test_recipe_strings_are_checked_as_argparse_converts_them(tmp_path):
    _check(_recipe(tmp_path, 'learning_rate: "1e-5"'))  # YAML reads 1e-5 as a string; argparse converts it
    assert "expected a number, got 'fast'" in _error(_recipe(tmp_path, "learning_rate: fast"))


def test_a_recipe_value_overridden_on_the_command_line_is_not_checked(tmp_path):
    _check(_recipe(tmp_path, "trb_schedule: linaer"), "--trb_schedule", "constant")


def test_a_stray_value_is_named():
    assert _error(TINY_RECIPE, "--max_steps", "3", "4").startswith("unexpected argument '4'")


def test_recipe_problems_are_one_line(tmp_path):
    assert _error(tmp_path / "missing.yaml") == f"recipe not found: {tmp_path / 'missing.yaml'}"
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- a\n- b\n")
    assert "must contain a YAML mapping" in _error(not_a_mapping)
    assert _error("--config") == "expected a recipe path after --config"


# --- report_to -----------------------------------------------------------------------------------------------------


def test_report_to_backends_are_checked_from_the_recipe_and_the_command_line(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a)
    )
    expected = "report_to includes 'tensorboard' but the package 'tensorboard'"
    with pytest.raises(ValueError, match=expected):
        _check(_recipe(tmp_path, "report_to: [tensorboard]"))
    with pytest.raises(ValueError, match=expected):
        _check(TINY_RECIPE, "--report_to", "tensorboard")
    _check(_recipe(tmp_path, "report_to: [tensorboard]"), "--report_to", "none")  # the command line wins


# --- when the schema is not for the installed packages --------------------------------------------------------------


def test_a_stale_schema_rejects_no_key_but_still_checks_report_to(tmp_path, stale_schema, monkeypatch):
    _check(_recipe(tmp_path, "trb_epsilo: 0.1\ntrb_schedule: linaer"), "--some_new_option", "1")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="pip install mlflow"):
        _check(TINY_RECIPE, "--report_to", "mlflow")


def test_the_live_parser_reports_unknown_keys_in_the_same_words(tmp_path, monkeypatch):
    """What `trb-trl train` says when the schema is stale (the live parser decides) is what the schema says."""
    monkeypatch.setenv("WANDB_PROJECT", "")  # parsing sets the recipe's env; monkeypatch restores it
    recipe = _recipe(tmp_path, "trb_epsilo: 0.1")
    with pytest.raises(cli.UsageError) as live:
        cli.plan_launch(cli._train_parser([str(recipe)]), [str(recipe)])
    assert str(live.value) == _error(recipe)
    args = [str(TINY_RECIPE), "--trb_epsilo", "0.1"]  # no abbreviation: not taken for --trb_epsilon
    with pytest.raises(cli.UsageError) as live:
        cli.plan_launch(cli._train_parser(args), args)
    assert str(live.value) == _error(*args)


def test_train_with_a_stale_schema_asks_the_live_parser(tmp_path, stale_schema, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "")
    recipe = _recipe(tmp_path, "trb_epsilo: 0.1")
    assert cli.train([str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"trb-trl: error: unknown recipe key 'trb_epsilo' in {recipe}; did you mean 'trb_epsilon'?"
    )


def test_recipe_key_names_include_the_launcher_and_the_cli_keys():
    names = recipe_check.recipe_key_names(["trb_epsilon"], ["--num_processes", "-q"])
    assert names == ["trb_epsilon", "num_processes", "env", "accelerate_config"]
