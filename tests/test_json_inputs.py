"""Issue 19, item 1: every JSON reader turns hostile input into one `GptOssError` line.

A hundred thousand nested `[` makes `json.loads` raise RecursionError; a few hundred levels
parse but overflow the recursive code that walks them. Each reader must refuse both, name the
file, and leave a REPL running. The CLI cases run in-process through the real entry point.
"""
from __future__ import annotations

import io
import json
import struct
import sys

import pytest
from cli_runner import cli, one_line

from mlx_gptoss.config import load_config
from mlx_gptoss.env import MAX_JSON_DEPTH, check_depth, json_depth, parse_json, read_json
from mlx_gptoss.errors import (CheckpointError, ConfigError, GptOssError, HarmonyError,
                               SchemaError)

DEEP = "[" * 100_000  # RecursionError inside json.loads
NESTED = "[" * 300 + "]" * 300  # parses, then overflows whatever walks it recursively
BAD_UTF8 = b'{"a": "\xff"}'


def deep_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


# --------------------------------------------------------------------------- the helper


@pytest.mark.parametrize("text, fragment", [
    (DEEP, f"nested more than {MAX_JSON_DEPTH} levels"),
    (NESTED, f"nested more than {MAX_JSON_DEPTH} levels"),
    (BAD_UTF8, "not UTF-8"),
    ("{nope", "not valid JSON"),
    ("[1]", "expected a JSON object, got a JSON array"),
    ("true", "expected a JSON object, got true or false"),
])
def test_parse_json_refuses_with_the_callers_error_class(text, fragment):
    with pytest.raises(ConfigError) as e:
        parse_json(text, "the thing", expect=dict, error=ConfigError)
    assert str(e.value).startswith("the thing: ") and fragment in str(e.value)


def test_parse_json_accepts_what_it_should():
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_depth(parse_json(nested, "x", expect=list)) == MAX_JSON_DEPTH
    assert parse_json(b'{"a": [1, {"b": 2}]}', "x", expect=dict) == {"a": [1, {"b": 2}]}
    assert parse_json("7", "x", expect=int) == 7
    with pytest.raises(GptOssError, match="expected an integer, got true or false"):
        parse_json("true", "x", expect=int)
    assert json_depth(3) == 0 and json_depth({"a": [[]]}) == 3


def test_read_json_names_the_file(tmp_path):
    with pytest.raises(GptOssError, match=r"missing\.json \(tools file\): not found"):
        read_json(tmp_path / "missing.json", "tools file")
    with pytest.raises(GptOssError, match="is a directory"):
        read_json(tmp_path)
    (tmp_path / "deep.json").write_text(DEEP)
    with pytest.raises(SchemaError, match=r"deep\.json: nested more than"):
        read_json(tmp_path / "deep.json", error=SchemaError)


def test_check_depth_for_data_that_arrives_parsed():
    value = json.loads(NESTED)
    with pytest.raises(HarmonyError, match="request: nested more than"):
        check_depth(value, "request", HarmonyError)
    assert check_depth([[1]], "ok") == [[1]]


# --------------------------------------------------------------------------- every reader


def test_config_and_safetensors_readers(tmp_path):
    (tmp_path / "config.json").write_text(DEEP)
    with pytest.raises(ConfigError, match=r"config\.json: nested more than"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_bytes(BAD_UTF8)
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path)

    from mlx_gptoss.safetensors_io import open_tensor_dir, read_header

    header = DEEP.encode()
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="corrupt safetensors header: nested more than"):
        read_header(shard)
    (tmp_path / "model.safetensors.index.json").write_text(NESTED)
    with pytest.raises(CheckpointError, match=r"index\.json: nested more than"):
        open_tensor_dir(tmp_path)


def test_conversation_from_json_and_tools_file(tmp_path):
    from mlx_gptoss.harmony import Conversation
    from mlx_gptoss.tools.functions import FunctionTool, ToolsFileError, load_tools_file

    with pytest.raises(HarmonyError, match="conversation: nested more than"):
        Conversation.from_json(DEEP)
    path = tmp_path / "tools.json"
    path.write_text(DEEP)
    with pytest.raises(ToolsFileError, match=r"tools\.json \(tools file\): nested more than"):
        load_tools_file(path)
    # Hostile tool-call arguments from the model become an error result, not a crash.
    tool = FunctionTool("f", "", None, lambda **kw: "ran")
    assert "nested more than" in json.loads(tool.run(DEEP))["error"]


def test_typescript_renderer_refuses_a_deep_schema_and_renders_a_deep_enough_one():
    from mlx_gptoss.harmony.typescript import schema_to_typescript

    with pytest.raises(HarmonyError, match="nested more than"):
        schema_to_typescript(deep_schema(300))
    shallow = schema_to_typescript(deep_schema(MAX_JSON_DEPTH // 2 - 1))
    assert shallow.count("x?:") == MAX_JSON_DEPTH // 2 - 1


def test_json_schema_readers(tmp_path):
    from mlx_gptoss.constrained import json_schema_of, load_json_schema

    (tmp_path / "s.json").write_text(DEEP)
    with pytest.raises(SchemaError, match=r"s\.json \(JSON Schema\): nested more than"):
        load_json_schema(tmp_path / "s.json")
    with pytest.raises(SchemaError, match="nested more than"):
        json_schema_of(deep_schema(300))
    with pytest.raises(SchemaError, match="JSON Schema text: nested more than"):
        json_schema_of(DEEP)


# --------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("command", ["render", "parse"])
def test_harmony_cli_deep_file_and_stdin(command, tmp_path, vocab_file, capsys,  # noqa: F811
                                         monkeypatch):
    path = tmp_path / "deep.json"
    path.write_text(DEEP)
    code, out, err = cli(capsys, "harmony", command, path, "--vocab", vocab_file)
    one_line(code, err, "deep.json", "nested more than")
    code, out, err = cli(capsys, "harmony", command, "-", "--vocab", vocab_file,
                         stdin=DEEP.encode(), monkeypatch=monkeypatch)
    one_line(code, err, "on stdin", "nested more than")


def test_generate_options_read_before_the_model(tmp_path, capsys):
    """--tools and --json-schema fail before any model is loaded (the model dir is bogus)."""
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    for option in ("--tools", "--json-schema"):
        code, _, err = cli(capsys, "generate", "-m", tmp_path / "no-model", "-p", "x", option, deep)
        one_line(code, err, "deep.json", "nested more than")
    code, _, err = cli(capsys, "convert", "--hf-path", tmp_path, "--mlx-path", tmp_path / "out")
    one_line(code, err, "config.json")


def test_chat_load_and_the_repl_survive_deep_files(chat_checkpoint, chat_model, tmp_path, capsys,
                                                   monkeypatch):
    from mlx_gptoss.chat import Chat
    from mlx_gptoss.cli.chat import repl
    from mlx_gptoss.cli.generate import Display

    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    code, _, err = cli(capsys, "chat", "-m", chat_checkpoint, "--load", deep, "--dtype", "float32",
                       stdin=b"", monkeypatch=monkeypatch)
    one_line(code, err, "deep.json", "nested more than")

    model, tok = chat_model
    session = Chat(model, tok, reasoning_effort="low")
    out, errs = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", errs)
    repl(session, Display(tok, out=out, err=errs),
         stdin=io.StringIO(f"/load {deep}\n/effort high\n/quit\n"))
    lines = errs.getvalue().splitlines()
    assert any(line.startswith("error: ") and "nested more than" in line for line in lines)
    assert "reasoning effort: high" in lines  # the session went on after the error
