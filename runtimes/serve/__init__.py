"""``llava-edge serve``: the model over HTTP, for apps (OpenAI and Ollama APIs, a chat page).

``app``: the routes, limits, auth and logs; ``openai_api`` and ``ollama_api``:
each API's JSON; ``conversation``: one request form for both, with the image
sources a request may use; ``metrics``: Prometheus counters. The answers come
from ``runtimes/batching.py``. See docs/SERVE.md.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import logging
import sys

from llava_edge.errors import UserError

from .app import Server, ServeOptions, create_app
from .connections import protocol

__all__ = ["Server", "ServeOptions", "create_app", "check_bind", "serve"]


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a key, unless told ``insecure``."""
    if api_key or insecure or is_loopback(host):
        return
    raise UserError(f"--host {host} lets other machines reach the model: give --api-key (or $LLAVA_EDGE_API_KEY), "
                    "or --insecure to serve it without one")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def return_large_buffers_to_the_system(threshold: int = 1 << 20) -> None:
    """Have glibc's malloc give every block of ``threshold`` bytes or more its own mapping, returned to the
    system when freed.

    A request body, its JSON text and a decoded image are blocks of up to tens of MB. glibc raises its mmap
    threshold (up to 32 MB) each time such a block is freed, so the next ones come from its heaps instead,
    which it keeps: after a few large bodies the process holds their high-water mark for good. A fixed
    threshold ends that adjustment. (Elsewhere than glibc, mallopt is absent or does nothing.)"""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_MMAP_THRESHOLD = -3  # glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, threshold)


def serve(options: ServeOptions, load, host: str = "127.0.0.1", port: int = 8080, grace_s: float = 30.0,
          log_requests: bool = True) -> None:
    """Run until SIGINT/SIGTERM: stop accepting, let in-flight answers finish within ``grace_s``, then stop."""
    import uvicorn

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("llava_edge.serve")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("llava_edge.serve.access").disabled = not log_requests
    return_large_buffers_to_the_system()
    if options.check_host is None:  # a server on loopback answers loopback names only (DNS rebinding)
        options = dataclasses.replace(options, check_host=is_loopback(host))
    server = Server(options, load)
    config = uvicorn.Config(create_app(server), host=host, port=port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=grace_s, lifespan="on",
                            http=protocol(options.header_timeout_s), timeout_keep_alive=options.keep_alive_s,
                            limit_concurrency=options.max_connections)

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: /health says "draining" while answers finish
            server.state = "draining"
            super().handle_exit(sig, frame)
            # uvicorn raises the signal again once it has shut down, which would end the process as killed
            # by it; after a graceful shutdown the exit status is 0 instead
            getattr(self, "_captured_signals", []).clear()

    uv = Uvicorn(config)
    original_load = server.load

    def load_then_announce() -> None:
        original_load()
        if server.state == "failed":
            uv.should_exit = True
        else:
            root.info(f"llava-edge serve: http://{host}:{port}/ ready (model {options.model_name!r}, "
                      f"{options.parallel} in parallel)")

    server.load = load_then_announce
    uv.run()
    if server.state == "failed":
        raise UserError(server.error or "the model failed to load")
