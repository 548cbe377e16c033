"""Ctrl-C is never lost (cli/interrupts.py), at each moment it can arrive.

MLX's CPU backend runs the system C++ compiler through `system()`, which ignores SIGINT while
it runs. To send the signal *inside* such a call, deterministically, the tests put a `g++` in
front of the real one that, once armed, holds the first compiler run it sees until the test
releases it; a fresh TMPDIR empties MLX's kernel cache so compiler runs happen at all. Every
wait is on an event: a line printed, a marker file written by the held compiler, an exit.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import subprocess_env

pytestmark = pytest.mark.slow  # real subprocesses and kernel compiles

PROGRAM = [sys.executable, "-c", "from mlx_gptoss.cli import main; main()"]
SAFETY_NET = 120  # seconds: a hang fails the test instead of blocking CI


class HeldCompiler:
    """A `g++` on PATH that holds one compiler run (once armed) until released.

    `check=True` holds MLX's compiler check (`g++ --version`), else the first kernel compile.
    `cache` seeds MLX's kernel cache (an empty one by default, so every kernel compiles).
    """

    def __init__(self, root: Path, *, check: bool = False, cache: Path | None = None):
        real = shutil.which("g++")
        if real is None:
            pytest.fail("g++ is needed: MLX's CPU backend compiles its kernels with it")
        self.dir = root / "held"
        self.dir.mkdir()
        script = self.dir / "bin" / "g++"
        script.parent.mkdir()
        skip = "" if check else '  *--version*) exec "{real}" "$@" ;;\n'.format(real=real)
        script.write_text(
            "#!/bin/sh\n"
            f'case "$*" in\n{skip}esac\n'
            f'if [ -e "{self.dir}/armed" ] && mkdir "{self.dir}/holding" 2>/dev/null; then\n'
            f'  : > "{self.dir}/held"\n'
            f'  while [ ! -e "{self.dir}/released" ]; do sleep 0.02; done\n'
            "fi\n"
            f'exec "{real}" "$@"\n')
        script.chmod(0o755)
        tmp = root / "tmp"
        if cache is None:
            tmp.mkdir()
        else:
            shutil.copytree(cache, tmp)
        self.env = subprocess_env(PATH=f"{script.parent}{os.pathsep}{os.environ['PATH']}",
                                  TMPDIR=str(tmp))  # MLX keeps its kernels under $TMPDIR/mlx

    def arm(self) -> None:
        (self.dir / "armed").touch()

    def wait_until_held(self, alive) -> None:
        deadline = time.monotonic() + SAFETY_NET
        while not (self.dir / "held").exists():
            assert alive(), "the program ended before compiling a kernel"
            assert time.monotonic() < deadline, "no compiler run was held"
            time.sleep(0.02)

    def release(self) -> None:
        (self.dir / "released").touch()


@pytest.fixture(scope="module")
def kernel_cache(chat_checkpoint, tmp_path_factory) -> Path:
    """MLX's kernel cache after one short generation: every kernel `generate` needs."""
    tmp = tmp_path_factory.mktemp("kernels")
    env = subprocess_env(TMPDIR=str(tmp))
    subprocess.run([*PROGRAM, "generate", "-m", str(chat_checkpoint), "-p", "Hello",
                    "--max-tokens", "3", "--temp", "0", "--dtype", "float32"],
                   env=env, check=True, capture_output=True, timeout=SAFETY_NET)
    return tmp


def without_last_kernel(cache: Path, root: Path) -> Path:
    """A copy of `cache` less the kernel compiled last: the first decode step's (decoding
    comes after the prefill, and its one-token graphs are compiled apart)."""
    copy = root / "cache"
    shutil.copytree(cache, copy)
    kernels = sorted(copy.rglob("*.so"), key=lambda k: k.stat().st_mtime)
    assert kernels, "MLX compiled no kernel"
    kernels[-1].unlink()
    return copy


def generating(chat_checkpoint, env) -> subprocess.Popen:
    return subprocess.Popen(
        [*PROGRAM, "generate", "-m", str(chat_checkpoint), "-p", "Hello", "--json",
         "--max-tokens", "100000", "--temp", "0", "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def assert_interrupted(process) -> None:
    try:
        _, err = process.communicate(timeout=SAFETY_NET)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err, err


@pytest.mark.parametrize("moment", ["compiler check (prefill)", "kernel compile (prefill)",
                                    "kernel compile (decode step)", "between tokens"])
def test_ctrl_c_stops_generate_at_every_moment(chat_checkpoint, kernel_cache, tmp_path, moment):
    if moment == "kernel compile (decode step)":
        compiler = HeldCompiler(tmp_path, cache=without_last_kernel(kernel_cache, tmp_path))
    elif moment == "between tokens":
        compiler = HeldCompiler(tmp_path, cache=kernel_cache)
    else:
        compiler = HeldCompiler(tmp_path, check=moment.startswith("compiler check"))
    compiler.arm()
    process = generating(chat_checkpoint, compiler.env)
    try:
        if moment == "between tokens":
            for _ in range(5):
                assert json.loads(process.stdout.readline())["type"]
        else:
            compiler.wait_until_held(lambda: process.poll() is None)
        process.send_signal(signal.SIGINT)
        compiler.release()
        assert_interrupted(process)
    finally:
        compiler.release()
        process.kill()


def test_chat_in_a_terminal_ctrl_c_keeps_the_session_ctrl_d_exits(chat_checkpoint, tmp_path):
    """A real terminal (pty): Ctrl-C pressed while MLX checks for its compiler (the reply's
    prefill) stops the reply, the session goes on, Ctrl-D exits."""
    import pexpect

    compiler = HeldCompiler(tmp_path, check=True)
    child = pexpect.spawn(PROGRAM[0], [*PROGRAM[1:], "chat", "-m", str(chat_checkpoint),
                                       "--max-tokens", "100000", "--temp", "0",
                                       "--dtype", "float32"],
                          env={**compiler.env, "TERM": "dumb", "MLX_GPTOSS_HISTORY": ""}, encoding="utf-8",
                          timeout=SAFETY_NET)
    try:
        child.expect_exact(">>> ")
        compiler.arm()
        child.sendline("Hello")
        compiler.wait_until_held(child.isalive)
        child.sendintr()  # the terminal signals the whole foreground process group
        compiler.release()
        child.expect_exact("[interrupted: this turn was discarded]")
        child.expect_exact(">>> ")
        child.sendline("/effort low")
        child.expect_exact("reasoning effort: low")
        child.expect_exact(">>> ")
        child.sendintr()  # at the prompt: a fresh line, the session stays
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        compiler.release()
        child.close(force=True)
    assert child.exitstatus == 0, child.before
