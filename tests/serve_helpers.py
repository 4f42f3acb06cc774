"""Starting ``llava-edge serve`` in a child process on a free loopback port, and stopping it as an operator does."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def stop(self, timeout: float = 600) -> int:
        """SIGTERM, as systemd or docker stop; the exit code. The wait is long because a graceful stop finishes the
        answers running, which a busy machine makes slow: only a hang reaches it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serving(bundle: Path, tmp: Path, *args: str, env: dict | None = None, ready_s: float = 120):
    """``llava-edge serve --bundle BUNDLE ARGS`` until the block ends (SIGTERM); yields :class:`Served`."""
    port = free_port()
    log = tmp / f"serve-{port}.log"
    code = "import sys; from llava_edge.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "serve", "--bundle", str(bundle), "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    s = Served(proc, f"http://127.0.0.1:{port}", log)
    try:
        end = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}: {s.log_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(s.url + "/health", timeout=2).json().get("status") == "ready":
                    break
            if time.monotonic() > end:
                raise AssertionError(f"serve was not ready in {ready_s} s: {s.log_text()}")
            time.sleep(0.2)
        yield s
    finally:
        s.stop()


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user_message(question: str, image: Path | None = None) -> dict:
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_uri(image)}})
    return {"role": "user", "content": content}


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, in Prometheus' text format."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, value = line.rsplit(" ", 1)
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


# -- the server process, seen from outside (Linux /proc) -----------------------------------------------------------
def proc_status_mb(pid: int, key: str) -> float:
    """``VmRSS``, ``VmHWM`` (peak RSS) ... of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak_rss(pid: int) -> None:
    """Make ``VmHWM`` the current RSS again (Linux's ``clear_refs``), so the next peak is one request's."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raw_connection(url: str, data: bytes = b"", timeout: float = 60) -> socket.socket:
    """A TCP connection to the server at ``url`` that has sent ``data`` (which may be half a request)."""
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    if data:
        s.sendall(data)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (``socket.timeout`` if it does not)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def post_head(path: str, body_length: int, content_type: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {body_length}\r\n\r\n").encode()
