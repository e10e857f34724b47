"""IFBench (allenai/IFBench_test): prompts with verifiable output constraints, graded by IFBench's own checkers.

Each row holds a prompt, the ids of the constraints it carries (`instruction_id_list`, e.g. `"count:keywords_multiple"`)
and their arguments (`kwargs`, one dict per id, unused keys null). A response is graded as IFBench's
`evaluation_lib` grades it: each constraint's checker is built from its arguments (and the prompt, for the checkers
that need it) and asked whether the response follows it.

- strict: the response as written (an empty response follows nothing);
- loose: IFBench's upper bound, the constraint counts as followed if any of eight variants of the response follows it
  (first and/or last line removed, `*` removed);
- a prompt counts as correct when *every* constraint is followed (prompt level); instruction level is the fraction of
  all constraints followed, pooled over prompts.

`Verdict.correct` is strict prompt level by default (`InstructionFollowingGrader(correct_by="loose")` switches it);
`summary_metrics` gives all four numbers. IFBench's README says its paper reports prompt-level *loose* accuracy; the
TrOPD paper does not say which it reports. Reasoning is removed before grading, as the IFBench authors do for thinking
models: the text after the last `</think>`, and nothing at all when a `<think>` block never closes (a response cut off
while thinking has no answer).

The checkers come from the `if-verifiable` package (`pip install 'trb-trl[ifbench]'`), which ships IFBench's
`instructions.py` and registry (58 constraint types) as of late 2025; the official repository has since changed a few
checkers (pronoun list, repeat-span and word-position checkers), so scores can differ slightly from a run of its
current head. Five constraint types need NLTK data, which no package on PyPI ships: `punkt_tab` (words:start_verb,
words:words_position, words:keywords_specific_position, format:title_case), `averaged_perceptron_tagger_eng`
(words:start_verb) and `stopwords` (ratio:stop_words). The grader looks for them when it is built; if any is missing it
tries one bounded download (skipped offline, i.e. with `HF_HUB_OFFLINE=1`), then stops with the command that installs
them. `if-verifiable` itself would call `nltk.download` on import, without any time limit; that call is switched off.

Standard library only at import time: `if-verifiable` and NLTK are imported when a grader is built.
"""

import os
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence

from trb_trl.evaluation.benchmarks import Problem, thaw
from trb_trl.evaluation.grading import Verdict


# NLTK resource -> (its path in an nltk_data folder, the constraint types that need it).
NLTK_RESOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "punkt_tab": (
        "tokenizers/punkt_tab",
        ("words:start_verb", "words:words_position", "words:keywords_specific_position", "format:title_case"),
    ),
    "averaged_perceptron_tagger_eng": ("taggers/averaged_perceptron_tagger_eng", ("words:start_verb",)),
    "stopwords": ("corpora/stopwords", ("ratio:stop_words",)),
}
NLTK_DOWNLOAD_TIMEOUT_SECONDS = 120.0
_INSTALL_HINT = "pip install 'trb-trl[ifbench]'  (or: pip install if-verifiable)"

_registry_lock = threading.Lock()
_registry: Mapping | None = None


def problem_from_row(row: Mapping, problem_id: str, spec) -> Problem:
    """One IFBench row as a `Problem`: the prompt as the problem text, the constraint ids joined by ", " as the
    `answer` (what the results files show as the gold), and `metadata` = `instruction_id_list` and `kwargs` (one
    mapping per constraint, without the null entries). A missing column, an empty prompt, no constraints, ids and
    argument lists of different lengths, a constraint id the installed checkers do not know, or arguments its checker
    rejects are a `ValueError` that says which (so a bad row stops the load, not the grading after generation). Imports
    the checkers (`if-verifiable`) on first use."""
    where = f"{getattr(spec, 'dataset', 'IFBench')}, problem {problem_id}"
    prompt_column = getattr(spec, "problem_column", None) or "prompt"
    for column in (prompt_column, "instruction_id_list", "kwargs"):
        if column not in row:
            raise ValueError(f"{where}: no {column!r} column (IFBench rows have prompt, instruction_id_list, kwargs).")
    prompt = row[prompt_column]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: the {prompt_column!r} column holds no prompt text ({prompt!r}).")
    ids = row["instruction_id_list"]
    if isinstance(ids, str) or not isinstance(ids, Sequence) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{where}: instruction_id_list must be a non-empty list of constraint ids, got {ids!r}.")
    kwargs = row["kwargs"]
    if kwargs is None:
        kwargs = [{} for _ in ids]
    if isinstance(kwargs, str) or not isinstance(kwargs, Sequence) or len(kwargs) != len(ids):
        raise ValueError(f"{where}: kwargs must be a list with one entry per constraint ({len(ids)}), got {kwargs!r}.")
    arguments = []
    for instruction_id, entry in zip(ids, kwargs):
        if entry is not None and not isinstance(entry, Mapping):
            raise ValueError(f"{where}: the arguments of {instruction_id!r} are not a mapping: {entry!r}.")
        arguments.append({key: value for key, value in (entry or {}).items() if value is not None})
    registry = _load_registry()
    for instruction_id, entry in zip(ids, arguments):
        _build_checker(registry, instruction_id, entry, prompt, where)
    metadata = {"instruction_id_list": list(ids), "kwargs": arguments}  # frozen by Problem
    return Problem(id=problem_id, problem=prompt, answer=", ".join(ids), metadata=metadata)


