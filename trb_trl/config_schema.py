"""Every `trb-trl train` option as data, so that `trb-trl train --help` and recipe-key errors answer without TRL.

```bash
python -m trb_trl.scripts.write_config_schema --write   # regenerate trb_trl/config_schema.json from the live classes
python -m trb_trl.scripts.write_config_schema --check   # exit status 1 if the shipped file is out of date
```

`trb_trl/config_schema.json` (package data) lists, for each trainer (`trb`, `tropd`), every option of the training
script's parser (`trb_trl.scripts.trb_distill.make_parser`): its option strings, the dataclass that defines it, its
type, default, choices and help, in the parser's order; then the `accelerate launch` options (the recipe keys that go
to the launcher) and the `report_to` backends transformers knows. It records the minor versions of TRL, transformers
and accelerate it was generated with, and a fingerprint of trb_trl's own config sources: the CLI trusts it to *reject*
a key only when both match (`is_current`), and otherwise asks the live classes. `tests/test_config_schema.py` rebuilds it from the live classes
and fails when the shipped file differs, so it cannot drift.

Only the standard library is imported here: this module reads the schema. Building it from the live classes (which
imports TRL, transformers and accelerate, and the training script's parser) is `trb_trl/scripts/write_config_schema.py`.
"""

import argparse
import hashlib
import json
from functools import cache
from importlib import metadata
from pathlib import Path


SCHEMA_PATH = Path(__file__).resolve().parent / "config_schema.json"
WRITE_COMMAND = "python -m trb_trl.scripts.write_config_schema --write"
TRAINERS = ("trb", "tropd")
# The packages whose classes the schema describes (trb_trl's own travel with the file).
VERSIONED_PACKAGES = ("trl", "transformers", "accelerate")
# trb_trl's modules that define the options (the dataclasses' fields, help and defaults), fingerprinted in the schema so
# that an edited checkout falls back to the live classes rather than rejecting a key it has just added.
CONFIG_SOURCES = ("trb_distill_config.py", "tropd_config.py", "scripts/trb_distill.py")


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
