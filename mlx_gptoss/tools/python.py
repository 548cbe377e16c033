"""The built-in `python` tool: code runs in a separate, long-lived, resource-limited Python process.

Never in the caller's process. The worker runs `python -I` (no user site, no PYTHON* variables,
no current directory on sys.path) in its own temporary working directory, with an address-space
limit (`RLIMIT_AS`) and a file-size limit (`RLIMIT_FSIZE`, so a print loop cannot fill the disk);
its globals persist from call to call like a notebook's, and the value of a final expression is
printed as Jupyter would. Each call has a wall-clock timeout: past it the worker is killed and
restarted (its state is lost, and the result says so). Output (stdout and stderr, including that
of child processes) is truncated to `max_output` characters inside the worker, so a huge output
costs the caller nothing; a traceback comes after it, truncated separately, so it is never cut
off by the output. Every failure becomes text the model can read.

This is NOT a security sandbox: the limits keep runaway code from hurting the chat, but the code
runs as the current user and can read and write files anywhere that user can, start processes,
and use the network if there is one. Enable it only for models and prompts you trust that much.
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

from ..harmony import ToolNamespaceConfig

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MEMORY_BYTES = 2 << 30
DEFAULT_FILE_BYTES = 256 << 20
DEFAULT_MAX_OUTPUT = 8000

_WORKER = r'''
import ast, codecs, json, os, resource, sys, traceback
for limit, kind in zip(sys.argv[1:], (resource.RLIMIT_AS, resource.RLIMIT_FSIZE)):
    if int(limit) > 0:
        resource.setrlimit(kind, (int(limit), int(limit)))
requests = os.fdopen(os.dup(0), "r")
replies = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
# The capture file has no name once opened: the code may chdir, list or delete files freely.
capture = os.open("output.txt", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.unlink("output.txt")
namespace = {"__name__": "__main__"}

def run(code):
    """The traceback of what the code raised, or ""."""
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
        return "".join(traceback.format_exception(kind, error, tb))
    return ""

def read_back(limit):
    """The first `limit` characters of the captured output and its total length."""
    os.lseek(capture, 0, os.SEEK_SET)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    head, total = [], 0
    while True:
        chunk = os.read(capture, 1 << 20)
        text = decoder.decode(chunk, final=not chunk)
        head.append(text[:max(limit - total, 0)])
        total += len(text)
        if not chunk:
            return "".join(head), total

for line in requests:
    request = json.loads(line)
    os.ftruncate(capture, 0)
    os.lseek(capture, 0, os.SEEK_SET)
    os.dup2(capture, 1)
    os.dup2(capture, 2)
    error = run(request["code"])
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException as e:  # e.g. the file-size limit
            error = error or "".join(traceback.format_exception_only(type(e), e))
    # Flushing into /dev/null drops what a failed flush left buffered, out of the next output.
    os.dup2(null, 1)
    os.dup2(null, 2)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    limit = request["max_output"]
    reply = {"output": read_back(limit), "error": (error[:limit], len(error))}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()
'''


class PythonTool:
    """A stateful Python session in a resource-limited worker process (not a security
    sandbox); `run(code) -> text`. Starts lazily; close it."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT_S,
                 memory_limit: int = DEFAULT_MEMORY_BYTES, file_limit: int = DEFAULT_FILE_BYTES,
                 max_output: int = DEFAULT_MAX_OUTPUT):
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.file_limit = file_limit
        self.max_output = max_output
        self.process: subprocess.Popen | None = None
        self.workdir: str | None = None

    def _start(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mlx-gptoss-python-")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.workdir,
               "TMPDIR": self.workdir, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-c", _WORKER, str(self.memory_limit), str(self.file_limit)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=self.workdir, env=env, start_new_session=True)

    def run(self, code: str) -> str:
        """Run `code` in the session. If the call is interrupted (Ctrl-C), the worker is
        restarted before the exception propagates, so its state is lost, but no late reply
        can reach the next call."""
        if self.process is None or self.process.poll() is not None:
            self.restart()
            self._start()
        process = self.process
        try:
            try:
                request = {"code": code, "max_output": self.max_output}
                process.stdin.write((json.dumps(request) + "\n").encode())
                process.stdin.flush()
            except OSError:
                self.restart()
                return "error: the python process could not be reached; the session was restarted"
            line = self._read_line(process, time.monotonic() + self.timeout)
        except BaseException:
            self.restart()
            raise
        if not line:
            timed_out = line is None
            code_ = process.poll() if timed_out else process.wait()
            self.restart()
            if timed_out:
                return (f"error: timed out after {self.timeout:g} s; the python session was "
                        "restarted and its state is lost")
            return (f"error: the python process died (exit code {code_}, e.g. out of memory); "
                    "the session was restarted and its state is lost")
        reply = json.loads(line)
        return self._clip(*reply["output"]) + self._clip(*reply["error"])

    @staticmethod
    def _read_line(process: subprocess.Popen, deadline: float) -> bytes | None:
        """One reply line; None on timeout, b"" when the worker died."""
        chunks = []
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
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                return b"".join(chunks)

    @staticmethod
    def _clip(head: str, length: int) -> str:
        """`head` (the first characters of a text `length` long), with a note if it is cut."""
        if length <= len(head):
            return head
        return head + f"\n... [output truncated: {length - len(head)} more characters]\n"

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


def python_instructions(timeout: float, workdir: str, internet: str) -> str:
    """The python namespace text, stating the real timeout, directory and network access
    (with 120.0 s, /mnt/data and "UNKNOWN. Depends on the cluster" it is the trained text)."""
    return (
        "Use this tool to execute Python code in your chain of thought. The code will not be shown "
        "to the user. This tool should be used for internal reasoning, but not for code that is "
        "intended to be visible to the user (e.g. when creating plots, tables, or files).\n\n"
        "When you send a message containing Python code to python, it will be executed in a "
        "stateful Jupyter notebook environment. python will respond with the output of the "
        f"execution or time out after {float(timeout)!r} seconds. The drive at '{workdir}' can be "
        f"used to save and persist user files. Internet access for this session is {internet}."
    )


def trained_namespace() -> ToolNamespaceConfig:
    """The namespace exactly as gpt-oss was trained on (and openai-harmony renders)."""
    return ToolNamespaceConfig("python", [], python_instructions(
        120.0, "/mnt/data", "UNKNOWN. Depends on the cluster"))
