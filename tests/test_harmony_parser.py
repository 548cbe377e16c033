"""Streaming parser: strict mode agrees with openai-harmony's StreamableParser token by token;
lenient mode never raises and repairs what models get wrong."""
from __future__ import annotations

import json

import openai_harmony as oh
import pytest
from harmony_fixtures import chat_message, conversation, examples
from hypothesis import given
from hypothesis import strategies as st

from mlx_gptoss.errors import HarmonyError
from mlx_gptoss.harmony import (
    AnswerDone,
    Author,
    Message,
    MessageEnd,
    MessageStart,
    Recovery,
    RenderConversationConfig,
    Role,
    StreamParser,
    TextDelta,
    ToolCall,
    parse_messages,
    render_conversation,
    render_message,
)

HYPOTHESIS = examples(120)
KEEP_ALL = RenderConversationConfig(auto_drop_analysis=False)


def oracle_trace(oracle, tokens, role, strict=True):
    """(error position or None, per-token states, messages as JSON) from the oracle."""
    parser = oh.StreamableParser(oracle, None if role is None else oh.Role(role.value), strict=strict)
    trace = []
    for i, token in enumerate(tokens):
        try:
            parser.process(token)
        except Exception:
            return i, trace, None
        trace.append((parser.last_content_delta, parser.current_role, parser.current_channel,
                      parser.current_recipient, parser.current_content_type, parser.current_content))
    try:
        parser.process_eos()
    except Exception:
        return len(tokens), trace, None
    return None, trace, json.loads(json.dumps([m.to_dict() for m in parser.messages]))


def our_trace(tok, tokens, role, strict=True):
    parser = StreamParser(tok, role, strict=strict)
    trace = []
    for i, token in enumerate(tokens):
        try:
            parser.feed(token)
        except HarmonyError:
            return i, trace, None
        cur_role = parser.current_role
        trace.append((parser.last_delta, None if cur_role is None else oh.Role(cur_role.value),
                      parser.current_channel, parser.current_recipient, parser.current_content_type,
                      parser.current_text))
    try:
        parser.finish()
    except HarmonyError:
        return len(tokens), trace, None
    return None, trace, json.loads(json.dumps([m.to_dict() for m in parser.messages]))


def assert_strict_agrees(tok, oracle, tokens, role):
    assert our_trace(tok, tokens, role) == oracle_trace(oracle, tokens, role)


def lenient_events(tok, tokens, role=Role.ASSISTANT):
    parser = StreamParser(tok, role)
    events = parser.feed_all(tokens) + parser.finish()
    check_event_invariants(parser, events)
    return parser, events


def check_event_invariants(parser, events):
    """Deltas add up to each message's text; every start has an end; calls and returns follow."""
    texts, started, ended = {}, set(), []
    for e in events:
        if isinstance(e, MessageStart):
            started.add(e.index)
        elif isinstance(e, TextDelta):
            assert e.index in started and e.text
            texts[e.index] = texts.get(e.index, "") + e.text
        elif isinstance(e, MessageEnd):
            assert e.index in started
            ended.append(e.index)
            assert e.message.text() == texts.get(e.index, "")
    assert ended == list(range(len(parser.messages))) == sorted(started)


def completion_tokens(tok, messages):
    """Assistant output as the model writes it: rendered messages minus the prompt's `<|start|>assistant`."""
    ids = []
    for m in messages:
        ids += render_message(m, tok)
    return ids[2:]


assistant_message = chat_message().map(lambda m: Message(Author(Role.ASSISTANT), m.content, m.channel,
                                                         m.recipient, m.content_type))


# --------------------------------------------------------------------------- strict = oracle


@pytest.mark.slow
@HYPOTHESIS
@given(conv=conversation())
def test_strict_parses_rendered_conversations_like_the_oracle(conv, tok, oracle):
    tokens = render_conversation(conv, KEEP_ALL, tok)
    assert_strict_agrees(tok, oracle, tokens, None)
    error, _, theirs = oracle_trace(oracle, tokens, None)
    parser, _ = lenient_events(tok, tokens, None)
    if error is None and not parser.recoveries:
        assert json.loads(json.dumps([m.to_dict() for m in parser.messages])) == theirs


