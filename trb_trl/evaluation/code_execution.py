"""LiveCodeBench code generation (livecodebench/code_generation_lite): problems, prompts, and grading by running the
model's program against the tests.

**Problems.** A row holds the statement (`question_content`), LeetCode's `starter_code` (empty for AtCoder and
Codeforces), `public_test_cases` (a JSON list of `{"input", "output", "testtype"}`), `private_test_cases` (the same
list, compressed: base64 of zlib of a pickle of the JSON text), `metadata` (JSON; `func_name` for LeetCode's functional
problems) and `contest_date`. `problem_from_row` renders LiveCodeBench's generic prompt and keeps the tests in
`Problem.metadata`; the private tests stay compressed there and are decoded when graded (a few megabytes per problem
decoded). They are unpickled with an unpickler that refuses every global, and the result must be a string: LCB's own
loader calls `pickle.loads` on downloaded data, which can run arbitrary code; this one cannot.

**The v6 window.** LiveCodeBench v6 as papers report it is `release_v6` restricted to problems dated
`V6_START` <= contest_date <= `V6_END` (2025-02-01 to 2025-05-01, LCB's own inclusive comparison); TrOPD does not give
its window, so this is a choice (`in_v6_window`). Its LCBv6 scores are all multiples of 1/175, the size usually
reported for this window.

**Grading.** The program is the last fenced code block tagged python (else the last untagged one) of the answer (the
text after the last `</think>`). LiveCodeBench's rules: its import preamble runs first (so `List`, `defaultdict`,
`sys`, ... need no import); stdin problems compare the output with the expected one line by line, each line stripped,
after stripping the whole; a line that differs as text may still match as a list of decimals; functional problems call
`Solution().<func_name>(*args)` with one JSON argument per input line and compare with `==` (a tuple counts as a
list). Tests run in order, public then private, and grading stops at the first failure; the answer is correct only if
every test passes. `timeout_seconds` (LCB: 6) bounds each test.

**Execution.** Each stdin test runs the program in a fresh `python -I` process (functional problems: one process for
all tests, as LCB calls one `Solution` instance), in a new scratch directory that is its cwd, HOME and TMPDIR, with an
almost empty environment, in its own process group (killed whole at the end), under rlimits (address space
`memory_mb`, CPU time, output and file size `output_limit_mb`, processes where not root, no core files), with guards
against network access, process creation and writes outside the scratch directory (`code_execution_child`). These
guard against accidents; they are **not a security sandbox**. Model-written code runs on your machine with your
user's rights: `CodeExecutionGrader` refuses to start unless `allow_code_execution=True` (`--allow-code-execution`),
and the place for untrusted models is a container or VM without network and secrets. POSIX only (Linux, macOS).

Standard library only.
"""

import base64
import binascii
import functools
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

from trb_trl.evaluation.benchmarks import Problem
from trb_trl.evaluation.grading import Verdict


V6_START = datetime(2025, 2, 1)
V6_END = datetime(2025, 5, 1)

# LiveCodeBench's generic system message and prompt (lcb_runner/prompts/code_generation.py).
SYSTEM_PROMPT = (
    "You are an expert Python programmer. You will be given a question (problem specification) and will generate a "
    "correct Python program that matches the specification and passes all tests."
)
_FORMAT_WITH_STARTER_CODE = (
    "You will use the following starter code to write the solution to the problem and enclose your code within "
    "delimiters."
)
_FORMAT_STDIN = (
    "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test on the sample "
    "inputs). Enclose your code within delimiters as follows. Ensure that when the python program runs, it reads the "
    "inputs, runs the algorithm and writes output to STDOUT."
)

