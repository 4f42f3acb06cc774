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
import ctypes
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
from llava_edge.video import Video

from ..batching import BatchEngine, Draining, QueueFull, Request
from .body import ClientGone
from .conversation import IMAGE_FORMATS, ApiError, Conversation, ImagePolicy, SamplingRequest, image_bytes
from .guards import AccessLog, BrowserGuard, Guard, error_body
from .logprobs import Pieces, entries
from .metrics import ServeMetrics

log = logging.getLogger("llava_edge.serve")


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
    # slow clients and connections: a request's head and body must arrive within these, an idle keep-alive
    # connection is closed after keep_alive_s, and past max_connections uvicorn answers 503
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0
    max_connections: int = 512
    # browsers: check_host refuses a Host that is not a loopback name or one of allow_hosts (None: when bound
    # to loopback, as `serve` decides; an app made with create_app alone checks); an Origin must be the
    # server's own or one of `cors`
    check_host: bool | None = None
    allow_hosts: tuple[str, ...] = ()


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
        self.token_bytes = 0  # the most bytes of text one token of the vocabulary stands for
        self.pieces: Pieces | None = None  # tokens' text for logprobs

    def load(self) -> None:
        """Load the bundle and start the engine (on a thread, while the server already answers /health)."""
        try:
            self.model = self._load()
            self.token_bytes = longest_token_bytes(self.model.llm)
            self.pieces = Pieces(self.model.llm)
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
    def check_length(self, conv: Conversation, api: str) -> None:
        """Refuse a conversation that cannot fit the context, from its length, before it is tokenized.

        A token stands for at most ``token_bytes`` bytes of text, and the prompt holds every byte of the
        conversation's text (typed text stays text), so text of more than ``n_ctx * token_bytes`` bytes needs
        more than ``n_ctx`` positions. (This holds for tokenizers that do not shrink text before splitting
        it, as Llama's, Mistral's and Vicuna's SentencePiece models and byte-level BPEs do not.) Each turn of
        a conversation mode takes at least one position for its role, too. So what passes is tokenized in
        time and memory bounded by the context, whatever size of body the server takes."""
        n_ctx = self.model.llm.n_ctx
        limit = n_ctx * self.token_bytes
        texts = (conv.question, conv.system or "", *(t.text for t in conv.history))
        size = sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)
        turns = len(conv.history) + 1
        if size > limit or turns > n_ctx:
            self.metrics.rejected(api, "context_length")
            what = f"{turns:,} turns" if turns > n_ctx else \
                f"{size:,} bytes of text (a token of this model stands for {self.token_bytes} bytes at most)"
            raise ApiError(f"the conversation has {what}: more than a context of {n_ctx} positions can hold; "
                           "shorten it", code="context_length_exceeded", param="messages")

    def prepare(self, conv: Conversation, s: SamplingRequest, on_event, api: str) -> Request:
        """The engine's request for ``conv`` (worker thread: image read, decoded and preprocessed, prompt tokenized)."""
        m, o = self.model, self.options
        try:
            data = [Video(image_bytes(src, o.images), o.images.frames) if src.video else image_bytes(src, o.images)
                    for src in conv.images]
            slots, pictures, template = m.conversation_slots(conv.question, data or None, conv.history, conv.system,
                                                             formats=IMAGE_FORMATS)
        except UserError as e:
            where = (conv.images[-1].where if len(conv.images) > 1 and "picture" in str(e) else
                     conv.images[0].where if conv.images and "image" in str(e) else
                     "messages" if "system message" in str(e) or "picture" in str(e) else None)
            raise ApiError(str(e), param=where) from None
        if len(slots) >= m.llm.n_ctx:
            self.metrics.rejected(api, "context_length")
            raise ApiError(f"the conversation needs {len(slots)} positions but the context holds {m.llm.n_ctx} "
                           "(with room for the answer): shorten it", code="context_length_exceeded",
                           param="messages")
        max_tokens = s.max_tokens if s.max_tokens is not None else (o.max_tokens or m.llm.n_ctx)
        return Request(
            slots, pictures,
            temperature=o.temperature if s.temperature is None else float(s.temperature),
            top_p=o.top_p if s.top_p is None else float(s.top_p),
            max_tokens=max_tokens, seed=o.seed if s.seed is None else s.seed,
            stops=(*s.stop, *template.stop), on_event=on_event, timeout_s=o.timeout_s, ignore_eos=s.ignore_eos,
            logits=s.logprobs is not None)

    async def answer(self, conv: Conversation, s: SamplingRequest, api: str) -> "Answer":
        """Queue ``conv``; the returned :class:`Answer` streams the pieces (refusals raise ``ApiError`` here)."""
        self.ready()
        self.check_length(conv, api)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(ev) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        req = await asyncio.to_thread(self.prepare, conv, s, on_event, api)
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
        return Answer(self, req, queue, api, s.logprobs)