@pytest.mark.slow
@HYPOTHESIS
@given(messages=st.lists(assistant_message, min_size=1, max_size=4))
def test_strict_parses_completions_like_the_oracle(messages, tok, oracle):
    tokens = completion_tokens(tok, messages)
    assert_strict_agrees(tok, oracle, tokens, Role.ASSISTANT)
    # lenient agrees on the messages whenever the oracle accepts them (up to our repairs)
    error, _, theirs = oracle_trace(oracle, tokens, Role.ASSISTANT)
    parser, _ = lenient_events(tok, tokens)
    if error is None and not parser.recoveries:
        assert json.loads(json.dumps([m.to_dict() for m in parser.messages])) == theirs


def test_model_style_tool_call_with_recipient_after_channel(tok, oracle):
    text = ("<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>assistant"
            "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
            '{"location":"San Francisco"}<|call|>')
    tokens = oracle.encode(text, allowed_special="all")
    assert_strict_agrees(tok, oracle, tokens, Role.ASSISTANT)
    _, events = lenient_events(tok, tokens)
    call = [e for e in events if isinstance(e, ToolCall)]
    assert len(call) == 1 and call[0].recipient == "functions.get_weather"
    assert call[0].arguments == '{"location":"San Francisco"}'
    assert call[0].message.content_type == "<|constrain|>json"
    starts = [e for e in events if isinstance(e, MessageStart)]
    assert [(s.channel, s.recipient) for s in starts] == [("analysis", None), ("commentary", "functions.get_weather")]


def test_multibyte_characters_are_never_split(tok, oracle):
    text = "é🙂日本語 – ok"
    byte_tokens = [tok.encoding.encode_single_token(bytes([b])) for b in text.encode("utf-8")]
    tokens = oracle.encode("<|channel|>final<|message|>", allowed_special="all") + byte_tokens + [tok.return_]
    assert_strict_agrees(tok, oracle, tokens, Role.ASSISTANT)
    _, events = lenient_events(tok, tokens)
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)
    assert isinstance(events[-1], AnswerDone) and events[-1].message.text() == text


def test_invalid_utf8_becomes_replacement_like_the_oracle(tok, oracle):
    bad = [tok.encoding.encode_single_token(bytes([b])) for b in (0xF0, 0x9F, 0x41, 0xFF, 0xC3)]
    tokens = oracle.encode("<|channel|>final<|message|>", allowed_special="all") + bad
    assert_strict_agrees(tok, oracle, tokens, Role.ASSISTANT)
    assert_strict_agrees(tok, oracle, tokens + [tok.end], Role.ASSISTANT)


# --------------------------------------------------------------------------- fuzzing


def _pool(tok):
    words = ["assistant", "user", "tool", "functions.f", "final", "analysis", "commentary", " to=functions.f",
             " to=get_weather", " json", " code", "{", "hi", " ", "\n", "to=a", " to=b"]
    ids = [tok.start, tok.end, tok.message, tok.channel, tok.constrain, tok.return_, tok.call, tok.endoftext,
           tok.startoftext, 200013]
    ids += [t for w in words for t in tok.encode(w)]
    ids += [tok.encoding.encode_single_token(bytes([b])) for b in (0xF0, 0x9F, 0x99, 0x82, 0xC3, 0xA9, 0xFF)]
    return sorted(set(ids))


@st.composite
def token_stream(draw, tok):
    """Harmony-shaped chunks (headers, text, stops) mixed with stray and random tokens."""
    pool = _pool(tok)
    word = st.sampled_from(["assistant", "user", "functions.f", "final", "analysis", "commentary", "x y"])
    chunk = st.one_of(
        word.map(lambda w: [tok.start] + tok.encode(w)),
        word.map(lambda w: [tok.channel] + tok.encode(w)),
        st.sampled_from([" to=functions.f", " to=get_weather", " json", " code"]).map(tok.encode),
        st.just(tok.encode(" ") + [tok.constrain] + tok.encode("json")),
        st.just([tok.message]), st.just([tok.message]),
        st.text(max_size=8).map(tok.encode),
        st.sampled_from([[tok.end], [tok.call], [tok.return_]]),
        st.sampled_from(pool).map(lambda t: [t]),
        st.integers(0, 199997).map(lambda t: [t]),
    )
    chunks = draw(st.lists(chunk, max_size=12))
    return [t for c in chunks for t in c]


