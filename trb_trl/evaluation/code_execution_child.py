"""The child process of `code_execution`: runs one model-written Python program under limits and guards.

Run as `python -I -X utf8 code_execution_child.py CONFIG_JSON` by `CodeExecutionGrader`, never imported by it (standard
library only, no package imports, so that it starts fast). CONFIG_JSON holds `mode` ("stdin" or "functional"),
`program` (path of the program file), `work` (the scratch directory, also the cwd, HOME and TMPDIR), `timeout`
(seconds per test), `memory_bytes`, `output_bytes`, `cpu_seconds`, `nproc` (or null) and, in functional mode,
`fn_name`.

- stdin mode: the program runs once as `__main__`; its stdin and stdout are the files the parent set up. Exit codes:
  0 done (also after `sys.exit`/`exit()`, which LiveCodeBench does not count as an error), 1 uncaught exception,
  `EXIT_MEMORY` MemoryError, `EXIT_COMPILE` syntax error; killed by SIGALRM after `timeout` seconds.
- functional mode: stdin carries the tests as JSON (`[[input, output], ...]`, LiveCodeBench's strings: one JSON
  argument per input line, the output one JSON value). The program is executed as a module, then
  `Solution().<fn_name>` (or a module-level `<fn_name>`) is called once per test under a `timeout` alarm, stopping at
  the first failure. One JSON line per test goes to the original stdout: `{"status": "passed" | "wrong answer" |
  "timeout" | "runtime error" | "memory", "message": ...}`; the program's own prints are discarded.

Before the program runs: resource limits (address space, CPU time, file size, processes where not root, no core
files), then guards in the spirit of HumanEval's and LiveCodeBench's `reliability_guard`: no sockets or name lookups,
no new processes, no signals to others, no writes, renames or deletions outside `work`, no `resource` module to raise
the limits again. These are guards against accidents, not a security sandbox: a determined program (ctypes, `_io`,
`_posixsubprocess` imported anew, ...) gets around them. Run untrusted code in a container or VM.
"""

import _socket
import builtins
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading  # noqa: F401 (imported before the guards: it registers fork handlers on import)
import traceback


EXIT_MEMORY = 3
EXIT_COMPILE = 4

# The harness keeps these; the program gets refusing stand-ins (it must not cancel or catch the grader's timer).
_signal = signal.signal
_setitimer = signal.setitimer

# LiveCodeBench's `import_string`: executed before every program (stdin and functional), so that programs may use
# these names (and `List`, `Optional`, ... in LeetCode signatures) without importing them.
PREAMBLE = """\
from string import *
from re import *
from datetime import *
from collections import *
from heapq import *
from bisect import *
from copy import *
from math import *
from random import *
from statistics import *
from itertools import *
from functools import *
from operator import *
from io import *
from sys import *
from json import *
from builtins import *
from typing import *
import string
import re
import datetime
import collections
import heapq
import bisect
import copy
import math
import random
import statistics
import itertools
import functools
import operator
import io
import sys
import json
sys.setrecursionlimit(50000)
"""


class _Timeout(BaseException):
    """A test ran out of time (a BaseException, so that a program's `except Exception` does not swallow it)."""


def main() -> None:
    config = json.loads(sys.argv[1])
    tests = json.loads(sys.stdin.read()) if config["mode"] == "functional" else None
    if tests is not None:  # the program gets an empty stdin
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    result_stream = None
    if config["mode"] == "functional":  # results on the real stdout; the program's prints go nowhere
        result_stream = os.fdopen(os.dup(1), "w", encoding="utf-8")
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    with open(config["program"], encoding="utf-8") as handle:
        source = handle.read()
    preamble = compile(PREAMBLE, "<preamble>", "exec")
    exec(preamble, {"__name__": "_warm_up"})  # import the preamble's modules before the guards go up
    _limit(config)
    _guard(os.path.realpath(config["work"]))
    try:
        code = compile(source, "<program>", "exec")
    except (SyntaxError, ValueError) as error:
        sys.stderr.write(f"{type(error).__name__}: {error}\n")
        _finish(result_stream, {"status": "compile error", "message": f"{type(error).__name__}: {error}"})
        os._exit(EXIT_COMPILE)
    except MemoryError:
        os._exit(EXIT_MEMORY)
    if config["mode"] == "stdin":
        _run_stdin(preamble, code, config["timeout"])
    else:
        _run_functional(preamble, code, config["fn_name"], tests, config["timeout"], result_stream)


