"""JSON Schema → TypeScript rendering, compared with the oracle through a developer message."""
from __future__ import annotations

import openai_harmony as oh
import pytest
from harmony_fixtures import examples, float_value, json_schema, json_value
from hypothesis import given

from mlx_gptoss.harmony import DeveloperContent, Message, Role, ToolDescription, render_message
from mlx_gptoss.harmony.typescript import json_display, schema_to_typescript

HYPOTHESIS = examples(300)


def oracle_text(oracle, parameters) -> str:
    """The oracle's developer message for one function taking `parameters`."""
    dev = oh.DeveloperContent.new().with_function_tools([oh.ToolDescription.new("f", "d", parameters)])
    return oracle.decode_utf8(oracle.render(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev)))


def check(parameters, tok, oracle) -> str:
    dev = DeveloperContent.new().with_function_tools([ToolDescription.new("f", "d", parameters)])
    ours = render_message(Message.from_role_and_content(Role.DEVELOPER, dev), tok)
    theirs = oracle.render(oh.Message.from_role_and_content(
        oh.Role.DEVELOPER, oh.DeveloperContent.new().with_function_tools([oh.ToolDescription.new("f", "d", parameters)])))
    assert tok.decode(ours) == oracle.decode_utf8(theirs)
    assert ours == theirs
    return schema_to_typescript(parameters)


def obj(properties, required=None, **extra):
    schema = {"type": "object", "properties": properties, **extra}
    if required is not None:
        schema["required"] = required
    return schema


RULES = {
    "optional marker": obj({"a": {"type": "string"}, "b": {"type": "string"}}, ["a"]),
    "integer is number": obj({"n": {"type": "integer"}, "m": {"type": "number"}}),
    "string enum": obj({"e": {"type": "string", "enum": ["a", "b", 3]}}),
    "enum without strings": obj({"e": {"type": "string", "enum": [1, 2]}}),
    "array of union, no parentheses": obj({"a": {"type": "array", "items": {"type": ["string", "integer"]}}}),
    "array without items": obj({"a": {"type": "array"}}),
    "nested arrays": obj({"a": {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}}}}),
    "type list": obj({"t": {"type": ["number", "string", "null"]}}),
    "type list of non-strings": obj({"t": {"type": [1, 2]}}),
    "default string quoted": obj({"s": {"type": "string", "default": "x \"y\""}}),
    "default enum unquoted": obj({"s": {"type": "string", "enum": ["c", "f"], "default": "c"}}),
    "default numbers and json": obj({"i": {"type": "integer", "default": 3}, "f": {"type": "number", "default": 0.5},
                                     "big": {"type": "number", "default": 1e21}, "tiny": {"type": "number", "default": 1e-7},
                                     "l": {"type": "array", "default": [1, "a", None]},
                                     "o": {"type": "object", "default": {"k": True}}, "n": {"default": None}}),
    "oneOf property": obj({"v": {"oneOf": [{"type": "string", "description": "as text"},
                                           {"type": "integer", "default": 3, "nullable": True}],
                                 "description": "a value", "default": "x"}}),
    "oneOf property, description equals first variant's": obj(
        {"v": {"oneOf": [{"type": "string", "description": "same"}, {"type": "number", "description": "same"}],
               "description": "same"}}),
    "oneOf at the top": {"oneOf": [{"type": "string"}, obj({"a": {"type": "string"}}, description="obj")]},
    "oneOf not a list": obj({"v": {"oneOf": "nope", "type": "string", "description": "hidden", "default": 1}}),
    "anyOf, allOf and $ref are any": obj({"a": {"anyOf": [{"type": "string"}]}, "b": {"allOf": []},
                                          "c": {"$ref": "#/x"}, "d": {}, "e": True}),
    "nullable": obj({"n": {"type": "string", "nullable": True}, "m": {"type": "null", "nullable": True}}),
    "title and examples": obj({"t": {"type": "string", "title": "Title", "examples": ["a", 1, "b"]},
                               "u": {"type": "string", "examples": [1]}}),
    "descriptions with newlines and blank lines": obj({"d": {"type": "string", "description": "one\n\ntwo\r\n"}},
                                                      description="top\nlevel"),
    "nested objects indent": obj({"o": obj({"p": obj({"q": {"type": "string", "description": "deep"}}, ["q"])},
                                           description="inner")}),
    "empty object": {"type": "object"},
    "unknown type": obj({"x": {"type": "weird"}}),
}


@pytest.mark.parametrize("name", list(RULES))
def test_schema_rule(name, tok, oracle):
    check(RULES[name], tok, oracle)


def test_examples_of_each_rule_read_as_documented(tok, oracle):
    ts = check(RULES["optional marker"], tok, oracle)
    assert ts == "{\na: string,\nb?: string,\n}"
    assert check(RULES["array of union, no parentheses"], tok, oracle) == "{\na?: string | number[],\n}"
    assert '// default: "x \\"y\\""' not in check(RULES["default string quoted"], tok, oracle)
    assert "// default: c" in check(RULES["default enum unquoted"], tok, oracle)


def test_tool_description_lines(tok, oracle):
    for description in ["", "one", "one\ntwo", "one\n\ntwo", "trailing\n", "cr\r\nlf", "lone\rcr", "\n"]:
        dev = DeveloperContent.new().with_function_tools([ToolDescription.new("f", description)])
        ours = render_message(Message.from_role_and_content(Role.DEVELOPER, dev), tok)
        theirs = oracle.render(oh.Message.from_role_and_content(
            oh.Role.DEVELOPER, oh.DeveloperContent.new().with_function_tools([oh.ToolDescription.new("f", description)])))
        assert ours == theirs, description


@pytest.mark.slow
@HYPOTHESIS
@given(schema=json_schema)
def test_random_schemas_render_like_the_oracle(schema, tok, oracle):
    check({"type": "object", "properties": {"p": schema}} if not isinstance(schema, dict) else schema, tok, oracle)


@pytest.mark.slow
@examples(300)
@given(value=json_value)
def test_defaults_print_like_serde_json(value):
    """`json_display` is serde_json's Display (ryu floats); checked through the oracle above,
    and here for self-consistency: it is valid JSON that reads back as the same value."""
    import json

    assert json.loads(json_display(value)) == value


@pytest.mark.slow
@HYPOTHESIS
@given(x=float_value)
def test_float_defaults_match_the_oracle(x, tok, oracle):
    """ryu's layout: `1e21`, `1e-7`, `100.0`, `0.0001` (see float_value for the digit limit)."""
    check(obj({"x": {"type": "number", "default": x}}), tok, oracle)