@pytest.mark.slow
@HYPOTHESIS
@given(data=st.data())
def test_random_streams_lenient_never_raises_strict_agrees(data, tok, oracle):
    tokens = data.draw(token_stream(tok))
    role = data.draw(st.sampled_from([Role.ASSISTANT, None]))
    lenient_events(tok, tokens, role)
    assert_strict_agrees(tok, oracle, tokens, role)


@pytest.mark.slow
@HYPOTHESIS
@given(messages=st.lists(assistant_message, min_size=1, max_size=3), data=st.data())
def test_truncations_and_header_corruptions(messages, data, tok, oracle):
    tokens = completion_tokens(tok, messages)
    for cut in range(len(tokens) + 1):  # every truncation (EOS anywhere, mid-header included)
        lenient_events(tok, tokens[:cut])
    cut = data.draw(st.integers(0, len(tokens)))
    assert_strict_agrees(tok, oracle, tokens[:cut], Role.ASSISTANT)
    # corrupt: drop, duplicate or replace one token (headers are where this hurts)
    i = data.draw(st.integers(0, len(tokens) - 1))
    replacement = data.draw(st.sampled_from(_pool(tok)))
    for corrupted in (tokens[:i] + tokens[i + 1:], tokens[:i] + [tokens[i]] + tokens[i:],
                      tokens[:i] + [replacement] + tokens[i + 1:]):
        lenient_events(tok, corrupted)
        assert_strict_agrees(tok, oracle, corrupted, Role.ASSISTANT)


def test_lenient_drops_ids_outside_the_vocabulary(tok):
    tokens = tok.encode("hi") + [10**6, -3] + [tok.end]
    parser, events = lenient_events(tok, tokens)
    assert parser.messages[0].text() == "hi"
    assert sum(isinstance(e, Recovery) for e in events) >= 2
    with pytest.raises(HarmonyError, match="token 1: .*outside the vocabulary"):
        parse_messages([tok.channel, 10**6], strict=True, tokenizer=tok)


# --------------------------------------------------------------------------- lenient repairs


def parse(tok, text, role=Role.ASSISTANT):
    tokens = tok.encoding.encode(text, allowed_special="all")
    parser, events = lenient_events(tok, tokens, role)
    return parser.messages, [e.reason for e in events if isinstance(e, Recovery)], events


def test_text_without_a_header_is_a_final_answer(tok):
    messages, repairs, events = parse(tok, "I can't help with that.<|return|>")
    assert messages == [Message(Author(Role.ASSISTANT), messages[0].content, "final")]
    assert messages[0].text() == "I can't help with that."
    assert repairs and isinstance(events[-1], AnswerDone)


def test_long_headerless_text_is_streamed(tok):
    text = "Sorry, I cannot do that.\nBut here is something else that may help you today."
    tokens = tok.encode(text)
    parser = StreamParser(tok)
    streamed = []
    for t in tokens:
        streamed += [e.text for e in parser.feed(t) if isinstance(e, TextDelta)]
    assert "".join(streamed) == text  # the text arrived before the end of the stream
    parser.finish()
    assert parser.messages[0].channel == "final" and parser.messages[0].text() == text


def test_constrain_taken_as_content_type_not_recipient(tok, oracle):
    text = "<|channel|>commentary <|constrain|>json<|message|>{}<|call|>"
    assert oracle.parse_messages_from_completion_tokens(
        oracle.encode(text, allowed_special="all"), oh.Role.ASSISTANT)[0].recipient == "<|constrain|>json"
    messages, repairs, _ = parse(tok, text)
    assert (messages[0].recipient, messages[0].content_type) == (None, "<|constrain|>json")
    assert any("content type" in r for r in repairs)


