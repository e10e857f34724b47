"""Every `trb-trl train` option as data, so that `trb-trl train --help` and recipe-key errors answer without TRL.

```bash
python -m trb_trl.config_schema --write   # regenerate trb_trl/config_schema.json from the live config classes
python -m trb_trl.config_schema --check   # exit status 1 if the shipped file is out of date
```

`trb_trl/config_schema.json` (package data) lists, for each trainer (`trb`, `tropd`), every option of the training
script's parser (`trb_trl.scripts.trb_distill.make_parser`): its option strings, the dataclass that defines it, its
type, default, choices and help, in the parser's order; then the `accelerate launch` options (the recipe keys that go
to the launcher) and the `report_to` backends transformers knows. It records the minor versions of TRL, transformers
and accelerate it was generated with, and a fingerprint of trb_trl's own config sources: the CLI trusts it to *reject*
a key only when both match (`is_current`), and otherwise asks the live classes. `tests/test_config_schema.py` rebuilds it from the live classes
and fails when the shipped file differs, so it cannot drift.

Only the standard library is imported at the top; `build_schema` imports TRL, transformers and accelerate.
"""

import argparse
import hashlib
import json
import sys
from functools import cache
from importlib import metadata
from pathlib import Path


SCHEMA_PATH = Path(__file__).resolve().parent / "config_schema.json"
WRITE_COMMAND = "python -m trb_trl.config_schema --write"
TRAINERS = ("trb", "tropd")
# The packages whose classes the schema describes (trb_trl's own travel with the file).
VERSIONED_PACKAGES = ("trl", "transformers", "accelerate")
# trb_trl's modules that define the options (the dataclasses' fields, help and defaults), fingerprinted in the schema so
# that an edited checkout falls back to the live classes rather than rejecting a key it has just added.
CONFIG_SOURCES = ("trb_distill_config.py", "tropd_config.py", "scripts/trb_distill.py")
_TYPE_NAMES = {str: "str", int: "int", float: "float", dict: "dict"}


# ---------------------------------------------------------------------------------------------------------------------
# Reading


@cache
def _load(path: str) -> dict:
    with open(path) as file:
        return json.load(file)


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    """The shipped schema (read once per process)."""
    return _load(str(path))


def _minor_version(version: str) -> str:
    return ".".join(version.split(".")[:2])


def installed_versions() -> dict[str, str | None]:
    """`major.minor` of each package the schema describes, as installed (`None` if it is not)."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = _minor_version(metadata.version(package))
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def sources_fingerprint() -> str:
    """A hash of `CONFIG_SOURCES` as they are on disk (line endings normalised)."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for name in CONFIG_SOURCES:
        digest.update((package / name).read_bytes().replace(b"\r\n", b"\n"))
    return digest.hexdigest()[:16]


def is_current(schema: dict) -> bool:
    """Whether the schema was generated with the installed TRL, transformers and accelerate (same minor versions) and
    from trb_trl's config sources as they are.

    If not, a key missing from it may still be valid (a newer transformers adds fields, an edited config class):
    callers then check with the live classes before rejecting anything."""
    return schema.get("versions") == installed_versions() and schema.get("sources") == sources_fingerprint()


def options(schema: dict, trainer: str) -> list[dict]:
    """The training script's options for `trainer`, in the parser's order."""
    return schema["trainers"][trainer]["options"]


def recipe_keys(schema: dict, trainer: str) -> dict[str, dict]:
    """Recipe key (the option's `dest`) -> its first option; a recipe sets `dest`, as `TrlParser` does."""
    keys: dict[str, dict] = {}
    for option in options(schema, trainer):
        keys.setdefault(option["dest"], option)
    return keys


def option_strings(schema: dict, trainer: str) -> dict[str, dict]:
    """Command-line option string (`--trb_epsilon`, `--trb-epsilon`, `--no_...`) -> its option."""
    return {string: option for option in options(schema, trainer) for string in option["option_strings"]}


def launcher_options(schema: dict) -> dict[str, dict]:
    """`accelerate launch` option string -> `{"dest", "nargs"}`."""
    return {string: option for option in schema["launcher_options"] for string in option["option_strings"]}


