"""`mlx-gptoss serve`: the OpenAI-compatible server (Responses and Chat Completions).

Under `mlx.launch` rank 0 serves and the other ranks follow (`server.worker.follow`)."""
from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from ..distributed import rank_zero_command
from ..errors import GptOssError
from .generate import (ADAPTER, BROWSER, BROWSER_ALLOW_PRIVATE, BROWSER_SEARCH, DTYPE, KV_BITS,
                       PARALLEL, PIPELINE_MEMORY, PYTHON, PYTHON_UNSAFE, builtin_tools,
                       model_option)

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # as server.app.LOOPBACK_HOSTS (not imported: slow)


@rank_zero_command
def serve(
    model: str = model_option(),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to bind (loopback by default; 0.0.0.0 exposes it)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free one)."),
    served_model_name: Optional[str] = typer.Option(
        None, "--served-model-name", help="Model id clients use (default: the last part of --model, e.g. gpt-oss-20b)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="MLX_GPTOSS_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    max_concurrency: int = typer.Option(
        4, "--max-concurrency", min=1,
        help="Requests decoding at once, as rows of one batch (1: the single-sequence loop)."),
    max_queue: int = typer.Option(16, "--max-queue", min=0,
                                  help="Requests that may wait beyond those; past that, 429."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", min=0.001,
                                      help="Largest request body; past that, 413."),
    python: bool = PYTHON,
    python_unsafe: bool = PYTHON_UNSAFE,
    browser: bool = BROWSER,
    browser_search: Optional[str] = BROWSER_SEARCH,
    browser_allow_private: bool = BROWSER_ALLOW_PRIVATE,
    dtype: Optional[str] = DTYPE,
    adapter: Optional[Path] = ADAPTER,
    kv_bits: Optional[int] = KV_BITS,
    parallel: str = PARALLEL,
    pipeline_memory: Optional[str] = PIPELINE_MEMORY,
) -> None:
    """Serve a model over OpenAI's Responses and Chat Completions APIs."""
    from ..distributed import init_group, load
    from ..engine import Engine
    from ..server import create_app
    from ..server import serve as run
    from ..server.worker import follow

    ranks = init_group().size()
    if ranks > 1:
        if kv_bits is not None:
            raise GptOssError("--kv-bits needs the batched engine, which does not run across "
                              "ranks yet")
        max_concurrency = 1
    if kv_bits is not None and max_concurrency < 2:
        raise GptOssError("--kv-bits needs the batched engine (--max-concurrency 2 or more)")
    # Code runs without asking (the opt-in is --python), a fresh session per response.
    tools = builtin_tools(python=python, python_unsafe=python_unsafe, confirm_code=None,
                          browser=browser, browser_search=browser_search,
                          browser_allow_private=browser_allow_private)
    net, tokenizer = load(model, dtype, adapter=adapter, parallel=parallel,
                          pipeline_memory=pipeline_memory, tools=[f"--{t}" for t in tools])
    if ranks > 1 and net.shard.group.rank() != 0:
        # Led by rank 0: a terminal's Ctrl-C (sent to every rank mlx.launch started) stops
        # rank 0, which then tells this rank to stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        follow(net, tokenizer)  # no server here: rank 0's generation calls, until it stops
        return
    if ranks > 1:
        print(f"serving across {ranks} ranks: one request decodes at a time (the others "
              "wait in the queue)", file=sys.stderr, flush=True)
    # Several rows: the batched engine; one: the pipelined single-sequence loop (lower latency).
    engine = (Engine(net, tokenizer, max_batch=max_concurrency, kv_bits=kv_bits)
              if max_concurrency > 1 else None)

    # "openai/gpt-oss-20b" and "~/models/gpt-oss-20b/" both serve as "gpt-oss-20b"
    served = served_model_name or Path(model.rstrip("/")).name
    app = create_app(net, tokenizer, served_name=served, api_key=api_key,
                     max_concurrency=max_concurrency, max_queue=max_queue, max_body_mb=max_body_mb,
                     builtin_tools=tools, trusted_hosts=LOOPBACK if host in LOOPBACK else None,
                     engine=engine)
    if host not in LOOPBACK and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    if ranks > 1:
        serve_across_ranks(app, host, port)
        return
    try:
        run(app, host, port, on_ready=lambda url: print(url, flush=True))
    except OSError as e:  # the port is taken, the address does not exist, ...
        raise GptOssError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def serve_across_ranks(app, host: str, port: int) -> None:
    """Rank 0: HTTP from a background thread, the generations on this (main) thread, where
    MLX reports a lost rank. Ctrl-C or SIGTERM stops the running generation within a token,
    tells the other ranks to stop, then stops the server; a lost rank ends with its line."""
    from ..server.app import running

    worker = app.state.server.worker

    def stop(signum, frame) -> None:  # a thread: the handler may interrupt one holding a lock
        threading.Thread(target=worker.shutdown, daemon=True).start()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    _check_address(host, port)  # uvicorn on a thread would only log it, then time out
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(running(app, host, port))
        except RuntimeError as e:  # uvicorn could not start (its log says why)
            raise GptOssError(f"cannot serve on {host}:{port}: {e}") from None
        print(url, flush=True)
        worker.run()
    if worker.lost is not None:
        raise worker.lost


def _check_address(host: str, port: int) -> None:
    """One clear line now if `host:port` cannot be bound (taken, not this machine's)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind((host, port))
    except OSError as e:
        raise GptOssError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
