"""Chat: prompt-cache reuse equals uncached generation, the chain-of-thought choice, the tool
loop (on a scripted model), interrupts, save/load."""
from __future__ import annotations

import json

import openai_harmony as oh
import pytest

from mlx_gptoss.chat import CALL_SLACK, Chat, Reply, ToolResult
from mlx_gptoss.generate import GenerationResult
from mlx_gptoss.harmony import Conversation, Role, render_conversation_for_completion
from mlx_gptoss.sampling import SamplingParams
from scripted import FREE, ForcedScript, ScriptedModel, harmony

GREEDY = SamplingParams(temperature=0)
QUESTIONS = ["Hello there", "Tell me more, with details", "And why is that?", "Thanks!"]


def structured_script():
    return ForcedScript(harmony("<|channel|>analysis<|message|>") + [FREE] * 6
                        + harmony("<|end|><|start|>assistant<|channel|>final<|message|>")
                        + [FREE] * 7)


def run_turns(chat: Chat) -> list[GenerationResult]:
    results = []
    for question in QUESTIONS:
        reply = chat.send(question)
        results += reply.generations
    return results


@pytest.mark.slow
@pytest.mark.parametrize("scripted", [True, False], ids=["analysis+final", "free"])
def test_prompt_cache_gives_the_same_tokens_as_no_cache(chat_model, scripted):
    """Four turns, each far longer than the sliding window (8 here): the cached chat prefills
    only the new tokens, and every token equals the uncached chat's."""
    model, tok = chat_model
    options = dict(sampling=GREEDY, max_tokens=24, reasoning_effort="low",
                   logits_processors=[structured_script()] if scripted else [])
    cached = run_turns(Chat(model, tok, **options))
    uncached = run_turns(Chat(model, tok, prompt_cache=False, **options))
    assert [r.tokens for r in cached] == [r.tokens for r in uncached]
    assert [r.prompt_tokens for r in cached] == [r.prompt_tokens for r in uncached]
    window = model.config.sliding_window
    for turn, result in enumerate(cached[1:], 1):
        stats = result.stats
        assert stats.prompt_tokens > 10 * window
        assert stats.cached_tokens >= cached[turn - 1].stats.prompt_tokens - 1
        assert stats.prompt_tokens - stats.cached_tokens < len(cached[turn - 1].tokens) + 20
    assert all(r.stats.cached_tokens == 0 for r in uncached)
    if scripted:
        assert all(r.stop == "return" and r.text and r.reasoning for r in cached)


@pytest.mark.slow
def test_finished_turns_lose_their_analysis_in_the_prompt_only(chat_model):
    model, tok = chat_model
    chat = Chat(model, tok, sampling=SamplingParams(seed=3), logits_processors=[structured_script()])
    first = chat.send("one")
    second = chat.send("two")
    assert first.reasoning != second.reasoning
    prompt = tok.decode(chat.prompt_tokens())
    for reply in (first, second):
        assert reply.reasoning and reply.reasoning not in prompt
        assert reply.text in prompt
    assert [m.channel for m in chat.messages if m.author.role is Role.ASSISTANT] == \
        ["analysis", "final"] * 2
    # openai-harmony's rule (drop only before the first final) would have kept turn two's.
    oracle_rule = tok.decode(render_conversation_for_completion(chat.conversation(), Role.ASSISTANT,
                                                                tokenizer=tok))
    assert second.reasoning in oracle_rule and first.reasoning not in oracle_rule


# --------------------------------------------------------------------------- the tool loop

CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>"
        "commentary to=functions.get_weather <|constrain|>json<|message|>{ARGS}<|call|>")
ANSWER = "<|channel|>final<|message|>It is sunny in Paris.<|return|>"


def get_weather(location: str, unit: str = "celsius") -> dict:
    """Current weather.

    Args:
        location: A city.
        unit: celsius or fahrenheit.
    """
    return {"location": location, "sunny": True, "unit": unit}


def scripted(*responses: str) -> ScriptedModel:
    return ScriptedModel([harmony(r) for r in responses])


@pytest.fixture(scope="module")
def oracle_encoding(chat_checkpoint):
    patch = pytest.MonkeyPatch()
    patch.setenv("TIKTOKEN_ENCODINGS_BASE", str(chat_checkpoint))
    yield oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    patch.undo()


