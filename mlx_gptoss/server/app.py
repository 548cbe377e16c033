"""The FastAPI app: routes, authentication, body limits, OpenAI error bodies; running it.

`create_app(model, tokenizer, ...)` builds the app around one `Worker` (the only code that
touches the model). Every failure a client can cause is answered with OpenAI's error body and
the right status (400 malformed or invalid, 401 bad key, 404 unknown model/response/route, 413
body over `max_body_mb`, 429 queue full); anything else is logged with its traceback and
answered 500 without it, and the server stays up. `running(app)` serves it from a background
thread (tests, benchmarks); `serve(app)` is the blocking CLI entry point.
"""
from __future__ import annotations

import functools
import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..env import parse_json
from . import chat_completions, responses
from .generation import ServerState, sse
from .protocol import APIError, bad_request
from .worker import Worker

log = logging.getLogger("mlx_gptoss.server")
DEFAULT_MAX_BODY_MB = 16.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(model: Any, tokenizer: Any, *, served_name: str | None = None,
               api_key: str | None = None, max_concurrency: int = 1, max_queue: int = 16,
               max_body_mb: float = DEFAULT_MAX_BODY_MB,
               builtin_tools: dict[str, Callable[[], Any]] | None = None,
               trusted_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS,
               engine: Any = None) -> FastAPI:
    """An OpenAI-compatible app serving `model` (see the module docstring). `builtin_tools`:
    built-in tools the server runs, `{"python": factory, "browser": factory}` (each factory makes
    a fresh `mlx_gptoss.tools.Tool` per response), offered to requests with a
    `code_interpreter` / `web_search` tool. `trusted_hosts`: the only
    `Host` headers answered (None: any), so a web page cannot reach a loopback server through
    DNS rebinding; POST bodies must be `application/json`, which a page on another origin
    cannot send without a CORS preflight (this server answers none). `engine`: an `Engine` to
    decode up to `max_concurrency` requests at once (closed with the app); without one, one
    request decodes at a time."""
    if served_name is None:
        model_dir = getattr(model, "model_dir", None)
        served_name = Path(model_dir).name if model_dir else "gpt-oss"
    worker = Worker(model, tokenizer, max_concurrency=max_concurrency, max_queue=max_queue,
                    engine=engine)
    state = ServerState(model, tokenizer, worker, served_name, api_key=api_key,
                        max_body_bytes=int(max_body_mb * 2**20), created=int(time.time()),
                        store=responses.ResponseStore(),
                        builtin_tools=dict(builtin_tools or {}),
                        builtin_namespaces=_namespaces(builtin_tools or {}),
                        trusted_hosts=trusted_hosts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="mlx-gptoss", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.server = state
    _install_error_handlers(app)

    @app.get("/health")
    @answers_errors
    async def health(request: Request) -> dict[str, Any]:
        authorize(state, request, key=False)
        return {"status": "ok", "model": state.served_name}

    @app.get("/v1/models")
    @answers_errors
    async def models(request: Request) -> dict[str, Any]:
        authorize(state, request)
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{name:path}")
    @answers_errors
    async def model_info(name: str, request: Request) -> dict[str, Any]:
        authorize(state, request)
        state.check_model(name)
        return model_card(state)

    @app.post("/v1/responses")
    @answers_errors
    async def create_response(request: Request):
        authorize(state, request)
        parsed = responses.parse_request(state, await read_json(state, request))
        events = await responses.run_events(state, parsed, request)
        if parsed.stream:
            return StreamingResponse((sse(e, e["type"]) async for e in events),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        last = None
        async for event in events:
            last = event
        response = last["response"]
        if response["status"] == "failed":  # not streamed: the failure is the HTTP answer
            code, message = response["error"]["code"], response["error"]["message"]
            status = {"cancelled": 499, "invalid_prompt": 400}.get(code, 500)
            kind = "server_error" if status == 500 else "invalid_request_error"
            return JSONResponse(APIError(status, message, type=kind, code=code).body(),
                                status_code=status)
        return response

    @app.get("/v1/responses/{response_id}")
    @answers_errors
    async def get_response(response_id: str, request: Request):
        authorize(state, request)
        return state.store.get(response_id).response

    @app.delete("/v1/responses/{response_id}")
    @answers_errors
    async def delete_response(response_id: str, request: Request):
        authorize(state, request)
        state.store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.post("/v1/chat/completions")
    @answers_errors
    async def chat(request: Request):
        authorize(state, request)
        plan, knobs = chat_completions.parse_request(state, await read_json(state, request))
        if not knobs["stream"]:
            return await chat_completions.complete(state, plan, knobs, request)
        chunks = await chat_completions.stream_chunks(state, plan, knobs, request)

        async def body():
            async for chunk in chunks:
                yield sse(chunk)
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    return app


def _namespaces(factories: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each built-in tool's system-message namespace, from one instance made now (so a tool
    that cannot work here, e.g. no sandbox, fails at startup, not in a request)."""
    out = {}
    for name, factory in factories.items():
        with factory() as tool:
            out[name] = tool.namespace_config()
    return out


def model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.served_name, "object": "model", "created": state.created,
            "owned_by": "mlx-gptoss"}


def authorize(state: ServerState, request: Request, key: bool = True) -> None:
    """Refuse untrusted Host headers, then a missing or wrong API key (when one is set)."""
    if state.trusted_hosts is not None:
        host = request.headers.get("host", "")
        name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
        if name.lower() not in state.trusted_hosts:
            raise bad_request(f"this server only answers requests for {', '.join(state.trusted_hosts)} "
                              f"(Host: {host[:100]!r})", None, "invalid_host")
    if state.api_key is None or not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


async def read_json(state: ServerState, request: Request) -> dict[str, Any]:
    """The body as a JSON object, refused early when it is over the limit."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"the request body must be JSON sent as 'Content-Type: application/json' "
                            f"(got {kind or 'none'!r})", code="unsupported_media_type")
    limit = state.max_body_bytes
    too_large = APIError(413, f"the request body is over the server's limit of {limit} bytes "
                              "(--max-body-mb)", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return parse_json(b"".join(chunks), "the request body", expect=dict, error=InvalidBody)


class InvalidBody(APIError):
    """A body that is not a JSON object (or is nested too deeply): 400 `invalid_json`."""

    def __init__(self, message: str):
        super().__init__(400, message, code="invalid_json")


def answers_errors(route: Callable) -> Callable:
    """Any other exception of a route becomes an OpenAI error body (500, logged with its
    traceback); it never reaches Starlette's error middleware, which would drop the connection."""
    @functools.wraps(route)
    async def guarded_route(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except APIError:
            raise
        except RecursionError:  # e.g. a schema too deep to compile
            raise bad_request("the request is nested too deeply") from None
        except Exception:
            log.exception("request failed")
            raise APIError(500, "internal server error (see the server's log)",
                           type="server_error", code="server_error") from None

    return guarded_route


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(APIError(error.status_code, message, code=code).body(),
                            status_code=error.status_code)



# --------------------------------------------------------------------------- running


class _Server(uvicorn.Server):
    """uvicorn's server, telling when its sockets are listening."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[["_Server"], None]):
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_ready(self)

    def address(self) -> tuple[str, int]:
        return self.servers[0].sockets[0].getsockname()[:2]


def _config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          lifespan="on", timeout_graceful_shutdown=5)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
          on_ready: Callable[[str], None] = print, log_level: str = "info") -> None:
    """Serve until Ctrl-C; `on_ready("http://HOST:PORT")` once it listens."""
    def ready(server: _Server) -> None:
        bound_host, bound_port = server.address()
        on_ready(f"http://{bound_host}:{bound_port}")

    _Server(_config(app, host, port, log_level), ready).run()


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
            timeout: float = 60.0) -> Iterator[str]:
    """Serve `app` from a background thread; yields its base URL, stops it on exit."""
    ready = threading.Event()
    server = _Server(_config(app, host, port, "warning"), lambda s: ready.set())
    thread = threading.Thread(target=server.run, daemon=True, name="mlx-gptoss-server")
    thread.start()
    if not ready.wait(timeout):
        server.should_exit = True
        raise RuntimeError("the server did not start")
    bound_host, bound_port = server.address()
    try:
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout)

