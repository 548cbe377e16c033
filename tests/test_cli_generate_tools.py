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


@pytest.mark.slow
def test_python_flag_runs_code_in_the_sandbox(chat_model, monkeypatch, capsys):
    use_script(monkeypatch, chat_model, PYTHON, ANSWER)
    code, out, err = cli(capsys, "generate", "-m", "x", "-p", "Compute", "--python")
    assert code == 2 and "--python-auto" in err  # generate cannot ask before running code
    code, out, err = cli(capsys, "generate", "-m", "x", "-p", "Compute", "--python",
                         "--python-auto")
    assert code == 0 and out == "Sunny.\n"
    assert "[tool] python returned: 42" in err


def _decode(ids):
    from mlx_gptoss.harmony import load_tokenizer

    return load_tokenizer().decode(ids)


def test_a_script_answers_the_call_through_a_conversation_file(chat_model, tools_file, tmp_path,
                                                                monkeypatch, capsys):
    """Issue 19, item 7: generate stops at the call and saves the conversation; the script
    appends the tool's message; generate resumes the turn from the file, with no prompt."""
    model = use_script(monkeypatch, chat_model, CALL, ANSWER)
    conversation = tmp_path / "conv.json"
    code, out, _ = cli(capsys, "generate", "-m", "x", "-p", "Weather?", "--tools", tools_file,
                       "--conversation", conversation, "-r", "low")
    assert code == 0 and json.loads(out)["tool_call"]["recipient"] == "functions.get_weather"
    saved = json.loads(conversation.read_text())
    assert [m["role"] for m in saved["messages"]] == ["system", "developer", "user", "assistant"]
    saved["messages"].append({"role": "tool", "name": "functions.get_weather",
                              "recipient": "assistant", "channel": "commentary",
                              "content": [{"type": "text", "text": '{"sky": "clear"}'}]})
    conversation.write_text(json.dumps(saved))

    code, _, err = cli(capsys, "generate", "-m", "x", "-p", "again", "--conversation",
                       conversation)
    assert code == 2 and "ends with a tool's result: continue it without --prompt" in err
    code, out, _ = cli(capsys, "generate", "-m", "x", "--conversation", conversation)
    assert code == 0 and out == "Sunny.\n"
    # The resumed prompt is the saved one: effort and the tool from the file, the tool's answer.
    prompt = _decode(model.prefills[-1])
    assert "Reasoning: low" in prompt and "type get_weather" in prompt
    assert prompt.endswith('<|start|>functions.get_weather to=assistant<|channel|>commentary'
                           '<|message|>{"sky": "clear"}<|end|><|start|>assistant')
    final = json.loads(conversation.read_text())["messages"]
    assert [m["role"] for m in final][-2:] == ["tool", "assistant"]
    assert final[-1]["content"][0]["text"] == "Sunny."

    conversation.write_text('{"messages": [{"role": "robot", "content": "x"}]}')
    code, _, err = cli(capsys, "generate", "-m", tmp_path / "no-model", "--conversation",
                       conversation)  # checked before the model is looked for
    assert code == 2 and err.startswith(f"error: {conversation}: message 0: unknown role")


def test_a_conversation_file_in_openai_messages_shape(chat_model, tools_file, tmp_path,
                                                      monkeypatch, capsys):
    """Issue 19, item 7: an OpenAI chat history (content strings, tool_calls, a tool message)
    continues the same way; the command's own settings apply, as the file sets none."""
    model = use_script(monkeypatch, chat_model, ANSWER)
    conversation = tmp_path / "openai.json"
    conversation.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'}]}))
    code, out, _ = cli(capsys, "generate", "-m", "x", "--tools", tools_file, "-r", "high",
                       "--conversation", conversation)
    assert code == 0 and out == "Sunny.\n"
    prompt = _decode(model.prefills[-1])
    assert "Reasoning: high" in prompt and "type get_weather" in prompt
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary '
            '<|constrain|>json<|message|>{"location": "Paris"}<|call|>') in prompt
    assert prompt.endswith('<|start|>functions.get_weather to=assistant<|channel|>commentary'
                           '<|message|>{"sky": "clear"}<|end|><|start|>assistant')
    saved = json.loads(conversation.read_text())["messages"]  # written back as harmony JSON
    assert saved[-1]["role"] == "assistant" and saved[-1]["content"][0]["text"] == "Sunny."
