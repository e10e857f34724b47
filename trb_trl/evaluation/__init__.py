"""Evaluation as the papers do it: pass@1 over n samples per problem, graded by each benchmark's kind (math-verify for
math, the answer letter for multiple choice, instruction checks, code execution).

Modules, one concept each:

- `benchmarks`: the registry (Hub id, split, columns, kind, default sample count), the papers' suites, local files.
- `grading`: the last `\\boxed{}` of a completion checked against the gold answer by math-verify, under a deadline.
- `graders`: the grader of each kind (`Grader`, `grader_for`) and each kind's default system prompt.
- `multiple_choice`: GPQA and MMLU-Redux rows, seeded option order, lettered prompts, the answer letter.
- `instruction_following`, `code_execution`: IFBench and LiveCodeBench rows and their graders.
- `pass_at_k`: unbiased pass@k (Chen et al. 2021) and its mean over problems.
- `prompts`: problems rendered as training renders prompts.
- `sampling`: completions from HF `generate` (batched) or vLLM.
- `runner`: `evaluate()` (results.json, samples.jsonl, resumable) and in-memory `score_benchmarks()`.
- `compare`: several runs as pass@1-against-step curves and a markdown table.
- `cli`: `trb-trl eval`.
- `callback`: in-training evaluation every N steps, with best-checkpoint tracking.

Names are imported lazily (PEP 562), as in `trb_trl`, so that `trb-trl eval --help` and the grading child process
do not import torch or datasets.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

# Imported eagerly (standard library only): the function shares its module's name, and a lazy lookup would lose to
# the submodule that importing `trb_trl.evaluation.pass_at_k` binds on this package.
from .pass_at_k import mean_pass_at_k, pass_at_k


# Public name -> the submodule that defines it.
_LAZY_ATTRIBUTES = {
    "BENCHMARKS": ".benchmarks",
    "KINDS": ".benchmarks",
    "PAPER_SUITES": ".benchmarks",
    "TROPD_BENCHMARKS": ".benchmarks",
    "TROPD_SUITES": ".benchmarks",
    "Benchmark": ".benchmarks",
    "BenchmarkSpec": ".benchmarks",
    "Problem": ".benchmarks",
    "benchmark_from_dataset": ".benchmarks",
    "load_benchmark": ".benchmarks",
    "parse_benchmarks": ".benchmarks",
    "AnswerChecker": ".grading",
    "Grader": ".graders",
    "SYSTEM_PROMPTS": ".graders",
    "grader_for": ".graders",
    "MultipleChoiceGrader": ".multiple_choice",
    "extract_letter": ".multiple_choice",
    "Verdict": ".grading",
    "extract_boxed": ".grading",
    "DEFAULT_SYSTEM_PROMPT": ".prompts",
    "render_prompt": ".prompts",
    "sample_completions": ".sampling",
    "evaluate": ".runner",
    "score_benchmarks": ".runner",
    "MathEvalCallback": ".callback",
}

__all__ = [
    "AnswerChecker",
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkSpec",
    "DEFAULT_SYSTEM_PROMPT",
    "Grader",
    "KINDS",
    "MathEvalCallback",
    "MultipleChoiceGrader",
    "PAPER_SUITES",
    "Problem",
    "SYSTEM_PROMPTS",
    "TROPD_BENCHMARKS",
    "TROPD_SUITES",
    "Verdict",
    "benchmark_from_dataset",
    "evaluate",
    "extract_boxed",
    "extract_letter",
    "grader_for",
    "load_benchmark",
    "mean_pass_at_k",
    "parse_benchmarks",
    "pass_at_k",
    "render_prompt",
    "sample_completions",
    "score_benchmarks",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from `__getattr__`
    from .benchmarks import (
        BENCHMARKS,
        KINDS,
        PAPER_SUITES,
        TROPD_BENCHMARKS,
        TROPD_SUITES,
        Benchmark,
        BenchmarkSpec,
        Problem,
        benchmark_from_dataset,
        load_benchmark,
        parse_benchmarks,
    )
    from .callback import MathEvalCallback
    from .graders import SYSTEM_PROMPTS, Grader, grader_for
    from .grading import AnswerChecker, Verdict, extract_boxed
    from .multiple_choice import MultipleChoiceGrader, extract_letter
    from .prompts import DEFAULT_SYSTEM_PROMPT, render_prompt
    from .runner import evaluate, score_benchmarks
    from .sampling import sample_completions


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES)
