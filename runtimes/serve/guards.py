"""What every request passes before a route runs, as pure ASGI middleware (outermost first):

``AccessLog``: one JSON line per request with the status the client got; an exception
  no route turned into an answer becomes a JSON 500 here, logged in one line (the
  framework's own fallback is a plain-text 500 and a traceback, logged after the
  access line has been written).
``BrowserGuard``: a loopback server answers only loopback ``Host`` names (DNS
  rebinding), and a browser page only from its own origin or a ``--cors`` origin.
``Guard``: the bearer key, the body's size limit and its read deadline (streams
  checked as they arrive, so an oversized chunked body is cut off, not held).

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``, which would hide the receive
channel that the body limits and a non-streaming answer's disconnect watch need.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import traceback
from urllib.parse import urlsplit

from .conversation import ApiError

log = logging.getLogger("llava_edge.serve")
access_log = logging.getLogger("llava_edge.serve.access")

OPEN_PATHS = ("/", "/health")  # no key needed: the page asks for it, and a load balancer probes health


def openai_error(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def error_body(path: str, e: ApiError) -> dict:
    """The error in the route's API: Ollama's ``{"error": "..."}`` under ``/api/``, OpenAI's object elsewhere."""
    return {"error": e.message} if path.startswith("/api/") else openai_error(e)


async def send_error(scope, send, e: ApiError, headers: dict | None = None) -> None:
    body = json.dumps(error_body(scope["path"], e)).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in {**e.headers, **(headers or {})}.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


# -- the access log, and the last word on exceptions ---------------------------------------------------------------
def describe(e: BaseException) -> str:
    """An exception in one line: its type, message and where it was raised."""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}{at}"


class AccessLog:
    """One JSON line per request on ``llava_edge.serve.access``: method, path, the status sent, time, client.

    An exception that reaches this far (a route's bug) is answered with a JSON 500 in the route's API when no
    response has begun, and logged as one line on ``llava_edge.serve``; it is not raised further, so neither
    the framework nor uvicorn prints a traceback or sends a plain-text 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status = 0

        async def record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        except Exception as e:  # noqa: BLE001 - every request gets an answer and a log line, whatever failed
            log.error("%s %s failed: %s", scope["method"], scope["path"], describe(e))
            if not status:
                status = 500
                try:
                    await send_error(scope, send, ApiError(f"the server failed on this request ({type(e).__name__}); "
                                                           "its log says more", status=500, type="server_error"))
                except Exception:  # noqa: BLE001 - the connection is gone: nothing more to say
                    pass
        finally:
            client = scope.get("client")
            access_log.info(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": scope["method"], "path": scope["path"],
                # 499: the client left before any response (nginx's code), as when a route was cancelled
                "status": status or 499, "ms": round((time.monotonic() - start) * 1000, 1),
                "client": f"{client[0]}:{client[1]}" if client else None}))


# -- browsers: Host (DNS rebinding) and Origin ---------------------------------------------------------------------
def host_name(host: str) -> str:
    """``Host`` without its port, lower case, without a trailing dot (``[::1]:8080`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:].split("]", 1)[0]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.rstrip(".")


def is_loopback_name(name: str) -> bool:
    """``localhost``, a ``.localhost`` name (RFC 6761: browsers resolve them to loopback themselves, so no
    DNS answer can point them elsewhere) or a loopback address."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class BrowserGuard:
    """Refuses (403) what a web page could send that the server's own page and API clients never do.

    - ``Host``: a server bound to loopback answers only loopback names and addresses (and ``--allow-host``
      names). A page on another site can have its own name resolve to 127.0.0.1 (DNS rebinding) and then
      talk to the server as if from the same origin; its requests still carry its name in ``Host``.
    - ``Origin``: a browser sends it with every cross-origin request and with same-origin POSTs; it must be
      the server's own origin (the chat page's) or one given with ``--cors`` (``*``: any). API clients
      send none. Without this, a form or a ``fetch`` in ``no-cors`` mode from any site (a "simple"
      request, sent without a CORS preflight) would reach an unkeyed server on the user's machine.
    """

    def __init__(self, app, check_host: bool, allow_hosts: tuple[str, ...] = (), cors: tuple[str, ...] = ()):
        self.app = app
        self.check_host = check_host
        self.allow_hosts = {host_name(h) for h in allow_hosts}
        self.any_origin = "*" in cors
        self.origins = {o.rstrip("/").lower() for o in cors}

    def host_ok(self, host: str | None) -> bool:
        if not self.check_host or host is None:  # HTTP/1.0 may send none; browsers always do
            return True
        name = host_name(host)
        return is_loopback_name(name) or name in self.allow_hosts

    def origin_ok(self, origin: str | None, host: str | None) -> bool:
        if origin is None or self.any_origin or origin.rstrip("/").lower() in self.origins:
            return True
        parts = urlsplit(origin.strip().lower())
        # same origin: the page this server gave (its Origin names the Host the browser asked)
        return parts.scheme in ("http", "https") and host is not None and parts.netloc == host.strip().lower()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        host, origin = headers.get("host"), headers.get("origin")
        if not self.host_ok(host):
            return await send_error(scope, send, ApiError(
                f"the Host {host!r} is not this server's: a server bound to loopback answers only localhost and "
                "loopback addresses (start it with --allow-host NAME to add a name)", status=403,
                type="permission_error", code="host_not_allowed"))
        if not self.origin_ok(origin, host):
            return await send_error(scope, send, ApiError(
                f"requests from web pages at {origin!r} are refused (start the server with --cors {origin} to "
                "allow that origin)", status=403, type="permission_error", code="origin_not_allowed"))
        return await self.app(scope, receive, send)


# -- key, body size, body deadline ---------------------------------------------------------------------------------
class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class Guard:
    """The bearer key (constant-time), then the body: refused from its declared length when that is over the
    limit, cut off when it grows past it, and given up on (408, connection closed) when it has not all
    arrived ``body_timeout_s`` after the request's head (uvicorn bounds neither a body's size nor its time)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout_s: float):
        self.app, self.api_key = app, api_key
        self.limit, self.body_timeout_s = max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if self.api_key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                err = ApiError("missing or wrong API key (send 'Authorization: Bearer KEY')", status=401,
                               code="invalid_api_key")
                return await send_error(scope, send, err, {"WWW-Authenticate": "Bearer"})
        limit = self.limit
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            return await send_error(scope, send, _too_large(limit))
        seen, body_done = 0, False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def guarded_receive():
            nonlocal seen, body_done
            if body_done:  # after the body: a disconnect watch, which waits as long as the answer takes
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _BodyTooSlow() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
                body_done = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, guarded_receive, send)
        except _BodyTooLarge:
            await send_error(scope, send, _too_large(limit))
        except _BodyTooSlow:
            # the rest of the body may still come: the connection is closed after the answer
            await send_error(scope, send, ApiError(
                f"the request body did not arrive within {self.body_timeout_s:g} s", status=408,
                code="request_timeout"), {"Connection": "close"})


def _too_large(limit: int) -> ApiError:
    return ApiError(f"the request body is over the server's limit of {limit / (1 << 20):.3g} MB", status=413,
                    code="request_too_large")
