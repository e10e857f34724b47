"""Check a `trb-trl train` command (a recipe and command-line overrides) before TRL, torch or a model is loaded.

`check_train_command` answers from the option schema shipped with the package (`trb_trl/config_schema.json`, see
`trb_trl.config_schema`) in well under a second: unknown recipe keys and command-line options (with the closest valid
name), values outside an option's choices or of the wrong type, and `report_to` backends that are not installed.
Values that need the config classes' own checks (`__post_init__`) are left to them. The messages are one line and
the same whether they come from the schema or, when it does not match the installed TRL/transformers/accelerate,
from the live parser (`unknown_keys_message`).
"""

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from trb_trl import config_schema
from trb_trl.report_to import check_report_to


ACCELERATE_CONFIG_KEY = "accelerate_config"
# Recipe keys that are not options of the training script or `accelerate launch`: the environment variables TrlParser
# sets (`env`) and the accelerate config `trb-trl train` resolves.
EXTRA_RECIPE_KEYS = ("env", ACCELERATE_CONFIG_KEY)
HELP_HINT = "see `trb-trl train --help`"
NEITHER = "neither a training option nor an `accelerate launch` option"
# argparse takes `-1` and `-.5` for values, not options, when no option looks like a negative number.
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")
_TRUE, _FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")  # TRL's `string_to_bool`
_TRUE_WORDS, _FALSE_WORDS = ("yes", "on", "true", "y"), ("no", "off", "false", "n")  # YAML 1.1 booleans
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false"}
_MAX_CHOICES_SHOWN = 12


class RecipeError(ValueError):
    """A mistake in a recipe or a `trb-trl train` command line; the message is one line."""


@dataclass
class TrainCommand:
    """`trb-trl train [RECIPE] [--KEY VALUE ...]`, read: the recipe (path and keys) and the rest of the command line."""

    recipe: Path | None
    config: dict
    args: list[str]

    @property
    def wants_help(self) -> bool:
        return "-h" in self.args or "--help" in self.args