def help_parser(schema: dict, trainer: str, defaults: dict | None = None, **parser_kwargs) -> argparse.ArgumentParser:
    """An `argparse` parser with the training options of `trainer`, for `--help` only (it prints what the live parser
    prints; it is not meant to parse). `defaults` (a recipe's values) replace the defaults, as `TrlParser` does."""
    parser = argparse.ArgumentParser(**parser_kwargs)
    defaults = defaults or {}
    for option in options(schema, trainer):
        default = defaults.get(option["dest"], option.get("default_text", option["default"]))
        kwargs = dict(dest=option["dest"], default=default, help=option["help"], required=option["required"])
        if option["action"] == "store":
            kwargs.update(nargs=option["nargs"], choices=option["choices"], metavar=option["metavar"])
        else:
            kwargs["action"] = option["action"]
        parser.add_argument(*option["option_strings"], **kwargs)
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Building from the live classes


def _jsonable(value):
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def _type_name(action: argparse.Action) -> str | None:
    kind = action.type
    if kind is None:
        return None
    if kind in _TYPE_NAMES:
        return _TYPE_NAMES[kind]
    if getattr(kind, "__name__", "") == "string_to_bool":
        return "bool"
    if action.choices is not None:
        return "choice"
    return kind.__name__ if isinstance(kind, type) else "str"


def _action_name(action: argparse.Action) -> str:
    names = {argparse._StoreAction: "store", argparse._StoreFalseAction: "store_false"}
    names[argparse._StoreTrueAction] = "store_true"
    if type(action) not in names:
        raise TypeError(f"config_schema does not describe {type(action).__name__} (option {action.option_strings}).")
    return names[type(action)]


def _describe(action: argparse.Action, owner: dict[str, str]) -> dict:
    default = _jsonable(action.default)
    option = {
        "dest": action.dest,
        "option_strings": list(action.option_strings),
        "dataclass": owner.get(action.dest),
        "action": _action_name(action),
        "type": _type_name(action),
        "nargs": action.nargs,
        "default": default,
        "choices": None if action.choices is None else [_jsonable(choice) for choice in action.choices],
        "metavar": action.metavar,
        "required": action.required,
        "help": action.help,
    }
    if str(default) != str(action.default):  # what `--help` shows, e.g. a tuple default
        option["default_text"] = str(action.default)
    return option


def _trainer_schema(trainer: str) -> dict:
    import dataclasses

    from trb_trl.scripts.trb_distill import make_parser

    parser = make_parser(trainer=trainer)
    owner = {}
    for dataclass_type in parser.dataclass_types:
        for field in dataclasses.fields(dataclass_type):
            owner.setdefault(field.name, dataclass_type.__name__)
    return {
        "dataclasses": [dataclass_type.__name__ for dataclass_type in parser.dataclass_types],
        "options": [_describe(action, owner) for action in parser._actions if action.dest != "help"],
    }


def build_schema() -> dict:
    """The schema, from the live config classes (imports TRL, transformers and accelerate)."""
    from accelerate.commands.launch import launch_command_parser
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    launcher = [
        {"option_strings": list(action.option_strings), "dest": action.dest, "nargs": _jsonable(action.nargs)}
        for action in launch_command_parser()._actions
        if action.option_strings and action.dest != "help"
    ]
    return {
        "about": f"Generated from the live config classes by `{WRITE_COMMAND}`; do not edit. "
        "tests/test_config_schema.py checks it is current.",
        "versions": installed_versions(),
        "sources": sources_fingerprint(),
        "trainers": {trainer: _trainer_schema(trainer) for trainer in TRAINERS},
        "launcher_options": launcher,
        "report_to_backends": sorted(INTEGRATION_TO_CALLBACK),
    }


def dumps(schema: dict) -> str:
    return json.dumps(schema, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trb_trl.config_schema", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help=f"Rewrite {SCHEMA_PATH.name} from the live classes.")
    mode.add_argument("--check", action="store_true", help=f"Exit with status 1 if {SCHEMA_PATH.name} is stale.")
    args = parser.parse_args(argv)
    text = dumps(build_schema())
    if args.write:
        SCHEMA_PATH.write_text(text)
        print(f"wrote {SCHEMA_PATH}")
        return 0
    if SCHEMA_PATH.is_file() and SCHEMA_PATH.read_text() == text:
        print(f"{SCHEMA_PATH} is current")
        return 0
    print(f"{SCHEMA_PATH} is out of date: run `{WRITE_COMMAND}`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