FAILURES = ("no code", "compile error", "wrong answer", "runtime error", "timeout", "memory", "output limit")
# Hub rows have all of these; a local file needs only the first two (no private tests, no starter code: stdin).
_COLUMNS = ("question_content", "public_test_cases", "private_test_cases", "starter_code", "metadata")
_REQUIRED_COLUMNS = _COLUMNS[:2]
_MAX_DECODED_BYTES = 1 << 30  # a private-test payload that inflates past 1 GiB is refused, not decoded
_CHILD = Path(__file__).with_name("code_execution_child.py")
_EXIT_MEMORY, _EXIT_COMPILE = 3, 4  # code_execution_child's exit codes
_STARTUP_SECONDS = 10.0  # the parent's wall-clock allowance past the child's own alarm (a backstop only)
_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*$", re.MULTILINE)


def contest_date(row: Mapping) -> datetime:
    """The row's `contest_date` as a naive datetime (the column is an ISO string, or a timestamp once parsed)."""
    value = row["contest_date"]
    if isinstance(value, str):
        value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    elif isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise ValueError(f"contest_date {value!r} is not a date.")
    return value.replace(tzinfo=None)


def in_window(row: Mapping, start: datetime | None = V6_START, end: datetime | None = V6_END) -> bool:
    """`start <= contest_date <= end` (either bound may be None), as LiveCodeBench filters by date."""
    when = contest_date(row)
    return (start is None or start <= when) and (end is None or when <= end)


def in_v6_window(row: Mapping) -> bool:
    """Whether a `release_v6` row belongs to LiveCodeBench v6 as reported: dated 2025-02-01 to 2025-05-01."""
    return in_window(row, V6_START, V6_END)


def rows_to_score(dataset, spec) -> list[int]:
    """The rows a code benchmark scores: for the registry's `livecodebench_v6`, those dated in the v6 window (the
    release file may carry problems outside it); every row of a local file (which has its own selection)."""
    if spec.name != "livecodebench_v6" or "contest_date" not in dataset.column_names:
        return list(range(len(dataset)))
    return [index for index, row in enumerate(dataset) if in_v6_window(row)]


def lcb_prompt(question_content: str, starter_code: str = "") -> str:
    """LiveCodeBench's generic code-generation prompt (`get_generic_question_template_answer`)."""
    prompt = f"### Question:\n{question_content}\n\n"
    if starter_code:
        prompt += f"### Format: {_FORMAT_WITH_STARTER_CODE}\n```python\n{starter_code}\n```\n\n"
    else:
        prompt += f"### Format: {_FORMAT_STDIN}\n```python\n# YOUR CODE HERE\n```\n\n"
    return prompt + "### Answer: (use the provided format with backticks)\n\n"


