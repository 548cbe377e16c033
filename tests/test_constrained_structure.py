"""The constraint writes the whole assistant turn: no header is forced anywhere in this file.

A random-weight model with the real vocabulary (`chat_model`) never writes a harmony header of
its own and never closes its analysis, so every answer here that validates does so because the
decoder controls the structure: the header, the reasoning budget, the JSON, the end token.
jsonschema is the oracle for answers and arguments.
"""
from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_constrained import LEAVES, WEATHER, arrays, feed_all, objects

from mlx_gptoss.constrained import JsonSchemaConstraint, compile_schema, max_json_tokens
from mlx_gptoss.errors import SchemaError
from mlx_gptoss.generate import generate
from mlx_gptoss.prompts import prompt_messages
from mlx_gptoss.harmony import StreamParser, ToolDescription, parser_after
from mlx_gptoss.harmony.tokenizer import FIRST_SPECIAL_ID
from mlx_gptoss.sampling import SamplingParams

VOCAB = 201088
ANALYSIS_ROOM = 6  # reasoning tokens the tight max_tokens below leave


def bounded(schema) -> bool:
    return max_json_tokens(schema) is not None


# Bounded schemas: the generated family of test_constrained without its `number` leaves.
BOUNDED_LEAVES = LEAVES.filter(bounded)
BOUNDED = objects(st.one_of(BOUNDED_LEAVES, arrays(BOUNDED_LEAVES), objects(BOUNDED_LEAVES)))
FAST = settings(max_examples=3, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=25)


def answer_overhead(constraint: JsonSchemaConstraint) -> int:
    """Tokens around the answer's JSON: analysis header, <|end|><|start|>assistant, final
    header, <|return|>."""
    analysis, final = constraint.openings[:2]
    return len(analysis.header) + constraint.reopen_tokens + len(final.header) + 1


def run(chat_model, constraint: JsonSchemaConstraint, seed: int, max_tokens: int,
        user: str = "Reply in JSON.", functions=()):
    """`generate` as the engine will wire it: the prompt describes the format and the tools,
    the processor (bound to generate's parser) knows `max_tokens`; nothing forced."""
    model, tok = chat_model
    messages = prompt_messages(user, functions=functions, response_format=constraint.response_format)
    processor = constraint.processor(max_tokens=max_tokens)
    result = generate(model, tok, messages, max_tokens=max_tokens, constrain_tools=False,
                      sampling=SamplingParams(temperature=1.0, seed=seed),
                      logits_processors=[processor])
    return result, processor


def check_answer(chat_model, schema, seed: int):
    """A budget fitted to max_tokens only (no max_reasoning_tokens): the answer always fits."""
    tok = chat_model[1]
    jsonschema.Draft202012Validator.check_schema(schema)
    constraint = JsonSchemaConstraint.from_schema(tok, schema)
    bound = max_json_tokens(schema)
    result, processor = run(chat_model, constraint, seed,
                            answer_overhead(constraint) + ANALYSIS_ROOM + bound)
    assert result.stop == "return", (result.stop, tok.decode(result.tokens))
    assert processor.json_complete is True
    jsonschema.validate(json.loads(result.text), schema, format_checker=jsonschema.FormatChecker())
    assert [m.channel for m in result.messages] in (["analysis", "final"], ["final"])
    bodies = body_lengths(tok, result.tokens)
    assert bodies[-1] <= bound  # the sampled JSON, <|return|> excluded
    assert len(bodies) == 1 or bodies[0] <= ANALYSIS_ROOM  # the budget left the answer room
    return result


def body_lengths(tok, tokens: list[int]) -> list[int]:
    """Sampled content tokens of each message: from <|message|> to its closing token."""
    starts = [i + 1 for i, t in enumerate(tokens) if t == tok.message]
    stops = [i for i, t in enumerate(tokens) if t in (tok.end, tok.return_, tok.call)]
    return [stop - start for start, stop in zip(starts, stops)]


@pytest.mark.slow
@FAST
@given(schema=BOUNDED, seed=st.integers(0, 2**16))
def test_bounded_schemas_validate_without_a_forced_header(chat_model, schema, seed):
    check_answer(chat_model, schema, seed)


