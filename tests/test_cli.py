import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from schema_versions import schema_versions_installed

from trb_trl import cli


REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny_cpu.yaml"
CLI = [shutil.which("trb-trl")] if shutil.which("trb-trl") else [sys.executable, "-m", "trb_trl.cli"]


def _run(*args, timeout=300, cwd=REPO):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _plan(*argv):
    return cli.plan_launch(cli._train_parser(), list(argv))  # a fresh parser: recipes set parser defaults


# --- trb-trl --help ---------------------------------------------------------------------------------------------


def test_help_lists_the_commands():
    result = _run("--help")
    assert result.returncode == 0
    assert "train" in result.stdout and "demo" in result.stdout


def test_help_imports_neither_torch_nor_trl():
    """What keeps `trb-trl --help` fast (timed by scripts/bench_cli.py, not here): no heavy import on its path."""
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    code = (
        "import sys\n"
        "from trb_trl.cli import main\n"
        "assert main(['--help']) == 0\n"
        "heavy = {'torch', 'trl', 'transformers', 'accelerate', 'datasets'} & set(sys.modules)\n"
        "assert not heavy, sorted(heavy)\n"
    )
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_pure_api_imports_without_trl_and_the_trainer_names_the_supported_range():
    # TRL cannot be imported at all, and the installed one claims to be 1.10.
    code = (
        "import importlib.metadata, sys\n"
        "real_version = importlib.metadata.version\n"
        "importlib.metadata.version = lambda name: '1.10.0' if name == 'trl' else real_version(name)\n"
        "sys.modules['trl'] = None\n"
        "import torch\n"
        "from trb_trl import BlendResult, TrustRegionBlendingProcessor, trust_region_blend\n"
        "result = trust_region_blend(torch.zeros(1, 4), torch.ones(1, 4), 0.1)\n"
        "assert isinstance(result, BlendResult)\n"
        "assert TrustRegionBlendingProcessor.__name__ == 'TrustRegionBlendingProcessor'\n"
        "try:\n"
        "    from trb_trl import TRBDistillTrainer\n"
        "except ImportError as error:\n"
        "    assert 'trl>=1.16' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('TRBDistillTrainer imported with an unsupported TRL')\n"
        "import trb_trl\n"
        "assert set(trb_trl.__all__) <= set(dir(trb_trl))\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_unknown_command_fails():
    assert _run("frobnicate").returncode != 0


# --- trb-trl train --help ---------------------------------------------------------------------------------------


def test_train_help_starts_with_the_recipe_and_launcher_keys_then_lists_the_trb_fields():
    result = _run("train", "--help")
    assert result.returncode == 0, result.stderr
    help_text = result.stdout
    # Libraries may log a line on import (e.g. W&B in offline mode); the help itself opens with the short usage.
    assert "usage: trb-trl train RECIPE.yaml [--KEY VALUE ...]\n" in help_text
    help_text = help_text[help_text.index("usage: trb-trl train") :]
    for field in ("--trb_epsilon", "--trb_warmup_steps", "--trb_schedule", "--system_prompt"):
        assert field in help_text
    first_option = help_text.index("--dataset_name")
    for launcher_key in ("accelerate_config", "num_processes", "zero3"):
        assert help_text.index(launcher_key) < first_option


@schema_versions_installed
def test_train_help_and_key_errors_answer_without_importing_torch_or_trl(tmp_path):
    """`trb-trl train --help` and a mistyped key are answered from the shipped option schema (about 0.2 s; the live
    parser takes 10-14 s to import torch and TRL)."""
    typo = tmp_path / "typo.yaml"
    typo.write_text(TINY_RECIPE.read_text().replace("trb_epsilon:", "trb_epsilo:"))
    code = (
        "import sys\n"
        "from trb_trl.cli import main\n"
        f"assert main(['train', '--help']) == 0\n"
        f"assert main(['train', {str(REPO / 'recipes' / 'qwen3_1p7b_tropd.yaml')!r}, '--help']) == 0\n"
        f"assert main(['train', {str(typo)!r}]) == 2\n"
        f"assert main(['train', {str(TINY_RECIPE)!r}, '--trb_epsilo', '0.1']) == 2\n"
        f"assert main(['train', {str(TINY_RECIPE)!r}, '--trb_schedule', 'linaer']) == 2\n"
        "heavy = {'torch', 'trl', 'transformers', 'accelerate', 'datasets'} & set(sys.modules)\n"
        "assert not heavy, sorted(heavy)\n"
    )
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert check.returncode == 0, check.stderr
    assert "--tropd_top_k" in check.stdout
    errors = check.stderr.strip().splitlines()
    assert errors == [
        f"trb-trl: error: unknown recipe key 'trb_epsilo' in {typo}; did you mean 'trb_epsilon'?",
        "trb-trl: error: unknown option --trb_epsilo; did you mean --trb_epsilon?",
        "trb-trl: error: option --trb_schedule: invalid choice 'linaer'; did you mean 'linear'? (choose from "
        "'constant', 'linear')",
    ]
    for args in (["train", "--help"], ["train", str(typo)]):  # the installed command; timed by scripts/bench_cli.py
        result = _run(*args)
        assert result.returncode == (0 if "--help" in args else 2), result.stderr


def test_a_missing_report_to_package_is_one_line_before_anything_loads(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a)
    )
    assert cli.main(["train", str(REPO / "recipes" / "qwen3_0p6b.yaml")]) == 2  # report_to: [wandb]
    assert capsys.readouterr().err == (
        "trb-trl: error: report_to includes 'wandb' but the package 'wandb' is not installed: pip install wandb "
        "(or remove it from report_to)\n"
    )


