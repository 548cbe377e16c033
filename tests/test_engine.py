"""The batched engine against the single-sequence loop: rows of different lengths, joining
mid-decode, stopping at different steps, constrained beside unconstrained, seeded rows, cancels,
failures that stay in their row, the prompt-cache pool, and streams from several threads."""
from __future__ import annotations

import inspect
import json
import threading

import jsonschema
import mlx.core as mx
import pytest

from mlx_gptoss import generate as generate_api
from mlx_gptoss.cache import PromptCachePool
from mlx_gptoss.engine import Engine, Request, batch_generate
from mlx_gptoss.errors import GptOssError
from mlx_gptoss.generate import generate, generate_tokens, stream_generate
from mlx_gptoss.prompts import render_prompt
from mlx_gptoss.sampling import SamplingParams, make_sampler

GREEDY = SamplingParams(temperature=0)
# Prompts shorter and longer than the tiny model's sliding window (8).
TEXTS = ["Hi", "What is the capital of France? Answer briefly.",
         "Tell me a long story about a dragon, a knight and a very old castle by the sea, "
         "with many details about the weather.", "2+2?"]


def alone(model, ids, sampling=GREEDY, max_tokens=12, stop=()) -> list[int]:
    """The single-sequence reference: what `generate` runs."""
    return list(generate_tokens(model, ids, sampler=make_sampler(sampling),
                                max_tokens=max_tokens, stop_tokens=stop))


@pytest.fixture(scope="module")
def prompts(chat_model):
    _, tok = chat_model
    return [render_prompt(t, tok) for t in TEXTS]


@pytest.mark.slow
def test_rows_of_different_lengths_equal_single_sequence_generation(chat_model, prompts):
    model, _ = chat_model
    assert len({len(p) for p in prompts}) == len(prompts)
    engine = Engine(model, max_batch=8, prefill_chunk=16)
    budgets = [5, 12, 9, 1]  # rows stop at different steps
    requests = [engine.add(Request(p, GREEDY, max_tokens=n)) for p, n in zip(prompts, budgets)]
    engine.run()
    for request, ids, n in zip(requests, prompts, budgets):
        assert request.finish_reason == "length" and request.error is None
        assert request.tokens == alone(model, ids, max_tokens=n)


@pytest.mark.slow
def test_rows_join_mid_decode_and_stop_on_their_own_stop_tokens(chat_model, prompts):
    model, _ = chat_model
    first = alone(model, prompts[0], max_tokens=12)
    stop = frozenset({first[6]})  # a token this row samples: it stops there
    expected_first = first[:first.index(first[6]) + 1]
    engine = Engine(model, max_batch=4, prefill_chunk=8)
    a = engine.add(Request(prompts[0], GREEDY, max_tokens=12, stop_tokens=stop))
    while len(a.tokens) < 2:
        engine.step()
    assert len(a.tokens) < len(expected_first)
    b = engine.add(Request(prompts[2], GREEDY, max_tokens=10))  # joins while `a` decodes
    engine.run()
    assert a.finish_reason == "stop" and a.tokens == expected_first
    assert b.tokens == alone(model, prompts[2], max_tokens=10)