def _load_recipe(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        with open(path) as file:
            config = yaml.safe_load(file)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(config, dict):
        raise RecipeError(f"Config file {path} must contain a YAML mapping.")  # TrlParser's words
    if not isinstance(config.get("env", {}), dict):
        raise RecipeError(f"`env` in {path} must be a mapping of environment variables.")
    return config


def read_train_command(argv: list[str]) -> TrainCommand:
    """Split `[RECIPE | --config RECIPE] [ARGS ...]` and read the recipe."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):  # `trb-trl train RECIPE ...`
        argv = ["--config", *argv]
    if "--config" not in argv:
        return TrainCommand(None, {}, argv)
    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise RecipeError("expected a recipe path after --config")
    recipe = Path(argv[index + 1])
    return TrainCommand(recipe, _load_recipe(recipe), argv[:index] + argv[index + 2 :])


def trainer_name(argv: list[str]) -> str:
    """The `trainer` a command line asks for: `--trainer X`, else the recipe's `trainer` key, else `"trb"`. Read first,
    because it decides which config class parses every other option. A missing or unreadable recipe counts as none
    (the parser reports it)."""
    for index, arg in enumerate(argv):
        if arg == "--trainer" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--trainer="):
            return arg.split("=", 1)[1]
    recipe = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    if recipe is not None and Path(recipe).is_file():
        try:
            config = _load_recipe(Path(recipe))
        except RecipeError:
            return "trb"
        if config.get("trainer") is not None:
            return str(config["trainer"])
    return "trb"


def _recipe_argv(command: TrainCommand) -> list[str]:
    return command.args if command.recipe is None else ["--config", str(command.recipe), *command.args]


def checked_trainer(command: TrainCommand, schema: dict) -> str:
    """The trainer the command asks for; a `RecipeError` if there is no such trainer."""
    name = trainer_name(_recipe_argv(command))
    trainers = list(schema["trainers"])
    if name not in trainers:
        raise RecipeError(
            f"trainer must be {' or '.join(map(repr, trainers))}, got {name!r}{_did_you_mean(name, trainers, repr)}"
        )
    return name


# ---------------------------------------------------------------------------------------------------------------------
# Messages (shared with the live parser's checks in `trb_trl.cli` and the training script)


def _closest(name: str, candidates) -> str | None:
    """The valid name closest to `name` (hyphens read as underscores), if one is close."""
    dashes = len(name) - len(name.lstrip("-"))
    close = difflib.get_close_matches(name[:dashes] + name[dashes:].replace("-", "_"), list(candidates), n=1)
    return close[0] if close else None


def _did_you_mean(name: str, candidates, spell=str) -> str:
    close = _closest(name, candidates)
    return f"; did you mean {spell(close)}?" if close else ""


def _underscore_spellings(names) -> list[str]:
    """The names without their hyphenated twins (`--trb-epsilon` next to `--trb_epsilon`), for suggestions."""
    names = list(dict.fromkeys(names))
    return [name for name in names if "-" not in name.lstrip("-")]


def unknown_keys_message(
    keys: list[str],
    valid,
    *,
    recipe: Path | None = None,
    other_trainers: dict[str, set[str]] | None = None,
) -> str:
    """One line naming unknown recipe keys (`recipe` given; bare names) or command-line options (`--name`).

    `valid`: the valid names, spelled like `keys`; the closest is suggested. `other_trainers`: trainer -> its names,
    so that an option of the other trainer is named as such rather than as a typo.
    """
    candidates = _underscore_spellings(valid)
    spell = str if recipe is None else repr
    noun = "option" if recipe is None else "recipe key"
    where = "" if recipe is None else f" in {recipe}"
    details = {}
    for key in dict.fromkeys(keys):
        owner = next((name for name, names in (other_trainers or {}).items() if key in names), None)
        close = _closest(key, candidates)
        if owner is not None:
            if len(set(keys)) == 1:
                return (
                    f"{noun} {spell(key)}{where} is only an option of `trainer: {owner}`: set `trainer: {owner}` in "
                    f"the recipe (or pass --trainer {owner})"
                )
            details[key] = f"only an option of `trainer: {owner}`"
        else:
            details[key] = f"did you mean {spell(close)}?" if close else None
    if len(details) == 1:
        ((key, detail),) = details.items()
        hint = f"; {detail}" if detail else f" ({NEITHER}; {HELP_HINT})"
        return f"unknown {noun} {spell(key)}{where}{hint}"
    listed = ", ".join(spell(key) + (f" ({detail})" if detail else "") for key, detail in details.items())
    return f"unknown {noun}s{where}: {listed}; {HELP_HINT}"


def recipe_key_names(dests, launcher_option_strings) -> list[str]:
    """Every valid recipe key: the training options' `dest`s, `accelerate launch`'s options and `EXTRA_RECIPE_KEYS`."""
    launcher_keys = [string[2:] for string in launcher_option_strings if string.startswith("--")]
    return [*dests, *launcher_keys, *EXTRA_RECIPE_KEYS]


def check_unknown_arguments(
    parser, launcher_option_strings, config_remaining: list[str], cli_remaining: list[str], recipe, *, launched: bool
) -> None:
    """The live parser's check (when the shipped schema is stale, and in the launched script): a recipe key that neither
    the training options nor `accelerate launch` know, or an unknown command-line option, is a one-line `ValueError`
    naming the closest valid name. `launched=False` (`trb-trl train`): `accelerate launch`'s options (and their values)
    may follow on the command line; `launched=True` (the script itself): nothing may be left over."""
    launcher = set(launcher_option_strings)
    dests = [action.dest for action in parser._actions if action.dest != "help"]
    valid_keys = recipe_key_names(dests, launcher)
    unknown_keys = [key[2:] for key in config_remaining[::2] if key[2:] not in valid_keys]
    if unknown_keys:
        raise ValueError(unknown_keys_message(unknown_keys, valid_keys, recipe=recipe))
    options = [arg.split("=", 1)[0] for arg in cli_remaining if looks_like_option(arg)]
    unknown_options = options if launched else [option for option in options if option not in launcher]
    if unknown_options:
        script_options = [option for action in parser._actions for option in action.option_strings]
        valid = script_options if launched else [*script_options, *launcher]
        raise ValueError(unknown_keys_message(unknown_options, valid))
    if launched and cli_remaining:
        raise ValueError(f"unexpected arguments: {' '.join(cli_remaining)}")


# ---------------------------------------------------------------------------------------------------------------------
# Values


def _value_problem(option: dict, value, *, from_recipe: bool) -> str | None:
    """What is wrong with one value of `option`, or `None`. Mirrors argparse: a recipe value is converted (and so
    checked) only when it is a string, and argparse never checks a recipe value against the choices (we do)."""
    if value is None or (from_recipe and isinstance(value, (list, dict))):
        return None
    if option["choices"] is not None:
        choices = [str(choice) for choice in option["choices"]]
        if isinstance(value, bool) and from_recipe:  # YAML 1.1 reads unquoted no/off/yes/on as booleans
            words = [word for word in (_FALSE_WORDS if value is False else _TRUE_WORDS) if word in choices]
            if words:
                return f"got {value} (YAML reads an unquoted {words[0]} as {str(value).lower()}: write '{words[0]}')"
        if str(value) not in choices:
            shown = (
                ", ".join(map(repr, choices))
                if len(choices) <= _MAX_CHOICES_SHOWN
                else f"{len(choices)} values; {HELP_HINT}"
            )
            return f"invalid choice {str(value)!r}{_did_you_mean(str(value), choices, repr)} (choose from {shown})"
        return None
    kind = option["type"]
    if kind not in _EXPECTED or not isinstance(value, str):
        return None
    try:
        if kind == "int":
            int(value)
        elif kind == "float":
            float(value)
        elif value.lower() not in _TRUE + _FALSE:
            raise ValueError
    except ValueError:
        return f"expected {_EXPECTED[kind]}, got {value!r}"
    return None


def looks_like_option(token: str) -> bool:
    """Whether argparse reads `token` as an option (rather than a value such as `-1`)."""
    return token.startswith("-") and token != "-" and not _NEGATIVE_NUMBER.match(token) and " " not in token


def _arity(option: dict) -> tuple[int, int | None]:
    """(fewest, most) values an option takes on the command line (`None`: no limit)."""
    nargs = option.get("nargs")
    if option.get("action", "store") != "store" or nargs == 0:
        return 0, 0
    if nargs is None:
        return 1, 1
    if nargs == "?":
        return 0, 1
    if nargs == "*":
        return 0, None
    if nargs == "+":
        return 1, None
    if isinstance(nargs, int):
        return nargs, nargs
    return 0, None  # argparse.REMAINDER and the like


def _command_line_options(
    args: list[str], known: dict[str, dict]
) -> tuple[list[tuple[str, dict, list[str]]], list[str]]:
    """Read `--option VALUE ...` from `args`: `([(option string, option, values)], unknown option strings)`."""
    found, unknown, index = [], [], 0
    while index < len(args):
        token = args[index]
        index += 1
        if not looks_like_option(token):
            raise RecipeError(
                f"unexpected argument {token!r} (one value too many for the option before it? options come as "
                f"--KEY VALUE; {HELP_HINT})"
            )
        name, inline = token.split("=", 1) if "=" in token and token.startswith("--") else (token, None)
        option = known.get(name)
        values = []
        if option is None:
            unknown.append(name)
            while index < len(args) and not looks_like_option(args[index]):  # its values, whatever it takes
                index += 1
            continue
        fewest, most = _arity(option)
        if inline is not None:
            values = [inline]
        else:
            while index < len(args) and not looks_like_option(args[index]) and (most is None or len(values) < most):
                values.append(args[index])
                index += 1
        if len(values) < fewest:
            raise RecipeError(f"option {name} expects {'a value' if fewest == 1 else 'values'}")
        found.append((name, option, values))
    return found, unknown


# ---------------------------------------------------------------------------------------------------------------------
# The check


def check_train_command(command: TrainCommand, schema: dict | None = None) -> None:
    """Raise a one-line `RecipeError` (or `ReportToError`) for what the schema can tell is wrong with `command`.

    Unknown keys, choices and types are judged only when the schema matches the installed TRL, transformers and
    accelerate (`config_schema.is_current`); otherwise `trb-trl train` leaves them to the live parser, which reports
    unknown keys with the same messages. `report_to`'s packages are always checked.
    """
    schema = config_schema.load_schema() if schema is None else schema
    trainer = checked_trainer(command, schema)
    keys = config_schema.recipe_keys(schema, trainer)
    strings = config_schema.option_strings(schema, trainer)
    launcher = config_schema.launcher_options(schema)
    current = config_schema.is_current(schema)
    others = {name: set(config_schema.recipe_keys(schema, name)) - set(keys) for name in schema["trainers"]}

    # The command line first: the script's options shadow `accelerate launch`'s of the same name, as in argparse.
    accelerate_config = {"dest": ACCELERATE_CONFIG_KEY, "action": "store", "nargs": None}
    known = {**launcher, **strings, f"--{ACCELERATE_CONFIG_KEY}": accelerate_config}
    found, unknown_options = _command_line_options(command.args, known)
    overridden = {option["dest"] for string, option, _ in found if string in strings}

    if current:
        valid_keys = recipe_key_names(keys, launcher)
        unknown_keys = [key for key in command.config if key not in valid_keys]
        if unknown_keys:
            other_keys = {name: names for name, names in others.items() if name != trainer}
            raise RecipeError(
                unknown_keys_message(unknown_keys, valid_keys, recipe=command.recipe, other_trainers=other_keys)
            )
        if unknown_options:
            other_options = {
                name: {
                    s for s, option in config_schema.option_strings(schema, name).items() if option["dest"] in names
                }
                for name, names in others.items()
                if name != trainer
            }
            raise RecipeError(unknown_keys_message(unknown_options, list(known), other_trainers=other_options))
        for key, value in command.config.items():
            if key in keys and key not in overridden:
                problem = _value_problem(keys[key], value, from_recipe=True)
                if problem:
                    raise RecipeError(f"recipe key {key!r} in {command.recipe}: {problem}")
        for string, option, values in found:
            if string in strings:
                for value in values:
                    problem = _value_problem(option, value, from_recipe=False)
                    if problem:
                        raise RecipeError(f"option {string}: {problem}")

    report_to = command.config.get("report_to", keys["report_to"]["default"])
    for string, option, values in found:
        if string in strings and option["dest"] == "report_to" and values:
            report_to = values if option["nargs"] in ("+", "*") else values[-1]
    check_report_to(report_to, schema["report_to_backends"] if current else None)
