"""The HTTP server: one bundle, the OpenAI and Ollama APIs, health, metrics and a chat page.

Starlette/FastAPI with uvicorn carry HTTP; the model runs on the batching engine's
thread (``runtimes/batching.py``), and each request waits for its answer's pieces
on an asyncio queue the engine fills. A request's image is read and preprocessed
and its prompt tokenized on a worker thread, so the engine only decodes.

Safe by default: loopback only (another address needs ``--api-key`` or
``--insecure``), bearer keys compared in constant time, request bodies, images and
prompts limited, CORS off unless asked, and no route serves a file: images are
read only from ``--image-dir``, and only for the model.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from starlette.requests import Request as HttpRequest

from llava_edge.errors import UserError

from ..batching import BatchEngine, Draining, QueueFull, Request
from .conversation import IMAGE_FORMATS, ApiError, Conversation, ImagePolicy, SamplingRequest, image_bytes
from .metrics import ServeMetrics

log = logging.getLogger("llava_edge.serve")
access_log = logging.getLogger("llava_edge.serve.access")


@dataclass
class ServeOptions:
    model_name: str = "llava-edge"
    api_key: str | None = None
    parallel: int = 4
    queue: int = 64
    timeout_s: float = 300.0  # per request, from arrival to the last token
    max_body_bytes: int = 32 << 20
    cors: tuple[str, ...] = ()
    images: ImagePolicy = field(default_factory=ImagePolicy)
    # sampling when a request says nothing (OpenAI's own default temperature is 1; here, as in `chat`, greedy)
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int | None = None  # None: until the end of the answer or of the context
    seed: int | None = None


class Server:
    """The loaded model, its engine and the server's state (``loading``, ``ready``, ``draining``, ``failed``)."""

    def __init__(self, options: ServeOptions, load: Callable[[], object]):
        self.options = options
        self._load = load
        self.state = "loading"
        self.error: str | None = None
        self.model = None
        self.engine: BatchEngine | None = None
        self.metrics = ServeMetrics(self)
        self.started = time.time()

    def load(self) -> None:
        """Load the bundle and start the engine (on a thread, while the server already answers /health)."""
        try:
            self.model = self._load()
            self.engine = BatchEngine(self.model, queue_limit=self.options.queue)
            self.state = "ready" if self.state == "loading" else self.state
        except Exception as e:  # noqa: BLE001 - shown by /health and the log; the CLI exits
            self.error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.state = "failed"
            log.error("loading failed: %s", self.error)

    def drain(self, grace_s: float) -> None:
        self.state = "draining"
        if self.engine is not None:
            self.engine.drain(grace_s)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.model is not None:
            self.model.close()

    def check_model(self, name) -> None:
        """Only this server's model is known (``name`` or ``name:latest``, as Ollama clients write it)."""
        if name is None or name == "":
            return
        if not isinstance(name, str) or name not in (self.options.model_name, f"{self.options.model_name}:latest"):
            raise ApiError(f"model {name!r} does not exist; this server has {self.options.model_name!r}",
                           status=404, code="model_not_found", param="model")

    def ready(self) -> None:
        if self.state != "ready":
            why = {"loading": "the model is still loading", "draining": "the server is shutting down",
                   "failed": f"the model failed to load: {self.error}"}[self.state]
            raise ApiError(why, status=503, type="server_error", headers={"Retry-After": "5"})

    # -- one answer ----------------------------------------------------------------------------------------
    def prepare(self, conv: Conversation, s: SamplingRequest, on_event) -> Request:
        """The engine's request for ``conv`` (worker thread: image read, decoded and preprocessed, prompt tokenized)."""
        m, o = self.model, self.options
        try:
            data = None if conv.image is None else image_bytes(conv.image, o.images)
            slots, image, template = m.conversation_slots(conv.question, data, conv.history, conv.system,
                                                          formats=IMAGE_FORMATS)
        except UserError as e:
            where = conv.image.where if conv.image and "image" in str(e) else \
                "messages" if "system message" in str(e) else None
            raise ApiError(str(e), param=where) from None
        if len(slots) >= m.llm.n_ctx:
            raise ApiError(f"the conversation needs {len(slots)} positions but the context holds {m.llm.n_ctx} "
                           "(with room for the answer): shorten it", code="context_length_exceeded",
                           param="messages")
        max_tokens = s.max_tokens if s.max_tokens is not None else (o.max_tokens or m.llm.n_ctx)
        return Request(
            slots, image,
            temperature=o.temperature if s.temperature is None else float(s.temperature),
            top_p=o.top_p if s.top_p is None else float(s.top_p),
            max_tokens=max_tokens, seed=o.seed if s.seed is None else s.seed,
            stops=(*s.stop, *template.stop), on_event=on_event, timeout_s=o.timeout_s, ignore_eos=s.ignore_eos)

    async def answer(self, conv: Conversation, s: SamplingRequest, api: str) -> "Answer":
        """Queue ``conv``; the returned :class:`Answer` streams the pieces (refusals raise ``ApiError`` here)."""
        self.ready()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(ev) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        req = await asyncio.to_thread(self.prepare, conv, s, on_event)
        try:
            self.engine.submit(req)
        except QueueFull as e:
            self.metrics.rejected(api, "queue_full")
            raise ApiError(f"the server is busy: {e}; retry later", status=503, type="server_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except Draining:
            raise ApiError("the server is shutting down", status=503, type="server_error",
                           headers={"Retry-After": "5"}) from None
        except UserError as e:
            raise ApiError(str(e), code="context_length_exceeded", param="messages") from None
        return Answer(self, req, queue, api)


class Answer:
    """One answer as it comes: ``async for piece in answer.pieces()``; ``req`` holds the counts afterwards."""

    def __init__(self, server: Server, req: Request, queue: asyncio.Queue, api: str):
        self.server, self.req, self.queue, self.api = server, req, queue, api
        self.text = ""
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text pieces; an engine error or a timeout raises ``ApiError``. A consumer that stops
        early (its client disconnected) cancels the request and frees its sequence."""
        finished = False
        try:
            while True:
                ev = await self.queue.get()
                if ev.kind == "text":
                    self.text += ev.text
                    yield ev.text
                    continue
                finished = True
                if ev.kind == "error":
                    raise ApiError(ev.text, status=500, type="server_error")
                if self.req.finish_reason == "timeout":
                    raise ApiError(f"the answer took longer than the server's limit of "
                                   f"{self.server.options.timeout_s:g} s", status=504, type="server_error",
                                   code="timeout")
                break
        finally:
            if not finished:
                self.server.engine.cancel(self.req)
            self.server.metrics.finished(self.api, self.req)

    async def full(self) -> str:
        async for _ in self.pieces():
            pass
        return self.text

    @property
    def finish_reason(self) -> str:
        """OpenAI's name: ``stop`` (end of answer or a stop string) or ``length`` (token limit or context)."""
        return "length" if self.req.finish_reason in ("max_tokens", "context") else "stop"


# -- the app ---------------------------------------------------------------------------------------------------
def create_app(server: Server):
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.middleware.cors import CORSMiddleware

    from . import ollama_api, openai_api

    o = server.options

    async def lifespan(app):
        threading.Thread(target=server.load, name="llava-edge-load", daemon=True).start()
        yield
        await asyncio.to_thread(server.close)

    app = FastAPI(title="llava-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, e: ApiError):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        return JSONResponse(openai_error(e), status_code=e.status, headers=e.headers)

    @app.exception_handler(404)
    async def not_found(request: HttpRequest, _e):
        return JSONResponse(openai_error(ApiError(f"no route {request.url.path}", status=404)), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: HttpRequest, _e):
        return JSONResponse(openai_error(ApiError(f"{request.method} is not allowed on {request.url.path}",
                                                  status=405)), status_code=405)

    @app.get("/health")
    async def health():
        body = {"status": server.state}
        if server.error:
            body["error"] = server.error
        return JSONResponse(body, status_code=200 if server.state == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))

    openai_api.register(app, server)
    ollama_api.register(app, server)

    # middleware, outermost last: access log, then auth and the body limit
    app.add_middleware(GuardMiddleware, server=server)
    if o.cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(o.cors), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(AccessLogMiddleware)
    return app


def openai_error(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


OPEN_PATHS = ("/", "/health")  # no key needed: the page asks for it, and a load balancer probes health


class GuardMiddleware:
    """Bearer key (constant-time) and the request body limit, before any route runs (pure ASGI: streams checked
    as they arrive, so an oversized chunked body is cut off without being held in memory)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        o = self.server.options
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if o.api_key and path not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), o.api_key.encode()):
                err = ApiError("missing or wrong API key (send 'Authorization: Bearer KEY')", status=401,
                               code="invalid_api_key")
                return await _send_error(scope, send, err, {"WWW-Authenticate": "Bearer"})
        limit = o.max_body_bytes
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            return await _send_error(scope, send, _too_large(limit))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _send_error(scope, send, _too_large(limit))


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> ApiError:
    return ApiError(f"the request body is over the server's limit of {limit >> 20} MB", status=413,
                    code="request_too_large")


async def _send_error(scope, send, e: ApiError, headers: dict | None = None) -> None:
    body = json.dumps({"error": e.message} if scope["path"].startswith("/api/") else openai_error(e)).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in {**e.headers, **(headers or {})}.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


class AccessLogMiddleware:
    """One JSON line per request on the ``llava_edge.serve.access`` logger: method, path, status, time, client."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status = {"code": 0}

        async def record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            client = scope.get("client")
            access_log.info(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": scope["method"], "path": scope["path"],
                "status": status["code"] or 499, "ms": round((time.monotonic() - start) * 1000, 1),
                "client": f"{client[0]}:{client[1]}" if client else None}))


def page_path() -> Path:
    return Path(str(resources.files(__package__).joinpath("page.html")))