@pytest.mark.slow
def test_a_long_prompt_prefills_in_chunks_while_others_keep_decoding(chat_model, prompts):
    model, _ = chat_model
    engine = Engine(model, max_batch=2, prefill_chunk=4)
    running = engine.add(Request(prompts[0], GREEDY, max_tokens=40))
    while not running.tokens:
        engine.step()
    long = engine.add(Request(prompts[2], GREEDY, max_tokens=3))
    chunks = -(-len(prompts[2]) // 4)
    for step in range(chunks):  # every step of the long prefill still yields a token
        before = len(running.tokens)
        engine.step()
        assert len(running.tokens) == before + 1, step
    engine.run()
    assert long.tokens == alone(model, prompts[2], max_tokens=3)
    assert running.tokens == alone(model, prompts[0], max_tokens=40)


@pytest.mark.slow
def test_constrained_and_unconstrained_rows_in_one_batch(chat_model):
    model, tok = chat_model
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    texts = ["Reply in JSON.", "Hello there"]
    options = dict(max_tokens=60, sampling=GREEDY, reasoning_effort="low")
    batch = batch_generate(model, tok, texts, response_format=[schema, None], **options)
    single = [generate(model, tok, texts[0], response_format=schema, **options),
              generate(model, tok, texts[1], **options)]
    for got, want in zip(batch, single):
        assert got.tokens == want.tokens and got.stop == want.stop
        assert got.messages == want.messages
    if batch[0].stop == "return":
        jsonschema.validate(json.loads(batch[0].text), schema)


@pytest.mark.slow
def test_a_seeded_row_samples_the_same_tokens_whatever_the_batch(chat_model, prompts):
    model, _ = chat_model
    seeded = SamplingParams(temperature=1.0, seed=1234)
    reference = alone(model, prompts[1], seeded, max_tokens=10)
    engine = Engine(model, max_batch=4)
    row = engine.add(Request(prompts[1], seeded, max_tokens=10))
    for i, other in enumerate([prompts[0], prompts[2], prompts[3]]):
        engine.add(Request(other, SamplingParams(temperature=1.0, seed=i), max_tokens=7))
    engine.run()
    assert row.tokens == reference


def test_cancel_and_bad_requests_fail_alone(chat_model, prompts):
    model, _ = chat_model
    engine = Engine(model, max_batch=4)
    keep = engine.add(Request(prompts[1], GREEDY, max_tokens=8))
    cancelled = engine.add(Request(prompts[0], GREEDY, max_tokens=50))
    bad_ids = engine.add(Request([10**9], GREEDY, max_tokens=5))
    broken = engine.add(Request(prompts[3], GREEDY, max_tokens=5,
                                logits_processors=[lambda tokens, logits: 1 / 0]))
    engine.step()
    engine.step()
    cancelled.cancel()
    engine.run()
    assert cancelled.finish_reason == "cancelled" and len(cancelled.tokens) < 50
    assert bad_ids.finish_reason == "error" and "outside the model's vocabulary" in str(bad_ids.error)
    assert broken.finish_reason == "error" and isinstance(broken.error, ZeroDivisionError)
    assert keep.finish_reason == "length" and keep.tokens == alone(model, prompts[1], max_tokens=8)
    assert not engine.has_work


@pytest.mark.slow
def test_the_pool_reuses_the_longest_cached_prefix_exactly(chat_model):
    model, tok = chat_model
    pool = PromptCachePool(model, max_bytes=1 << 30)
    engine = Engine(model, tok, max_batch=2, cache_pool=pool)
    system = "You are a helpful assistant that answers about geography in detail."
    first = render_prompt("Where is Paris?", tok, developer=system)
    second = render_prompt("Where is Rome?", tok, developer=system)
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    a = engine.add(Request(first, GREEDY, max_tokens=6))
    engine.run()
    b = engine.add(Request(second, GREEDY, max_tokens=6))
    again = engine.add(Request(first, GREEDY, max_tokens=6))
    engine.run()
    assert b.stats.cached_tokens == shared and again.stats.cached_tokens >= shared
    assert a.tokens == again.tokens == alone(model, first, max_tokens=6)
    assert b.tokens == alone(model, second, max_tokens=6)
    stats = pool.stats()
    assert stats["hits"] == 2 and stats["reused_tokens"] >= 2 * shared
    tiny = PromptCachePool(model, max_bytes=1)  # bounded in bytes: nothing fits
    tiny.release(pool.acquire(first))
    assert tiny.stats()["entries"] == 0


@pytest.mark.slow
def test_streams_from_many_threads_are_batched_and_each_exact(chat_model):
    model, tok = chat_model
    texts = ["Hi", "Name a colour.", "Count to three."]
    expected = [generate(model, tok, t, max_tokens=10, temperature=0) for t in texts]
    results: dict[int, object] = {}
    with Engine(model, tok, max_batch=4) as engine:
        def consume(i: int) -> None:
            results[i] = list(engine.stream_generate(texts[i], max_tokens=10, temperature=0))

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        # A consumer that stops early cancels its row; the engine goes on.
        stream = engine.stream_generate("Hello", max_tokens=1000, temperature=0)
        next(stream)
        stream.close()
        after = list(engine.stream_generate(texts[0], max_tokens=10, temperature=0))
    for i, want in enumerate(expected):
        events = results[i]
        got = events[-1]
        assert got.tokens == want.tokens and got.messages == want.messages
        assert [type(e).__name__ for e in events[:-1]] == \
            [type(e).__name__ for e in stream_generate(model, tok, texts[i], max_tokens=10,
                                                       temperature=0)][:-1]
    assert after[-1].tokens == expected[0].tokens


def test_generate_takes_sampling_keywords_with_a_real_signature(chat_model):
    model, tok = chat_model
    params = inspect.signature(generate).parameters
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "sampling"):
        assert name in params, name
    a = generate_api(model, tok, "hi", temperature=0.7, seed=5, max_tokens=6)
    b = generate(model, tok, "hi", sampling=SamplingParams(temperature=0.7, seed=5), max_tokens=6)
    assert a.tokens == b.tokens
    with pytest.raises(TypeError, match="unknown generation option.*temprature"):
        generate(model, tok, "hi", temprature=0.7)
    with pytest.raises(GptOssError, match="temperature must be >= 0"):
        generate(model, tok, "hi", temperature=-1)