class InstructionFollowingGrader:
    """Grades responses to IFBench prompts with IFBench's checkers (see the module docstring for the protocol).

    `check(problem, completion)` -> `Verdict(extracted=<the graded response, reasoning removed; None if empty>,
    correct=<every constraint followed>, details={"instruction_id_list", "followed", "followed_loose"}, plus "errors"
    when a checker raised, which counts as not followed)`. Building the grader imports `if-verifiable` and checks the
    NLTK data (`require_nltk_data=False` skips that check; a constraint that then needs missing data raises a
    `RuntimeError` when it is graded). `download_nltk_data`: `None` tries a download of missing data (in a child
    process, at most `NLTK_DOWNLOAD_TIMEOUT_SECONDS`) unless `HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE` is set; `False`
    never downloads. Problems come from `problem_from_row`, which has checked their constraints.
    """

    def __init__(
        self,
        *,
        correct_by: str = "strict",
        require_nltk_data: bool = True,
        download_nltk_data: bool | None = None,
    ):
        if correct_by not in ("strict", "loose"):
            raise ValueError(f"correct_by must be 'strict' or 'loose', got {correct_by!r}.")
        self.correct_by = correct_by
        self._registry = _load_registry()
        self._missing_nltk = missing_nltk_resources()
        if self._missing_nltk and _should_download(download_nltk_data):
            _download_nltk_resources(self._missing_nltk)
            self._missing_nltk = missing_nltk_resources()
        if self._missing_nltk and require_nltk_data:
            raise RuntimeError(_missing_nltk_message(self._missing_nltk))

    @property
    def library_version(self) -> str:
        """The `if-verifiable` release whose checkers grade (worth recording next to scores)."""
        from importlib.metadata import version

        return version("if-verifiable")

    def check(self, problem: Problem, completion: str) -> Verdict:
        metadata = getattr(problem, "metadata", None) or {}
        ids = tuple(metadata.get("instruction_id_list", ()))
        arguments = tuple(metadata.get("kwargs", ()))
        if not ids or len(arguments) != len(ids):
            raise ValueError(
                f"Problem {problem.id} carries no IFBench constraints in its metadata: build it with "
                "trb_trl.evaluation.instruction_following.problem_from_row."
            )
        from if_verifiable.common import get_loose_transformations

        response = final_response(completion)
        variants = [variant for variant in get_loose_transformations(response) if variant.strip()]
        followed, followed_loose, errors = [], [], {}
        for instruction_id, kwargs in zip(ids, arguments):
            checker = _build_checker(self._registry, instruction_id, kwargs, problem.problem, f"Problem {problem.id}")
            try:
                strict = bool(response.strip()) and bool(checker.check_following(response))
                loose = strict or any(bool(checker.check_following(variant)) for variant in variants)
            except LookupError as error:  # NLTK data missing (only reachable with require_nltk_data=False)
                raise RuntimeError(f"IFBench constraint {instruction_id!r}: {_missing_nltk_message(None)}") from error
            except Exception as error:  # a checker that crashes on an odd response: not followed
                strict = loose = False
                errors[instruction_id] = f"{type(error).__name__}: {error}"[:200]
            followed.append(strict)
            followed_loose.append(loose)
        details = {"instruction_id_list": ids, "followed": tuple(followed), "followed_loose": tuple(followed_loose)}
        if errors:
            details["errors"] = errors
        correct = all(followed_loose if self.correct_by == "loose" else followed)
        return Verdict(extracted=response if response.strip() else None, correct=correct, details=details)

    def summary_metrics(self, verdicts: Iterable[Verdict]) -> dict[str, float]:
        """IFBench's four numbers over the graded responses (each sample counts as one response): `prompt_accuracy`
        and `instruction_accuracy` (strict), and their `_loose` variants. Empty when no verdict has IFBench details."""
        prompts = 0
        prompt_hits = {"strict": 0, "loose": 0}
        instructions = 0
        instruction_hits = {"strict": 0, "loose": 0}
        for verdict in verdicts:
            details = getattr(verdict, "details", None) or {}
            if "followed" not in details:
                continue
            strict, loose = details["followed"], details.get("followed_loose", details["followed"])
            prompts += 1
            prompt_hits["strict"] += all(strict)
            prompt_hits["loose"] += all(loose)
            instructions += len(strict)
            instruction_hits["strict"] += sum(strict)
            instruction_hits["loose"] += sum(loose)
        if prompts == 0:
            return {}
        return {
            "prompt_accuracy": prompt_hits["strict"] / prompts,
            "instruction_accuracy": instruction_hits["strict"] / max(instructions, 1),
            "prompt_accuracy_loose": prompt_hits["loose"] / prompts,
            "instruction_accuracy_loose": instruction_hits["loose"] / max(instructions, 1),
        }

    def close(self) -> None:
        """Nothing to release (the checkers run in-process); here for the grader interface."""