@pytest.mark.slow
def test_tool_call_runs_the_function_and_loops_to_the_answer(chat_model, oracle_encoding):
    _, tok = chat_model
    model = scripted(CALL.replace("{ARGS}", '{"location": "Paris"}'), ANSWER)
    chat = Chat(model, tok, tools=[get_weather], sampling=GREEDY)
    events = list(chat.stream("Weather in Paris?"))
    reply = events[-1]
    assert isinstance(reply, Reply) and reply.stop == "return"
    assert reply.text == "It is sunny in Paris."
    [result] = [e for e in events if isinstance(e, ToolResult)]
    assert json.loads(result.output) == {"location": "Paris", "sunny": True, "unit": "celsius"}
    assert result.result.author.name == "functions.get_weather"
    assert (result.result.recipient, result.result.channel) == ("assistant", "commentary")
    assert [m.author.role for m in reply.messages] == [Role.ASSISTANT, Role.ASSISTANT, Role.TOOL,
                                                       Role.ASSISTANT]
    # Round two's prompt: the whole turn so far, analysis kept (the turn is not finished),
    # exactly as openai-harmony renders it; the call is re-rendered recipient first.
    second_prompt = model.prefills[-1]
    conversation = chat.conversation()
    conversation.messages = conversation.messages[:-1]
    oracle = oh.Conversation.from_json(conversation.to_json())
    full = oracle_encoding.render_conversation_for_completion(oracle, oh.Role.ASSISTANT)
    assert tok.decode(chat.cache.tokens[:len(full)]) == tok.decode(full)
    assert full[-len(second_prompt):] == second_prompt
    text = tok.decode(full)
    assert "Need the weather." in text
    assert ("<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
            '<|message|>{"location": "Paris"}<|call|><|start|>functions.get_weather to=assistant'
            '<|channel|>commentary<|message|>{"location": "Paris", "sunny": true, "unit": '
            '"celsius"}<|end|><|start|>assistant') in text
    # The function appears in the developer message as harmony renders it.
    assert "namespace functions {\n\n// Current weather.\ntype get_weather = (_: {" in text


@pytest.mark.slow
def test_tool_errors_become_results(chat_model):
    _, tok = chat_model
    for args, expected in (("{not json", "not valid JSON"),
                           ('{"city": "Paris"}', "bad arguments"),
                           ('["Paris"]', "must be a JSON object")):
        model = scripted(CALL.replace("{ARGS}", args), ANSWER)
        # Unconstrained: by default such arguments cannot be sampled (mlx_gptoss.constrained).
        reply = Chat(model, tok, tools=[get_weather], sampling=GREEDY,
                     constrain_tools=False).send("weather?")
        [tool_message] = [m for m in reply.messages if m.author.role is Role.TOOL]
        assert expected in json.loads(tool_message.text())["error"]
        assert reply.text == "It is sunny in Paris."

    def broken(location: str) -> str:
        raise RuntimeError("service down")

    broken.__name__ = "get_weather"
    model = scripted(CALL.replace("{ARGS}", '{"location": "x"}'), ANSWER)
    reply = Chat(model, tok, tools=[broken], sampling=GREEDY).send("weather?")
    assert json.loads(reply.messages[2].text()) == {"error": "RuntimeError: service down"}


def test_tool_rounds_are_bounded(chat_model):
    _, tok = chat_model
    model = scripted(CALL.replace("{ARGS}", '{"location": "Paris"}'))  # calls forever
    chat = Chat(model, tok, tools=[get_weather], sampling=GREEDY, max_tool_rounds=3)
    reply = chat.send("weather?")
    assert reply.stop == "tool_rounds"
    assert sum(m.author.role is Role.TOOL for m in reply.messages) == 3
    assert len(reply.generations) == 4


