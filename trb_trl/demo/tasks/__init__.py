"""The demo's synthetic tasks, chosen with `trb-trl demo --task NAME`.

- `machine` (`machine.py`, the default): tracing a state machine; 24-step rollouts in which one wrong state derails
  the rest.
- `addition` (`addition.py`): column addition with carries; short fixed-format rollouts whose mistakes are local.

A task (`base.DemoTask`) brings its problems (each writes its worked solution, sloppy or clean, and checks a completion
exactly), disjoint train / dev / held-out splits, the pretraining of its teacher and weak student, and its run defaults.
"""

from .addition import ADDITION
from .base import DemoTask, Problem, ProblemSplits, TaskDefaults
from .machine import MACHINE


TASKS: dict[str, DemoTask] = {task.name: task for task in (MACHINE, ADDITION)}


def task_argument(name: str) -> DemoTask:
    """`--task NAME` for argparse: the task, or a usage error that lists the valid names."""
    import argparse

    if name not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    return TASKS[name]


__all__ = ["ADDITION", "MACHINE", "TASKS", "DemoTask", "Problem", "ProblemSplits", "TaskDefaults", "task_argument"]
