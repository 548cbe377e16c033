"""`mlx-gptoss harmony render|parse`, run through the real entry point."""
from __future__ import annotations

import json

import openai_harmony as oh
import pytest

from mlx_gptoss.cli import main

CONV = {"messages": [
    {"role": "system", "content": [{"type": "system_content", "reasoning_effort": "Low"}]},
    {"role": "developer", "content": [{"type": "developer_content", "instructions": "Be brief.", "tools": {
        "functions": {"name": "functions", "tools": [{"name": "f", "description": "d", "parameters": {
            "type": "object", "properties": {"x": {"type": "integer"}}}}]}}}]},
    {"role": "user", "content": "hi <|start|>"},
]}


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.fixture
def conv_file(tmp_path):
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(CONV))
    return path


def test_render_prints_the_oracles_ids(conv_file, vocab_file, oracle, capsys):
    theirs = oh.Conversation.from_json(json.dumps(CONV))
    code, out, _ = run(capsys, "harmony", "render", str(conv_file), "--vocab", str(vocab_file))
    assert code == 0
    assert json.loads(out) == oracle.render_conversation_for_completion(theirs, oh.Role.ASSISTANT)
    code, out, _ = run(capsys, "harmony", "render", str(conv_file), "--no-completion", "--vocab", str(vocab_file))
    assert json.loads(out) == oracle.render_conversation(theirs)
    code, out, _ = run(capsys, "harmony", "render", str(conv_file), "--next-role", "user", "--vocab", str(vocab_file))
    assert json.loads(out) == oracle.render_conversation_for_completion(theirs, oh.Role.USER)


def test_render_text(conv_file, vocab_file, capsys, monkeypatch):
    monkeypatch.setenv("MLX_GPTOSS_VOCAB", str(vocab_file))
    code, out, _ = run(capsys, "harmony", "render", str(conv_file), "--text")
    assert code == 0
    assert out.startswith("<|start|>system<|message|>") and out.rstrip("\n").endswith("<|start|>assistant")
    assert "Reasoning: low" in out and "type f = (_: {\nx?: number,\n}) => any;" in out


def test_parse_prints_harmony_json(tmp_path, vocab_file, tok, oracle, capsys):
    ids = oracle.encode("<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>commentary "
                        "to=functions.f <|constrain|>json<|message|>{\"x\": 1}<|call|>", allowed_special="all")
    path = tmp_path / "ids.json"
    path.write_text(json.dumps(ids))
    code, out, err = run(capsys, "harmony", "parse", str(path), "--vocab", str(vocab_file))
    assert code == 0 and err == ""
    expected = oracle.parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT)
    assert json.loads(out) == json.loads(oh.Conversation.from_messages(expected).to_json())


def test_parse_reports_repairs_on_stderr(tmp_path, vocab_file, tok, capsys):
    path = tmp_path / "ids.json"
    path.write_text(json.dumps(tok.encode("No header here.") + [tok.return_]))
    code, out, err = run(capsys, "harmony", "parse", str(path), "--vocab", str(vocab_file))
    assert code == 0
    assert json.loads(out)["messages"][0]["channel"] == "final"
    assert err.startswith("warning: token")
    code, out, err = run(capsys, "harmony", "parse", str(path), "--strict", "--vocab", str(vocab_file))
    assert code == 2 and err.startswith("error: end of stream after")


@pytest.mark.parametrize("content, args, message", [
    ('{"messages": [{"role": "robot", "content": "x"}]}', [], "bad.json: message 0: unknown role 'robot'"),
    ("{nope", [], "bad.json (conversation): not valid JSON"),
    (json.dumps(CONV), ["--next-role", "robot"], "error: unknown role 'robot'"),
])
def test_render_errors_are_one_line(content, args, message, tmp_path, vocab_file, capsys):
    path = tmp_path / "bad.json"
    path.write_text(content)
    code, out, err = run(capsys, "harmony", "render", str(path), "--vocab", str(vocab_file), *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_files_and_bad_ids(tmp_path, vocab_file, capsys):
    code, _, err = run(capsys, "harmony", "render", str(tmp_path / "none.json"), "--vocab", str(vocab_file))
    assert code == 2 and err.startswith("error: ") and "none.json (conversation): not found" in err
    path = tmp_path / "ids.json"
    path.write_text('[1, "two"]')
    code, _, err = run(capsys, "harmony", "parse", str(path), "--vocab", str(vocab_file))
    assert code == 2 and "JSON array of integer token ids" in err
    code, _, err = run(capsys, "harmony", "render", str(path), "--vocab", str(tmp_path / "missing.tiktoken"))
    assert code == 2 and err.startswith("error:")


def test_wrong_vocabulary_is_refused_by_the_cli(conv_file, tmp_path, capsys):
    bad = tmp_path / "o200k_base.tiktoken"
    bad.write_bytes(b"garbage")
    code, _, err = run(capsys, "harmony", "render", str(conv_file), "--vocab", str(bad))
    assert code == 2 and "does not have the o200k_base SHA-256" in err
