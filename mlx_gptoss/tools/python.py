"""The built-in `python` tool: code runs in a separate, long-lived Python process.

Never in the caller's process. The worker runs `python -I` (no user site, no PYTHON* variables,
no current directory on sys.path) in its own temporary working directory, under an address-space
limit (`resource.setrlimit(RLIMIT_AS)`); its globals persist from call to call like a notebook's,
and the value of a final expression is printed as Jupyter would. Each call has a wall-clock
timeout: past it the worker is killed and restarted (its state is lost, and the result says so).
Output (stdout and stderr, including that of child processes) is truncated to `max_output`
characters. Every failure becomes text the model can read.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MEMORY_BYTES = 2 << 30
DEFAULT_MAX_OUTPUT = 8000

_WORKER = r'''
import ast, json, os, resource, sys, traceback
limit = int(sys.argv[1])
if limit > 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
requests = os.fdopen(os.dup(0), "r")
replies = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
namespace = {"__name__": "__main__"}
for line in requests:
    code = json.loads(line)["code"]
    capture = os.open("output.txt", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.dup2(capture, 1)
    os.dup2(capture, 2)
    try:
        tree = ast.parse(code, "<python>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<python>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<python>", "eval"), namespace)
            if value is not None:
                print(repr(value))
    except BaseException:
        kind, error, tb = sys.exc_info()
        while tb is not None and tb.tb_frame.f_code.co_filename != "<python>":
            tb = tb.tb_next
        traceback.print_exception(kind, error, tb)
    sys.stdout.flush()
    sys.stderr.flush()
    os.close(capture)
    with open("output.txt", "rb") as f:
        output = f.read().decode("utf-8", "replace")
    replies.write(json.dumps({"output": output}) + "\n")
    replies.flush()
'''


class PythonTool:
    """A sandboxed, stateful Python session; `run(code) -> text`. Start it lazily, close it."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT_S,
                 memory_limit: int = DEFAULT_MEMORY_BYTES, max_output: int = DEFAULT_MAX_OUTPUT):
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.max_output = max_output
        self.process: subprocess.Popen | None = None
        self.workdir: str | None = None

    def _start(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mlx-gptoss-python-")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.workdir,
               "TMPDIR": self.workdir, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-c", _WORKER, str(self.memory_limit)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=self.workdir, env=env, start_new_session=True)

    def run(self, code: str) -> str:
        if self.process is None or self.process.poll() is not None:
            self._start()
        process = self.process
        try:
            process.stdin.write((json.dumps({"code": code}) + "\n").encode())
            process.stdin.flush()
        except OSError:
            self.restart()
            return "error: the python process could not be reached; the session was restarted"
        line = self._read_line(process, time.monotonic() + self.timeout)
        if not line:
            timed_out = line is None
            code_ = process.poll() if timed_out else process.wait()
            self.restart()
            if timed_out:
                return (f"error: timed out after {self.timeout:g} s; the python session was "
                        "restarted and its state is lost")
            return (f"error: the python process died (exit code {code_}, e.g. out of memory); "
                    "the session was restarted and its state is lost")
        return self._truncate(json.loads(line)["output"])

    @staticmethod
    def _read_line(process: subprocess.Popen, deadline: float) -> bytes | None:
        """One reply line; None on timeout, b"" when the worker died."""
        buffer = b""
        fd = process.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            buffer += chunk
            if buffer.endswith(b"\n"):
                return buffer

    def _truncate(self, output: str) -> str:
        if len(output) <= self.max_output:
            return output
        return (output[:self.max_output]
                + f"\n... [output truncated: {len(output) - self.max_output} more characters]")

    def restart(self) -> None:
        """Kill the worker (and anything it started); the next call starts a fresh one."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait()
            for pipe in (self.process.stdin, self.process.stdout):
                pipe.close()
            self.process = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    close = restart

    def __del__(self) -> None:
        try:
            self.restart()
        except Exception:
            pass