@pytest.mark.slow
@SLOW
@given(schema=BOUNDED, seed=st.integers(0, 2**16))
def test_bounded_schemas_validate_many_seeds(chat_model, schema, seed):
    check_answer(chat_model, schema, seed)


@pytest.mark.slow
def test_reasoning_budget_then_final_json(chat_model):
    """max_reasoning_tokens closes the analysis after exactly N tokens (the random model never
    closes it itself); with a number (unbounded) in the schema the JSON still closes."""
    tok = chat_model[1]
    schema = {"type": "object", "additionalProperties": False, "required": ["x", "ok"],
              "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1},
                             "ok": {"type": "boolean"}}}
    constraint = JsonSchemaConstraint.from_schema(tok, schema, max_reasoning_tokens=5)
    thought = []
    for seed in (1, 2):
        result, processor = run(chat_model, constraint, seed, max_tokens=300)
        assert result.stop == "return" and processor.json_complete
        jsonschema.validate(json.loads(result.text), schema)
        if result.messages[0].channel == "analysis":
            thought.append(body_lengths(tok, result.tokens)[0])
    assert thought and set(thought) == {5}  # five reasoning tokens, then closed


@pytest.mark.slow
def test_without_the_header_constraint_the_answer_is_not_json(chat_model):
    """The issue's failure, kept as a check on the test itself: trusting the model to open the
    final message (structure=False) leaves its header-less text in result.text."""
    tok = chat_model[1]
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    constraint = JsonSchemaConstraint.from_schema(tok, schema, structure=False)
    result, _ = run(chat_model, constraint, seed=1, max_tokens=150)
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(result.text), schema)
    structured = JsonSchemaConstraint.from_schema(tok, schema)
    result, _ = run(chat_model, structured, seed=1, max_tokens=150)
    jsonschema.validate(json.loads(result.text), schema)


LOOKUP_PARAMETERS = BOUNDED.map(lambda s: {**s, "required": sorted(s["properties"])})


def check_call(chat_model, parameters, seed: int, tool_choice):
    tok = chat_model[1]
    lookup = ToolDescription("lookup", "Look something up.", parameters)
    tools = [WEATHER, lookup]
    constraint = JsonSchemaConstraint.from_schema(tok, tools=tools, tool_choice=tool_choice,
                                                  max_reasoning_tokens=4)
    result, processor = run(chat_model, constraint, seed, 400, "Use a tool.", functions=tools)
    assert result.stop == "call", (result.stop, tok.decode(result.tokens))
    assert processor.json_complete is True and result.text == ""
    [call] = result.tool_calls
    schemas = {"functions.get_weather": WEATHER.parameters, "functions.lookup": parameters}
    if isinstance(tool_choice, dict):
        named = tool_choice.get("name") or tool_choice["function"]["name"]
        assert call.recipient == "functions." + named
    assert call.channel == "commentary" and call.content_type == "<|constrain|>json"
    jsonschema.validate(json.loads(call.text()), schemas[call.recipient],
                        format_checker=jsonschema.FormatChecker())


@pytest.mark.slow
@FAST
@given(parameters=LOOKUP_PARAMETERS, seed=st.integers(0, 2**16))
def test_required_tool_choice_calls_a_declared_function(chat_model, parameters, seed):
    check_call(chat_model, parameters, seed, "required")


@pytest.mark.slow
@SLOW
@given(parameters=LOOKUP_PARAMETERS, seed=st.integers(0, 2**16),
       choice=st.sampled_from(["required", {"type": "function", "name": "lookup"},
                               {"type": "function", "function": {"name": "get_weather"}}]))
def test_tool_choices_many_seeds(chat_model, parameters, seed, choice):
    check_call(chat_model, parameters, seed, choice)


@pytest.mark.slow
def test_named_function(chat_model):
    parameters = {"type": "object", "additionalProperties": False, "required": ["q"],
                  "properties": {"q": {"enum": ["a", "b"]}}}
    check_call(chat_model, parameters, 3, {"type": "function", "name": "lookup"})


# --------------------------------------------------------------------------- the processor


