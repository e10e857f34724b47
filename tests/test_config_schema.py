"""The option schema shipped with the package (`trb_trl/config_schema.json`) is the live config classes', exactly."""

import tomllib
from pathlib import Path

import pytest
import yaml
from schema_versions import schema_versions_installed

from trb_trl import cli, config_schema, recipe_check
from trb_trl.scripts import write_config_schema


REPO = Path(__file__).resolve().parents[1]
STALE = f"trb_trl/config_schema.json is out of date: run `{config_schema.WRITE_COMMAND}`"


@pytest.fixture(scope="module")
def live_schema():
    return write_config_schema.build_schema()


@schema_versions_installed
def test_shipped_schema_matches_the_live_config_classes(live_schema):
    shipped = config_schema.load_schema()
    # Piece by piece, so that a failure names what changed.
    assert shipped["versions"] == live_schema["versions"], STALE
    assert shipped["sources"] == live_schema["sources"], f"{config_schema.CONFIG_SOURCES} changed: {STALE}"
    for trainer, live in live_schema["trainers"].items():
        assert shipped["trainers"][trainer]["dataclasses"] == live["dataclasses"], STALE
        shipped_options = {option["dest"]: option for option in shipped["trainers"][trainer]["options"]}
        live_options = {option["dest"]: option for option in live["options"]}
        assert sorted(set(shipped_options) ^ set(live_options)) == [], STALE
        for dest, option in live_options.items():
            assert shipped_options[dest] == option, f"{trainer} option {dest}: {STALE}"
    assert shipped == live_schema, STALE
    assert config_schema.SCHEMA_PATH.read_text() == write_config_schema.dumps(live_schema), STALE  # byte for byte


@schema_versions_installed
def test_shipped_schema_is_current_for_the_installed_packages():
    assert config_schema.is_current(config_schema.load_schema()), STALE


@pytest.mark.parametrize(
    "recipe",
    [None, "recipes/qwen3_1p7b.yaml", "recipes/qwen3_1p7b_tropd.yaml"],
    ids=["no recipe", "trb recipe", "tropd recipe"],
)
@schema_versions_installed
def test_help_from_the_schema_is_the_live_parsers_help(recipe, monkeypatch):
    """`trb-trl train [RECIPE] --help` prints from the schema exactly what the live parser prints, with the recipe's
    values as the defaults."""
    argv = [] if recipe is None else [str(REPO / recipe)]
    command = recipe_check.read_train_command(argv)
    live = cli._train_parser(argv)
    if recipe is not None:
        for key in command.config.get("env", {}):
            monkeypatch.setenv(key, "")  # TrlParser would set the recipe's env; monkeypatch restores it
        live.set_defaults_with_config(**{key: value for key, value in command.config.items() if key != "env"})
    from_schema = cli.schema_help_parser(command, config_schema.load_schema())
    monkeypatch.setenv("COLUMNS", "119")
    assert from_schema.format_help() == live.format_help()


def test_the_schema_ships_with_the_package():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "config_schema.json" in package_data["trb_trl"]
    assert config_schema.SCHEMA_PATH.parent == REPO / "trb_trl"


def test_is_current_compares_minor_versions(monkeypatch):
    schema = {"versions": {"trl": "1.16", "transformers": "5.25", "accelerate": "1.16"}}
    installed = {"trl": "1.16.3", "transformers": "5.25.1", "accelerate": "1.16.0"}
    monkeypatch.setattr(config_schema.metadata, "version", lambda package: installed[package])
    schema["sources"] = config_schema.sources_fingerprint()
    assert config_schema.is_current(schema)
    installed["transformers"] = "5.26.0"
    assert not config_schema.is_current(schema)


def test_every_recipe_key_of_the_shipped_recipes_is_in_the_schema():
    schema = config_schema.load_schema()
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        config = yaml.safe_load(recipe.read_text())
        trainer = config.get("trainer", "trb")
        valid = recipe_check.recipe_key_names(
            config_schema.recipe_keys(schema, trainer), config_schema.launcher_options(schema)
        )
        assert set(config) <= set(valid), recipe.name


@schema_versions_installed
def test_an_edited_config_source_makes_the_schema_stale(tmp_path, monkeypatch):
    schema = config_schema.load_schema()
    assert config_schema.is_current(schema)
    package = tmp_path / "trb_trl"
    for name in config_schema.CONFIG_SOURCES:
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_bytes((REPO / "trb_trl" / name).read_bytes())
    monkeypatch.setattr(config_schema, "__file__", str(package / "config_schema.py"))
    assert config_schema.is_current(schema)
    (package / "tropd_config.py").write_text((package / "tropd_config.py").read_text() + "\n# edited\n")
    assert not config_schema.is_current(schema)
