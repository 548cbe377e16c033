"""JSON-Schema-constrained decoding with a random-weight model that, unconstrained, emits garbage.

Every answer must parse and validate with the `jsonschema` library (the oracle); every tool call
must parse and validate against its function's parameters. Schemas keep strings and arrays
bounded: the garbage model would otherwise wander inside an open string for hundreds of tokens,
and each token costs a full 201088-entry output projection on CPU.
"""
from __future__ import annotations

import json
from typing import Annotated, Literal

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field

from mlx_gptoss.chat import Chat
from mlx_gptoss.cli import main
from mlx_gptoss.constrained import (
    JsonSchemaConstraint,
    apply_bitmask,
    compile_schema,
    constraint_cost,
    load_json_schema,
    response_format_of,
)
from mlx_gptoss.errors import GptOssError, SchemaError
from mlx_gptoss.generate import generate, generate_tokens, stream_generate
from mlx_gptoss.harmony import (
    DeveloperContent,
    Message,
    Role,
    ToolDescription,
    developer_text,
    render_conversation_for_completion,
)
from mlx_gptoss.loading import load_model
from mlx_gptoss.sampling import SamplingParams, make_sampler

VOCAB = 201088
MAX_TOKENS = 400


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    path = checkpoint_factory("tiny-full-vocab", vocab_size=VOCAB)
    return load_model(path, "float32")[0]


def final_prompt(tok, constraint: JsonSchemaConstraint) -> list[int]:
    """system, developer (with the response format), user, then the final message opened."""
    developer = DeveloperContent(instructions="Answer in JSON.")
    developer.with_response_format(constraint.response_format)
    messages = [Message.from_role_and_content(Role.DEVELOPER, developer),
                Message.from_role_and_content(Role.USER, "Describe something.")]
    ids = render_conversation_for_completion(messages, Role.ASSISTANT, None, tok)
    return ids + [tok.channel] + tok.encode("final") + [tok.message]


def constrained_answer(model, tok, schema, seed: int) -> str:
    """Sample the final message under the constraint; it must end with <|return|>."""
    constraint = JsonSchemaConstraint.from_schema(tok, schema)
    prompt = final_prompt(tok, constraint)
    out = list(generate_tokens(model, prompt, sampler=make_sampler(SamplingParams(seed=seed)),
                               max_tokens=MAX_TOKENS, stop_tokens=tok.eos_token_ids,
                               logits_processors=[constraint.processor(prompt)]))
    assert out[-1] == tok.return_, f"stopped on {out[-1]} after {len(out)} tokens: {tok.decode(out)!r}"
    assert tok.return_ not in out[:-1]
    return tok.decode(out[:-1])


def forcing(tokens: list[int]):
    """A logits processor that plays a model choosing `tokens` first (a harmony header)."""
    def force(generated, logits):
        if len(generated) >= len(tokens):
            return logits
        onehot = mx.arange(logits.shape[-1]) == tokens[len(generated)]
        return mx.where(onehot, logits, -mx.inf)
    return force


# --------------------------------------------------------------------------- answers

HAND_PICKED = {
    "nested objects": {
        "type": "object",
        "properties": {
            "user": {"type": "object", "additionalProperties": False, "required": ["id", "role"],
                     "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                    "role": {"enum": ["admin", "guest"]}}},
            "ok": {"type": "boolean"},
        },
        "required": ["user", "ok"], "additionalProperties": False,
    },
    "enum of mixed values": {"enum": ["red", "green", 7, None, {"k": [1, 2]}]},
    "array with bounds": {"type": "array", "minItems": 2, "maxItems": 4,
                          "items": {"type": "integer", "minimum": -5, "maximum": 5}},
    "required and optional": {
        "type": "object", "additionalProperties": False, "required": ["a"],
        "properties": {"a": {"type": "boolean"}, "b": {"type": "string", "maxLength": 3},
                       "c": {"type": "null"}, "d": {"enum": [1, 2]}},
    },
    "numbers with ranges": {
        "type": "object", "additionalProperties": False, "required": ["x", "n", "m"],
        "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.25},
                       "n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
                       "m": {"type": "integer", "minimum": 100, "maximum": 199}},
    },
    "strings with patterns": {
        "type": "object", "additionalProperties": False, "required": ["code", "month"],
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                       "month": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])$"}},
    },
    "anyOf, const and $ref": {
        "$defs": {"point": {"type": "object", "additionalProperties": False, "required": ["x"],
                            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}}},
        "anyOf": [{"$ref": "#/$defs/point"}, {"const": "none"},
                  {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 2}],
    },
    "bare integer": {"type": "integer", "minimum": 100, "maximum": 200},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HAND_PICKED))
