"""The `trb-trl` command line.

```bash
trb-trl train recipes/qwen3_1p7b.yaml                      # accelerate settings from the recipe
trb-trl train recipes/qwen3_1p7b.yaml --trb_epsilon 0.01   # any recipe value can be overridden
trb-trl train recipes/tiny_cpu.yaml --num_processes 1      # so can the launcher's
trb-trl sweep recipes/qwen3_1p7b.yaml --output-dir sweeps/qwen3_1p7b --methods trb,skd   # the paper's grid as recipes
```

This module imports only the standard library (and the package's own light modules) at the top, so `trb-trl --help`
answers at once; TRL, torch and accelerate are imported by the command that needs them. `trb-trl train --help` and the
mistakes a recipe or command line can make in its keys (an unknown key, a value outside an option's choices, a
`report_to` backend that is not installed) are answered from the option schema shipped with the package
(`trb_trl/config_schema.json`, see `trb_trl.config_schema`), in about a second, before TRL is imported.
"""

import argparse
import subprocess
import sys
from pathlib import Path

from trb_trl import config_schema, recipe_check
from trb_trl.report_to import check_report_to


PROG = "trb-trl"
# The accelerate configs shipped with the package (the repository's `recipes/accelerate/` links here).
PACKAGE_ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "accelerate_configs"
ACCELERATE_CONFIG_OPTION = "--accelerate_config"


class UsageError(Exception):
    """A mistake in the recipe or the command line: reported as one `trb-trl: error: ...` line, exit status 2."""


def _error(message: object) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------------------------------
# Accelerate configs


def _shipped_config_names() -> list[str]:
    return sorted(config.stem for config in PACKAGE_ACCELERATE_CONFIGS.glob("*.yaml"))