class Answer:
    """One answer as it comes: ``async for piece, logprobs in answer.pieces()``; ``req`` holds the counts
    afterwards."""

    def __init__(self, server: Server, req: Request, queue: asyncio.Queue, api: str, top_logprobs: int | None = None):
        self.server, self.req, self.queue, self.api = server, req, queue, api
        self.top_logprobs = top_logprobs  # None: no logprobs asked
        self.text = ""
        self.logprobs: list[dict] = []  # the entries of the answer's tokens so far (logprobs.py), when asked
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())

    async def pieces(self) -> AsyncIterator[tuple[str, list[dict]]]:
        """The answer's text pieces, each with the logprobs entries of the tokens whose text it shows (none
        when not asked); an engine error or a timeout raises ``ApiError``. A consumer that stops early (its
        client disconnected) cancels the request and frees its sequence."""
        finished = False
        try:
            while True:
                ev = await self.queue.get()
                if ev.kind == "text":
                    self.text += ev.text
                    found = [] if self.top_logprobs is None else \
                        entries(ev.tokens, self.top_logprobs, self.server.pieces)
                    self.logprobs += found
                    yield ev.text, found
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

    async def full(self, request: HttpRequest | None = None) -> str:
        """The whole answer. With the HTTP ``request`` (its body read), its connection is watched meanwhile: a
        client that disconnects cancels the answer, which frees its sequence at the engine's next step, and
        :class:`ClientGone` is raised. (A streamed answer needs no watch here: Starlette's ``StreamingResponse``
        watches for the disconnect itself and stops the stream, which cancels the answer.)"""
        if request is None:
            async for _ in self.pieces():
                pass
            return self.text
        left = asyncio.Event()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            left.set()
            self.server.engine.cancel(self.req)

        watcher = asyncio.create_task(watch())
        try:
            async for _ in self.pieces():
                pass
        finally:
            watcher.cancel()
        if left.is_set():
            raise ClientGone("before its answer was complete")
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
        # a ClientGone's answer goes nowhere; the access log's line (status 499) is all it leaves
        return JSONResponse(error_body(request.url.path, e), status_code=e.status, headers=e.headers)

    @app.exception_handler(404)
    async def not_found(request: HttpRequest, _e):
        return JSONResponse(error_body(request.url.path, ApiError(f"no route {request.url.path}", status=404)),
                            status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: HttpRequest, _e):
        return JSONResponse(error_body(request.url.path, ApiError(
            f"{request.method} is not allowed on {request.url.path}", status=405)), status_code=405)

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

    # middleware, outermost last: the access log (and the last word on exceptions), Host and Origin, CORS,
    # then the key and the body's limits
    app.add_middleware(Guard, api_key=o.api_key, max_body_bytes=o.max_body_bytes, body_timeout_s=o.body_timeout_s)
    if o.cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(o.cors), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BrowserGuard, check_host=o.check_host is not False, allow_hosts=o.allow_hosts, cors=o.cors)
    app.add_middleware(AccessLog)
    return app


def longest_token_bytes(llm) -> int:
    """The most bytes of text one token stands for: the longest piece of the GGUF's vocabulary (control tokens
    stand for none; a byte-fallback token for one byte)."""
    import llama_cpp

    buf = ctypes.create_string_buffer(256)
    longest = 1
    for token in range(llm.n_vocab):
        n = llama_cpp.llama_token_to_piece(llm.vocab, token, buf, len(buf), 0, False)
        if n < 0:  # longer than the buffer: llama.cpp says how long
            n = -n
        longest = max(longest, n)
    return longest


def page_path() -> Path:
    return Path(str(resources.files(__package__).joinpath("page.html")))
