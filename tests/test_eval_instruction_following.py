"""IFBench rows and the instruction-following grader, on tiny local rows with real IFBench constraint ids.

Offline and deterministic: the constraints used here need no NLTK data (CI has none; no package on PyPI ships it),
and the tests that concern NLTK data point NLTK at an empty folder.
"""

import subprocess

import pytest


pytest.importorskip("if_verifiable", reason="IFBench grading needs the ifbench extra (if-verifiable)")

from trb_trl.evaluation import instruction_following  # noqa: E402
from trb_trl.evaluation.grading import Verdict  # noqa: E402
from trb_trl.evaluation.instruction_following import (  # noqa: E402
    InstructionFollowingGrader,
    final_response,
    problem_from_row,
)


KEYWORDS = {"keyword1": "alpha", "keyword2": "beta", "keyword3": "gamma", "keyword4": "delta", "keyword5": "omega"}
NLTK_NAMES = ["punkt_tab", "averaged_perceptron_tagger_eng", "stopwords"]
FOLLOWS_KEYWORDS = "alpha " + "beta " * 2 + "gamma " * 3 + "delta " * 5 + "omega " * 7


class _Spec:
    dataset = "allenai/IFBench_test"
    problem_column = "prompt"


def row(ids, kwargs, prompt="Write about the sea."):
    return {"key": "7", "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}


def problem(ids, kwargs, prompt="Write about the sea."):
    return problem_from_row(row(ids, kwargs, prompt), "7", _Spec)


@pytest.fixture(scope="module")
def grader():
    grader = InstructionFollowingGrader(require_nltk_data=False, download_nltk_data=False)
    yield grader
    grader.close()


@pytest.fixture
def no_nltk_data(monkeypatch, tmp_path):
    """NLTK looks only in an empty folder, whatever this machine has installed."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    punkt = getattr(nltk.tokenize, "_get_punkt_tokenizer", None)
    if punkt is not None and hasattr(punkt, "cache_clear"):
        punkt.cache_clear()
    yield
    if punkt is not None and hasattr(punkt, "cache_clear"):
        punkt.cache_clear()


# --- problems -------------------------------------------------------------------------------------------------------


def test_row_becomes_problem_with_constraints():
    # As the Hub rows come: every argument name present, the unused ones null (and floats where ints are meant).
    kwargs = [{**dict.fromkeys(["N", "keyword", "options"]), **KEYWORDS}, {"N": 3.0, "keyword": None}]
    made = problem(["count:keywords_multiple", "count:numbers"], kwargs, prompt="Tell me a story.")
    assert made.problem == "Tell me a story." and made.id == "7"
    assert made.answer == "count:keywords_multiple, count:numbers"
    assert made.metadata["instruction_id_list"] == ("count:keywords_multiple", "count:numbers")
    assert [dict(arguments) for arguments in made.metadata["kwargs"]] == [KEYWORDS, {"N": 3.0}]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": "p", "instruction_id_list": ["format:no_whitespace"]}, "no 'kwargs' column"),
        ({"prompt": "p", "kwargs": [{}]}, "no 'instruction_id_list' column"),
        (row(["format:no_whitespace"], [{}], prompt=" "), "no prompt text"),
        (row([], []), "non-empty list"),
        (row(["format:no_whitespace", "count:numbers"], [{}]), "one entry per constraint"),
        (row(["format:no_such_constraint"], [{}]), "unknown IFBench constraint 'format:no_such_constraint'"),
        (row(["repeat:repeat_change"], [{}]), "rejects its arguments"),  # needs prompt_to_repeat
    ],
)
def test_bad_rows_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        problem_from_row(bad, "7", _Spec)


def test_loaded_through_the_registry_spec():
    from datasets import Dataset

    from trb_trl.evaluation.benchmarks import TROPD_BENCHMARKS, benchmark_from_dataset

    rows = [
        {"key": "0", "prompt": "A", "instruction_id_list": ["count:numbers"], "kwargs": [{"N": 2}]},
        {"key": "1", "prompt": "B", "instruction_id_list": ["count:keywords_multiple"], "kwargs": [KEYWORDS]},
    ]
    benchmark = benchmark_from_dataset(Dataset.from_list(rows), TROPD_BENCHMARKS["ifbench"])
    assert [p.id for p in benchmark.problems] == ["0", "1"]
    assert dict(benchmark.problems[0].metadata["kwargs"][0]) == {"N": 2}  # the other struct fields were null


# --- grading --------------------------------------------------------------------------------------------------------


def test_followed_and_not_followed(grader):
    keywords = problem(["count:keywords_multiple"], [KEYWORDS])
    verdict = grader.check(keywords, FOLLOWS_KEYWORDS)
    assert verdict.correct and verdict.extracted == FOLLOWS_KEYWORDS
    assert verdict.details["followed"] == (True,) and verdict.details["followed_loose"] == (True,)
    verdict = grader.check(keywords, FOLLOWS_KEYWORDS + " alpha")  # alpha twice: not once
    assert not verdict.correct and verdict.details["followed"] == (False,)


def test_every_constraint_must_be_followed(grader):
    both = problem(["count:keywords_multiple", "count:numbers"], [KEYWORDS, {"N": 2}])
    verdicts = [
        grader.check(both, FOLLOWS_KEYWORDS + " 1 and 2"),  # both followed
        grader.check(both, FOLLOWS_KEYWORDS + " 1 and 2 and 3"),  # three numbers, not two
    ]
    assert [v.correct for v in verdicts] == [True, False]
    assert verdicts[1].details["followed"] == (True, False)
    assert verdicts[1].details["instruction_id_list"] == ("count:keywords_multiple", "count:numbers")
    assert grader.summary_metrics(verdicts) == {
        "prompt_accuracy": 0.5,
        "instruction_accuracy": 0.75,
        "prompt_accuracy_loose": 0.5,
        "instruction_accuracy_loose": 0.75,
    }


def test_loose_grading_forgives_a_first_line_and_markdown(grader):
    no_space = problem(["format:no_whitespace"], [{}])
    verdict = grader.check(no_space, "Sure, here it is:\nOneLongWord")
    assert not verdict.correct
    assert verdict.details["followed"] == (False,) and verdict.details["followed_loose"] == (True,)
    loose = InstructionFollowingGrader(correct_by="loose", require_nltk_data=False, download_nltk_data=False)
    assert loose.check(no_space, "Sure, here it is:\nOneLongWord").correct
    metrics = grader.summary_metrics([verdict])
    assert (metrics["prompt_accuracy"], metrics["prompt_accuracy_loose"]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="correct_by"):
        InstructionFollowingGrader(correct_by="lenient", require_nltk_data=False)


def test_reasoning_is_removed_before_grading(grader):
    no_space = problem(["format:no_whitespace"], [{}])
    verdict = grader.check(no_space, "<think>\nLet me think about spaces.\n</think>\n\nOneLongWord")
    assert verdict.correct and verdict.extracted == "OneLongWord"
    unfinished = grader.check(no_space, "<think>\nStill thinking when the tokens ran out")
    assert not unfinished.correct and unfinished.extracted is None
    assert unfinished.details["followed_loose"] == (False,)
    assert not grader.check(no_space, "").correct
    assert final_response("  keep my whitespace \n") == "  keep my whitespace \n"
    assert final_response(None) == ""


def test_summary_metrics_skips_other_verdicts(grader):
    assert grader.summary_metrics([]) == {}
    assert grader.summary_metrics([Verdict("5", True)]) == {}
    # After a restart the details come back from samples.jsonl as JSON lists.
    restored = Verdict(None, False, {"followed": [True, False], "followed_loose": [True, True]})
    assert grader.summary_metrics([restored])["instruction_accuracy_loose"] == 1.0


def test_problem_without_constraints_is_an_error(grader):
    from trb_trl.evaluation.benchmarks import Problem

    with pytest.raises(ValueError, match="problem_from_row"):
        grader.check(Problem("x", "p", "a"), "text")


# --- NLTK data ------------------------------------------------------------------------------------------------------


def test_missing_nltk_data_is_a_clear_error_without_a_download_offline(monkeypatch, no_nltk_data):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_subprocess(*args, **kwargs):
        raise AssertionError("no download may be attempted offline")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert instruction_following.missing_nltk_resources() == NLTK_NAMES
    with pytest.raises(RuntimeError, match="python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng"):
        InstructionFollowingGrader()


def test_download_is_tried_once_and_bounded(monkeypatch, no_nltk_data):
    calls = []

    def timed_out(command, timeout, **kwargs):
        calls.append((command[-3:], timeout))
        raise subprocess.TimeoutExpired(command, timeout)

    monkeypatch.setattr(subprocess, "run", timed_out)
    with pytest.raises(RuntimeError, match="not installed: punkt_tab"):
        InstructionFollowingGrader(download_nltk_data=True)
    assert calls == [(NLTK_NAMES, instruction_following.NLTK_DOWNLOAD_TIMEOUT_SECONDS)]


def test_constraint_needing_missing_data_says_what_to_install(grader, no_nltk_data):
    title_case = problem(["format:title_case"], [{}])  # NLTK's punkt_tab tokenizer
    with pytest.raises(RuntimeError, match="format:title_case.*nltk.downloader"):
        grader.check(title_case, "This Is A Title")


def test_checkers_are_imported_without_nltk_downloads(monkeypatch, no_nltk_data):
    """if-verifiable calls nltk.download() for each missing resource on import; the grader switches that off."""
    import sys

    import nltk

    attempts = []
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: attempts.append(args))
    for name in [name for name in sys.modules if name.startswith("if_verifiable.ifbench")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(instruction_following, "_registry", None)
    registry = instruction_following._load_registry()
    assert "count:keywords_multiple" in registry and len(registry) == 58
    assert attempts == []
    assert nltk.download is not instruction_following._no_download  # put back afterwards
