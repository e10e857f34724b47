"""The benchmark kinds, and the module that reads and grades each one (math is read by `benchmarks.py` and graded
by `grading.py`), imported by name on first use so that a kind's dependencies load only when it is evaluated."""

import importlib


KINDS = ("math", "multiple_choice", "instruction_following", "code")
KIND_MODULES = {
    "multiple_choice": "multiple_choice",
    "instruction_following": "instruction_following",
    "code": "code_execution",
}


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown benchmark kind {kind!r}; the kinds are {', '.join(KINDS)}.")


def kind_module(kind: str):
    """The module that reads and grades `kind` (not math), imported now; a clear `ImportError` if it is missing."""
    check_kind(kind)
    name = f"{__package__}.{KIND_MODULES[kind]}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:  # the module exists but lacks a dependency: that error says what to install
            raise
        raise ImportError(
            f"{kind} benchmarks are read and graded by {name}, which this installation does not have."
        ) from error