def test_hand_picked_schemas_always_validate(model, tok, name):
    schema = HAND_PICKED[name]
    text = constrained_answer(model, tok, schema, seed=len(name))
    jsonschema.validate(json.loads(text), schema)


class Reading(BaseModel):
    """A sensor reading."""

    model_config = ConfigDict(extra="forbid")  # else any extra key, with an unbounded value
    sensor: Annotated[str, Field(pattern=r"^s[0-9]$")]
    unit: Literal["C", "F"]
    values: Annotated[list[Annotated[int, Field(ge=0, le=50)]], Field(min_length=1, max_length=2)]
    note: Annotated[str, Field(max_length=3)] | None = None


@pytest.mark.slow
def test_pydantic_model_as_response_format(model, tok):
    text = constrained_answer(model, tok, Reading, seed=3)
    jsonschema.validate(json.loads(text), Reading.model_json_schema())
    assert Reading.model_validate_json(text).unit in ("C", "F")
    fmt = response_format_of(Reading)
    assert (fmt.name, fmt.description) == ("Reading", "A sensor reading.")


# Property-generated schemas: objects of bounded leaves and one level of nesting.
LEAVES = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-1000, 1000), st.integers(0, 50)),
    st.builds(lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span},
              st.floats(-100, 100, allow_nan=False).map(lambda x: round(x, 2)), st.integers(1, 10)),
    st.builds(lambda values: {"enum": values},
              st.lists(st.one_of(st.text("abcxyz", min_size=1, max_size=4), st.integers(-9, 9),
                                 st.booleans(), st.none()), min_size=1, max_size=4, unique=True)),
    st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
              st.integers(0, 2), st.integers(0, 2)),
    st.sampled_from([{"type": "boolean"}, {"type": "null"},
                     {"type": "string", "pattern": "^[a-c]{1,3}$"},
                     {"type": "string", "format": "date"}]),
)
NAMES = st.text("abcdefgh", min_size=1, max_size=5)


def objects(children):
    def build(props, required_mask):
        names = list(props)
        return {"type": "object", "properties": props, "additionalProperties": False,
                "required": [n for n, keep in zip(names, required_mask) if keep]}
    return st.dictionaries(NAMES, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.booleans(), min_size=len(props), max_size=len(props)).map(
            lambda mask: build(props, mask)))


def arrays(children):
    return st.builds(lambda items, lo, extra: {"type": "array", "items": items,
                                               "minItems": lo, "maxItems": lo + extra},
                     children, st.integers(0, 1), st.integers(0, 2))


SCHEMAS = objects(st.one_of(LEAVES, arrays(LEAVES), objects(LEAVES)))