def test_unimplemented_function_asks_the_handler(chat_model):
    _, tok = chat_model
    from mlx_gptoss.tools.functions import FunctionTool

    asked = []

    def handler(call):
        asked.append((call.recipient, call.text()))
        return '{"temperature": 21}'

    model = scripted(CALL.replace("{ARGS}", '{"location": "Paris"}'), ANSWER)
    tool = FunctionTool("get_weather", "Weather.", {"type": "object", "properties": {}})
    reply = Chat(model, tok, tools=[tool], on_tool_call=handler, sampling=GREEDY).send("w?")
    assert asked == [("functions.get_weather", '{"location": "Paris"}')]
    assert reply.messages[2].text() == '{"temperature": 21}' and reply.stop == "return"
    # Without a handler the turn stops at the call; the caller answers and resumes.
    chat = Chat(scripted(CALL.replace("{ARGS}", "{}"), ANSWER), tok, tools=[tool], sampling=GREEDY)
    reply = chat.send("w?")
    assert reply.stop == "call" and reply.messages[-1].recipient == "functions.get_weather"
    chat.add_tool_result(reply.messages[-1], '{"temperature": 5}')
    resumed = chat.resume()
    assert resumed.stop == "return" and resumed.text == "It is sunny in Paris."
    assert [m.author.role for m in chat.messages] == [Role.USER, Role.ASSISTANT, Role.ASSISTANT,
                                                      Role.TOOL, Role.ASSISTANT]
    # A function the model made up gets an error it can read.
    invented = CALL.replace("get_weather", "get_time").replace("{ARGS}", "{}")
    reply = Chat(scripted(invented, ANSWER), tok, tools=[tool], sampling=GREEDY).send("w?")
    assert "unknown function 'get_time'" in reply.messages[2].text()


# --------------------------------------------------------------------------- interrupts, files


@pytest.mark.slow
def test_interrupted_turn_is_discarded(chat_model):
    model, tok = chat_model
    steps = {"n": 0}

    def interrupt_second_turn(tokens, logits):
        steps["n"] += 1
        if steps["n"] == 30:
            raise KeyboardInterrupt
        return logits

    chat = Chat(model, tok, sampling=GREEDY, max_tokens=20,
                logits_processors=[interrupt_second_turn])
    chat.send("first")
    history = list(chat.messages)
    with pytest.raises(KeyboardInterrupt):
        chat.send("second")
    assert chat.messages == history
    after = chat.send("third")
    fresh = Chat(model, tok, sampling=GREEDY, max_tokens=20, prompt_cache=False)
    fresh.messages = list(history)
    assert after.generations[0].tokens == fresh.send("third").generations[0].tokens


@pytest.mark.slow
def test_save_and_load_round_trip(chat_model, tmp_path, oracle_encoding):
    model, tok = chat_model
    chat = Chat(model, tok, instructions="Be brief.", reasoning_effort="high", tools=[get_weather],
                sampling=GREEDY, logits_processors=[structured_script()])
    chat.send("hi")
    path = tmp_path / "chat.json"
    chat.save(path)
    oracle = oh.Conversation.from_json(path.read_text())  # openai-harmony reads our file
    assert len(oracle.messages) == len(chat.conversation().messages)
    other = Chat(model, tok, sampling=GREEDY)
    other.load(path)
    assert other.conversation().to_dict() == chat.conversation().to_dict()
    assert other.prompt_tokens() == chat.prompt_tokens()
    assert other.reasoning_effort.value == "High" and other.instructions == "Be brief."
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "wizard", "content": "x"}]}')
    from mlx_gptoss.errors import GptOssError

    with pytest.raises(GptOssError, match="bad.json: message 0: unknown role 'wizard'"):
        other.load(bad)
    assert Conversation.from_json(path.read_text()).to_dict() == chat.conversation().to_dict()


@pytest.mark.slow
def test_python_tool_runs_in_the_sandbox(chat_model):
    from mlx_gptoss.tools.python import PythonTool

    _, tok = chat_model
    model = scripted("<|channel|>analysis to=python code<|message|>x = 6 * 7\nprint(x)<|call|>",
                     "<|channel|>final<|message|>42.<|return|>")
    with Chat(model, tok, python=PythonTool(timeout=10), sampling=GREEDY) as chat:
        reply = chat.send("compute")
        assert reply.text == "42." and reply.stop == "return"
        tool_message = reply.messages[1]
        assert (tool_message.author.name, tool_message.channel, tool_message.text()) == \
            ("python", "analysis", "42\n")
        assert "## python" in tok.decode(chat.prompt_tokens())  # declared in the system message
    off = Chat(scripted("<|channel|>analysis to=python code<|message|>1<|call|>",
                        "<|channel|>final<|message|>ok<|return|>"), tok, sampling=GREEDY)
    assert "no tool named python is available" in off.send("x").messages[1].text()


