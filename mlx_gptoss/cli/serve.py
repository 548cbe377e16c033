"""`mlx-gptoss serve`: the OpenAI-compatible server (Responses and Chat Completions)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import GptOssError
from .generate import (ADAPTER, BROWSER, BROWSER_ALLOW_PRIVATE, BROWSER_SEARCH, DTYPE, PYTHON,
                       PYTHON_UNSAFE, model_option)

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # as server.app.LOOPBACK_HOSTS (not imported: slow)


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
) -> None:
    """Serve a model over OpenAI's Responses and Chat Completions APIs."""
    from ..engine import Engine
    from ..hub import load
    from ..server import create_app
    from ..server import serve as run

    tools = builtin_tools(python, python_unsafe, browser, browser_search, browser_allow_private)
    net, tokenizer = load(model, dtype, adapter=adapter)
    # Several rows: the batched engine; one: the pipelined single-sequence loop (lower latency).
    engine = Engine(net, tokenizer, max_batch=max_concurrency) if max_concurrency > 1 else None
    # "openai/gpt-oss-20b" and "~/models/gpt-oss-20b/" both serve as "gpt-oss-20b"
    served = served_model_name or Path(model.rstrip("/")).name
    app = create_app(net, tokenizer, served_name=served, api_key=api_key,
                     max_concurrency=max_concurrency, max_queue=max_queue, max_body_mb=max_body_mb,
                     builtin_tools=tools, trusted_hosts=LOOPBACK if host in LOOPBACK else None,
                     engine=engine)
    if host not in LOOPBACK and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    try:
        run(app, host, port, on_ready=lambda url: print(url, flush=True))
    except OSError as e:  # the port is taken, the address does not exist, ...
        raise GptOssError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def builtin_tools(python: bool, python_unsafe: bool, browser: bool, search: Optional[str],
                  allow_private: bool) -> dict:
    """Factories of the built-in tools the server runs: a fresh session per response. Code
    runs without asking (the opt-in is --python); the sandbox is required unless
    --python-unsafe-no-sandbox."""
    from functools import partial

    from ..tools.browser import BrowserTool
    from ..tools.python import PythonTool
    from ..tools.search import search_provider

    tools = {}
    if python:
        tools["python"] = partial(PythonTool, unsafe_no_sandbox=python_unsafe)
    if browser:
        provider = search_provider(search)  # a bad --browser-search fails now
        tools["browser"] = partial(BrowserTool, provider, allow_private=allow_private)
    return tools


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