@settings(max_examples=10, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@pytest.mark.slow
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_generated_schemas_always_validate(model, tok, schema, seed):
    jsonschema.Draft202012Validator.check_schema(schema)
    text = constrained_answer(model, tok, schema, seed)
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.slow
def test_answer_through_harmony_stream(model, tok):
    """The model writes its own header, with an analysis message first: only `final` is constrained."""
    schema = HAND_PICKED["numbers with ranges"]
    constraint = JsonSchemaConstraint.from_schema(tok, schema)
    header = ([tok.channel] + tok.encode("analysis") + [tok.message] + tok.encode("Let me think.")
              + [tok.end, tok.start] + tok.encode("assistant") + [tok.channel]
              + tok.encode("final") + [tok.message])
    prompt = render_conversation_for_completion(
        [Message.from_role_and_content(Role.USER, "Numbers, please.")], Role.ASSISTANT, None, tok)
    processor = constraint.processor()
    events = list(stream_generate(model, tok, prompt, max_tokens=MAX_TOKENS,
                                  sampling=SamplingParams(seed=5),
                                  logits_processors=[forcing(header), processor]))
    result = events[-1]
    assert result.stop == "return"
    assert result.reasoning == "Let me think."
    jsonschema.validate(json.loads(result.text), schema)


# --------------------------------------------------------------------------- the API and CLI


@pytest.mark.slow
def test_generate_with_response_format(model, tok):
    """`generate(..., response_format=)`: the schema is in the developer message and the answer
    validates, with nothing forced: the decoder writes the whole message structure and, given
    `max_tokens`, closes the random model's analysis in time for the answer."""
    for seed in (4, 5, 6):
        result = generate(model, tok, "Reading?", response_format=Reading, max_tokens=MAX_TOKENS,
                          sampling=SamplingParams(seed=seed))
        assert result.stop == "return" and result.complete, seed
        Reading.model_validate_json(result.text)
    prompt = tok.decode(result.prompt_tokens)
    assert "# Response Formats\n\n## Reading\n\n// A sensor reading.\n{" in prompt


@pytest.mark.slow
def test_chat_constrains_every_answer(model, tok):
    schema = HAND_PICKED["required and optional"]
    chat = Chat(model, tok, response_format=schema, sampling=SamplingParams(seed=6),
                max_tokens=MAX_TOKENS)  # nothing forced: the constraint writes the structure
    for question in ("First?", "Second?"):
        reply = chat.send(question)
        assert reply.stop == "return"
        jsonschema.validate(json.loads(reply.text), schema)
    assert "# Response Formats" in tok.decode(chat.prompt_tokens())


class Exploding:
    """A model that must never run."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name})")

    def __call__(self, *args, **kwargs):
        raise AssertionError("the model ran")


def test_bad_schema_fails_before_generation(tok):
    bad = {"type": "integer", "minimum": 3, "maximum": 2}
    with pytest.raises(SchemaError, match="minimum"):
        generate(Exploding(), tok, "hi", response_format=bad)
    with pytest.raises(SchemaError, match="minimum"):
        Chat(Exploding(), tok, response_format=bad, prompt_cache=False)
    tool = ToolDescription("f", "", {"type": "object", "properties": {"x": {"type": "nope"}}})
    with pytest.raises(SchemaError, match="parameters of tool 'f'"):
        generate(Exploding(), tok, "hi", functions=[tool])


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.mark.slow
def test_cli_json_schema(checkpoint_factory, tmp_path, capsys):
    path = checkpoint_factory("tiny-full-vocab", vocab_size=VOCAB)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(HAND_PICKED["array with bounds"]))
    code, _, err = run_cli(capsys, "generate", "--model", str(path), "--prompt", "hi",
                           "--json-schema", str(schema), "--max-tokens", "2", "--seed", "0",
                           "--verbose")
    # Two tokens cannot hold the answer: nothing reaches stdout, and the exit code says so.
    assert code == 1 and "before its JSON was complete; nothing was printed" in err
    assert "# Response Formats\n\n## response\n\n" + json.dumps(
        HAND_PICKED["array with bounds"], separators=(",", ":")) in err
    schema.write_text('{"type": "array", "uniqueItems": true}')
    for command in (["generate", "--prompt", "hi"], ["chat"]):
        code, _, err = run_cli(capsys, *command, "--model", str(path), "--json-schema", str(schema))
        assert code == 2 and err.startswith("error: ") and "uniqueItems" in err
        assert err.count("\n") == 1
    code, _, err = run_cli(capsys, "generate", "--model", str(path), "--prompt", "hi",
                           "--json-schema", str(tmp_path / "missing.json"))
    assert code == 2 and "missing.json (JSON Schema): not found" in err


# --------------------------------------------------------------------------- tool calls

WEATHER = ToolDescription("get_weather", "Current weather.", {
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 4}, "unit": {"enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 3}},
})


def call_header(tok, recipient: str, constrain: bool = True) -> list[int]:
    text = f"commentary to={recipient}" + (" " if constrain else "")
    ids = [tok.channel] + tok.encode(text)
    if constrain:
        ids += [tok.constrain] + tok.encode("json")
    return ids + [tok.message]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_tool_call_arguments_always_parse(model, tok, seed):
    recipient = "functions.get_weather"
    constraint = JsonSchemaConstraint.from_schema(tok, tools=[WEATHER])
    assert constraint.response_format is None
    developer = DeveloperContent().with_function_tools([WEATHER])
    prompt = render_conversation_for_completion(
        [Message.from_role_and_content(Role.DEVELOPER, developer),
         Message.from_role_and_content(Role.USER, "Weather in Oslo?")], Role.ASSISTANT, None, tok)
    events = list(stream_generate(model, tok, prompt, max_tokens=MAX_TOKENS,
                                  sampling=SamplingParams(seed=seed),
                                  logits_processors=[forcing(call_header(tok, recipient)),
                                                     constraint.processor()]))
    result = events[-1]
    assert result.stop == "call"
    [call] = result.tool_calls
    assert call.recipient == recipient and call.content_type == "<|constrain|>json"
    jsonschema.validate(json.loads(call.text()), WEATHER.parameters)


@settings(max_examples=5, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@pytest.mark.slow
@given(parameters=SCHEMAS, seed=st.integers(0, 2**16))
def test_generated_tool_parameters_always_validate(model, tok, parameters, seed):
    tool = ToolDescription("lookup", "Look something up.", parameters)
    constraint = JsonSchemaConstraint.from_schema(tok, tools=[WEATHER, tool])
    prompt = render_conversation_for_completion(
        [Message.from_role_and_content(Role.DEVELOPER, DeveloperContent().with_function_tools([tool])),
         Message.from_role_and_content(Role.USER, "Look it up.")], Role.ASSISTANT, None, tok)
    prompt += call_header(tok, "functions.lookup")
    out = list(generate_tokens(model, prompt, sampler=make_sampler(SamplingParams(seed=seed)),
                               max_tokens=MAX_TOKENS, stop_tokens=tok.eos_token_ids,
                               logits_processors=[constraint.processor(prompt)]))
    assert out[-1] == tok.call, f"stopped on {out[-1]}: {tok.decode(out)!r}"
    jsonschema.validate(json.loads(tok.decode(out[:-1])), parameters,
                        format_checker=jsonschema.FormatChecker())


def test_undeclared_function_gets_any_json_object(tok):
    """Its arguments cannot be checked against a schema, but they still parse as an object."""
    constraint = JsonSchemaConstraint.from_schema(tok, tools=[WEATHER])
    logits = mx.zeros((VOCAB,))
    header = call_header(tok, "functions.undeclared")
    first = np.array(feed_all(constraint.processor(), header, logits)[-1])
    allowed = np.flatnonzero(first > -np.inf).tolist()
    assert tok.encode("{")[0] in allowed and tok.encode("[")[0] not in allowed
    assert all(tok.decode([t]).lstrip(" \t\r\n")[:1] in ("{", "") for t in allowed)
    done = header + tok.encode('{"q": [1, "x"]}')
    out = np.array(feed_all(constraint.processor(), done, logits)[-1])
    assert np.flatnonzero(out > -np.inf).tolist() == [tok.call]


# --------------------------------------------------------------------------- the processor


def feed_all(processor, tokens, logits):
    """Call the processor as the generation loop does, one generated token at a time."""
    outputs = []
    for i in range(len(tokens) + 1):
        outputs.append(processor(tokens[:i], logits))
    return outputs


def test_without_structure_analysis_and_unconstrained_calls_stay_free(tok):
    constraint = JsonSchemaConstraint.from_schema(tok, {"type": "integer"}, tools=[WEATHER],
                                                  structure=False)
    logits = mx.random.normal((VOCAB,))
    for header in ([tok.channel] + tok.encode("analysis") + [tok.message] + tok.encode("hmm {"),
                   call_header(tok, "functions.get_weather", constrain=False) + tok.encode("x"),
                   call_header(tok, "python") + tok.encode("print(1)")):
        processor = constraint.processor()
        assert all(out is logits for out in feed_all(processor, header, logits))
        assert not processor.active


def test_mask_allows_exactly_the_schema_tokens(tok):
    constraint = JsonSchemaConstraint.from_schema(tok, {"enum": ["yes", "no"]})
    processor = constraint.processor()
    logits = mx.zeros((VOCAB,))
    header = [tok.channel] + tok.encode("final") + [tok.message]
    out = np.array(feed_all(processor, header, logits)[-1])
    allowed = {int(i) for i in np.flatnonzero(out > -np.inf)}
    assert processor.active and allowed
    for token in allowed:  # every allowed token starts a valid answer, no control token
        text = tok.decode([token]).lstrip(" \t\r\n")
        assert not tok.is_special(token) and any(f'"{w}"'.startswith(text) for w in ("yes", "no"))
    assert tok.encode('"yes"')[0] in allowed and tok.encode('"no"')[0] in allowed
    # completing the JSON leaves exactly <|return|>; for a tool call, exactly <|call|>
    done = header + tok.encode('"no"')
    out = np.array(feed_all(constraint.processor(), done, logits)[-1])
    assert np.flatnonzero(out > -np.inf).tolist() == [tok.return_]
    tool = JsonSchemaConstraint.from_schema(tok, tools=[ToolDescription("f", "", {"enum": [1]})])
    done = call_header(tok, "functions.f") + tok.encode("1")
    out = np.array(feed_all(tool.processor(), done, logits)[-1])
    assert np.flatnonzero(out > -np.inf).tolist() == [tok.call]


def test_prompt_conventions(tok):
    """Prompt given up front, or passed with the tokens (mlx-lm style): both constrain."""
    constraint = JsonSchemaConstraint.from_schema(tok, {"type": "boolean"})
    prompt = render_conversation_for_completion(
        [Message.from_role_and_content(Role.USER, "?")], Role.ASSISTANT, None, tok)
    opened = prompt + [tok.channel] + tok.encode("final") + [tok.message]
    logits = mx.zeros((VOCAB,))
    up_front = constraint.processor(opened)
    with_tokens = constraint.processor()
    a = np.array(up_front([], logits))
    b = np.array(with_tokens(opened, logits))
    assert up_front.active and with_tokens.active
    np.testing.assert_array_equal(a, b)
    allowed = set(np.flatnonzero(a > -np.inf).tolist())
    assert {tok.encode("true")[0], tok.encode("false")[0]} <= allowed
    assert not allowed & {tok.encode("1")[0], tok.encode('"')[0], tok.return_, tok.end}


def test_one_processor_serves_generation_after_generation(model, tok):
    schema = HAND_PICKED["bare integer"]
    constraint = JsonSchemaConstraint.from_schema(tok, schema)
    prompt = final_prompt(tok, constraint)
    processor = constraint.processor(prompt)
    for seed in (1, 2, 3):
        out = list(generate_tokens(model, prompt, sampler=make_sampler(SamplingParams(seed=seed)),
                                   max_tokens=MAX_TOKENS, stop_tokens=tok.eos_token_ids,
                                   logits_processors=[processor]))
        assert out[-1] == tok.return_
        jsonschema.validate(json.loads(tok.decode(out[:-1])), schema)


@pytest.mark.slow
def test_mlx_lm_generate_step_with_the_processor(model, tok):
    """mlx-lm passes prompt + generated ids as an mx.array and logits [1, vocab]."""
    from mlx_lm.generate import generate_step

    schema = {"type": "array", "items": {"enum": [1, 2]}, "minItems": 1, "maxItems": 3}
    constraint = JsonSchemaConstraint.from_schema(tok, schema)
    prompt = final_prompt(tok, constraint)
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS,
                                  sampler=make_sampler(SamplingParams(seed=1)),
                                  logits_processors=[constraint.processor()]):
        out.append(int(token))
        if out[-1] == tok.return_:
            break
    assert out[-1] == tok.return_
    jsonschema.validate(json.loads(tok.decode(out[:-1])), schema)


def test_apply_bitmask_matches_numpy(tok):
    rng = np.random.default_rng(0)
    words = rng.integers(-2**31, 2**31, size=(VOCAB + 31) // 32, dtype=np.int64).astype(np.int32)
    logits = mx.array(rng.standard_normal(VOCAB).astype(np.float32))
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:VOCAB].astype(bool)
    expected = np.where(bits, np.array(logits), -np.inf)
    np.testing.assert_array_equal(np.array(apply_bitmask(logits, words)), expected)
    np.testing.assert_array_equal(np.array(apply_bitmask(logits[None], words))[0], expected)


def test_a_token_outside_the_mask_is_refused(tok):
    constraint = JsonSchemaConstraint.from_schema(tok, {"type": "integer"})
    header = [tok.channel] + tok.encode("final") + [tok.message] + tok.encode('"text"')
    with pytest.raises(SchemaError, match="breaks the JSON Schema constraint"):
        feed_all(constraint.processor(), header, mx.zeros((VOCAB,)))


def test_response_format_reaches_the_developer_message(tok):
    schema = HAND_PICKED["array with bounds"]
    constraint = JsonSchemaConstraint.from_schema(tok, schema, name="numbers",
                                                  description="A few small integers.")
    text = developer_text(DeveloperContent().with_response_format(constraint.response_format))
    assert text.endswith("# Response Formats\n\n## numbers\n\n// A few small integers.\n"
                         + json.dumps(schema, separators=(",", ":")))


def test_constraint_cost_replays_the_document(tok):
    document = '{"code": "ABC-12", "month": "2024-07"}'
    cost = constraint_cost(tok, HAND_PICKED["strings with patterns"], document, repeats=1)
    assert cost["tokens"] == len(tok.encode(document)) + 1
    assert 0 < cost["median_ms"] <= cost["p90_ms"] <= cost["max_ms"]


# --------------------------------------------------------------------------- bad input

BAD_SCHEMAS = {
    "unknown type": ({"type": "strin"}, "Invalid type: strin"),
    "minimum above maximum": ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
    "look-behind pattern": ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
    "broken pattern": ({"type": "string", "pattern": "["}, "unclosed character class"),
    "unsupported keyword": ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    "properties not an object": ({"type": "object", "properties": 5}, "properties"),
    "dangling $ref": ({"$ref": "#/nothing"}, "/nothing"),
    "not a schema": ([1, 2], "must be a dict"),
    "false schema": (False, "schema is false"),
}


@pytest.mark.parametrize("name", list(BAD_SCHEMAS))
def test_bad_schema_is_one_clear_error(tok, name):
    schema, fragment = BAD_SCHEMAS[name]
    with pytest.raises(SchemaError) as info:
        JsonSchemaConstraint.from_schema(tok, schema)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert isinstance(info.value, GptOssError)


def test_bad_tool_schema_names_the_tool(tok):
    bad = ToolDescription("lookup", "", {"type": "object", "properties": {"q": {"type": "nope"}}})
    with pytest.raises(SchemaError, match="parameters of tool 'lookup'"):
        JsonSchemaConstraint.from_schema(tok, tools=[WEATHER, bad])


def test_schema_files(tmp_path, tok):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(HAND_PICKED["nested objects"]))
    assert load_json_schema(good) == HAND_PICKED["nested objects"]
    compile_schema(tok, load_json_schema(good))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path, fragment in ((tmp_path / "missing.json", "not found"), (broken, "not valid JSON")):
        with pytest.raises(SchemaError, match=fragment) as info:
            load_json_schema(path)
        assert str(path) in str(info.value)
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(SchemaError, match="expected a JSON object or true or false, got a JSON array"):
        load_json_schema(listed)
