"""The CLI's tool handling on a scripted model: `generate --tools` stops at a call and prints
it, `chat --tools` asks the user for the result, `--python` runs code in the sandbox."""
from __future__ import annotations

import io
import json
import sys

import pytest

import mlx_gptoss.hub
from mlx_gptoss.cli import main
from mlx_gptoss.sampling import SamplingParams
from scripted import ScriptedModel, harmony

CALL = ("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"location": "Paris"}<|call|>')
ANSWER = "<|channel|>final<|message|>Sunny.<|return|>"
PYTHON = "<|channel|>analysis to=python code<|message|>print(6 * 7)<|call|>"


@pytest.fixture
def tools_file(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                       "required": ["location"]}}}]))
    return path


def use_script(monkeypatch, chat_model, *responses):
    _, tok = chat_model
    model = ScriptedModel([harmony(r) for r in responses])
    model.sampling_defaults = SamplingParams(temperature=0)
    monkeypatch.setattr(mlx_gptoss.hub, "load", lambda name, dtype=None, **k: (model, tok))
    return model


def cli(capsys, *args):
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return done.value.code or 0, out, err


def test_generate_stops_at_an_unanswerable_call(chat_model, tools_file, monkeypatch, capsys):
    use_script(monkeypatch, chat_model, CALL, ANSWER)
    code, out, err = cli(capsys, "generate", "-m", "x", "-p", "Weather?", "--tools", tools_file)
    assert code == 0
    assert json.loads(out) == {"tool_call": {"recipient": "functions.get_weather",
                                             "arguments": '{"location": "Paris"}'}}
    assert "-> functions.get_weather" in err
    code, out, _ = cli(capsys, "generate", "-m", "x", "-p", "Weather?", "--tools", tools_file,
                       "--json")
    events = [json.loads(line) for line in out.splitlines()]
    assert {"type": "tool_call", "index": 0, "recipient": "functions.get_weather",
            "arguments": '{"location": "Paris"}'} in events
    assert events[-1] == {"type": "reply", "stop": "call", "text": ""}


def test_chat_asks_the_user_for_a_tool_result(chat_model, tools_file, monkeypatch, capsys):
    model = use_script(monkeypatch, chat_model, CALL, ANSWER)
    monkeypatch.setattr(sys, "stdin", io.StringIO('Weather?\n{"sky": "clear"}\n'))
    code, out, err = cli(capsys, "chat", "-m", "x", "--tools", tools_file)
    assert code == 0 and out == "Sunny.\n"
    # The call is shown once, as it streams, and then its result is asked for.
    assert err.count('{"location": "Paris"}') == 1
    assert '-> functions.get_weather: {"location": "Paris"}\n' in err
    assert "result for functions.get_weather> " in err
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>' \
           '{"sky": "clear"}<|end|>' in _decode(model.prefills[-1])


def test_python_flag_runs_code_in_the_sandbox(chat_model, monkeypatch, capsys):
    use_script(monkeypatch, chat_model, PYTHON, ANSWER)
    code, out, err = cli(capsys, "generate", "-m", "x", "-p", "Compute", "--python")
    assert code == 0 and out == "Sunny.\n"
    assert "[tool] python returned: 42" in err


def _decode(ids):
    from mlx_gptoss.harmony import load_tokenizer

    return load_tokenizer().decode(ids)
