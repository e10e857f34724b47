"""The `trb-trl` command line.

```bash
trb-trl train recipes/qwen3_1p7b.yaml                      # accelerate settings from the recipe
trb-trl train recipes/qwen3_1p7b.yaml --trb_epsilon 0.01   # any recipe value can be overridden
```
"""

import argparse
import sys
from pathlib import Path


def _resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """Turn `--accelerate_config NAME_OR_PATH` into `--config_file PATH` for `accelerate launch`.

    A name is looked up in `recipes/accelerate/` (relative to the working directory), then among TRL's shipped
    configs (`zero3`, `multi_gpu`, ...).
    """
    if "--accelerate_config" not in launch_args:
        return launch_args
    index = launch_args.index("--accelerate_config")
    if index + 1 >= len(launch_args):
        raise ValueError("Expected a value after `--accelerate_config`.")
    name = launch_args[index + 1]
    rest = launch_args[:index] + launch_args[index + 2 :]
    for candidate in (Path(name), Path("recipes/accelerate") / f"{name}.yaml"):
        if candidate.is_file():
            return ["--config_file", str(candidate), *rest]
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    return resolve_accelerate_config_argument(["--accelerate_config", name, *rest])


def train(argv: list[str]) -> int:
    """Parse a recipe (plus CLI overrides) and launch `trb_trl/scripts/trb_distill.py` with `accelerate launch`."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    from trb_trl.scripts import trb_distill

    if argv and not argv[0].startswith("-"):
        argv = ["--config", argv[0], *argv[1:]]
    parser = trb_distill.make_parser(prog="trb-trl train")
    # Exits on -h. Keys that are not training arguments (e.g. `accelerate_config`, `num_processes`) are left over
    # and go to `accelerate launch`, as with `trl <command> --config`.
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = _resolve_accelerate_config(config_remaining + cli_remaining)
    script_args = [arg for arg in argv if arg not in cli_remaining]
    accelerate_args = launch_command_parser().parse_args([*launch_args, trb_distill.__file__, *script_args])
    launch_command(accelerate_args)
    return 0


def demo(argv: list[str]) -> int:
    from trb_trl.demo import main as demo_main

    return demo_main(argv)


COMMANDS = {
    "train": (train, "Run TRB distillation from a YAML recipe (launched with accelerate)."),
    "demo": (demo, "CPU toy reproduction: TRB vs vanilla OPD on a synthetic task, with a report."),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="trb-trl", description="Trust-Region behaviour Blending for TRL distillation."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.error(
            f"unknown command {argv[0]!r}"
        )
        return 0
    command, _ = COMMANDS[argv[0]]
    return command(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
