"""`mlx-gptoss generate` and `chat` end to end on a tiny model with the full vocabulary:
in-process, as a real subprocess, errors, Ctrl-C."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env
from cli_runner import cli

from mlx_gptoss.cli.chat import repl
from mlx_gptoss.cli.generate import Display
from mlx_gptoss.generate import generate as api_generate
from mlx_gptoss.harmony import Role, TextDelta
from mlx_gptoss.sampling import SamplingParams

GREEDY_FLAGS = ["--max-tokens", "24", "--temp", "0", "--dtype", "float32"]


def subprocess_cli(*args, stdin: str | None = None, **popen):
    done = subprocess.run([sys.executable, "-c", "from mlx_gptoss.cli import main; main()",
                           *map(str, args)], input=None if stdin is None else stdin.encode(),
                          capture_output=True, env=subprocess_env(), timeout=120, **popen)
    # Decoded by hand: text mode would turn a generated "\r" into "\n".
    done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()
    return done


@pytest.fixture(scope="module")
def expected(chat_model):
    model, tok = chat_model
    result = api_generate(model, tok, "Hello", max_tokens=24, sampling=SamplingParams(temperature=0))
    assert result.text, "the greedy answer must be non-empty for the comparison to mean much"
    return result


@pytest.mark.slow
def test_generate_prints_the_answer_alone_on_stdout(chat_checkpoint, expected, capsys):
    code, out, err = cli(capsys, "generate", "-m", chat_checkpoint, "-p", "Hello", *GREEDY_FLAGS,
                         "--verbose", "--stats")
    assert code == 0
    assert out == expected.text + "\n"
    assert "<|start|>user<|message|>Hello<|end|><|start|>assistant" in err  # --verbose prompt
    assert "prompt: " in err and "tok/s" in err and "peak memory" in err
    assert expected.text not in err


@pytest.mark.slow
def test_generate_reads_stdin_and_streams_json(chat_checkpoint, expected, capsys, monkeypatch):
    code, out, _ = cli(capsys, "generate", "-m", chat_checkpoint, *GREEDY_FLAGS, "--json",
                       stdin="Hello", monkeypatch=monkeypatch)
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1] == {"type": "reply", "stop": "length", "text": expected.text}
    done = [e for e in events if e["type"] == "done"]
    assert done[0]["stats"]["generation_tokens"] == 24
    final_text = "".join(e["text"] for e in events if e["type"] == "text" and e["channel"] == "final")
    assert final_text == expected.text


@pytest.mark.slow
def test_generate_as_a_real_subprocess(chat_checkpoint, expected):
    done = subprocess_cli("generate", "-m", chat_checkpoint, *GREEDY_FLAGS, "--hide-reasoning",
                          stdin="Hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.slow
def test_user_errors_are_one_line_exit_2(chat_checkpoint, tmp_path, capsys, monkeypatch):
    broken_config = tmp_path / "broken"
    broken_config.mkdir()
    write(broken_config / "config.json", "{not json")
    no_vocab = tmp_path / "no_vocab"
    no_vocab.mkdir()
    for f in chat_checkpoint.iterdir():
        if f.name != "o200k_base.tiktoken":
            (no_vocab / f.name).symlink_to(f)
    monkeypatch.setenv("MLX_GPTOSS_VOCAB", str(tmp_path / "missing.tiktoken"))
    cases = {
        "missing dir": (["-m", tmp_path / "nope", "-p", "x"], "nope: model directory not found"),
        "config": (["-m", broken_config, "-p", "x"], "config.json"),
        "vocabulary": (["-m", no_vocab, "-p", "x"], "missing.tiktoken"),
        "tools file": (["-m", chat_checkpoint, "-p", "x", "--tools",
                        write(tmp_path / "t.json", '[{"type": "function", "function": {}}]')],
                       "t.json, tool 0: invalid function name"),
        "tools json": (["-m", chat_checkpoint, "-p", "x", "--tools",
                        write(tmp_path / "u.json", "[")], "u.json (tools file): not valid JSON"),
        "effort": (["-m", chat_checkpoint, "-p", "x", "-r", "extreme"], "--reasoning-effort"),
        "top-p": (["-m", chat_checkpoint, "-p", "x", "--top-p", "0"], "top-p must be in"),
    }
    for name, (args, message) in cases.items():
        code, out, err = cli(capsys, "generate", *args)
        assert code == 2, name
        assert err.startswith("error: ") and message in err, (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err, name
    done = subprocess_cli("generate", "-m", tmp_path / "nope", "-p", "x")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
    done = subprocess_cli("--debug", "generate", "-m", tmp_path / "nope", "-p", "x")
    assert "Traceback" in done.stderr


# --------------------------------------------------------------------------- the chat REPL


@pytest.mark.slow
def test_chat_repl_commands_and_ctrl_c(chat_model, tmp_path, capsys):
    from mlx_gptoss.chat import Chat

    model, tok = chat_model
    chat = Chat(model, tok, sampling=SamplingParams(temperature=0), max_tokens=12)

    class InterruptingDisplay(Display):
        turns = 0

        def show(self, event):
            if isinstance(event, TextDelta) and self.turns == 1:
                self.turns += 1
                raise KeyboardInterrupt
            super().show(event)
            if type(event).__name__ == "Reply":
                self.turns += 1

    saved = tmp_path / "s.json"
    script = "\n".join(["/help", "/effort low", "/effort huge", "first", "second", "third",
                        f"/save {saved}", "/reset", f"/load {saved}", "/bogus", "/quit",
                        "never"]) + "\n"
    repl(chat, InterruptingDisplay(tok), stdin=io.StringIO(script))
    out, err = capsys.readouterr()
    assert "/effort [low|medium|high]" in err
    assert "error: /effort takes one of low, medium, high" in err
    assert "[interrupted: this turn was discarded]" in err
    assert "error: unknown command /bogus" in err
    users = [m.text() for m in chat.messages if m.author.role is Role.USER]
    assert users == ["first", "third"]  # "second" was interrupted, "never" came after /quit
    assert chat.reasoning_effort.value == "Low"
    assert json.loads(saved.read_text())["messages"][0]["content"][0]["reasoning_effort"] == "Low"
    assert out.count("\n") == 2  # two answers reached stdout


def test_bad_seed_is_one_line_exit_2(chat_checkpoint, capsys):
    code, out, err = cli(capsys, "generate", "-m", chat_checkpoint, "-p", "x", "--seed", "-1")
    assert code == 2 and out == ""
    assert err == "error: seed must be in [0, 2**64), got -1\n"


def test_chat_save_and_load_take_the_rest_of_the_line(chat_model, tmp_path, capsys, monkeypatch):
    """Spaces, apostrophes and stray quotes are part of the file name; a bad name is an error
    line, never a traceback that ends the session."""
    from mlx_gptoss.chat import Chat

    model, tok = chat_model
    chat = Chat(model, tok, instructions="Keep me.")
    monkeypatch.chdir(tmp_path)
    script = ["/save my chat.json", "/save Bob's chat.json", '/save "quoted name.json"',
              '/load "missing.json', "/load my chat.json", "/save  ", "/quit"]
    repl(chat, Display(tok), stdin=io.StringIO("\n".join(script) + "\n"))
    out, err = capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["Bob's chat.json", "my chat.json", "quoted name.json"]
    assert "Keep me." in (tmp_path / "Bob's chat.json").read_text()
    assert err.splitlines() == [
        "saved my chat.json", "saved Bob's chat.json", "saved quoted name.json",
        'error: "missing.json (saved chat): not found',
        "loaded my chat.json", "error: /save needs a file name"]
    assert out == "" and chat.instructions == "Keep me."