def missing_nltk_resources() -> list[str]:
    """The NLTK resources IFBench's checkers need that `nltk.data.find` cannot find."""
    import nltk

    missing = []
    for name, (path, _) in NLTK_RESOURCES.items():
        try:
            nltk.data.find(path)
        except LookupError:
            missing.append(name)
    return missing


def _load_registry() -> Mapping:
    """IFBench's checker classes by constraint id, imported once with NLTK's import-time download switched off."""
    global _registry
    with _registry_lock:
        if _registry is None:
            try:
                import nltk
            except ImportError as error:
                raise ImportError(f"IFBench grading needs if-verifiable and NLTK: {_INSTALL_HINT}") from error
            download = nltk.download
            # if_verifiable.ifbench.instructions_util calls nltk.download() for every missing resource at import,
            # with no time limit (a firewall that drops packets holds it for minutes). The grader checks and
            # downloads on its own terms instead.
            nltk.download = _no_download
            try:
                from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT
            except ImportError as error:
                raise ImportError(f"IFBench grading needs the if-verifiable package: {_INSTALL_HINT}") from error
            finally:
                nltk.download = download
            _registry = INSTRUCTION_DICT
        return _registry


def _build_checker(registry: Mapping, instruction_id: str, kwargs: Mapping, prompt: str, where: str):
    """IFBench's checker for one constraint, built as its `evaluation_lib` builds it."""
    checker_class = registry.get(instruction_id)
    if checker_class is None:
        raise ValueError(
            f"{where}: unknown IFBench constraint {instruction_id!r}; the installed checkers (if-verifiable) know "
            f"{len(registry)} types. Upgrade if-verifiable."
        )
    checker = checker_class(instruction_id)
    try:
        checker.build_description(**thaw(kwargs))  # plain lists and dicts, as IFBench's loader gives them
        arguments = checker.get_instruction_args()
        if arguments and "prompt" in arguments:
            checker.build_description(prompt=prompt)
    except Exception as error:
        raise ValueError(
            f"{where}: IFBench constraint {instruction_id!r} rejects its arguments {thaw(kwargs)!r} "
            f"({type(error).__name__}: {error})."
        ) from error
    return checker


def _no_download(*args, **kwargs) -> bool:
    return False


def _should_download(download_nltk_data: bool | None) -> bool:
    if download_nltk_data is not None:
        return download_nltk_data
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return not any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in offline)


def _download_nltk_resources(names: list[str]) -> None:
    """Download into NLTK's default folder in a child process, killed after `NLTK_DOWNLOAD_TIMEOUT_SECONDS`."""
    script = "import sys, nltk\nfor name in sys.argv[1:]:\n    nltk.download(name, quiet=True, raise_on_error=False)\n"
    try:
        subprocess.run(
            [sys.executable, "-c", script, *names],
            timeout=NLTK_DOWNLOAD_TIMEOUT_SECONDS,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pass  # the caller finds the data still missing and says so


def _missing_nltk_message(missing: list[str] | None) -> str:
    names = missing or list(NLTK_RESOURCES)
    users = sorted({user for name in names for user in NLTK_RESOURCES[name][1]})
    return (
        f"IFBench's checkers need NLTK data that is not installed: {', '.join(names)} (used by {', '.join(users)}). "
        f"Install it once where there is network access: python -m nltk.downloader {' '.join(names)}  "
        "(or copy an nltk_data folder here and point NLTK_DATA at it). No package on PyPI ships this data."
    )


def final_response(completion) -> str:
    """The answer part of a completion: the text after the last `</think>` (stripped), `""` when a `<think>` block
    opens and never closes, otherwise the completion unchanged (whitespace matters to some checkers)."""
    if not isinstance(completion, str):
        return ""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1].strip()
    if completion.lstrip().startswith("<think>"):
        return ""
    return completion
