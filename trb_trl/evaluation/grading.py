r"""Answer checking with math-verify: the last `\boxed{}` of a completion against the gold answer, under a deadline.

The prediction is the content of the completion's last `\boxed{...}` (or `\fbox{...}`, or `\boxed 5`), as the
evaluation prompt asks for; a completion without one is simply wrong. Both sides are parsed by math-verify as boxed
LaTeX and compared with its `verify(gold, prediction)` (numbers, fractions, sets, intervals, matrices, equations,
units and `\text{}` answers). Each distinct gold string is parsed once.

Why a deadline of our own: sympy can spend minutes on an adversarial expression (`9^{9^{9^9}}` compared with 5).
math-verify bounds its stages with `signal.alarm`, but each stage separately, in whole seconds, and only in the
main thread. Here one SIGALRM timer bounds the prediction's parse and comparison together (math-verify's own
timers are off, since two timers on one signal cancel each other). Off the main thread, where Python delivers no
signals, the check runs in a small child process with the same deadline, which is killed if it overruns (a long
computation inside C code cannot be interrupted by a signal either). `timeout_seconds=None` turns all of this off.

Run as a module (`python -m trb_trl.evaluation.grading`), this file is that child: it reads `[gold, answer,
timeout]` JSON lines on stdin and answers `1` or `0` per line.
"""

import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

from .frozen import FrozenMapping


_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
# The child process: time to import math-verify (about a second), and how long past its own deadline it may run.
_WORKER_STARTUP_SECONDS = 120.0
_WORKER_GRACE_SECONDS = 2.0


def extract_boxed(text: str) -> str | None:
    r"""The content of the last non-empty `\boxed{...}` (or `\fbox{...}`) in `text`, braces balanced; `None` if none.

    Escaped braces (`\{`, `\}`) do not count. The unbraced form `\boxed 5` gives the token after the space (trailing
    `.,;:` dropped). A box left unclosed, as in a completion cut off by the token limit, is skipped for the one before.
    """
    if not isinstance(text, str):
        return None
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        content = _box_content(text, match.end())
        if content:
            return content
    return None


def _box_content(text: str, start: int) -> str | None:
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i == len(text):
        return None
    if text[i] != "{":  # `\boxed 5`: one token
        token = re.match(r"[^\s$]*", text[i:]).group(0).rstrip(".,;:")
        return token or None
    depth = 0
    j = i
    while j < len(text):
        char = text[j]
        if char == "\\":  # `\{`, `\}` and `\\` are not grouping braces
            j += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
        j += 1
    return None


@dataclass(frozen=True)
class Verdict:
    """One graded completion."""

    extracted: str | None  # the answer found in the completion (None: nothing to grade, so incorrect)
    correct: bool
    # What a kind's grader reports beyond right or wrong (instruction following: which instructions were followed),
    # read-only and small: it is written into samples.jsonl and its grader's `summary_metrics` reads it back.
    details: Mapping = field(default_factory=FrozenMapping, hash=False)

    def __post_init__(self):
        if not isinstance(self.details, FrozenMapping):
            object.__setattr__(self, "details", FrozenMapping(self.details))


class AnswerChecker:
    r"""Grades completions against gold answers with math-verify; never raises, never runs far past its deadline.

    `timeout_seconds` bounds the parse and comparison of one prediction (and, once, the parse of each new gold);
    a check that runs out of time is incorrect. `None` disables the deadline. Off the main thread the checks run in
    a child process (started on first use, one at a time); `close()` stops it, as does garbage collection.
    """

    def __init__(self, timeout_seconds: float | None = 5):
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive or None, got {timeout_seconds}.")
        self.timeout_seconds = timeout_seconds
        self._gold_cache: dict[str, list] = {}
        self._worker: _GradingProcess | None = None
        self._worker_lock = threading.Lock()

    def check(self, gold: str, completion: str) -> Verdict:
        """Grade `completion` (its last `\\boxed{}`) against the gold answer."""
        try:
            extracted = extract_boxed(completion)
            if extracted is None:
                return Verdict(None, False)
            return Verdict(extracted, self._is_equivalent(_as_text(gold), extracted))
        except Exception:  # garbage in, "incorrect" out: one odd sample must not end a long evaluation
            return Verdict(extract_boxed(completion) if isinstance(completion, str) else None, False)

    def _is_equivalent(self, gold: str, answer: str) -> bool:
        if self.timeout_seconds is None or _signals_work_here():
            _warm_up()
            return _grade(gold, answer, self.timeout_seconds, self._gold_cache)
        with self._worker_lock:
            if self._worker is None:
                self._worker = _GradingProcess()
                weakref.finalize(self, self._worker.close)
            return self._worker.grade(gold, answer, self.timeout_seconds)

    def close(self) -> None:
        """Stop the child process used off the main thread, if one was started."""
        with self._worker_lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None


def _as_text(gold) -> str:
    if isinstance(gold, float) and gold.is_integer():
        gold = int(gold)
    return str(gold)


