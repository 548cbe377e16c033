"""Conversation JSON moves between openai-harmony and us unchanged; bad JSON is one clear error."""
from __future__ import annotations

import json

import openai_harmony as oh
import pytest
from harmony_fixtures import conversation, examples, to_oracle
from hypothesis import given

from mlx_gptoss.errors import HarmonyError
from mlx_gptoss.harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    TextContent,
)


@pytest.mark.slow
@examples(150)
@given(conv=conversation())
def test_json_round_trips_with_the_oracle(conv):
    ours = json.loads(conv.to_json())
    theirs_obj = to_oracle(conv)
    assert ours == json.loads(theirs_obj.to_json())  # we write what the oracle writes
    # and read what it writes, the way it reads it (missing optional fields get defaults)
    payload = theirs_obj.to_json()
    assert json.loads(Conversation.from_json(payload).to_json()) == \
        json.loads(oh.Conversation.from_json(payload).to_json())
    # the oracle reads what we write
    assert json.loads(oh.Conversation.from_json(conv.to_json()).to_json()) == \
        json.loads(Conversation.from_json(conv.to_json()).to_json())


def test_plain_string_content_and_defaults():
    conv = Conversation.from_json(json.dumps({"messages": [
        {"role": "system", "content": [{"type": "system_content"}]},
        {"role": "user", "content": "hi"},
    ]}))
    assert conv.messages[0].content[0] == SystemContent()
    assert conv.messages[1] == Message(Author(Role.USER), [TextContent("hi")])


def test_reasoning_effort_spelling():
    payload = {"messages": [{"role": "system", "content": [{"type": "system_content", "reasoning_effort": "high"}]}]}
    assert Conversation.from_dict(payload).messages[0].content[0].reasoning_effort is ReasoningEffort.HIGH
    assert Conversation.from_dict(payload).to_dict()["messages"][0]["content"][0]["reasoning_effort"] == "High"


def test_fluent_builders_match_the_oracles():
    ours = (SystemContent.new().with_reasoning_effort(ReasoningEffort.LOW).with_conversation_start_date("2025-01-01")
            .with_required_channels(["analysis", "final"]).with_browser_tool().to_dict())
    theirs = (oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.LOW)
              .with_conversation_start_date("2025-01-01").with_required_channels(["analysis", "final"])
              .with_browser_tool().to_dict())
    assert ours == json.loads(json.dumps(theirs))
    dev = DeveloperContent.new().with_instructions("x").to_dict()
    assert dev == oh.DeveloperContent.new().with_instructions("x").to_dict()


BAD = [
    ("not json", "not valid JSON"),
    ("[]", 'a JSON object with a "messages" list'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}',
     "^message 1: unknown role 'robot'"),
    ('{"messages": [{"role": "tool", "content": "r"}]}', "^message 0: a tool message needs"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "system_content"}]}]}',
     "^message 1: system content in a user message"),
    ('{"messages": [{"role": "developer", "content": [{"type": "developer_content", "tools": {"functions": '
     '{"name": "functions", "tools": [{"description": "no name"}]}}}]}]}',
     "^message 0: content 0: namespace 'functions': tool 0: missing tool name"),
    ('{"messages": [{"role": "user", "content": [{"type": "image"}]}]}', "^message 0: content 0: unknown content type"),
    ('{"messages": [{"role": "user", "content": 3}]}', "^message 0: \"content\" must be"),
    ('{"messages": [{"role": "user", "content": "a", "channel": 5}]}', "^message 0: 'channel' must be a string"),
    ('{"messages": [{"role": "system", "content": [{"type": "system_content", "reasoning_effort": "max"}]}]}',
     "^message 0: content 0: unknown reasoning_effort 'max'"),
    ('{"messages": [{"role": "system", "content": [{"type": "system_content", "channel_config": {}}]}]}',
     "^message 0: content 0: channel_config needs"),
    ('{"messages": [{"role": "system", "content": [{"type": "system_content", "tools": []}]}]}',
     "^message 0: content 0: 'tools' must be an object"),
    ('{"messages": [{"role": "developer", "content": [{"type": "developer_content", "tools": {"f": '
     '{"name": "f", "tools": [{"name": "t", "parameters": 3}]}}}]}]}', "'parameters' must be a JSON Schema object"),
    ('{"messages": [3]}', "^message 0: must be a JSON object"),
]


@pytest.mark.parametrize("payload, match", BAD)
def test_bad_conversation_json_is_one_clear_error(payload, match):
    with pytest.raises(HarmonyError, match=match) as err:
        Conversation.from_json(payload)
    assert "\n" not in str(err.value)