@pytest.mark.parametrize("header, recipient", [
    ("<|channel|>commentary to=get_weather <|constrain|>json", "functions.get_weather"),
    (" to=get_weather<|channel|>commentary", "functions.get_weather"),
    ("<|channel|>analysis to=python code", "python"),
    ("<|channel|>analysis to=browser.search", "browser.search"),
    ("<|channel|>commentary to=functions.f", "functions.f"),
])
def test_recipient_before_or_after_channel_and_bare_function_names(header, recipient, tok):
    messages, repairs, events = parse(tok, header + "<|message|>{}<|call|>")
    assert messages[0].recipient == recipient
    assert any(isinstance(e, ToolCall) and e.recipient == recipient for e in events)
    assert bool(repairs) == (recipient.startswith("functions.") and "functions." not in header)


@pytest.mark.parametrize("text, expect", [
    ("<|channel|>final<|message|>x<|end|><|return|>", [("final", "x")]),
    ("<|channel|><|message|>x<|end|>", [(None, "x")]),
    ("<|channel|>commentary to=a to=b<|message|>{}<|call|>", [("commentary", "{}")]),
    ("<|channel|>final<|message|>x<|start|>assistant<|channel|>final<|message|>y<|return|>",
     [("final", "x"), ("final", "y")]),
    ("<|channel|>analysis<|message|>think<|channel|>final<|message|>answer<|return|>",
     [("analysis", "think"), ("final", "answer")]),
    ("<|channel|>final<|message|>a<|reserved_200013|>b<|message|>c<|end|>", [("final", "abc")]),
    ("<|channel|>final<|message|>done<|endoftext|>", [("final", "done")]),
    ("<|channel|>fin", [("fin", "")]),
    ("<|channel|>final hello there<|return|>", [("final", "hello there")]),
    ("<|channel|>analysis<|message|>a<|end|><|start|>user:bob<|message|>hi<|end|>", [("analysis", "a"), (None, "hi")]),
    ("<|channel|>analysis<|message|>a<|end|><|channel|>final<|message|>b<|end|>", [("analysis", "a"), ("final", "b")]),
    ("<|channel|>analysis<|message|>a<|end|><|message|>b<|end|>", [("analysis", "a"), ("final", "b")]),
    ("<|start|><|start|>assistant<|channel|>final<|message|>x<|end|>", [("final", "x")]),
])
def test_lenient_repairs_keep_the_text(text, expect, tok, oracle):
    messages, repairs, _ = parse(tok, text)
    assert [(m.channel, m.text()) for m in messages] == expect
    assert repairs  # each of these is reported
    # strict mode does what the oracle does with it (mostly: fail; `<|start|>` in text: keep it)
    assert_strict_agrees(tok, oracle, tok.encoding.encode(text, allowed_special="all"), Role.ASSISTANT)


def test_named_author_recovered(tok):
    messages, _, _ = parse(tok, "<|channel|>analysis<|message|>a<|end|><|start|>user:bob<|message|>hi<|end|>")
    assert messages[1].author == Author(Role.USER, "bob")


def test_eos_in_a_header_strict_error_is_precise(tok):
    with pytest.raises(HarmonyError, match="^end of stream after 2 tokens: the stream ended inside a message header$"):
        parse_messages(tok.encoding.encode("<|channel|>final", allowed_special="all"), strict=True, tokenizer=tok)
    with pytest.raises(HarmonyError, match=r"^token 5: unexpected <\|return\|> while expecting <\|start\|>$"):
        parse_messages(tok.encoding.encode("<|channel|>final<|message|>x<|end|><|return|>", allowed_special="all"),
                       strict=True, tokenizer=tok)


def test_event_sequence_for_an_answer(tok):
    tokens = tok.encoding.encode("<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>final"
                                 "<|message|>4<|return|>", allowed_special="all")
    _, events = lenient_events(tok, tokens)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["MessageStart", "TextDelta", "MessageEnd", "MessageStart", "TextDelta", "MessageEnd", "AnswerDone"]
    assert [e.stop for e in events if isinstance(e, MessageEnd)] == ["end", "return"]


def test_stop_tokens_are_return_and_call(tok):
    assert set(tok.stop_token_ids) == {tok.special("<|return|>"), tok.special("<|call|>")}