@pytest.mark.slow
def test_batch_generate_keeps_prompt_order_and_validates_up_front(chat_model):
    model, tok = chat_model
    results = batch_generate(model, tok, TEXTS[:3], max_tokens=5, temperature=0)
    assert [r.tokens for r in results] == \
        [generate(model, tok, t, max_tokens=5, temperature=0).tokens for t in TEXTS[:3]]
    with pytest.raises(GptOssError, match="2 values for 3 prompts"):
        batch_generate(model, tok, TEXTS[:3], sampling=[GREEDY, GREEDY])
    with pytest.raises(GptOssError):
        batch_generate(model, tok, ["a", "b"], response_format=[{"type": "nope"}, None])
    mx.eval(mx.zeros(1))


def test_a_failing_batch_fails_its_streams_and_the_engine_serves_on(chat_model, monkeypatch):
    model, tok = chat_model
    real = model.step_rows
    calls = []

    def fail_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*args)

    monkeypatch.setattr(model, "step_rows", fail_once)
    with Engine(model, tok, max_batch=2) as engine:
        with pytest.raises(RuntimeError, match="simulated"):
            list(engine.stream_generate("Hi", max_tokens=5, temperature=0))
        after = list(engine.stream_generate("Hi", max_tokens=5, temperature=0))
    assert after[-1].tokens == generate(model, tok, "Hi", max_tokens=5, temperature=0).tokens


@pytest.mark.slow
def test_guarantees_hold_in_the_engine_threads(chat_model):
    """`tool_choice="required"` and a response format through `Engine.stream_generate` (the
    constraint is built in the caller's thread and runs in the engine's): a random-weight model
    still calls a declared function with valid arguments, or answers with valid JSON."""
    from mlx_gptoss.harmony import ToolDescription

    model, tok = chat_model
    weather = ToolDescription("get_weather", "Weather for a city.",
                              {"type": "object", "properties": {"city": {"type": "string",
                                                                         "maxLength": 12}},
                               "required": ["city"], "additionalProperties": False})
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    with Engine(model, tok, max_batch=2) as engine:
        call = list(engine.stream_generate("Weather in Paris?", functions=[weather],
                                           tool_choice="required", max_tokens=120, seed=3))[-1]
        answer = list(engine.stream_generate("Is it ok?", response_format=schema,
                                             max_tokens=120, seed=3))[-1]
    assert call.stop == "call" and call.complete
    assert call.tool_calls[-1].recipient == "functions.get_weather"
    jsonschema.validate(json.loads(call.tool_calls[-1].text()), weather.parameters)
    assert answer.stop == "return" and answer.complete
    jsonschema.validate(json.loads(answer.text), schema)
    short = generate(model, tok, "Is it ok?", response_format=schema, max_tokens=3, seed=3)
    assert short.stop == "length" and not short.complete  # cut off: said, not hidden
