"""``llava-edge serve``: the model over HTTP, for apps (OpenAI and Ollama APIs, a chat page).

``app``: the routes, limits, auth and logs; ``openai_api`` and ``ollama_api``:
each API's JSON; ``conversation``: one request form for both, with the image
sources a request may use; ``metrics``: Prometheus counters. The answers come
from ``runtimes/batching.py``. See docs/SERVE.md.
"""

from __future__ import annotations

import ipaddress
import logging
import sys

from llava_edge.errors import UserError

from .app import Server, ServeOptions, create_app

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
    server = Server(options, load)
    config = uvicorn.Config(create_app(server), host=host, port=port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=grace_s, lifespan="on")

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