def _signals_work_here() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _grade(gold: str, answer: str, timeout: float | None, gold_cache: dict[str, list]) -> bool:
    """math-verify's verdict on `answer` (a boxed answer's content) against `gold`; False when out of time."""
    if gold not in gold_cache:
        gold_cache[gold] = _parse_gold(gold, timeout)
    gold_parsed = gold_cache[gold]
    try:
        return _call_with_deadline(lambda: _compare(gold_parsed, answer), timeout)
    except TimeoutError:
        return False


def _compare(gold_parsed: list, answer: str) -> bool:
    from math_verify import verify

    answer_parsed = _parse(answer)
    return bool(answer_parsed) and verify(gold_parsed, answer_parsed, timeout_seconds=None)


def _parse(latex: str) -> list:
    from math_verify import parse

    # Dollar signs inside a box are stray math delimiters (OlympiadBench golds are "$\frac{1}{2}$"); "\$" is money.
    return parse("\\boxed{" + _UNESCAPED_DOLLAR.sub("", latex) + "}", parsing_timeout=None)


def _parse_gold(gold: str, timeout: float | None) -> list:
    """Parsed gold; a gold that is itself a worked solution counts by its last box. Unparsable: the stripped text,
    which math-verify then compares as a string with the prediction's normalised LaTeX."""
    gold = extract_boxed(gold) or gold.strip()
    try:
        parsed = _call_with_deadline(lambda: _parse(gold), timeout)
    except TimeoutError:
        parsed = []
    return parsed or [gold]


class _Deadline(BaseException):
    """Raised by SIGALRM inside a check. A BaseException, like math-verify's own, so that the `except Exception`
    blocks of math-verify and sympy let it through."""


def _raise_deadline(signum, frame):
    raise _Deadline


def _call_with_deadline(function, seconds: float | None):
    """`function()`, or `TimeoutError` after `seconds` of wall time (main thread only: it uses SIGALRM). A timer that
    was already running (pytest-timeout, an outer alarm) gets back what is left of its time afterwards."""
    if seconds is None or not _signals_work_here():
        return function()
    started = time.monotonic()
    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    outer_handler = signal.signal(signal.SIGALRM, _raise_deadline)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            return function()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        raise TimeoutError(f"no verdict within {seconds} s") from None
    finally:
        signal.signal(signal.SIGALRM, outer_handler if outer_handler is not None else signal.SIG_DFL)
        if outer_delay > 0:
            remaining = max(outer_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, outer_interval)


class _GradingProcess:
    """A child Python running `_serve`, for checks made off the main thread; restarted after it overruns."""

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._replies: queue.Queue = queue.Queue()

    def _start(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "trb_trl.evaluation.grading"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=env,
        )
        self._replies = queue.Queue()
        threading.Thread(target=_pump_lines, args=(self._process.stdout, self._replies), daemon=True).start()
        if self._replies.get(timeout=_WORKER_STARTUP_SECONDS) != "ready":
            raise RuntimeError("The grading process did not start.")

    def grade(self, gold: str, answer: str, timeout: float) -> bool:
        try:
            if self._process is None or self._process.poll() is not None:
                self._start()
            self._process.stdin.write(json.dumps([gold, answer, timeout]) + "\n")
            self._process.stdin.flush()
            # Gold parse and prediction each have `timeout` in the child; beyond that it is stuck in C code.
            reply = self._replies.get(timeout=2 * timeout + _WORKER_GRACE_SECONDS)
        except Exception:  # queue.Empty (overran), a dead process, a broken pipe
            self.close()
            return False
        if reply is None:
            self.close()
            return False
        return reply == "1"

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for stream in (self._process.stdin, self._process.stdout):
                stream.close()
            self._process = None


def _pump_lines(stream, replies: queue.Queue) -> None:
    try:
        for line in stream:
            replies.put(line.strip())
    except (OSError, ValueError):  # the stream was closed under us
        pass
    replies.put(None)


_warmed_up = False


def _warm_up() -> None:
    """Grade one trivial pair without a deadline, once per process: math-verify and sympy set themselves up lazily on
    the first parse (a second or more on a slow machine), which must not count against the first real answer's time."""
    global _warmed_up
    if not _warmed_up:
        _grade("1", "1", None, {})
        _warmed_up = True


def _serve() -> None:
    gold_cache: dict[str, list] = {}
    _warm_up()  # before "ready": the parent's startup wait covers it, no answer's deadline does
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            gold, answer, timeout = json.loads(line)
            correct = _grade(gold, answer, timeout, gold_cache)
        except Exception:
            correct = False
        sys.stdout.write("1\n" if correct else "0\n")
        sys.stdout.flush()


class _WithoutTimeoutDisabledNotice(logging.Filter):
    """math-verify warns once that its own timeouts are off; here they are replaced, not missing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _logger_name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger_name).addFilter(_WithoutTimeoutDisabledNotice())


if __name__ == "__main__":
    _serve()