def find_accelerate_config(value: str, recipe_dir: Path | None, *, from_command_line: bool = False) -> Path:
    """Resolve a recipe's `accelerate_config` (a name such as `zero3`, or a path to a YAML file).

    Where it is looked for, in order:

    - an absolute path: as is;
    - a relative path: from the working directory if it was given on the command line, then next to the recipe;
    - a bare name `NAME`: `<recipe dir>/accelerate/NAME.yaml`, then the configs shipped in the package
      (`trb_trl/accelerate_configs/NAME.yaml`).

    A recipe's own paths and names never depend on the working directory, and there is no fallback to TRL's
    configs of the same name (they differ from ours). Raises `UsageError` listing every place it looked.
    """
    path = Path(value).expanduser()
    candidates: list[Path] = []
    if path.is_absolute():
        candidates.append(path)
    else:
        if from_command_line:
            candidates.append(Path.cwd() / path)
        if recipe_dir is not None:
            candidates.append(recipe_dir / path)
        if len(path.parts) == 1 and path.suffix not in (".yaml", ".yml"):  # a bare name
            if recipe_dir is not None:
                candidates.append(recipe_dir / "accelerate" / f"{value}.yaml")
            candidates.append(PACKAGE_ACCELERATE_CONFIGS / f"{value}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = ", ".join(_shipped_config_names())
    looked = ", ".join(str(candidate) for candidate in dict.fromkeys(candidates))
    raise UsageError(
        f"accelerate_config {value!r} not found (looked in: {looked}). Use a path to a YAML file or one of the "
        f"shipped names: {shipped}."
    )


def _pop_option(args: list[str], option: str) -> tuple[str | None, list[str]]:
    """Remove every `option VALUE` / `option=VALUE` from `args`; return the last value and the rest."""
    value, rest, index = None, [], 0
    while index < len(args):
        arg = args[index]
        if arg == option:
            if index + 1 >= len(args):
                raise UsageError(f"expected a value after {option}")
            value, index = args[index + 1], index + 2
        elif arg.startswith(f"{option}="):
            value, index = arg.split("=", 1)[1], index + 1
        else:
            rest.append(arg)
            index += 1
    return value, rest


# ---------------------------------------------------------------------------------------------------------------------
# Splitting launcher and script arguments


def script_arguments(argv: list[str], launcher_args: list[str]) -> list[str]:
    """`argv` without the launcher's arguments, removed by position rather than by value.

    `launcher_args` are the command-line strings the training script's parser did not recognise, in the order they
    appear in `argv` (an ordered subsequence of it; argparse keeps that order). Each one is matched to the first
    token of `argv` at or after the previous match, so in `--num_processes 1 --per_device_train_batch_size 1` only the
    first `1` goes to `accelerate launch`. Same rule as `_subtract_subsequence` in TRL's own CLI
    (`trl/cli/commands/training.py`).
    """
    remaining = iter(launcher_args)
    current = next(remaining, None)
    kept = []
    for arg in argv:
        if current is not None and arg == current:
            current = next(remaining, None)
        else:
            kept.append(arg)
    if current is not None:  # cannot happen with argparse's leftovers; guard against silently dropping arguments
        raise UsageError(f"could not place launcher argument {current!r} on the command line")
    return kept


def _recipe_path(argv: list[str]) -> Path | None:
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UsageError("expected a recipe path after --config")
        return Path(argv[index + 1])
    return None


def _launcher_actions() -> dict[str, argparse.Action]:
    """`accelerate launch`'s options, by option string."""
    from accelerate.commands.launch import launch_command_parser

    return {option: action for action in launch_command_parser()._actions for option in action.option_strings}


def _recipe_launch_args(config_remaining: list[str], actions: dict[str, argparse.Action]) -> list[str]:
    """The recipe's launcher keys (`--key value` pairs) as `accelerate launch` arguments.

    A flag key (`multi_gpu: true`) becomes `--multi_gpu`, or nothing when false: passed on as `--multi_gpu True`,
    accelerate would take `True` for the training script.
    """
    args = []
    for key, value in zip(config_remaining[::2], config_remaining[1::2]):
        action = actions.get(key)
        if action is None or action.nargs != 0:
            args += [key, value]
        elif value.lower() in ("true", "1", "yes"):
            args.append(key)
        elif value.lower() not in ("false", "0", "no", "none"):
            raise UsageError(f"recipe key {key[2:]} is an on/off `accelerate launch` flag; got {value!r}")
    return args


def plan_launch(parser, argv: list[str]) -> tuple[list[str], list[str]]:
    """Parse `[RECIPE] [--KEY VALUE ...]` with the training script's `parser`; return `(launch_args, script_args)`.

    Recipe keys and command-line options that are not training arguments go to `accelerate launch` (recipe values
    first, so the command line wins); everything else goes to the script, which re-reads the recipe itself.
    `accelerate_config` becomes `--config_file PATH` (see `find_accelerate_config`). Config errors (e.g. a
    `ValueError` from `TRBDistillConfig.__post_init__`) and unknown options raise `UsageError` before any launch.
    """
    import yaml

    if argv and not argv[0].startswith("-"):  # `trb-trl train RECIPE ...`
        argv = ["--config", argv[0], *argv[1:]]
    recipe = _recipe_path(argv)
    if recipe is not None and not recipe.is_file():
        raise UsageError(f"recipe not found: {recipe}")
    try:
        _, training_args, *_, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except (ValueError, yaml.YAMLError) as error:  # e.g. from the config dataclasses' `__post_init__`
        raise UsageError(error) from error
    script_args = script_arguments(argv, cli_remaining)

    recipe_dir = recipe.absolute().parent if recipe is not None else None
    recipe_config, config_remaining = _pop_option(config_remaining, ACCELERATE_CONFIG_OPTION)
    cli_config, cli_remaining = _pop_option(cli_remaining, ACCELERATE_CONFIG_OPTION)
    actions = _launcher_actions()
    try:
        recipe_check.check_unknown_arguments(
            parser, [*actions, ACCELERATE_CONFIG_OPTION], config_remaining, cli_remaining, recipe, launched=False
        )
    except ValueError as error:
        raise UsageError(error) from error
    _check_report_to(training_args.report_to)
    launch_args = [*_recipe_launch_args(config_remaining, actions), *cli_remaining]
    if cli_config is not None:
        config_file = find_accelerate_config(cli_config, recipe_dir, from_command_line=True)
    elif recipe_config is not None:
        config_file = find_accelerate_config(recipe_config, recipe_dir)
    else:
        config_file = None
    if config_file is not None:
        launch_args = ["--config_file", str(config_file), *launch_args]
    return launch_args, script_args


def _check_report_to(report_to) -> None:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    try:
        check_report_to(report_to, INTEGRATION_TO_CALLBACK)
    except ValueError as error:
        raise UsageError(error) from error


# ---------------------------------------------------------------------------------------------------------------------
# Launching


def _child_failure(error: BaseException) -> tuple[int, str] | None:
    """`(exit status, message)` for torchrun's `ChildFailedError` (multi-GPU / ZeRO launches), else `None`."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    except ImportError:
        return None
    if not isinstance(error, ChildFailedError):
        return None
    rank, failure = error.get_first_failure()
    message = failure.message
    if isinstance(message, dict):  # written by `@record` in the child: {"message": "ValueError: ...", ...}
        message = message.get("message", "")
    exitcode = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # a signal: -N -> 128 + N
    if "To enable traceback" in str(message) or not message:
        message = "its error is above"
    return exitcode, f"training failed on rank {rank} (exit status {failure.exitcode}): {message}"


def launch(launch_args: list[str], script_args: list[str], *, launch_command_fn=None) -> int:
    """Run the training script under `accelerate launch`; return its exit status.

    When the script fails, its own error (printed by the script) stays the last thing on screen: accelerate's
    `CalledProcessError` and torchrun's `ChildFailedError` are turned into the script's exit status instead of a
    launcher traceback.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser

    from trb_trl.scripts import trb_distill

    accelerate_args = launch_command_parser().parse_args([*launch_args, trb_distill.__file__, *script_args])
    try:
        (launch_command_fn or launch_command)(accelerate_args)
    except subprocess.CalledProcessError as error:
        return error.returncode if error.returncode > 0 else 128 - error.returncode
    except Exception as error:
        failure = _child_failure(error)
        if failure is None:
            raise
        exitcode, message = failure
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return exitcode
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Commands

TRAIN_USAGE = "%(prog)s RECIPE.yaml [--KEY VALUE ...]"
TRAIN_DESCRIPTION = """\
Run TRB distillation from a YAML recipe, launched with `accelerate launch`.

  trb-trl train recipes/qwen3_1p7b.yaml                       # everything from the recipe
  trb-trl train recipes/qwen3_1p7b.yaml --trb_epsilon 0.01    # a command-line value overrides the recipe's
  trb-trl train recipes/tiny_cpu.yaml --num_processes 1 --per_device_train_batch_size 1
  trb-trl train recipes/qwen3_1p7b_tropd.yaml                 # `trainer: tropd`: TrOPD and its tropd_* options

Every training option below can be a recipe key (`trb_epsilon: 0.01`) or a command-line option
(`--trb_epsilon 0.01`). Keys that are not training options go to `accelerate launch`:

  accelerate_config NAME|PATH  accelerate config file. A NAME is looked up as <recipe dir>/accelerate/NAME.yaml,
                               then among the configs shipped with trb_trl:
                               {shipped}.
                               A relative PATH is relative to the recipe (on the command line: to the working
                               directory, then to the recipe).
  num_processes N              processes (GPUs) per machine; likewise num_machines, main_process_port,
                               mixed_precision, ... (any `accelerate launch --help` option)
"""


class _TrainHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _as_train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` (the live one or the schema's) with `trb-trl train`'s usage, description and help layout."""
    parser.prog = f"{PROG} train"
    parser.usage = TRAIN_USAGE
    parser.description = TRAIN_DESCRIPTION.format(shipped=", ".join(_shipped_config_names()))
    parser.formatter_class = _TrainHelpFormatter
    parser.allow_abbrev = False  # `--trb_epsilo` is a typo to report, not `--trb_epsilon`
    for group in parser._action_groups:
        if group.title == "options":
            group.title = "training options"
    return parser


def _train_parser(argv: list[str] | None = None):
    """The training script's live parser (imports TRL), for `trb-trl train`."""
    from trb_trl.scripts import trb_distill

    argv = list(argv or [])
    if argv and not argv[0].startswith("-"):
        argv = ["--config", *argv]
    return _as_train_parser(trb_distill.make_parser(trainer=trb_distill.trainer_name(argv)))


def schema_help_parser(command: recipe_check.TrainCommand, schema: dict) -> argparse.ArgumentParser:
    """A parser that prints what the live `_train_parser` prints for `--help` (recipe values shown as the defaults),
    built from the shipped option schema without importing TRL."""
    trainer = recipe_check.checked_trainer(command, schema)
    return _as_train_parser(config_schema.help_parser(schema, trainer, command.config))


def train(argv: list[str]) -> int:
    """Parse a recipe (plus overrides) and launch `trb_trl/scripts/trb_distill.py` with `accelerate launch`.

    `--help` and the mistakes the option schema can see are answered first, without importing TRL (see
    `recipe_check.check_train_command`); the live parser then runs the config classes' own checks before the launch.
    """
    try:
        command = recipe_check.read_train_command(argv)
        schema = config_schema.load_schema()
        if command.wants_help:
            schema_help_parser(command, schema).print_help()
            return 0
        recipe_check.check_train_command(command, schema)
    except ValueError as error:
        return _error(error)
    try:
        parser = _train_parser(argv)  # imports TRL: fails with a clear message outside the tested TRL range
    except (ImportError, ValueError) as error:
        return _error(error)
    try:
        launch_args, script_args = plan_launch(parser, argv)  # exits on -h
    except UsageError as error:
        return _error(error)
    return launch(launch_args, script_args)


def demo(argv: list[str]) -> int:
    from trb_trl.demo import main as demo_main

    return demo_main(argv)


def evaluate(argv: list[str]) -> int:
    from trb_trl.evaluation.cli import main as eval_main

    return eval_main(argv)


def sweep(argv: list[str]) -> int:
    from trb_trl.sweep import main as sweep_main

    return sweep_main(argv)


COMMANDS = {
    "train": (train, "Run TRB distillation from a YAML recipe (launched with accelerate)."),
    "demo": (demo, "CPU toy comparison of TRB, vanilla OPD and the paper's baselines on a synthetic task."),
    "sweep": (sweep, "Write the paper's sweep grid as recipes: one YAML per point, from a base recipe."),
    "eval": (evaluate, "Score a model or checkpoint on math benchmarks (pass@1, pass@k), or compare runs' curves."),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=PROG, description="Trust-Region behaviour Blending for TRL distillation.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}")  # exits with status 2
    command, _ = COMMANDS[argv[0]]
    return command(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