def test_call_without_recipient_ends_the_turn_cleanly(chat_model):
    _, tok = chat_model
    chat = Chat(scripted("<|channel|>commentary<|message|>oops<|call|>"), tok, sampling=GREEDY)
    reply = chat.send("x")
    assert reply.stop == "invalid_call" and reply.messages[-1].text() == "oops"
    assert "oops<|end|><|start|>assistant" in tok.decode(chat.prompt_tokens())  # still renders


# --------------------------------------------------------------------------- settings, tools, cache


def test_tuple_default_becomes_a_json_array(chat_model, oracle_encoding):
    """A default with no JSON equivalent used to reach the renderer and fail the first send."""
    from mlx_gptoss.tools.functions import function_tool

    def resize(size: tuple[int, int] = (640, 480), when=object(), scale: float = 1.0):
        """Resize the image."""
        return list(size)

    properties = function_tool(resize).parameters["properties"]
    assert properties["size"] == {"type": "array", "items": {"type": "integer"}, "default": [640, 480]}
    assert properties["when"] == {} and properties["scale"] == {"type": "number", "default": 1.0}
    _, tok = chat_model
    model = scripted(CALL.replace("get_weather", "resize").replace("{ARGS}", "{}"), ANSWER)
    chat = Chat(model, tok, tools=[resize], sampling=GREEDY)
    reply = chat.send("resize it")
    assert reply.stop == "return" and reply.messages[2].text() == "[640, 480]"
    first_prompt = Conversation(chat.header() + chat.messages[:1])
    oracle = oh.Conversation.from_json(first_prompt.to_json())
    assert oracle_encoding.render_conversation_for_completion(oracle, oh.Role.ASSISTANT) == \
        model.prefills[0]
    assert "size?: number[], // default: [640,480]\n" in tok.decode(model.prefills[0])


def test_response_format_set_after_construction_applies(chat_model):
    _, tok = chat_model
    chat = Chat(scripted(ANSWER), tok, sampling=GREEDY)
    assert chat.json_constraint() is None
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    chat.response_format = schema
    assert chat.json_constraint().response_format.schema == schema
    assert "# Response Formats" in tok.decode(chat.prompt_tokens())
    schema["properties"]["zip"] = {"type": "integer"}  # edited in place: compiled again
    assert "zip" in chat.json_constraint().response_format.schema["properties"]
    chat.response_format = None
    assert chat.json_constraint() is None and "# Response Formats" not in tok.decode(chat.prompt_tokens())


def test_invented_function_gets_an_error_not_the_handler(chat_model):
    _, tok = chat_model
    asked = []
    invented = CALL.replace("get_weather", "get_time").replace("{ARGS}", "{}")
    chat = Chat(scripted(invented, ANSWER), tok, tools=[get_weather], sampling=GREEDY,
                on_tool_call=lambda call: asked.append(call) or "{}")
    reply = chat.send("time?")
    assert asked == []
    assert json.loads(reply.messages[2].text()) == \
        {"error": "unknown function 'get_time'; available: get_weather"}


