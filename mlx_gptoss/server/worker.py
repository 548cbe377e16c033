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
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

from ..cache import DEFAULT_SLIDING_SLACK, PromptCache
from ..generate import GenerationResult, stream_generate
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
        self.capacity = max_concurrency + max_queue
        self.admitted = 0
        self._lock = threading.Lock()
        self._waiting: deque[tuple[Stream, list[int], dict[str, Any]]] = deque()
        self._ready = threading.Condition(self._lock)
        self._closed = False
        self.cache = None if engine is not None else PromptCache.for_model(model, sliding_slack=DEFAULT_SLIDING_SLACK)
        self.records: deque[JobRecord] = deque(maxlen=256)
        self.finished = threading.Condition()
        # Without the engine one request decodes at a time, whatever --max-concurrency says.
        threads = max_concurrency if engine is not None else 1
        self._threads = [threading.Thread(target=self._loop, daemon=True, name=f"mlx-gptoss-generation-{i}")
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _generate(self, prompt: list[int], options: dict[str, Any]) -> Iterator[Any]:
        if self.engine is not None:
            return self.engine.stream_generate(prompt, **options)
        return stream_generate(self.model, self.tokenizer, prompt, prompt_cache=self.cache, **options)

    def start(self, prompt: list[int], *, admitted: bool = False, **options: Any) -> Stream:
        """Admit and queue a generation of `prompt` (token ids) with `stream_generate`'s
        keywords, or raise 429 when the queue is full. `admitted`: the next round of a request
        already being answered (after a built-in tool ran), never refused."""
        stream = Stream(self, asyncio.get_running_loop())
        with self._lock:
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
                if self._closed:
                    return
                stream, prompt, options = self._waiting.popleft()
            self._run(stream, prompt, options)

    def _run(self, stream: Stream, prompt: list[int], options: dict[str, Any]) -> None:
        events, result, error = 0, None, None
        try:
            generation = self._generate(prompt, options)
            try:
                for event in generation:
                    if stream.cancelled.is_set():
                        break
                    events += 1
                    if isinstance(event, GenerationResult):
                        result = event
                    stream.push(event)
            finally:
                generation.close()  # frees the row (and leaves the cache consistent) now
        except Exception as e:  # reported to this request only
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
