"""LiveCodeBench rows and the code-execution grader: real programs in real child processes, on tiny local problems.

Every test here runs offline; the slow ones are the two timeouts (about a second each, `timeout_seconds=1`).
"""

import base64
import dataclasses
import json
import os
import pickle
import time
import zlib
from datetime import datetime

import pytest

from trb_trl.evaluation.code_execution import (
    FAILURES,
    V6_END,
    V6_START,
    CodeExecutionGrader,
    decode_private_tests,
    extract_code,
    in_v6_window,
    in_window,
    lcb_prompt,
    outputs_match,
    problem_from_row,
)


pytestmark = pytest.mark.skipif(os.name != "posix", reason="code execution grading needs POSIX")


def encode(tests) -> str:
    """LiveCodeBench's private-test encoding: base64(zlib(pickle(json text)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def stdin_test(given: str, expected: str) -> dict:
    return {"input": given, "output": expected, "testtype": "stdin"}


def stdin_row(**overrides) -> dict:
    row = {
        "question_title": "A+B",
        "question_content": "Read two integers A and B and print A+B.",
        "platform": "atcoder",
        "question_id": "abc000_a",
        "contest_id": "abc000",
        "contest_date": "2025-03-01T00:00:00",
        "starter_code": "",
        "difficulty": "easy",
        "public_test_cases": json.dumps([stdin_test("1 2\n", "3\n")]),
        "private_test_cases": encode([stdin_test("5 7\n", "12\n"), stdin_test("0 0\n", "0")]),
        "metadata": "{}",
    }
    return {**row, **overrides}


def functional_row(**overrides) -> dict:
    tests = [
        {"input": "[2,7,11,15]\n9", "output": "[0, 1]", "testtype": "functional"},
        {"input": "[3,2,4]\n6", "output": "[1, 2]", "testtype": "functional"},
    ]
    row = {
        "question_title": "Two Sum",
        "question_content": "Return the indices of the two numbers that add up to target.",
        "platform": "leetcode",
        "question_id": "1",
        "contest_id": "weekly-contest-0",
        "contest_date": "2025-02-15T00:00:00",
        "starter_code": "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        ",
        "difficulty": "easy",
        "public_test_cases": json.dumps(tests[:1]),
        "private_test_cases": encode(tests[1:]),
        "metadata": json.dumps({"func_name": "twoSum"}),
    }
    return {**row, **overrides}


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


@pytest.fixture(scope="module")
def grader():
    grader = CodeExecutionGrader(
        allow_code_execution=True, timeout_seconds=1.0, memory_mb=512, output_limit_mb=1, max_workers=2
    )
    yield grader
    grader.close()


@pytest.fixture(scope="module")
def stdin_problem():
    return problem_from_row(stdin_row(), "abc000_a", None)


@pytest.fixture(scope="module")
def functional_problem():
    return problem_from_row(functional_row(), "1", None)


SUM = "a, b = map(int, input().split())\nprint(a + b)"
TWO_SUM = """
class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return (seen[target - x], i)  # a tuple counts as the list
            seen[x] = i