def test_load_replaces_every_setting(chat_model, tmp_path):
    """The loaded chat renders exactly the saved prompt, whatever the chat had before; a
    declared function keeps its callable; a bad file changes nothing."""
    model, tok = chat_model
    plain = Chat(scripted(ANSWER), tok, sampling=GREEDY)
    plain.send("hi")
    plain.save(tmp_path / "plain.json")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    busy = Chat(scripted(ANSWER), tok, sampling=GREEDY, system="You are Bob.", instructions="Be terse.",
                reasoning_effort="high", date="2025-01-01", tools=[get_weather], response_format=schema)
    busy.load(tmp_path / "plain.json")
    assert busy.prompt_tokens() == plain.prompt_tokens()
    assert (busy.system, busy.instructions, busy.date, busy.response_format) == (None, None, None, None)
    assert not busy.tools and busy.reasoning_effort.value == "Medium"

    def get_time() -> str:
        return "noon"

    structured = Chat(scripted(ANSWER), tok, sampling=GREEDY, system="You are Ann.",
                      tools=[get_weather], response_format=schema)
    structured.save(tmp_path / "structured.json")
    other = Chat(model, tok, sampling=GREEDY, tools=[get_weather, get_time])
    other.load(tmp_path / "structured.json")
    assert other.prompt_tokens() == structured.prompt_tokens()
    assert list(other.tools.tools) == ["get_weather"]
    assert other.tools.tools["get_weather"].function is get_weather
    assert other.json_constraint().response_format.schema == schema

    data = json.loads((tmp_path / "structured.json").read_text())
    developer = next(m for m in data["messages"] if m["role"] == "developer")
    developer["content"][0]["tools"]["functions"]["tools"][0]["name"] = "bad name"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    before = (other.prompt_tokens(), list(other.messages), other.tools.tools)
    from mlx_gptoss.errors import GptOssError

    plain.instructions = "Changed."
    with pytest.raises(GptOssError, match="invalid function tool name 'bad name'"):
        plain.load(tmp_path / "bad.json")
    assert plain.instructions == "Changed." and plain.system is None and not plain.tools
    assert before == (other.prompt_tokens(), list(other.messages), other.tools.tools)


ROUND_ANALYSIS = "<|channel|>analysis<|message|>I need the weather in Paris, so I call the tool.<|end|>"


class ToolRounds:
    """A logits processor: the first `calls` generations of each turn call get_weather after a
    fixed analysis, the next one answers (free text); `turn_calls` sets the calls per turn."""

    def __init__(self, turn_calls: list[int]):
        call = ROUND_ANALYSIS + ("<|start|>assistant<|channel|>commentary to=functions.get_weather "
                                 '<|constrain|>json<|message|>{"location": "Paris"}<|call|>')
        self.call = ForcedScript(harmony(call))
        self.answer = ForcedScript(harmony("<|channel|>final<|message|>") + [FREE] * 5)
        self.plan = [script for calls in turn_calls for script in [self.call] * calls + [self.answer]]
        self.generation = -1

    def __call__(self, tokens, logits):
        if not tokens:
            self.generation += 1
        return self.plan[self.generation](tokens, logits)


def tool_chat(model, tok, turn_calls, **options) -> Chat:
    return Chat(model, tok, tools=[get_weather], sampling=GREEDY, reasoning_effort="low",
                constrain_tools=False, logits_processors=[ToolRounds(turn_calls)], **options)


@pytest.mark.slow
def test_next_turn_reuses_the_cache_after_the_most_tool_rounds(chat_model):
    """A turn of 1 + max_tool_rounds generations marks as many snapshots; the one where the
    turn began (where the next turn drops its analysis) must survive them."""
    model, tok = chat_model
    rounds = 8
    chat = tool_chat(model, tok, [rounds, 0], max_tool_rounds=rounds)
    first = chat.send("Weather in Paris?")
    assert first.stop == "return" and len(first.generations) == rounds + 1
    second = chat.send("Thanks!").generations[0].stats
    began = first.generations[0].stats.prompt_tokens
    window = model.config.sliding_window
    assert first.generations[-1].stats.prompt_tokens - began > CALL_SLACK + window  # no trim
    assert second.cached_tokens == began  # the turn-start snapshot, nothing before re-read


@pytest.mark.slow
def test_tool_round_rewinds_only_the_call(chat_model):
    """The next round's prompt re-renders the call recipient first, right after the round's
    analysis: the sliding slack trims back there, so the analysis is not read again."""
    model, tok = chat_model
    chat = tool_chat(model, tok, [1, 1])
    uncached = tool_chat(model, tok, [1, 1], prompt_cache=False)
    for text in ("Weather in Paris?", "And tomorrow?"):
        reply, expected = chat.send(text), uncached.send(text)
        assert [g.tokens for g in reply.generations] == [g.tokens for g in expected.generations]
        assert reply.text and reply.stop == "return"
        call, answer = reply.generations
        analysis = len(harmony(ROUND_ANALYSIS + "<|start|>assistant"))
        assert answer.stats.cached_tokens == call.stats.prompt_tokens + analysis
