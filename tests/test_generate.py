"""The generation loop and the prompt cache on a tiny model with the full vocabulary."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from helpers import REWIND_CASES, reference_greedy, rewind_through
from mlx_gptoss.cache import PromptCache
from mlx_gptoss.generate import (
    GenerationResult,
    event_to_dict,
    generate,
    generate_tokens,
    stream_generate,
)
from mlx_gptoss.harmony import AnswerDone, MessageEnd, MessageStart, Role, TextDelta
from mlx_gptoss.model import prefill
from mlx_gptoss.sampling import SamplingParams, make_sampler
from scripted import FREE, ForcedScript, harmony

GREEDY = SamplingParams(temperature=0)


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 199_000, n).tolist()


def run(model, prompt, steps, cache=None, processors=(), stop=(), sampler=None):
    return list(generate_tokens(model, prompt, sampler=sampler or make_sampler(GREEDY),
                                max_tokens=steps, stop_tokens=stop, prompt_cache=cache,
                                logits_processors=processors))


@pytest.mark.slow
def test_greedy_tokens_match_transformers(chat_model, chat_checkpoint):
    model, _ = chat_model
    prompt = ids(12, 0)
    got = run(model, prompt, 16)
    assert got == reference_greedy(chat_checkpoint, np.array([prompt]), 16)
    # The step-by-step path (taken when logits processors run) gives the same tokens.
    assert run(model, prompt, 16, processors=[lambda tokens, logits: logits]) == got


@pytest.mark.slow
@pytest.mark.parametrize("pipelined", [True, False])
def test_stop_token_is_yielded_but_never_cached(chat_model, pipelined):
    model, _ = chat_model
    prompt = ids(20, 1)
    free = run(model, prompt, 12)
    stop_at = next(i for i in range(3, 12) if free[i] not in free[:i])
    processors = [] if pipelined else [lambda tokens, logits: logits]
    cache = PromptCache.for_model(model)
    got = run(model, prompt, 50, cache=cache, processors=processors, stop={free[stop_at]})
    assert got == free[:stop_at + 1]
    assert cache.tokens == prompt + got[:-1]
    assert all(layer.offset == len(cache.tokens) for layer in cache.layers)
    # The cache continues exactly where a fresh run would be.
    assert run(model, prompt + got[:-1], 4, cache=cache) == run(model, prompt + got[:-1], 4)


def fresh_logits(model, tokens):
    return np.array(prefill(model, mx.array([tokens]), model.make_cache(), chunk_size=7))


@pytest.mark.parametrize("case", REWIND_CASES)
def test_prompt_cache_rewinds_exactly(chat_model, case):
    """Every way back (trim within the slack, a snapshot, a full reset) is exact."""
    model, _ = chat_model
    cache = PromptCache.for_model(model, sliding_slack=2)
    prompt, todo = rewind_through(model, cache, case, ids)
    got = np.array(prefill(model, mx.array([todo]), cache.layers, chunk_size=5))
    np.testing.assert_allclose(got, fresh_logits(model, prompt), atol=2e-5)
    assert all(layer.offset == len(prompt) for layer in cache.layers)


def test_identical_prompt_recomputes_nothing(chat_model):
    model, _ = chat_model
    prompt = ids(30, 4)
    cache = PromptCache.for_model(model)
    first = run(model, prompt, 1, cache=cache)
    assert cache.prepare(prompt) == []
    assert run(model, prompt, 1, cache=cache) == first


@pytest.mark.slow
@pytest.mark.parametrize("pipelined", [True, False])
def test_interrupt_leaves_the_cache_consistent(chat_model, pipelined):
    model, _ = chat_model
    prompt = ids(25, 5)
    cache = PromptCache.for_model(model)
    stream = generate_tokens(model, prompt, sampler=make_sampler(GREEDY), max_tokens=40,
                             prompt_cache=cache,
                             logits_processors=[] if pipelined else [lambda t, logits: logits])
    seen = [next(stream) for _ in range(6)]
    stream.close()  # what a KeyboardInterrupt in the consumer leads to
    assert cache.tokens == prompt + seen[:len(cache.tokens) - len(prompt)]
    assert all(layer.offset == len(cache.tokens) for layer in cache.layers)

    def interrupt(tokens, logits):
        if len(tokens) == 3:
            raise KeyboardInterrupt
        return logits

    with pytest.raises(KeyboardInterrupt):
        run(model, prompt + seen, 10, cache=cache, processors=[interrupt])
    assert all(layer.offset == len(cache.tokens) for layer in cache.layers)
    follow = prompt + seen + ids(3, 6)
    assert run(model, follow, 8, cache=cache) == run(model, follow, 8)


def test_stream_generate_yields_harmony_events(chat_model):
    model, tok = chat_model
    script = ForcedScript(harmony("<|channel|>analysis<|message|>") + [FREE] * 4
                          + harmony("<|end|><|start|>assistant<|channel|>final<|message|>")
                          + [FREE] * 5)
    events = list(stream_generate(model, tok, "Hi", reasoning_effort="low", sampling=GREEDY,
                                  logits_processors=[script]))
    result = events[-1]
    assert isinstance(result, GenerationResult) and result.stop == "return"
    starts = [e for e in events if isinstance(e, MessageStart)]
    assert [(s.author.role, s.channel) for s in starts] == [(Role.ASSISTANT, "analysis"),
                                                            (Role.ASSISTANT, "final")]
    final_text = "".join(e.text for e in events if isinstance(e, TextDelta) and e.index == 1)
    assert result.text == final_text and final_text
    assert result.reasoning == "".join(e.text for e in events
                                       if isinstance(e, TextDelta) and e.index == 0)
    assert isinstance(events[-2], AnswerDone)
    assert [e.message.channel for e in events if isinstance(e, MessageEnd)] == ["analysis", "final"]
    assert result.tokens[-1] == tok.return_ and len(result.tokens) == len(script.template) + 1
    assert tok.decode(result.prompt_tokens).endswith("Reasoning: low\n\n# Valid channels: analysis, "
                                                     "commentary, final. Channel must be included "
                                                     "for every message.<|end|><|start|>user"
                                                     "<|message|>Hi<|end|><|start|>assistant")
    stats = result.stats
    assert stats.prompt_tokens == len(result.prompt_tokens) and stats.cached_tokens == 0
    assert stats.generation_tokens == len(result.tokens)
    assert stats.prompt_tps > 0 and stats.generation_tps > 0 and stats.peak_memory > 0
    assert event_to_dict(result)["stats"]["generation_tokens"] == len(result.tokens)
    assert event_to_dict(starts[1])["channel"] == "final"


def test_processors_see_the_parser_state(chat_model):
    """The structured-output hook: `bind(parser)`, then the channel is current at each step."""
    model, tok = chat_model
    prefix = harmony("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>final"
                     "<|message|>")
    script = ForcedScript(prefix + [FREE] * 3)

    class Watcher:
        seen: list = []

        def bind(self, parser):
            self.parser = parser

        def __call__(self, tokens, logits):
            self.seen.append((len(tokens), self.parser.current_channel, len(self.parser.tokens)))
            return logits

    watcher = Watcher()
    generate(model, tok, "Hi", sampling=GREEDY, logits_processors=[script, watcher])
    assert all(fed == n for n, _, fed in watcher.seen)
    channels = dict((n, channel) for n, channel, _ in watcher.seen)
    assert channels[len(prefix)] == "final" and channels[4] == "analysis"


def test_max_tokens_stops_with_length(chat_model):
    model, tok = chat_model
    result = generate(model, tok, "Hi", max_tokens=5, sampling=SamplingParams(seed=1),
                      logits_processors=[ForcedScript(harmony("<|channel|>final<|message|>")
                                                      + [FREE] * 10)])
    assert result.stop == "length" and len(result.tokens) == 5
    assert result.messages[-1].channel == "final" and result.text


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(chat_model):
    model, tok = chat_model
    a = generate(model, tok, ids(10, 7), max_tokens=12, sampling=SamplingParams(seed=11))
    b = generate(model, tok, ids(10, 7), max_tokens=12, sampling=SamplingParams(seed=11))
    c = generate(model, tok, ids(10, 7), max_tokens=12, sampling=SamplingParams(seed=12))
    assert a.tokens == b.tokens != c.tokens


def test_prompt_ids_are_validated_before_the_model_runs(chat_model):
    """Out-of-range ids would index past the embedding table (a crash, not an error)."""
    from mlx_gptoss.errors import GptOssError

    model, tokenizer = chat_model
    with pytest.raises(GptOssError, match="outside the vocabulary"):
        generate(model, tokenizer, [200006, 1, 10**9], max_tokens=2)
    with pytest.raises(GptOssError, match="outside the model's vocabulary"):
        list(generate_tokens(model, [1, model.config.vocab_size], max_tokens=1,
                             sampler=make_sampler(SamplingParams(temperature=0.0))))
    # Arrays of ids are accepted like lists.
    ids = [200006, 1516, 200008, 12194, 200007, 200006, 173781]
    greedy = SamplingParams(temperature=0.0)
    assert (generate(model, tokenizer, np.array(ids), max_tokens=3, sampling=greedy).tokens
            == generate(model, tokenizer, ids, max_tokens=3, sampling=greedy).tokens)