def problem_from_row(row: Mapping, problem_id: str, spec) -> Problem:
    """One `code_generation_lite` row as a `Problem`: LiveCodeBench's prompt as the problem text, a one-line summary
    of the tests as `answer`, and in `metadata` what grading needs: `fn_name` (None for stdin problems),
    `public_tests` (pairs of input and output text), `private_tests` (still compressed), `num_tests`, plus
    `question_id`, `platform`, `difficulty`, `contest_date`. A missing column, no statement, tests that cannot be
    decoded, or functional tests that are not JSON are a `ValueError` that says which."""
    where = f"{getattr(spec, 'dataset', 'LiveCodeBench')}, problem {problem_id}"
    for column in _REQUIRED_COLUMNS:
        if column not in row:
            raise ValueError(f"{where}: no {column!r} column (code_generation_lite rows have {', '.join(_COLUMNS)}).")
    question = row["question_content"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: the 'question_content' column holds no problem statement ({question!r}).")
    starter_code = row.get("starter_code") or ""
    metadata = _json_object(row.get("metadata"), where)
    fn_name = metadata.get("func_name") or None
    try:
        public = _test_pairs(json.loads(row["public_test_cases"] or "[]"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: public_test_cases is not a JSON list of tests ({error}).") from error
    private_raw = row.get("private_test_cases") or ""
    try:
        private = decode_private_tests(private_raw)
    except ValueError as error:
        raise ValueError(f"{where}: private_test_cases cannot be decoded ({error}).") from error
    tests = public + private
    if not tests:
        raise ValueError(f"{where}: no tests to grade with.")
    if fn_name is not None:
        for test_input, test_output in tests:
            try:
                [json.loads(line) for line in test_input.split("\n")]
                json.loads(test_output)
            except ValueError as error:
                raise ValueError(f"{where}: a functional test is not JSON ({error}): {test_input[:80]!r}") from error
    info = {
        "fn_name": fn_name,
        "public_tests": public,
        "private_tests": private_raw,
        "num_tests": len(tests),
        "question_id": str(row.get("question_id", problem_id)),
        "question_title": str(row.get("question_title") or ""),
        "platform": str(row.get("platform") or ""),
        "difficulty": str(row.get("difficulty") or ""),
        "contest_date": _date_text(row, where),
    }
    kind = f"functional {fn_name}" if fn_name else "stdin"
    return Problem(
        id=problem_id,
        problem=lcb_prompt(question, starter_code),
        answer=f"{len(tests)} tests ({kind})",
        metadata=info,  # frozen by Problem
    )


def decode_private_tests(raw: str) -> tuple[tuple[str, str], ...]:
    """LiveCodeBench's private tests as (input, output) pairs: plain JSON, or base64 -> zlib -> pickle -> JSON. The
    pickle may only hold a string (no globals, so no code runs); anything else is a `ValueError`. The last few
    decoded are cached (a problem's samples are graded one after another)."""
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {type(raw).__name__}")
    return _decode_private_tests(raw)


@functools.lru_cache(maxsize=4)
def _decode_private_tests(raw: str) -> tuple[tuple[str, str], ...]:
    if not raw.strip():
        return ()
    try:
        return _test_pairs(json.loads(raw))
    except ValueError:
        pass
    try:
        compressed = base64.b64decode(raw.encode("ascii"), validate=True)
        inflater = zlib.decompressobj()
        payload = inflater.decompress(compressed, _MAX_DECODED_BYTES)
        if inflater.unconsumed_tail:
            raise ValueError(f"it inflates past {_MAX_DECODED_BYTES} bytes")
    except (binascii.Error, UnicodeEncodeError, zlib.error) as error:
        raise ValueError(f"neither JSON nor base64/zlib data: {error}") from error
    try:
        text = _StringOnlyUnpickler(io.BytesIO(payload)).load()
    except Exception as error:
        raise ValueError(f"not a pickled string: {error}") from error
    if not isinstance(text, str):
        raise ValueError(f"the pickle holds a {type(text).__name__}, not the JSON text of the tests")
    try:
        return _test_pairs(json.loads(text))
    except (TypeError, ValueError) as error:
        raise ValueError(f"the decoded text is not a JSON list of tests: {error}") from error


class _StringOnlyUnpickler(pickle.Unpickler):
    """Loads plain data only: any global (class, function) in the stream is refused, so loading runs no code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from test data")


def _test_pairs(tests) -> tuple[tuple[str, str], ...]:
    if not isinstance(tests, list):
        raise ValueError(f"expected a list of tests, got {type(tests).__name__}")
    pairs = []
    for test in tests:
        if not isinstance(test, Mapping) or not isinstance(test.get("input"), str):
            raise ValueError(f"a test without input text: {str(test)[:80]}")
        if not isinstance(test.get("output"), str):
            raise ValueError(f"a test without output text: {str(test)[:80]}")
        pairs.append((test["input"], test["output"]))
    return tuple(pairs)


def _date_text(row: Mapping, where: str) -> str:
    if not row.get("contest_date"):
        return ""
    try:
        return contest_date(row).isoformat()
    except ValueError as error:
        raise ValueError(f"{where}: contest_date is not a date ({error}).") from error


def _json_object(value, where: str) -> dict:
    if isinstance(value, Mapping):
        return dict(value)
    try:
        parsed = json.loads(value or "{}")
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: the 'metadata' column is not JSON ({error}).") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"{where}: the 'metadata' column is not a JSON object: {value!r}.")
    return parsed


def extract_code(completion) -> str | None:
    """The program in a completion: the last fenced block tagged python (py, python3), else the last untagged
    fenced block, of the text after the last `</think>`; None when there is none (or the thinking never ended)."""
    if not isinstance(completion, str):
        return None
    if "</think>" in completion:
        completion = completion.rsplit("</think>", 1)[1]
    elif completion.lstrip().startswith("<think>"):
        return None
    blocks: list[tuple[str, str]] = []
    fences = list(_FENCE.finditer(completion))
    index = 0
    while index + 1 < len(fences):
        opening, closing = fences[index], fences[index + 1]
        if closing.group(1):  # a tagged fence cannot close a block: treat the first as stray
            index += 1
            continue
        code = completion[opening.end() + 1 : closing.start()]
        blocks.append((opening.group(1).lower(), code[:-1] if code.endswith("\n") else code))
        index += 2
    for wanted in (("python", "py", "python3"), ("",)):
        for language, code in reversed(blocks):
            if language in wanted and code.strip():
                return code
    return None


def outputs_match(actual: str, expected: str) -> bool:
    """LiveCodeBench's stdin comparison: same number of lines after stripping the whole output, and each pair of
    stripped lines equal as text or as lists of decimals."""
    actual_lines, expected_lines = _stripped_lines(actual), _stripped_lines(expected)
    if len(actual_lines) != len(expected_lines):
        return False
    for got, want in zip(actual_lines, expected_lines):
        if got == want:
            continue
        got_numbers, want_numbers = _decimals(got), _decimals(want)
        if got_numbers is None or want_numbers is None or got_numbers != want_numbers:
            return False
    return True


def _stripped_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(item) for item in line.split()]
    except InvalidOperation:
        return None


class CodeExecutionGrader:
    """Grades LiveCodeBench answers by running them (see the module docstring: protocol, limits, and why this is not a
    sandbox). `allow_code_execution` must be True, a deliberate opt-in (`--allow-code-execution`).

    `check(problem, completion)` -> `Verdict(extracted=<the program, or None>, correct=<every test passed>,
    details={"passed", "total", "failure", "message"})`, `failure` one of `FAILURES` (None when correct), `message` a
    short account of the first failure. `check_many(pairs)` grades several answers at once on `max_workers` threads
    (each runs its own child processes). `timeout_seconds` bounds one test, `memory_mb` the address space of the
    program's process, `output_limit_mb` what it may print or write to one file.
    """

    def __init__(
        self,
        allow_code_execution: bool = False,
        timeout_seconds: float = 6.0,
        memory_mb: int = 4096,
        output_limit_mb: int = 64,
        max_workers: int | None = None,
        python_executable: str | None = None,
    ):
        if not allow_code_execution:
            raise ValueError(
                "Grading LiveCodeBench runs model-written Python programs on this machine, with your user's rights "
                "(rlimits and guards, not a sandbox). Pass --allow-code-execution (allow_code_execution=True) to "
                "accept that, preferably inside a container or VM without network access or secrets."
            )
        if os.name != "posix":
            raise RuntimeError("Code execution grading needs a POSIX system (resource limits, process groups).")
        if not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds}.")
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be at least 64 (the interpreter itself needs that), got {memory_mb}.")
        if output_limit_mb <= 0:
            raise ValueError(f"output_limit_mb must be positive, got {output_limit_mb}.")
        self.timeout_seconds = float(timeout_seconds)
        self.memory_mb = int(memory_mb)
        self.output_limit_mb = output_limit_mb
        self.max_workers = max_workers or max(1, min(8, (os.cpu_count() or 2) // 2))
        self.python_executable = python_executable or sys.executable
        self._nproc = _process_limit()

    def check(self, problem: Problem, completion: str) -> Verdict:
        metadata = getattr(problem, "metadata", None) or {}
        if "num_tests" not in metadata:
            raise ValueError(
                f"Problem {problem.id} carries no LiveCodeBench tests in its metadata: build it with "
                "trb_trl.evaluation.code_execution.problem_from_row."
            )
        total = metadata["num_tests"]
        program = extract_code(completion)
        if program is None:
            return _verdict(None, 0, total, "no code", "no fenced code block in the answer")
        tests = tuple(metadata["public_tests"]) + decode_private_tests(metadata["private_tests"])
        with tempfile.TemporaryDirectory(prefix="trb-code-") as base:
            base = Path(base)
            program_path = base / "program.py"
            program_path.write_text(program, encoding="utf-8")
            if metadata.get("fn_name"):
                passed, failure, message = self._run_functional(base, program_path, metadata["fn_name"], tests)
            else:
                passed, failure, message = self._run_stdin(base, program_path, tests)
        return _verdict(program, passed, total, failure, message)

    def check_many(self, pairs: Iterable[tuple[Problem, str]]) -> list[Verdict]:
        """`check` for each (problem, completion) pair, `max_workers` at a time; verdicts in the pairs' order."""
        pairs = list(pairs)
        if self.max_workers == 1 or len(pairs) <= 1:
            return [self.check(problem, completion) for problem, completion in pairs]
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="trb-code") as pool:
            return list(pool.map(lambda pair: self.check(*pair), pairs))

    def summary_metrics(self, verdicts: Iterable[Verdict]) -> dict[str, float]:
        """The share of graded answers that failed for each reason (`failed/timeout`, ...; only reasons seen), and
        `tests_passed_before_failure`: the mean share of tests passed before the first failure (1 when correct)."""
        counts: dict[str, int] = {}
        fractions = []
        for verdict in verdicts:
            details = getattr(verdict, "details", None) or {}
            if "total" not in details:
                continue
            fractions.append(details["passed"] / max(details["total"], 1))
            if details.get("failure"):
                counts[details["failure"]] = counts.get(details["failure"], 0) + 1
        if not fractions:
            return {}
        metrics = {"tests_passed_before_failure": sum(fractions) / len(fractions)}
        metrics.update({f"failed/{reason}": count / len(fractions) for reason, count in sorted(counts.items())})
        return metrics

    def close(self) -> None:
        """Nothing to release: every program's processes are gone when its `check` returns."""

    def _run_stdin(self, base: Path, program: Path, tests: Sequence[tuple[str, str]]):
        for index, (test_input, expected) in enumerate(tests):
            input_path = base / "input.txt"
            input_path.write_text(test_input, encoding="utf-8")
            run = self._run_child(base, program, {"mode": "stdin"}, input_path, self.timeout_seconds)
            where = f"test {index + 1}/{len(tests)}"
            if run.failure:
                return index, run.failure, f"{where}: {run.message}"
            if not outputs_match(run.stdout, expected):
                return index, "wrong answer", f"{where}: expected {_short(expected)}, got {_short(run.stdout)}"
        return len(tests), None, None

    def _run_functional(self, base: Path, program: Path, fn_name: str, tests: Sequence[tuple[str, str]]):
        input_path = base / "tests.json"
        input_path.write_text(json.dumps([list(test) for test in tests]), encoding="utf-8")
        wall = (self.timeout_seconds + 1) * len(tests)  # LCB's global budget: (timeout + 1) per test
        run = self._run_child(base, program, {"mode": "functional", "fn_name": fn_name}, input_path, wall)
        records = []
        for line in run.stdout.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break
        passed = sum(record.get("status") == "passed" for record in records)
        if passed == len(tests):
            return passed, None, None
        where = f"test {passed + 1}/{len(tests)}"
        failed = next((record for record in records if record.get("status") != "passed"), None)
        if failed is not None:
            return passed, failed["status"], f"{where}: {failed.get('message', '')}"
        return passed, run.failure or "runtime error", f"{where}: {run.message or 'the program stopped the grader'}"

    def _run_child(self, base: Path, program: Path, mode: dict, input_path: Path, seconds: float) -> "_Run":
        work = base / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        output_bytes = self.output_limit_mb << 20
        config = {
            **mode,
            "program": str(program),
            "work": str(work),
            "timeout": self.timeout_seconds,
            "memory_bytes": self.memory_mb << 20,
            "output_bytes": output_bytes,
            "cpu_seconds": math.ceil(seconds) + 1,
            "nproc": self._nproc,
        }
        env = {
            "PATH": os.defpath,
            "HOME": str(work),
            "TMPDIR": str(work),
            "TMP": str(work),
            "TEMP": str(work),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "no_proxy": "*",
            "NO_PROXY": "*",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        stdout_path, stderr_path = base / "stdout", base / "stderr"
        command = [self.python_executable, "-I", "-X", "utf8", str(_CHILD), json.dumps(config)]
        timed_out = False
        with open(input_path, "rb") as stdin, open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            started = time.monotonic()
            process = subprocess.Popen(
                command, stdin=stdin, stdout=stdout, stderr=stderr, cwd=work, env=env, start_new_session=True
            )
            try:
                process.wait(timeout=seconds + _STARTUP_SECONDS)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(process.pid)
                process.wait()
            elapsed = time.monotonic() - started
        return _Run.read(process.returncode, stdout_path, stderr_path, output_bytes, timed_out, elapsed)


class _Run:
    """What one child process left: its output, and the failure its exit status means (None: it ran to the end)."""

    def __init__(self, stdout: str, failure: str | None, message: str | None):
        self.stdout, self.failure, self.message = stdout, failure, message

    @classmethod
    def read(cls, returncode: int, stdout_path: Path, stderr_path: Path, limit: int, timed_out: bool, elapsed: float):
        stdout_size = stdout_path.stat().st_size
        with open(stdout_path, "rb") as handle:
            stdout = handle.read(limit).decode("utf-8", errors="replace")
        with open(stderr_path, "rb") as handle:
            handle.seek(max(0, stderr_path.stat().st_size - 2000))
            stderr = handle.read().decode("utf-8", errors="replace").strip()
        last_line = stderr.splitlines()[-1] if stderr else ""
        killed_by = -returncode if returncode < 0 else None
        if timed_out or killed_by in (signal.SIGALRM, signal.SIGXCPU, signal.SIGKILL):
            return cls(stdout, "timeout", f"no result within the time limit ({elapsed:.1f} s)")
        if stdout_size >= limit or killed_by == signal.SIGXFSZ or "File too large" in stderr:
            return cls(stdout, "output limit", f"printed or wrote {limit >> 20} MiB or more")
        if returncode == _EXIT_MEMORY or "MemoryError" in last_line:
            return cls(stdout, "memory", "MemoryError: the address-space limit was reached")
        if returncode == _EXIT_COMPILE:
            return cls(stdout, "compile error", _short(last_line))
        if killed_by is not None:  # a crash in C code (SIGSEGV from too deep a recursion, say)
            return cls(stdout, "runtime error", _short(f"killed by {_signal_name(killed_by)}. {last_line}"))
        if returncode != 0:
            return cls(stdout, "runtime error", _short(last_line or f"exit status {returncode}"))
        return cls(stdout, None, None)


def _verdict(program: str | None, passed: int, total: int, failure: str | None, message: str | None) -> Verdict:
    details = {"passed": passed, "total": total, "failure": failure, "message": message}
    return Verdict(extracted=program, correct=failure is None and passed == total, details=details)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _process_limit() -> int | None:
    """RLIMIT_NPROC for the programs: this user's current process count plus room for a few threads. None for root,
    which the kernel exempts (a fork bomb then meets only the Python-level guards)."""
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        return None
    uid = os.geteuid()
    count = 0
    try:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    count += len(os.listdir(f"/proc/{entry.name}/task")) if entry.stat().st_uid == uid else 0
                except OSError:
                    continue
    except OSError:
        return None  # no /proc (macOS): leave the limit alone
    return count + 256


def _short(text, length: int = 200) -> str:
    text = text if isinstance(text, str) else repr(text)
    text = text.strip()
    return text if len(text) <= length else text[: length // 2] + " ... " + text[-length // 2 :]
