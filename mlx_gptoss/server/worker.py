"""The one place the server touches the model: admission, a bounded queue, cancellation.

Generations run on long-lived generation threads (MLX and the generation loop are
synchronous) and hand their harmony events to the request's asyncio task through a queue.
`Worker.start` admits a request or refuses it at once with 429 (`--max-concurrency` decoding
plus `--max-queue` waiting); a cancelled request (its client went away) stops within one token,
or leaves the queue if it was still waiting, and its row is freed.

Backends: with an `Engine` (`mlx-gptoss serve --max-concurrency N`, N > 1) up to N requests
decode at once as rows of one batch (`Engine.stream_generate`, one generation thread per row
slot), reusing prefixes through the engine's prompt-cache pool. Without one, the pipelined
single-sequence loop (`stream_generate`, the lowest latency for one stream) decodes one request
at a time over one shared `PromptCache`, the others waiting in order. Either way a
conversation's next turn, or a `previous_response_id` continuation, prefills only what is new.

Across ranks (a model from `distributed.load` under `mlx.launch`), rank 0 serves with the
single-sequence loop, run by the main thread (`Worker.run`: MLX raises a lost rank's error
there, while a collective on another thread waits forever, measured), the HTTP server on
another; the other ranks run `follow`, no server. For each job rank 0
broadcasts the prompt ids and options (JSON), every rank makes the same `stream_generate` call
(rank 0's sampled token on every rank), and after every event all ranks agree whether to go on
(one tiny all_sum of rank 0's stop flag: a client gone, a stop string, a failed constraint), so
no rank is ever left waiting in a collective the others skipped. Closing broadcasts a stop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

import mlx.core as mx

from .. import distributed
from ..cache import DEFAULT_SLIDING_SLACK, PromptCache
from ..errors import DistributedError
from ..generate import GenerationResult, stream_generate
from ..sampling import SamplingParams
from .protocol import APIError

log = logging.getLogger("mlx_gptoss.server")
_END = object()


@dataclass(frozen=True)
class JobRecord:
    """How a generation ended (kept for observability and tests)."""

    prompt_tokens: int
    events: int
    cancelled: bool
    error: str | None
    result: GenerationResult | None


class Stream:
    """One request's generation, seen from its asyncio task: iterate it, or `cancel()` it."""

    def __init__(self, worker: "Worker", loop: asyncio.AbstractEventLoop):
        self.worker = worker
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.done = threading.Event()

    def push(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        """Stop the generation within one token; a request still waiting leaves the queue."""
        self.cancelled.set()
        self.worker.cancel_waiting(self)

    async def events(self) -> AsyncIterator[Any]:
        """The harmony events, then the `GenerationResult`; the generation's error re-raised."""
        try:
            while True:
                item = await self.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()  # a no-op when the generation ended by itself


class Worker:
    """Admits requests and runs their generations (see the module docstring).

    Generations run on long-lived threads (one without the engine, `max_concurrency` with it)
    that take jobs in arrival order: MLX arrays are tied to the thread whose stream made them,
    so a thread per request could not reuse the prompt cache of the one before.
    """

    def __init__(self, model, tokenizer, *, max_concurrency: int = 1, max_queue: int = 16,
                 engine: Any = None):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.group = group_of(model)
        # Across ranks: set once another rank is gone (every later job would fail too).
        self.lost: DistributedError | None = None
        self._current: Stream | None = None
        if self.group is not None and engine is not None:
            raise DistributedError("the batched engine does not run across ranks yet: serve "
                                   "with --max-concurrency 1 under mlx.launch")
        self.capacity = max_concurrency + max_queue
        self.admitted = 0
        self._lock = threading.Lock()
        self._waiting: deque[tuple[Stream, list[int], dict[str, Any]]] = deque()
        self._ready = threading.Condition(self._lock)
        self._closed = False
        self.cache = None if engine is not None else PromptCache.for_model(model, sliding_slack=DEFAULT_SLIDING_SLACK)
        self.records: deque[JobRecord] = deque(maxlen=256)
        self.finished = threading.Condition()
        # Without the engine one request decodes at a time, whatever --max-concurrency says;
        # across ranks the caller's thread runs the jobs (`run`).
        threads = 0 if self.group is not None else max_concurrency if engine is not None else 1
        self._threads = [threading.Thread(target=self._loop, daemon=True, name=f"mlx-gptoss-generation-{i}")
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _generate(self, stream: Stream, prompt: list[int], options: dict[str, Any]
                  ) -> Iterator[Any]:
        """The generation's events, ending within one token of `stream.cancel()`."""
        if self.group is not None:
            distributed.broadcast_json(job_message(prompt, options), self.group)
            return lockstep_generation(self.model, self.tokenizer, self.cache, self.group,
                                       prompt, options, stop=stream.cancelled.is_set)
        if self.engine is not None:
            events = self.engine.stream_generate(prompt, **options)
        else:
            events = stream_generate(self.model, self.tokenizer, prompt, prompt_cache=self.cache,
                                     **options)
        return _until(events, stream.cancelled.is_set)

    def start(self, prompt: list[int], *, admitted: bool = False, **options: Any) -> Stream:
        """Admit and queue a generation of `prompt` (token ids) with `stream_generate`'s
        keywords, or raise 429 when the queue is full. `admitted`: the next round of a request
        already being answered (after a built-in tool ran), never refused."""
        stream = Stream(self, asyncio.get_running_loop())
        with self._lock:
            if self.lost is not None:
                raise _unavailable(self.lost)
            if self.admitted >= self.capacity and not admitted:
                raise APIError(429, "the server is busy (its request queue is full); retry later",
                               type="rate_limit_exceeded", code="rate_limit_exceeded")
            self.admitted += 1
            self._waiting.append((stream, prompt, options))
            self._ready.notify()
        return stream

    def cancel_waiting(self, stream: Stream) -> None:
        with self._lock:
            job = next((j for j in self._waiting if j[0] is stream), None)
            if job is None:
                return
            self._waiting.remove(job)
            self.admitted -= 1
        self._record(stream, job[1], 0, None, None)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._ready.wait()
                closed = self._closed
                if not closed:
                    stream, prompt, options = self._waiting.popleft()
                    self._current = stream
            if closed:
                self._release_followers()
                return
            self._run(stream, prompt, options)
            self._current = None

    def run(self) -> None:
        """Across ranks: run the jobs on this thread (the main one, see the module docstring)
        until `close()` or a lost rank; then the other ranks are told to stop."""
        self._loop()

    def shutdown(self) -> None:
        """`close()`, and cancel the generation running now (it stops within one token)."""
        current = self._current
        if current is not None:
            current.cancelled.set()
        self.close()

    def _lose_rank(self, error: RuntimeError) -> APIError:
        """Another rank is gone: answer this request and every later one 503, and stop."""
        self.lost = distributed.lost_peer_error(self.group, error)
        log.error("%s", self.lost)
        self.close()
        return _unavailable(self.lost)

    def _release_followers(self) -> None:
        """Tell the other ranks to stop (from this thread, after its last job's collectives)."""
        if self.group is None or self.lost is not None:
            return
        try:
            distributed.broadcast_json(STOP_JOB, self.group)
        except RuntimeError as e:  # a follower already gone: nothing left to release
            log.warning("could not tell the other ranks to stop: %s", e)

    def _run(self, stream: Stream, prompt: list[int], options: dict[str, Any]) -> None:
        events, result, error = 0, None, None
        try:
            generation = self._generate(stream, prompt, options)
            try:
                for event in generation:
                    events += 1
                    if isinstance(event, GenerationResult):
                        result = event
                    stream.push(event)
            finally:
                generation.close()  # frees the row (and leaves the cache consistent) now
        except Exception as e:  # reported to this request only
            if self.group is not None and distributed.peer_lost(e):
                e = self._lose_rank(e)
            error = f"{type(e).__name__}: {e}"
            if type(e).__module__.split(".")[0] != "mlx_gptoss":
                log.exception("generation failed")
            stream.push(e)
        finally:
            with self._lock:
                self.admitted -= 1
            self._record(stream, prompt, events, error, result)

    def _record(self, stream: Stream, prompt: list[int], events: int, error: str | None,
                result: GenerationResult | None) -> None:
        stream.push(_END)
        with self.finished:
            self.records.append(JobRecord(len(prompt), events, stream.cancelled.is_set(), error, result))
            self.finished.notify_all()
        stream.done.set()

    def wait_for_record(self, predicate: Callable[[JobRecord], bool], timeout: float) -> JobRecord | None:
        """The first finished generation matching `predicate`, waiting up to `timeout` s."""
        with self.finished:
            found: list[JobRecord] = []

            def match() -> bool:
                found[:] = [r for r in self.records if predicate(r)]
                return bool(found)

            self.finished.wait_for(match, timeout)
            return found[0] if found else None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._ready.notify_all()
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()


def _unavailable(lost: DistributedError) -> APIError:
    return APIError(503, f"the server cannot generate: {lost}", type="server_error",
                    code="rank_lost")


def _until(events: Iterator[Any], stop: Callable[[], bool]) -> Iterator[Any]:
    """`events` until `stop()` holds (checked before each one); closing closes `events`."""
    try:
        for event in events:
            if stop():
                return
            yield event
    finally:
        events.close()


# --------------------------------------------------------------------------- across ranks

STOP_JOB = {"stop": True}


def group_of(model: Any) -> Any:
    """The group `model` is sharded over (`distributed.load` sets `model.shard`), or None on
    one process."""
    shard = getattr(model, "shard", None)
    group = getattr(shard, "group", None)
    return group if group is not None and group.size() > 1 else None


def job_message(prompt: list[int], options: dict[str, Any]) -> dict[str, Any]:
    """What the other ranks need to make rank 0's generation call, as JSON. The logits
    processors (a request's constraint) stay on rank 0: its token is everyone's."""
    rest = {k: v for k, v in options.items() if k not in ("sampling", "logits_processors")}
    sampling = options.get("sampling")
    return {"prompt": [int(t) for t in prompt], "options": rest,
            "sampling": None if sampling is None else dataclasses.asdict(sampling),
            "constrained": bool(options.get("logits_processors"))}


def _unchanged(tokens: list[int], logits: mx.array) -> mx.array:
    return logits


def job_options(job: dict[str, Any]) -> dict[str, Any]:
    """`stream_generate`'s keywords on a follower, from rank 0's `job_message`."""
    options = dict(job["options"])
    if job["sampling"] is not None:
        options["sampling"] = SamplingParams(**job["sampling"])
    if job["constrained"]:
        # A processor that changes nothing keeps the token loop on its processors path, so
        # this rank runs its collectives in rank 0's order.
        options["logits_processors"] = [_unchanged]
    return options


class _Guarded:
    """A rank-0 logits processor whose failure is kept for later instead of raised inside
    the token loop, where the other ranks would wait forever for this rank's token."""

    def __init__(self, processor: Callable, failures: list[BaseException]):
        self.processor = processor
        self.failures = failures

    def __call__(self, tokens: list[int], logits: mx.array) -> mx.array:
        if not self.failures:
            try:
                return self.processor(tokens, logits)
            except Exception as e:  # noqa: BLE001 - re-raised once every rank has stopped
                self.failures.append(e)
        return logits

    def __getattr__(self, name: str) -> Any:  # bind, json_complete, constraint, ...
        return getattr(self.processor, name)


def lockstep_generation(model, tokenizer, cache: PromptCache, group, prompt: list[int],
                        options: dict[str, Any], stop: Callable[[], bool] = lambda: False
                        ) -> Iterator[Any]:
    """`stream_generate`'s events, the same call on every rank of `group`: every rank takes
    rank 0's sampled token, and before each event all ranks agree whether to go on (rank 0's
    `stop()`, or a failure of its logits processors, re-raised once everyone has stopped)."""
    failures: list[BaseException] = []
    if group.rank() == 0:
        options = {**options, "logits_processors": [
            _Guarded(p, failures) for p in options.get("logits_processors", ())]}

    def agreed_stop() -> bool:  # one collective per event, on every rank
        flag = mx.array(int(group.rank() == 0 and (stop() or bool(failures))), mx.int32)
        return bool(distributed.broadcast(flag, group).item())

    events = stream_generate(model, tokenizer, prompt, prompt_cache=cache,
                             wrap_sampler=lambda s: distributed.synchronized_sampler(s, group),
                             **options)
    yield from _until(events, agreed_stop)
    if failures:
        raise failures[0]


def follow(model, tokenizer) -> None:
    """A follower rank's serving: rank 0's generation calls, one after another, until rank 0
    stops. A lost rank 0 raises MLX's RuntimeError (see `distributed.rank_zero_output`)."""
    group = group_of(model)
    cache = PromptCache.for_model(model, sliding_slack=DEFAULT_SLIDING_SLACK)
    while True:
        job = distributed.broadcast_json(None, group)
        if job.get("stop"):
            return
        try:
            for _ in lockstep_generation(model, tokenizer, cache, group, job["prompt"],
                                         job_options(job)):
                pass
        except Exception as e:  # noqa: BLE001 - rank 0 meets the same error and reports it
            if distributed.peer_lost(e):
                raise
            log.info("job failed on this rank as on rank 0: %s", e)
