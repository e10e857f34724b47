r"""Graders: how the samples of each kind of benchmark are scored, and the system prompt each kind is asked with.

A grader turns one completion of one problem into a `Verdict` (correct or not, the answer it found, small `details`)
and, once a benchmark's samples are graded, may add metrics of its own to that benchmark's results
(`summary_metrics`: `{}` for math and multiple choice; instruction following reports instruction-level accuracy,
say). `run_benchmark`, `evaluate`, `score_benchmarks` and the in-training callback grade each benchmark with the grader
of its kind (`Graders`: one per kind, made on first use, closed together).

| kind | grader | system prompt (default) |
| --- | --- | --- |
| `math` | `MathGrader`: math-verify on the last `\boxed{}` (`grading.AnswerChecker`) | the papers' math prompt |
| `multiple_choice` | `multiple_choice.MultipleChoiceGrader`: the letter of the answer | the math prompt, for a letter |
| `instruction_following` | `instruction_following.InstructionFollowingGrader` | none (IFBench prompts stand alone) |
| `code` | `code_execution.CodeExecutionGrader`: runs the program on the tests (opt-in) | LiveCodeBench's |

Grading code runs the model's programs on this machine, so it is opt-in: `grader_for("code")` refuses unless
`allow_code_execution=True` (`trb-trl eval --allow-code-execution`, `math_eval_allow_code_execution`).

Standard library only at import time (the graders of other kinds are imported when first made).
"""

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from .grading import AnswerChecker, Verdict
from .kinds import KINDS, check_kind, kind_module  # noqa: F401 (re-exported)
from .prompts import DEFAULT_SYSTEM_PROMPT


if TYPE_CHECKING:
    from .benchmarks import Problem


MULTIPLE_CHOICE_SYSTEM_PROMPT = (
    "Please reason step by step, and put the letter of the correct option as your final answer within \\boxed{}."
)
# LiveCodeBench's generic system message (lcb_runner/prompts/code_generation.py), as `code_execution.SYSTEM_PROMPT`
# (a test keeps the two equal; here so that `trb-trl eval --help` shows it without importing that module).
CODE_SYSTEM_PROMPT = (
    "You are an expert Python programmer. You will be given a question (problem specification) and will generate a "
    "correct Python program that matches the specification and passes all tests."
)
# Each kind's default system prompt (None: no system message). A `system_prompt` argument may be one prompt for every
# benchmark, None for none, or a mapping like this one (kinds it lacks get their default).
SYSTEM_PROMPTS: Mapping[str, str | None] = MappingProxyType(
    {
        "math": DEFAULT_SYSTEM_PROMPT,
        "multiple_choice": MULTIPLE_CHOICE_SYSTEM_PROMPT,
        "instruction_following": None,
        "code": CODE_SYSTEM_PROMPT,
    }
)
# The module that reads the rows of each kind but math (`problem_from_row`) and defines its grader.
KIND_GRADERS = {
    "multiple_choice": "MultipleChoiceGrader",
    "instruction_following": "InstructionFollowingGrader",
    "code": "CodeExecutionGrader",
}
# Kinds whose graders add no summary metrics: the in-training callback gathers no verdicts across processes for them.
SUMMARY_FREE_KINDS = frozenset({"math", "multiple_choice"})
CODE_EXECUTION_FLAG = "--allow-code-execution"


class Grader(Protocol):
    """Scores completions of one kind of benchmark."""

    def check(self, problem: "Problem", completion: str) -> Verdict:
        """Grade one completion of `problem`; never raises for a bad completion (it is simply wrong)."""
        ...

    def summary_metrics(self, verdicts: list[Verdict]) -> dict[str, float]:
        """Extra metrics of a benchmark from the verdicts of all its samples (`{}` if none)."""
        ...

    def close(self) -> None:
        """Release what the grader holds (child processes, sandboxes)."""
        ...


class MathGrader:
    """The math kind: `AnswerChecker` (math-verify on the last `\\boxed{}`) against the problem's gold answer."""

    def __init__(self, checker: AnswerChecker | None = None, *, timeout_seconds: float | None = 5):
        self._owns_checker = checker is None
        self.checker = checker if checker is not None else AnswerChecker(timeout_seconds=timeout_seconds)

    def check(self, problem: "Problem", completion: str) -> Verdict:
        return self.checker.check(problem.answer, completion)

    def summary_metrics(self, verdicts: list[Verdict]) -> dict[str, float]:
        return {}

    def close(self) -> None:
        if self._owns_checker:  # a checker handed in belongs to its owner (it may grade other runs)
            self.checker.close()


def grader_for(kind: str, **options) -> Grader:
    """A new grader for benchmarks of `kind`.

    Options: math `checker` (an `AnswerChecker` to share) or `timeout_seconds`; instruction_following passes its
    options to `InstructionFollowingGrader`; code `allow_code_execution` (required: grading runs the model's programs),
    `timeout_seconds`, `memory_mb`. An option a kind does not take is a `TypeError`.
    """
    check_kind(kind)
    if kind == "math":
        return MathGrader(**options)
    if kind == "multiple_choice":
        if options:
            raise TypeError(f"multiple_choice graders take no options, got {sorted(options)}.")
        return kind_module(kind).MultipleChoiceGrader()
    if kind == "code":
        require_code_execution([("code benchmarks", kind)], options.get("allow_code_execution", False))
    return getattr(kind_module(kind), KIND_GRADERS[kind])(**options)


def require_code_execution(
    benchmarks: Iterable[tuple[str, str | None]], allowed: bool, flag: str = CODE_EXECUTION_FLAG
) -> None:
    """A `ValueError` naming the code benchmarks among `(name, kind)` pairs unless code execution is `allowed`."""
    code = [name for name, kind in benchmarks if kind == "code"]
    if code and not allowed:
        raise ValueError(
            f"{', '.join(code)}: grading code runs the programs the model writes on this machine, which is opt-in. "
            f"Pass {flag} to allow it."
        )


def system_prompt_for(kind: str, system_prompt: str | None | Mapping[str, str | None] = SYSTEM_PROMPTS) -> str | None:
    """The system prompt of a benchmark of `kind`: `system_prompt` itself when it is one prompt (or None: none), its
    entry for `kind` when it is a mapping of kinds, and the kind's default when the mapping lacks it."""
    check_kind(kind)
    if isinstance(system_prompt, Mapping):
        return system_prompt[kind] if kind in system_prompt else SYSTEM_PROMPTS[kind]
    return system_prompt


class Graders:
    """One grader per kind for a run, made on first use with the run's options (math: `checker`; code:
    `allow_code_execution`), and closed together."""

    def __init__(self, *, checker: AnswerChecker | None = None, allow_code_execution: bool = False):
        self.checker = checker
        self.allow_code_execution = allow_code_execution
        self._graders: dict[str, Grader] = {}

    def __getitem__(self, kind: str) -> Grader:
        if kind not in self._graders:
            options = {}
            if kind == "math" and self.checker is not None:
                options["checker"] = self.checker
            elif kind == "code":
                options["allow_code_execution"] = self.allow_code_execution
            self._graders[kind] = grader_for(kind, **options)
        return self._graders[kind]

    def close(self) -> None:
        """Close every grader made so far; later lookups make new ones."""
        graders, self._graders = self._graders, {}
        for grader in graders.values():
            grader.close()