def allowed(out: mx.array) -> set[int]:
    return set(np.flatnonzero(np.array(out) > -np.inf).tolist())


def first(tok, text: str) -> int:
    return tok.encode(text)[0]


def test_headers_are_only_the_allowed_openings(tok):
    logits = mx.zeros((VOCAB,))
    lookup = ToolDescription("lookup", "", {"type": "object"})
    cases = {
        "auto": {"analysis", "final", "commentary"},
        "none": {"analysis", "final"},
        "required": {"analysis", "commentary"},
    }
    for choice, words in cases.items():
        constraint = JsonSchemaConstraint.from_schema(tok, {"type": "boolean"}, tools=[WEATHER, lookup],
                                                      tool_choice=choice)
        processor = constraint.processor()
        assert allowed(processor([], logits)) == {tok.channel}
        assert allowed(processor([tok.channel], logits)) == {first(tok, w) for w in words}
    # after <|start|>: only the assistant's role word, then <|channel|>
    constraint = JsonSchemaConstraint.from_schema(tok, {"type": "boolean"})
    processor = constraint.processor([tok.start])
    assert allowed(processor([], logits)) == set(tok.encode("assistant"))
    assert allowed(processor(tok.encode("assistant"), logits)) == {tok.channel}


def test_allowed_tools_restrict_the_calls(tok):
    """allowed_tools: calls only to the listed functions (every declared one stays in the
    prompt); "auto" keeps the final answer open, "required" closes it; both API shapes."""
    lookup = ToolDescription("lookup", "", {"type": "object"})
    responses_shape = {"type": "allowed_tools", "mode": "auto",
                       "tools": [{"type": "function", "name": "lookup"}, {"type": "web_search"}]}
    chat_shape = {"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "lookup"}}]}}
    for choice, kinds in ((responses_shape, ["analysis", "final", "call"]),
                          (chat_shape, ["analysis", "call"])):
        constraint = JsonSchemaConstraint.from_schema(tok, tools=[WEATHER, lookup], tool_choice=choice)
        assert constraint.structured  # no schema, but a subset of the functions: enforced
        assert [o.kind for o in constraint.openings] == kinds
        assert tok.decode(constraint.openings[-1].header).startswith(
            "<|channel|>commentary to=functions.lookup ")
    # all the declared functions allowed: plain "auto", nothing to enforce
    every = {"type": "allowed_tools", "mode": "auto",
             "tools": [{"type": "function", "name": "lookup"}, {"type": "function", "name": "get_weather"}]}
    assert not JsonSchemaConstraint.from_schema(tok, tools=[WEATHER, lookup], tool_choice=every).structured


def test_named_function_header_is_forced(tok):
    lookup = ToolDescription("lookup", "", {"type": "object", "properties": {"q": {"type": "string"}}})
    constraint = JsonSchemaConstraint.from_schema(tok, tools=[WEATHER, lookup], max_reasoning_tokens=0,
                                                  tool_choice={"type": "function", "name": "lookup"})
    header = constraint.openings[-1].header
    assert tok.decode(header) == "<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>"
    outputs = feed_all(constraint.processor(), list(header), mx.zeros((VOCAB,)))
    for i, out in enumerate(outputs[:-1]):
        assert allowed(out) == {header[i]}
    assert tok.encode("{")[0] in allowed(outputs[-1])


def test_analysis_is_free_text_then_the_budget_closes_it(tok):
    logits = mx.zeros((VOCAB,))
    constraint = JsonSchemaConstraint.from_schema(tok, {"type": "boolean"}, tools=[WEATHER],
                                                  max_reasoning_tokens=3)
    processor = constraint.processor()
    analysis = [tok.channel] + tok.encode("analysis") + [tok.message]
    text = tok.encode(" a b c")
    assert len(text) == 3
    outs = feed_all(processor, analysis + text, logits)
    free = allowed(outs[len(analysis)])
    assert tok.end in free and len(free) == FIRST_SPECIAL_ID + 1
    assert not free & {tok.return_, tok.call, tok.start, tok.channel, tok.message, tok.endoftext}
    assert allowed(outs[-1]) == {tok.end}  # three reasoning tokens: closed
    tail = analysis + text + [tok.end]
    assert allowed(processor(tail, logits)) == {tok.start}
    tail += [tok.start] + tok.encode("assistant")
    assert allowed(processor(tail, logits)) == {tok.channel}
    # no second analysis: the final answer or the call
    assert allowed(processor(tail + [tok.channel], logits)) == {first(tok, "final"), first(tok, "commentary")}


def test_budget_from_max_tokens_leaves_room_for_the_answer(tok):
    schema = {"enum": ["yes", "no"]}
    assert max_json_tokens(schema) == 5
    constraint = JsonSchemaConstraint.from_schema(tok, schema)
    logits = mx.zeros((VOCAB,))
    analysis = [tok.channel] + tok.encode("analysis") + [tok.message]
    need_after = constraint.reopen_tokens + len(constraint.openings[1].header) + 5 + 1
    for room in (0, 2):
        processor = constraint.processor(max_tokens=len(analysis) + room + need_after)
        outs = feed_all(processor, analysis + tok.encode(" x") * room, logits)
        assert all(tok.end in allowed(o) and len(allowed(o)) > 1 for o in outs[len(analysis):-1])
        assert allowed(outs[-1]) == {tok.end}
    # no room to think at all: the analysis cannot even be opened
    processor = constraint.processor(max_tokens=len(analysis) + need_after - 1)
    assert allowed(processor([tok.channel], logits)) == {first(tok, "final")}


def test_bound_processor_reads_the_loops_parser(tok):
    """Bound, the processor parses nothing itself: it reads the parser the loop feeds."""
    constraint = JsonSchemaConstraint.from_schema(tok, {"type": "integer", "minimum": 0, "maximum": 50})
    logits = mx.zeros((VOCAB,))
    tokens = [tok.channel] + tok.encode("final") + [tok.message] + tok.encode("4")
    unbound = feed_all(constraint.processor(), tokens, logits)
    parser = StreamParser(tok)
    processor = constraint.processor()
    processor.bind(parser)
    assert processor.parser is parser
    bound = [processor([], logits)]
    assert processor.json_complete is None
    for token in tokens:
        parser.feed(token)
        bound.append(processor([], logits))  # `tokens` is not read when bound
    for a, b in zip(unbound, bound):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    assert processor.active and processor.json_complete is False  # "4" may go on: "42"
    parser.feed(tok.return_)
    assert processor.json_complete is True


def test_one_processor_per_row_of_a_batch(tok):
    """Rows share the compiled constraint, not state: interleaved steps give each row the
    masks it gets alone."""
    constraint = JsonSchemaConstraint.from_schema(tok, {"enum": ["yes", "no"]}, max_reasoning_tokens=2)
    logits = mx.zeros((VOCAB,))
    rows = [[tok.channel] + tok.encode("analysis") + [tok.message] + tok.encode(" a b"),
            [tok.channel] + tok.encode("final") + [tok.message] + tok.encode('"no"')]
    alone = [feed_all(constraint.processor(), row, logits) for row in rows]
    parsers = [StreamParser(tok) for _ in rows]
    processors = [constraint.processor() for _ in rows]
    for parser, processor in zip(parsers, processors):
        processor.bind(parser)
    for step in range(max(map(len, rows)) + 1):
        for r, (row, parser, processor) in enumerate(zip(rows, parsers, processors)):
            if step > len(row):
                continue
            np.testing.assert_array_equal(np.array(processor([], logits)), np.array(alone[r][step]))
            if step < len(row):
                parser.feed(row[step])
    assert allowed(alone[0][-1]) == {tok.end} and allowed(alone[1][-1]) == {tok.return_}


def test_json_complete_at_length(tok):
    """Cut at max_tokens: complete only if nothing but the end token could follow."""
    constraint = JsonSchemaConstraint.from_schema(tok, {"type": "object", "additionalProperties": False,
                                                        "properties": {"a": {"type": "null"}}})
    opened = [tok.channel] + tok.encode("final") + [tok.message]
    for text, complete in (('{"a": nu', False), ('{"a": null}', True)):
        parser = StreamParser(tok)
        processor = constraint.processor()
        processor.bind(parser)
        parser.feed_all(opened + tok.encode(text))
        parser.finish()  # what stream_generate does at "length"
        assert processor.json_complete is complete


def test_prompt_that_opened_the_final_message(tok):
    constraint = JsonSchemaConstraint.from_schema(tok, {"type": "boolean"})
    opened = [tok.start] + tok.encode("assistant") + [tok.channel] + tok.encode("final") + [tok.message]
    parser = parser_after(opened, tok)
    assert parser.current_channel == "final"
    processor = constraint.processor()
    processor.bind(parser)
    out = allowed(processor([], mx.zeros((VOCAB,))))
    assert {tok.encode("true")[0], tok.encode("false")[0]} <= out and tok.end not in out


def test_free_final_without_a_format(tok):
    """tool_choice none, no response format: the final answer is free text ending <|return|>."""
    constraint = JsonSchemaConstraint.from_schema(tok, tools=[WEATHER], tool_choice="none")
    assert constraint.structured
    final = [tok.channel] + tok.encode("final") + [tok.message]
    out = allowed(feed_all(constraint.processor(), final, mx.zeros((VOCAB,)))[-1])
    assert tok.return_ in out and tok.call not in out and tok.end not in out and len(out) == FIRST_SPECIAL_ID + 1


# --------------------------------------------------------------------------- answer lengths


def test_max_json_tokens_is_the_longest_accepted_text(tok):
    """The bound is reached: the widest whitespace and longest value llguidance accepts."""
    schema = {"type": "object", "additionalProperties": False, "required": ["n"],
              "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 10},
                             "s": {"enum": ["ab", None]}}}
    gap = " " * 16
    widest = "{" + gap + '"n"' + gap + ":" + gap + "-5" + gap + "," + gap + '"s"' + gap + ":" + gap \
             + '"ab"' + gap + "}"
    matcher = compile_schema(tok, schema).matcher()
    assert all(matcher.consume_token(t) for t in tok.encode(widest)) and matcher.is_accepting()
    matcher = compile_schema(tok, schema).matcher()
    assert not all(matcher.consume_token(t) for t in tok.encode(widest.replace("{", "{ ")))
    assert max_json_tokens(schema) == len(widest.encode())


