"""Training data: rendering (against openai-harmony) and the loss masks."""
from __future__ import annotations

import json

import numpy as np
import openai_harmony as oh
import pytest
from harmony_fixtures import to_oracle

from mlx_gptoss.harmony import Conversation
from mlx_gptoss.train_data import DataError, chat_to_harmony, data_files, load_examples

SYSTEM = {"role": "system", "content": "reasoning language: French"}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trained_text(tok, ex) -> str:
    """The text of the predicted tokens (targets are tokens[1:] where weights[1:] are 1)."""
    return tok.decode([int(t) for t, w in zip(ex.tokens[1:], ex.weights[1:]) if w])


@pytest.mark.slow
def test_single_turn_keeps_its_reasoning_and_matches_the_oracle(tok, oracle, tmp_path):
    row = {"messages": [SYSTEM, {"role": "user", "content": "Bonjour?"},
                        {"role": "assistant", "thinking": "Greet back.", "content": "Salut!"}],
           "reasoning_effort": "high"}
    [ex] = load_examples(write_rows(tmp_path / "d.jsonl", [row]), tok)
    # The oracle's training render with auto_drop_analysis=False keeps the CoT of the single
    # turn (its default would drop it): token for token what we render.
    convo = to_oracle(Conversation(chat_to_harmony(row, "row")))
    want = oracle.render_conversation_for_training(
        convo, oh.RenderConversationConfig(auto_drop_analysis=False))
    assert ex.tokens.tolist() == want
    assert "Reasoning: high" in tok.decode(ex.tokens.tolist())
    assert "# Instructions\n\nreasoning language: French" in tok.decode(ex.tokens.tolist())
    assert trained_text(tok, ex) == ("<|channel|>analysis<|message|>Greet back.<|end|>"
                                     "<|start|>assistant<|channel|>final<|message|>Salut!<|return|>")


def test_final_only_mask(tok, tmp_path):
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "reasoning_content": "Add.", "content": "4"}]}
    [ex] = load_examples(write_rows(tmp_path / "d.jsonl", [row]), tok, mask="final")
    assert trained_text(tok, ex) == "<|start|>assistant<|channel|>final<|message|>4<|return|>"


def test_multi_turn_drops_finished_reasoning_and_can_split_per_turn(tok, tmp_path):
    row = {"messages": [{"role": "user", "content": "Q1"},
                        {"role": "assistant", "thinking": "T1", "content": "A1"},
                        {"role": "user", "content": "Q2"},
                        {"role": "assistant", "reasoning": "T2", "content": "A2"}]}
    data = write_rows(tmp_path / "d.jsonl", [row])
    [last] = load_examples(data, tok)
    text = tok.decode(last.tokens.tolist())
    assert "T1" not in text and "A1<|end|>" in text and text.endswith("A2<|return|>")
    assert trained_text(tok, last) == ("<|channel|>analysis<|message|>T2<|end|><|start|>assistant"
                                       "<|channel|>final<|message|>A2<|return|>")
    first, second = load_examples(data, tok, per_turn=True)
    assert tok.decode(first.tokens.tolist()).endswith(
        "<|channel|>analysis<|message|>T1<|end|><|start|>assistant<|channel|>final"
        "<|message|>A1<|return|>")
    assert second.tokens.tolist() == last.tokens.tolist()


def test_tool_calls_train_the_call_not_the_result(tok, oracle, tmp_path):
    row = {"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "thinking": "Need the tool.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 20}"},
        {"role": "assistant", "content": "20 degrees."}]}
    data = write_rows(tmp_path / "d.jsonl", [row])
    [ex] = load_examples(data, tok)
    text = trained_text(tok, ex)
    assert "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json" \
           "<|message|>{\"city\":\"Paris\"}<|call|>" in "<|start|>assistant" + text
    assert "temp" not in text and text.endswith("20 degrees.<|return|>")
    assert "Need the tool." in text  # reasoning inside the unfinished tool turn is kept
    rendered = tok.decode(ex.tokens.tolist())
    assert "namespace functions" in rendered and "get_weather" in rendered
    # Cut at the call: the sample ends with <|call|>, as the model emits it.
    row["messages"] = row["messages"][:2]
    [call] = load_examples(write_rows(tmp_path / "c.jsonl", [row]), tok)
    assert call.tokens[-1] == tok.call
    convo = to_oracle(Conversation(chat_to_harmony(row, "row")))
    assert call.tokens.tolist() == oracle.render_conversation_for_training(convo)


def test_harmony_json_rows(tok, tmp_path):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                        {"role": "assistant", "channel": "final",
                         "content": [{"type": "text", "text": "Hello"}]}]}
    [ex] = load_examples(write_rows(tmp_path / "d.jsonl", [row]), tok)
    assert tok.decode(ex.tokens.tolist()) == ("<|start|>user<|message|>Hi<|end|><|start|>assistant"
                                              "<|channel|>final<|message|>Hello<|return|>")


@pytest.mark.parametrize("row, match", [
    ("{not json", r"d\.jsonl:2: not valid JSON"),
    ({"messages": "hi"}, r"d\.jsonl:2: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, r"d\.jsonl:2: message 0: unknown role"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
     r"d\.jsonl:2: message 0: a tool call needs function.name"),
    ({"messages": [{"role": "user", "channel": 3, "content": "x"}]}, r"d\.jsonl:2: .*channel"),
])
def test_malformed_row_is_named_by_file_and_line(tok, tmp_path, row, match):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match=match):
        load_examples(write_rows(tmp_path / "d.jsonl", [good, row]), tok)


def test_over_long_rows_truncated_or_dropped(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "word " * 30},
                          {"role": "assistant", "content": "answer " * 30}]}]
    data = write_rows(tmp_path / "d.jsonl", rows)
    [full] = load_examples(data, tok)
    warnings: list[str] = []
    [cut] = load_examples(data, tok, max_seq_length=len(full.tokens) - 5, warn=warnings.append)
    assert len(cut.tokens) == len(full.tokens) - 5
    np.testing.assert_array_equal(cut.weights, full.weights[:-5])
    assert "truncated" in warnings[0] and "d.jsonl:1" in warnings[0]
    assert load_examples(data, tok, max_seq_length=10, overflow="drop", warn=warnings.append) == []
    assert "dropped" in warnings[-1]


def test_data_directory_layout(tmp_path):
    with pytest.raises(DataError, match="no train.jsonl"):
        data_files(tmp_path)
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "valid.jsonl").write_text("")
    assert data_files(tmp_path) == (tmp_path / "train.jsonl", tmp_path / "valid.jsonl")
