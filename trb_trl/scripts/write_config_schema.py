"""Build `trb_trl/config_schema.json` from the live config classes and the training script's parser (imports TRL,
transformers and accelerate); `trb_trl.config_schema` reads it without them.

```bash
python -m trb_trl.scripts.write_config_schema --write   # regenerate the shipped file
python -m trb_trl.scripts.write_config_schema --check   # exit status 1 if it is out of date
```
"""

import argparse
import dataclasses
import json
import sys

from trb_trl.config_schema import (
    SCHEMA_PATH,
    TRAINERS,
    WRITE_COMMAND,
    installed_versions,
    sources_fingerprint,
)
from trb_trl.scripts.trb_distill import make_parser


_TYPE_NAMES = {str: "str", int: "int", float: "float", dict: "dict"}


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
    parser = argparse.ArgumentParser(
        prog="python -m trb_trl.scripts.write_config_schema", description=__doc__.split("\n\n")[0]
    )
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
