"""Issue 19, items 3 and 8: multi-line messages, REPL commands that confirm, a tool call shown
once, messages that start with "/", history across sessions, and /save + /load restoring
every setting."""
from __future__ import annotations

import io
import json

import pytest

from mlx_gptoss.chat import Chat
from mlx_gptoss.cli import chat as chat_cli
from mlx_gptoss.cli.chat import PASTE_END, PASTE_START, read_message, repl
from mlx_gptoss.cli.generate import Display
from mlx_gptoss.errors import GptOssError
from mlx_gptoss.harmony import ChannelConfig, Role, ToolNamespaceConfig
from mlx_gptoss.sampling import SamplingParams
from mlx_gptoss.tools import Tool


def lines(*items: str):
    """`next_line` over `items` (each gets its newline), then end of input."""
    queue = [item + "\n" for item in items]
    return lambda: queue.pop(0) if queue else ""


@pytest.mark.parametrize("first, rest, expected", [
    ('"""', ["line one", "", "  line three", '"""'], "line one\n\n  line three"),
    ('"""first', ["last"""'"""'], "first\nlast"),
    ('"""one line"""', [], "one line"),
    ('"""', ["cut off by end of input"], "cut off by end of input"),
    (PASTE_START + "pasted\n", ["block" + PASTE_END], "pasted\nblock"),
    ("plain line", [], None),
    ("/effort low", [], None),
])
def test_read_message(first, rest, expected):
    assert read_message(first, lines(*rest)) == expected


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def chat(chat_model):
    model, tok = chat_model
    return Chat(model, tok, sampling=SamplingParams(temperature=0), max_tokens=2)


def run_repl(chat, script: str, capsys) -> tuple[str, str]:
    repl(chat, Display(chat.tokenizer, show_reasoning=False), stdin=io.StringIO(script))
    return capsys.readouterr()


def test_blocks_slash_messages_and_confirmations(chat, capsys):
    script = "\n".join(['"""', "a pasted", "block", '"""', "//etc/hosts is a file", "/effort",
                        "/effort high", "/system You are terse.", "/system",
                        "/developer Answer in French.", "/quit"]) + "\n"
    _, err = run_repl(chat, script, capsys)
    users = [m.text() for m in chat.messages if m.author.role is Role.USER]
    assert users == ["a pasted\nblock", "/etc/hosts is a file"]
    confirmations = [line for line in err.splitlines() if ": " in line and not
                     line.startswith("[")]
    assert confirmations == ["reasoning effort: medium", "reasoning effort: high",
                             "system identity: You are terse.", "system identity: (default)",
                             "developer instructions: Answer in French."]
    assert chat.system is None and chat.instructions == "Answer in French."


def test_ctrl_d_ends_the_line_and_history_is_kept(chat, capsys, monkeypatch, tmp_path):
    history = tmp_path / "history"
    monkeypatch.setenv(chat_cli.HISTORY_ENV, str(history))
    typed = ["/effort low"]

    def fake_input(prompt: str) -> str:
        if not typed:
            raise EOFError
        line = typed.pop(0)
        import readline

        readline.add_history(line)  # what input() does under readline
        return line

    monkeypatch.setattr(chat_cli, "ask", fake_input)
    repl(chat, Display(chat.tokenizer), stdin=FakeTerminal())
    _, err = capsys.readouterr()
    assert err.endswith("reasoning effort: low\n\n")  # Ctrl-D: a newline for the shell prompt
    assert "/effort low" in history.read_text().splitlines()
    monkeypatch.setenv(chat_cli.HISTORY_ENV, "")
    assert chat_cli.history_file() is None


def test_a_tool_call_is_shown_once(chat_model, capsys, monkeypatch):
    from mlx_gptoss.harmony import Author, Message, TextContent

    monkeypatch.setattr("sys.stdin", io.StringIO('{"temp": 20}\n'))
    call = Message(Author(Role.ASSISTANT), [TextContent('{"city": "Paris"}')], "commentary",
                   "functions.get_weather", "<|constrain|>json")
    assert chat_cli._ask_tool_result(call) == '{"temp": 20}'
    _, err = capsys.readouterr()
    assert err == "result for functions.get_weather> "  # the streamed call is not repeated


class FakePython(Tool):
    """Stands in for the python tool (no process): declares the namespace, answers "ok"."""

    name = "python"
    closed = False

    def namespace_config(self) -> ToolNamespaceConfig:
        return ToolNamespaceConfig.python()

    def process(self, message):
        return [self.reply(message, "ok")]

    def restart(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_save_and_load_restore_every_setting(chat_model, tmp_path):
    model, tok = chat_model
    saved = tmp_path / "chat.json"
    chat = Chat(model, tok, python=FakePython(), reasoning_effort="low", system="Be terse.")
    chat.knowledge_cutoff = "2025-01"
    chat.channel_config = ChannelConfig.require_channels(["analysis", "final"])
    chat.save(saved)
    system = json.loads(saved.read_text())["messages"][0]["content"][0]
    assert system["knowledge_cutoff"] == "2025-01" and "python" in system["tools"]

    restored = Chat(model, tok, python=FakePython())
    restored.load(saved)
    assert restored.knowledge_cutoff == "2025-01"
    assert restored.channel_config.valid_channels == ["analysis", "final"]
    assert restored.python is not None and restored.system == "Be terse."
    assert restored.prompt_tokens() == chat.prompt_tokens()

    # A file never switches the python tool on: model-written code runs only on opt-in.
    plain = Chat(model, tok)
    with pytest.raises(GptOssError, match="uses the python tool"):
        plain.load(saved)
    assert plain.python is None and plain.knowledge_cutoff != "2025-01"  # nothing changed
    # A saved chat without it switches it off.
    Chat(model, tok).save(tmp_path / "plain.json")
    tool = FakePython()
    with_python = Chat(model, tok, python=tool)
    with_python.load(tmp_path / "plain.json")
    assert with_python.python is None and tool.closed