"""


# --- problems -------------------------------------------------------------------------------------------------------


def test_stdin_row_becomes_lcb_prompt_and_tests(stdin_problem):
    assert stdin_problem.problem == lcb_prompt(stdin_row()["question_content"])
    assert "Read the inputs from stdin" in stdin_problem.problem and "```python\n# YOUR CODE HERE\n```" in (
        stdin_problem.problem
    )
    metadata = stdin_problem.metadata
    assert metadata["fn_name"] is None and metadata["num_tests"] == 3
    assert metadata["public_tests"] == (("1 2\n", "3\n"),)
    assert decode_private_tests(metadata["private_tests"]) == (("5 7\n", "12\n"), ("0 0\n", "0"))
    assert stdin_problem.answer == "3 tests (stdin)"
    assert metadata["contest_date"] == "2025-03-01T00:00:00" and metadata["platform"] == "atcoder"


def test_functional_row_shows_starter_code(functional_problem):
    assert "```python\nclass Solution:\n    def twoSum" in functional_problem.problem
    assert "starter code" in functional_problem.problem and "stdin" not in functional_problem.problem
    assert functional_problem.metadata["fn_name"] == "twoSum"
    assert functional_problem.answer == "2 tests (functional twoSum)"


def test_plain_json_private_tests_and_missing_optional_columns():
    row = stdin_row(private_test_cases=json.dumps([stdin_test("2 2\n", "4\n")]))
    assert problem_from_row(row, "p", None).metadata["num_tests"] == 2
    local = {"question_content": "Print 1.", "public_test_cases": json.dumps([stdin_test("", "1\n")])}
    problem = problem_from_row(local, "p", None)
    assert problem.metadata["num_tests"] == 1 and problem.metadata["fn_name"] is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({k: v for k, v in stdin_row().items() if k != "question_content"}, "no 'question_content' column"),
        ({k: v for k, v in stdin_row().items() if k != "public_test_cases"}, "no 'public_test_cases' column"),
        (stdin_row(question_content="  "), "no problem statement"),
        (stdin_row(private_test_cases="not base64 at all!"), "private_test_cases cannot be decoded"),
        (stdin_row(private_test_cases=base64.b64encode(b"not zlib").decode()), "private_test_cases cannot be decoded"),
        (stdin_row(public_test_cases="[{]"), "public_test_cases is not a JSON list"),
        (stdin_row(metadata="{not json"), "'metadata' column is not JSON"),
        (stdin_row(public_test_cases="[]", private_test_cases=""), "no tests"),
        (stdin_row(private_test_cases=["not", "a", "string"]), "expected a string"),
        (stdin_row(contest_date="last spring"), "contest_date is not a date"),
        (functional_row(public_test_cases=json.dumps([{"input": "[1,", "output": "1"}])), "not JSON"),
    ],
)
def test_bad_rows_are_named(row, message):
    with pytest.raises(ValueError, match=message):
        problem_from_row(row, "p7", None)


class _RunsCode:
    def __reduce__(self):
        return (os.getpid, ())  # harmless, but a global: loading it would call it


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (pickle.dumps(_RunsCode()), "refusing to load"),
        (pickle.dumps([stdin_test("1", "1")]), "holds a list"),
        (pickle.dumps("not json"), "not a JSON list of tests"),
    ],
)
def test_private_tests_unpickle_strings_only(payload, message):
    raw = base64.b64encode(zlib.compress(payload)).decode()
    with pytest.raises(ValueError, match=message):
        decode_private_tests(raw)


def test_v6_window():
    assert (V6_START, V6_END) == (datetime(2025, 2, 1), datetime(2025, 5, 1))
    assert in_v6_window({"contest_date": "2025-02-01T00:00:00"})
    assert in_v6_window({"contest_date": "2025-05-01T00:00:00"})  # inclusive, as LiveCodeBench compares
    assert in_v6_window({"contest_date": datetime(2025, 3, 9, 12)})  # a timestamp column, once parsed
    assert not in_v6_window({"contest_date": "2025-01-31T23:59:59"})
    assert not in_v6_window({"contest_date": "2025-05-01T00:00:01"})
    assert in_window({"contest_date": "2024-08-05T00:00:00"}, datetime(2024, 8, 1), None)


def test_loaded_through_the_registry_spec():
    from datasets import Dataset

    from trb_trl.evaluation.benchmarks import TROPD_BENCHMARKS, benchmark_from_dataset

    spec = TROPD_BENCHMARKS["livecodebench_v6"]
    benchmark = benchmark_from_dataset(Dataset.from_list([stdin_row(), functional_row()]), spec)
    assert [problem.id for problem in benchmark.problems] == ["abc000_a", "1"]
    assert benchmark.problems[1].metadata["fn_name"] == "twoSum"


# --- extraction and comparison --------------------------------------------------------------------------------------


def test_extract_code_takes_the_last_python_block_of_the_answer():
    text = "```python\nfirst\n```\nthen\n```\nuntagged\n```\n```py\nlast\n```\nbye"
    assert extract_code(text) == "last"
    assert extract_code("```\nonly untagged\n```") == "only untagged"
    assert extract_code("```text\nnot code\n```") is None
    assert extract_code("<think>```python\ndraft\n```</think>\n```python\nfinal\n```") == "final"
    assert extract_code("<think>```python\ndraft\n```") is None  # thinking never ended: no answer
    assert extract_code("no fences") is None and extract_code(None) is None


def test_outputs_match_as_livecodebench_compares():
    assert outputs_match("3\n", "3")
    assert outputs_match("  1 2  \n3   \n\n", "1 2\n3")
    assert outputs_match("0.50\n", "0.5\n")  # decimals compared as numbers
    assert outputs_match("1e3", "1000")
    assert not outputs_match("1 2", "1  3")
    assert not outputs_match("1\n2", "1 2")
    assert not outputs_match("yes", "Yes")


# --- grading --------------------------------------------------------------------------------------------------------


def test_code_execution_is_opt_in():
    with pytest.raises(ValueError, match="--allow-code-execution"):
        CodeExecutionGrader()
    with pytest.raises(ValueError, match="--allow-code-execution"):
        CodeExecutionGrader(allow_code_execution=False)


def test_correct_stdin_program(grader, stdin_problem):
    verdict = grader.check(stdin_problem, fenced(SUM))
    assert verdict.correct and verdict.extracted == SUM
    assert dict(verdict.details) == {"passed": 3, "total": 3, "failure": None, "message": None}


def test_correct_functional_program(grader, functional_problem):
    verdict = grader.check(functional_problem, fenced(TWO_SUM))
    assert verdict.correct, verdict.details
    assert verdict.details["passed"] == 2


def test_lcb_preamble_and_exit_are_allowed(grader, stdin_problem):
    # No imports (LiveCodeBench's preamble provides sys), the input read through open(0), exit() at the end.
    program = "a, b = map(int, open(0).read().split())\nsys.stdout.write(f'{a + b}\\n')\nexit(1)"
    assert grader.check(stdin_problem, fenced(program)).correct


@pytest.mark.parametrize(
    ("program", "failure", "passed", "message"),
    [
        ("print(3)", "wrong answer", 1, "test 2/3: expected 12, got 3"),
        ("raise RuntimeError('boom')", "runtime error", 0, "RuntimeError: boom"),
        ("input()\ninput()", "runtime error", 0, "EOFError"),  # reads a line the test does not give
        ("def f(:\n    pass", "compile error", 0, "SyntaxError"),
        ("while True:\n    print('x' * 1000)", "output limit", 0, "1 MiB"),
        ("blob = bytearray(2 * 1024 ** 3)\nprint(len(blob))", "memory", 0, "MemoryError"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 80))", "runtime error", 0, "network access"),
        ("import urllib.request\nurllib.request.urlopen('http://example.com')", "runtime error", 0, "network"),
        ("import os\nos.fork()", "runtime error", 0, "os.fork is disabled"),
        ("import subprocess\nsubprocess.run(['true'])", "runtime error", 0, "subprocess is disabled"),
        ("import os\nos.system('true')", "runtime error", 0, "os.system is disabled"),
        ("import shutil\nshutil.rmtree('/tmp')", "runtime error", 0, "shutil.rmtree is disabled"),
    ],
)
def test_failures_are_named(grader, stdin_problem, program, failure, passed, message):
    verdict = grader.check(stdin_problem, fenced(program))
    assert not verdict.correct
    assert (verdict.details["failure"], verdict.details["passed"]) == (failure, passed), verdict.details
    assert message in verdict.details["message"]
    assert verdict.details["failure"] in FAILURES


def test_writes_outside_the_scratch_directory_are_refused(grader, stdin_problem, tmp_path):
    target = tmp_path / "written_by_the_model.txt"
    for program in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
    ):
        verdict = grader.check(stdin_problem, fenced(program + "\n" + SUM))
        assert verdict.details["failure"] == "runtime error", verdict.details
        assert "outside the scratch directory" in verdict.details["message"]
    assert not target.exists()
    # Inside its own directory (the cwd, also HOME and TMPDIR) a program may write.
    scratch = "import os, tempfile\nopen('notes.txt', 'w').write('x')\ntempfile.NamedTemporaryFile(dir=os.environ['TMPDIR'])\n"
    assert grader.check(stdin_problem, fenced(scratch + SUM)).correct


def test_infinite_loops_time_out(grader, stdin_problem, functional_problem):
    started = time.monotonic()
    verdict = grader.check(stdin_problem, fenced("while True:\n    pass"))
    assert verdict.details["failure"] == "timeout" and time.monotonic() - started < 5
    looping = "class Solution:\n    def twoSum(self, nums, target):\n        while True:\n            pass"
    started = time.monotonic()
    verdict = grader.check(functional_problem, fenced(looping))
    assert verdict.details["failure"] == "timeout" and time.monotonic() - started < 5
    # The timer cannot be switched off from inside.
    verdict = grader.check(stdin_problem, fenced("import signal\nsignal.setitimer(signal.ITIMER_REAL, 0)\n" + SUM))
    assert verdict.details["failure"] == "runtime error" and "disabled" in verdict.details["message"]


def test_functional_failures(grader, functional_problem):
    wrong = "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 0]"
    verdict = grader.check(functional_problem, fenced(wrong))
    assert (verdict.details["failure"], verdict.details["passed"]) == ("wrong answer", 0)
    missing = "class Solution:\n    def other(self):\n        return 1"
    verdict = grader.check(functional_problem, fenced(missing))
    assert verdict.details["failure"] == "runtime error" and "twoSum" in verdict.details["message"]


def test_no_code_block(grader, stdin_problem):
    verdict = grader.check(stdin_problem, "The answer is a + b.")
    assert verdict.extracted is None and not verdict.correct
    assert dict(verdict.details) == {
        "passed": 0,
        "total": 3,
        "failure": "no code",
        "message": "no fenced code block in the answer",
    }


def test_check_many_keeps_order_and_summary_metrics(grader, stdin_problem, functional_problem):
    pairs = [
        (stdin_problem, fenced(SUM)),
        (functional_problem, fenced(TWO_SUM)),
        (stdin_problem, "no code"),
        (stdin_problem, fenced("print(3)")),
    ]
    verdicts = grader.check_many(pairs)
    assert [v.correct for v in verdicts] == [True, True, False, False]
    assert [v.details["failure"] for v in verdicts] == [None, None, "no code", "wrong answer"]
    metrics = grader.summary_metrics(verdicts)
    assert metrics == pytest.approx(
        {"tests_passed_before_failure": (1 + 1 + 0 + 1 / 3) / 4, "failed/no code": 0.25, "failed/wrong answer": 0.25}
    )
    assert grader.summary_metrics([]) == {}


def test_problem_without_tests_is_an_error(grader):
    from trb_trl.evaluation.benchmarks import Problem

    with pytest.raises(ValueError, match="problem_from_row"):
        grader.check(Problem("x", "p", "a"), fenced(SUM))


def test_the_registry_entry_keeps_the_v6_window_and_a_local_file_every_row():
    from datasets import Dataset

    from trb_trl.evaluation.benchmarks import REGISTRY
    from trb_trl.evaluation.code_execution import rows_to_score

    dates = ["2025-01-31T00:00:00", "2025-02-01T00:00:00", "2025-04-30T12:00:00", "2025-05-02T00:00:00"]
    dataset = Dataset.from_list([{"contest_date": date, "question_content": "q"} for date in dates])
    assert rows_to_score(dataset, REGISTRY["livecodebench_v6"]) == [1, 2]
    local = dataclasses.replace(REGISTRY["livecodebench_v6"], name="my_problems")
    assert rows_to_score(dataset, local) == [0, 1, 2, 3]