# --- splitting launcher and script arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--config", "r.yaml", "--num_processes", "1", "--per_device_train_batch_size", "1"],
            ["--config", "r.yaml", "--per_device_train_batch_size", "1"],
        ),
        (
            ["--per_device_train_batch_size", "1", "--num_processes", "1", "--max_steps", "1"],
            ["--per_device_train_batch_size", "1", "--max_steps", "1"],
        ),
    ],
)
def test_script_arguments_are_removed_by_position_not_by_value(argv, expected):
    """`--num_processes 1` goes to the launcher; script values equal to it (`1`) stay with the script."""
    assert cli.script_arguments(argv, ["--num_processes", "1"]) == expected


def test_train_keeps_script_values_equal_to_launcher_values():
    launch_args, script_args = _plan(
        "--config", str(TINY_RECIPE), "--num_processes", "1", "--per_device_train_batch_size", "1"
    )
    assert script_args == ["--config", str(TINY_RECIPE), "--per_device_train_batch_size", "1"]
    assert launch_args == ["--config_file", str(REPO / "recipes" / "accelerate" / "cpu.yaml"), "--num_processes", "1"]


def test_command_line_accelerate_config_overrides_the_recipes():
    launch_args, _ = _plan("--config", str(TINY_RECIPE), "--accelerate_config", "ddp_cpu")
    assert launch_args == ["--config_file", str(REPO / "recipes" / "accelerate" / "ddp_cpu.yaml")]


def test_recipe_launcher_flags_become_bare_flags(tmp_path):
    recipe = _recipe_in(tmp_path, "cpu\nmulti_gpu: true\nquiet: false\nnum_processes: 2")
    launch_args, _ = _plan(str(recipe))
    assert launch_args == [
        "--config_file",
        str(cli.PACKAGE_ACCELERATE_CONFIGS / "cpu.yaml"),
        "--multi_gpu",
        "--num_processes",
        "2",
    ]


def test_unknown_option_is_a_one_line_error_before_launch():
    with pytest.raises(cli.UsageError, match="--num_proceses"):
        _plan("--config", str(TINY_RECIPE), "--num_proceses", "2")


# --- accelerate configs --------------------------------------------------------------------------------------------