@pytest.mark.parametrize("schema, expected", [
    ({"type": "integer", "minimum": 100, "maximum": 200}, 3),
    ({"type": "string", "maxLength": 3}, 2 + 18),
    ({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, 2 + 36),
    ({"type": "string", "format": "date"}, 2 + 60),
    ({"anyOf": [{"type": "boolean"}, {"type": "null"}]}, 5),
    ({"type": ["boolean", "null"], "enum": [None]}, 4),
    ({"$defs": {"b": {"type": "boolean"}}, "type": "array", "items": {"$ref": "#/$defs/b"},
      "maxItems": 2}, 2 + 10 + 1 + 4 * 16),
    ({"type": "number", "minimum": 0, "maximum": 1}, None),
    ({"type": "string", "pattern": "[a-z]"}, None),  # unanchored: any string containing one
    ({"type": "array", "items": {"type": "null"}}, None),
    ({"type": "object", "properties": {"a": {"type": "null"}}}, None),  # open to more keys
    ({"$defs": {"t": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/t"}}},
      "$ref": "#/$defs/t"}, None),  # recursive
])
def test_max_json_tokens(schema, expected):
    assert max_json_tokens(schema) == expected


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("options, fragment", [
    ({"tool_choice": "required"}, "needs at least one function"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "'nope'"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "auto, none, required"),
    ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "is not"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                          "tools": [{"type": "function", "name": "nope"}]}}, "'nope'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "tools": []}}, '"mode"'),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "mode": "required",
                                          "tools": [{"type": "web_search"}]}}, "at least one"),
    ({"max_reasoning_tokens": -1}, ">= 0"),
    ({"max_reasoning_tokens": 5, "structure": False}, "structure=True"),
])
def test_bad_choices_are_one_clear_error(tok, options, fragment):
    with pytest.raises(SchemaError) as info:
        JsonSchemaConstraint.from_schema(tok, {"type": "boolean"}, **options)
    assert fragment in str(info.value) and "\n" not in str(info.value)