def _run_stdin(preamble, code, timeout: float) -> None:
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    _signal(signal.SIGALRM, signal.SIG_DFL)  # the kernel ends the process: nothing in it can catch this
    _setitimer(signal.ITIMER_REAL, timeout)
    try:
        exec(preamble, namespace)
        exec(code, namespace)
    except SystemExit:
        pass
    except MemoryError:
        os._exit(EXIT_MEMORY)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Normal interpreter exit: threads the program started (the `threading.Thread(target=main)` idiom for deep
    # recursion) finish first, still under the alarm.


def _run_functional(preamble, code, fn_name: str, tests, timeout: float, out) -> None:
    def on_alarm(signum, frame):
        raise _Timeout

    _signal(signal.SIGALRM, on_alarm)
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        _with_deadline(timeout, lambda: (exec(preamble, namespace), exec(code, namespace)))
        solution = namespace["Solution"]() if "Solution" in namespace else None
        method = getattr(solution, fn_name, None) if solution is not None else namespace.get(fn_name)
        if not callable(method):
            raise AttributeError(f"the program defines no {'Solution.' if solution is not None else ''}{fn_name}")
    except BaseException as error:
        _finish(out, _failure(error))
        return
    for test_input, test_output in tests:
        try:
            arguments = [json.loads(line) for line in test_input.split("\n")]
            expected = json.loads(test_output)
            prediction = _with_deadline(timeout, lambda: method(*arguments))  # noqa: B023 (called right here)
            if isinstance(prediction, tuple):  # LiveCodeBench does not penalise a tuple for a list
                prediction = list(prediction)
            if prediction != expected:
                _finish(out, {"status": "wrong answer", "message": f"got {_short(prediction)}"})
                return
        except BaseException as error:
            _finish(out, _failure(error))
            return
        out.write(json.dumps({"status": "passed"}) + "\n")
        out.flush()
    out.close()


def _with_deadline(seconds: float, function):
    _setitimer(signal.ITIMER_REAL, seconds)
    try:
        return function()
    finally:
        _setitimer(signal.ITIMER_REAL, 0)


def _failure(error: BaseException) -> dict:
    if isinstance(error, _Timeout):
        return {"status": "timeout", "message": "over the time limit of one test"}
    if isinstance(error, MemoryError):
        return {"status": "memory", "message": "MemoryError"}
    return {"status": "runtime error", "message": _short(f"{type(error).__name__}: {error}")}


def _finish(out, record: dict) -> None:
    if out is not None:
        out.write(json.dumps(record) + "\n")
        out.close()


def _short(value, length: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= length else text[: length // 2] + " ... " + text[-length // 2 :]


def _limit(config: dict) -> None:
    def cap(kind, value, headroom=0):
        hard = resource.getrlimit(kind)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        new_hard = value + headroom if hard == resource.RLIM_INFINITY else min(value + headroom, hard)
        try:
            resource.setrlimit(kind, (value, new_hard))
        except (ValueError, OSError):  # macOS refuses some (RLIMIT_AS): the others and the guards still hold
            pass

    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_AS, config["memory_bytes"])
    cap(resource.RLIMIT_FSIZE, config["output_bytes"])
    cap(resource.RLIMIT_CPU, config["cpu_seconds"], headroom=1)  # SIGXCPU at the soft limit, SIGKILL a second later
    if config.get("nproc") is not None:
        cap(resource.RLIMIT_NPROC, config["nproc"])


def _refusing_class(base: type) -> type:
    class Refused(base):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled while grading")

    Refused.__name__ = Refused.__qualname__ = base.__name__
    return Refused


def _guard(work: str) -> None:
    """Refuse network, process creation and writes outside `work`, by replacing the Python-level entry points."""

    def refuse(what):
        def refused(*args, **kwargs):
            raise PermissionError(f"{what} is disabled while grading")

        return refused

    def inside(path) -> bool:
        if isinstance(path, int):  # an open descriptor (open(1, "w") for fast output)
            return True
        text = os.fsdecode(os.fspath(path))
        if text in (os.devnull, "/dev/stdout", "/dev/stderr"):
            return True
        real = os.path.realpath(text)
        return real == work or real.startswith(work + os.sep)

    def checked(function, what, path_arguments=(0,)):
        def wrapper(*args, **kwargs):
            if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None:
                raise PermissionError(f"{what} with dir_fd is disabled while grading")
            for index in path_arguments:
                if index < len(args) and not inside(args[index]):
                    raise PermissionError(f"{what} outside the scratch directory is disabled: {args[index]!r}")
            return function(*args, **kwargs)

        return wrapper

    # Network: no sockets, no name lookups. The socket classes stay classes (ssl and others subclass them on import);
    # making one is refused.
    for module in (socket, _socket):
        for name in ("socket", "SocketType"):
            setattr(module, name, _refusing_class(getattr(module, name)))
        for name in ("socketpair", "fromfd", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
                     "create_connection", "create_server"):  # fmt: skip
            if hasattr(module, name):
                setattr(module, name, refuse("network access"))

    # Files: writing opens and path operations only inside `work`.
    real_open = builtins.open
    real_os_open = os.open
    real_file_io = io.FileIO

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and not inside(file):
            raise PermissionError(f"writing outside the scratch directory is disabled: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        if flags & writes and (kwargs.get("dir_fd") is not None or not inside(path)):
            raise PermissionError(f"writing outside the scratch directory is disabled: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)

    class GuardedFileIO(real_file_io):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(flag in mode for flag in "wax+") and not inside(file):
                raise PermissionError(f"writing outside the scratch directory is disabled: {file!r}")
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open
    io.FileIO = GuardedFileIO
    os.open = guarded_os_open
    for name in ("remove", "unlink", "rmdir", "mkdir", "truncate", "chmod", "chown", "lchown", "utime", "chdir",
                 "mkfifo", "mknod"):  # fmt: skip
        if hasattr(os, name):
            setattr(os, name, checked(getattr(os, name), f"os.{name}"))
    for name in ("rename", "replace", "link", "symlink"):
        setattr(os, name, checked(getattr(os, name), f"os.{name}", path_arguments=(0, 1)))
    for name in ("removedirs", "renames", "chroot", "fchdir", "fchmod", "fchown", "lchmod", "lchflags", "chflags"):
        if hasattr(os, name):
            setattr(os, name, refuse(f"os.{name}"))

    # Processes and signals.
    for name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "setsid", "setpgid", "setuid",
                 "setgid", "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle",
                 "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "spawnvp", "spawnvpe"):  # fmt: skip
        if hasattr(os, name):
            setattr(os, name, refuse(f"os.{name}"))
    subprocess.Popen = refuse("subprocess")
    for name in ("run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, refuse("subprocess"))
    try:
        import _posixsubprocess

        _posixsubprocess.fork_exec = refuse("subprocess")
    except ImportError:
        pass
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, refuse(f"shutil.{name}"))

    def guarded_signal(signum, handler):
        if signum in (signal.SIGALRM, signal.SIGXCPU, signal.SIGXFSZ):
            raise PermissionError("changing the grader's timer and limit signals is disabled")
        return _signal(signum, handler)

    signal.signal = guarded_signal
    for name in ("alarm", "setitimer", "pthread_kill", "pthread_sigmask", "sigwait"):
        if hasattr(signal, name):
            setattr(signal, name, refuse(f"signal.{name}"))
    for name in ("resource", "psutil", "ipdb", "tkinter"):
        sys.modules[name] = None
    builtins.help = None


if __name__ == "__main__":
    main()