def _recipe_in(directory: Path, accelerate_config: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    recipe = directory / "recipe.yaml"
    text = TINY_RECIPE.read_text().replace("accelerate_config: cpu", f"accelerate_config: {accelerate_config}")
    recipe.write_text(text)
    return recipe


def test_recipe_elsewhere_resolves_its_accelerate_config_next_to_it(tmp_path, monkeypatch):
    recipe = _recipe_in(tmp_path / "elsewhere", "cpu")
    (tmp_path / "elsewhere" / "accelerate").mkdir()
    own_config = tmp_path / "elsewhere" / "accelerate" / "cpu.yaml"
    own_config.write_text((REPO / "recipes" / "accelerate" / "cpu.yaml").read_text())
    decoy = tmp_path / "cwd" / "recipes" / "accelerate" / "cpu.yaml"  # the old lookup: relative to the CWD
    decoy.parent.mkdir(parents=True)
    decoy.write_text("bogus: true\n")
    monkeypatch.chdir(tmp_path / "cwd")
    launch_args, _ = _plan(str(recipe))
    assert launch_args[:2] == ["--config_file", str(own_config)]


def test_recipe_without_its_own_configs_uses_the_packaged_ones(tmp_path, monkeypatch):
    recipe = _recipe_in(tmp_path / "elsewhere", "zero3")
    monkeypatch.chdir(tmp_path)
    launch_args, _ = _plan(str(recipe))
    assert launch_args[:2] == ["--config_file", str(cli.PACKAGE_ACCELERATE_CONFIGS / "zero3.yaml")]


def test_recipe_relative_path_is_relative_to_the_recipe(tmp_path, monkeypatch):
    recipe = _recipe_in(tmp_path / "elsewhere", "launch/mine.yaml")
    (tmp_path / "elsewhere" / "launch").mkdir()
    (tmp_path / "elsewhere" / "launch" / "mine.yaml").write_text("num_processes: 1\n")
    monkeypatch.chdir(tmp_path)
    launch_args, _ = _plan(str(recipe))
    assert launch_args[:2] == ["--config_file", str(tmp_path / "elsewhere" / "launch" / "mine.yaml")]


def test_missing_accelerate_config_is_an_error_listing_where_it_looked(tmp_path):
    recipe = _recipe_in(tmp_path, "no_such_config")
    with pytest.raises(cli.UsageError) as error:
        _plan(str(recipe))
    message = str(error.value)
    assert "no_such_config" in message
    assert str(tmp_path / "accelerate" / "no_such_config.yaml") in message
    assert str(cli.PACKAGE_ACCELERATE_CONFIGS / "no_such_config.yaml") in message


def test_no_fallback_to_trls_config_of_the_same_name(tmp_path):
    from importlib.resources import files

    assert files("trl.accelerate_configs").joinpath("multi_gpu.yaml").is_file()  # TRL has one; we do not
    with pytest.raises(cli.UsageError, match="multi_gpu"):
        cli.find_accelerate_config("multi_gpu", tmp_path)


def test_the_recipes_accelerate_folder_is_the_packaged_one():
    """One copy of each accelerate config: `recipes/accelerate` links to the configs shipped inside the package."""
    assert (REPO / "recipes" / "accelerate").resolve() == cli.PACKAGE_ACCELERATE_CONFIGS.resolve()
    assert sorted(p.name for p in cli.PACKAGE_ACCELERATE_CONFIGS.glob("*.yaml")) == [
        "cpu.yaml",
        "ddp.yaml",
        "ddp_cpu.yaml",
        "single_gpu.yaml",
        "zero2.yaml",
        "zero3.yaml",
    ]


# --- errors --------------------------------------------------------------------------------------------------------


def test_config_error_is_one_line_before_launch():
    result = _run("train", "recipes/tiny_cpu.yaml", "--trb_epsilon", "-1", timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("trb-trl: error: trb_epsilon must be")


def _run_training_script(monkeypatch, capsys, *argv) -> str:
    """`python -m trb_trl.scripts.trb_distill ARGV` (what `trb-trl train` launches) in this process, up to its first
    error: the script's own one-line reporting, without a new interpreter importing torch and TRL again. Returns the
    last line it wrote to stderr."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["trb_distill", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("trb_trl.scripts.trb_distill", run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_trb_recipe_trained_as_tropd_without_trb_is_one_line_naming_the_key(monkeypatch, capsys):
    """`trb_epsilon > 0` with TrOPD's default `rollout_policy: student` would run without TRB: refused, with the key to
    set."""
    last = _run_training_script(monkeypatch, capsys, "--config", str(TINY_RECIPE), "--trainer", "tropd")
    assert last.startswith("trb-trl: error: trb_epsilon=0.05 is TRB's KL budget") and "`rollout_policy: trb`" in last


def test_the_training_script_itself_reports_recipe_typos(tmp_path, monkeypatch, capsys):
    """Launched directly (`accelerate launch -m trb_trl.scripts.trb_distill --config ...`), the script no longer ignores
    an unknown recipe key; the launcher's keys (`accelerate_config`, `num_processes`) stay allowed."""
    typo = tmp_path / "typo.yaml"
    typo.write_text(TINY_RECIPE.read_text().replace("trb_epsilon:", "trb_epsilo:") + "num_processes: 1\n")
    last = _run_training_script(monkeypatch, capsys, "--config", str(typo))
    assert last == f"trb-trl: error: unknown recipe key 'trb_epsilo' in {typo}; did you mean 'trb_epsilon'?"


def test_missing_recipe_is_one_line():
    with pytest.raises(cli.UsageError, match="recipe not found"):
        _plan("--config", "no/such/recipe.yaml")


def test_failing_script_exit_status_is_returned_without_a_launcher_traceback(capsys):
    def fails(_args):
        raise subprocess.CalledProcessError(returncode=3, cmd=["python", "trb_distill.py"])

    assert cli.launch(["--num_processes", "1"], ["--max_steps", "1"], launch_command_fn=fails) == 3
    assert capsys.readouterr().err == ""  # the script's own error, already printed, stays the last thing


def test_failing_torchrun_rank_reports_its_error_last(tmp_path, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    error_file = tmp_path / "error.json"
    error_file.write_text(
        json.dumps({"message": {"message": "ValueError: bad prompt file", "extraInfo": {"timestamp": "0"}}})
    )
    failure = ProcessFailure(local_rank=1, pid=1234, exitcode=1, error_file=str(error_file))

    def fails(_args):
        raise ChildFailedError(name="trb_distill.py", failures={1: failure})

    assert cli.launch(["--num_processes", "2"], [], launch_command_fn=fails) == 1
    assert capsys.readouterr().err.strip() == (
        "trb-trl: error: training failed on rank 1 (exit status 1): ValueError: bad prompt file"
    )


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    make = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert make.returncode == 0, make.stderr
    return directory


@pytest.mark.slow
def test_train_runs_the_tiny_cpu_recipe_with_overrides(tiny_models, tmp_path):
    output_dir = tmp_path / "run"
    result = _run(
        "train",
        "recipes/tiny_cpu.yaml",
        "--model_name_or_path",
        str(tiny_models / "student"),
        "--teacher_model_name_or_path",
        str(tiny_models / "teacher"),
        "--dataset_name",
        str(tiny_models / "prompts.jsonl"),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'trb/epsilon': '0.05'" in result.stdout and "'trb/epsilon': '0.025'" in result.stdout
    assert (output_dir / "model.safetensors").is_file()
    card = (output_dir / "README.md").read_text()  # the final model's card: the trainer and the TRB paper
    assert "TRB Distill" in card and "2605.31159" in card


@pytest.mark.slow
def test_a_failing_training_script_shows_its_own_error_last(tiny_models, tmp_path):
    result = _run(
        "train",
        str(TINY_RECIPE),
        "--model_name_or_path",
        str(tiny_models / "student"),
        "--teacher_model_name_or_path",
        str(tiny_models / "teacher"),
        "--dataset_name",
        str(tmp_path / "missing.jsonl"),
        "--output_dir",
        str(tmp_path / "run"),
        cwd=tmp_path,  # and the recipe's accelerate config is found from another directory
    )
    assert result.returncode != 0
    assert "CalledProcessError" not in result.stderr
    assert "missing.jsonl" in result.stderr.strip().splitlines()[-1]
