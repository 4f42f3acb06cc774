"""``llava-edge serve`` against ``python -m llama_cpp.server`` on the same GGUF, over HTTP, in one run.

    python bench/serve_load.py --bundle BUNDLE --out results.json [--llm bf16] [--mmproj bf16]
        [--threads 2] [--rounds 5] [--requests-per-client 4] [--soak-minutes 10] [--sections ttft,load,soak]
        [--max-tokens 64] [--image-tokens K]

Both servers get the bundle's language-model GGUF (``--llm``); llama-cpp-python's
server gets the bundle's mmproj (``--mmproj``: llama.cpp's own CLIP, with its
``llava-1-5`` chat format), llava-edge its ONNX vision variant as the cpu profile
picks it. Every request carries a picture neither server has seen (random pixels,
640x480 JPEG) and one of a few questions; answers are ``MAX_TOKENS`` long (the
random-weight presets almost never end early; how many did is recorded). Servers
are measured one at a time, alternating, so neither slows the other; both stay
loaded. llama_cpp.server runs with ``--interrupt_requests False``: by default a new
request interrupts the one streaming (cut-off answers, not a queue).

Sections:

1. ``ttft``: one client, streamed, one token asked: time to its chunk.
   Goal: llava-edge <= 0.8x.
2. ``load``: 4 clients at once, each sending ``--requests-per-client`` requests
   one after the other: aggregate completion tokens/s (streamed token chunks /
   wall time: both servers send one chunk per token) and the 95th percentile time to first token. Goals: >= 2.5x
   llama_cpp.server's tokens/s, p95 TTFT <= 0.5x.
3. ``soak``: llava-edge alone, ``--soak-minutes`` at 4 clients with 5% bad
   requests mixed in (1 in 20) (bad JSON, bad images, two images, unknown model, an
   oversized body): good requests that failed (goal 0) and the server's
   resident memory at the end against after a warm-up round shaped as the
   soak's (goal <= +5%), with its value after every round.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

QUESTIONS = ("What is in the image?", "Describe the image in detail.", "What colors do you see?",
             "Is there a person in the picture?")
MAX_TOKENS = 64
SOAK_PER_CLIENT = 4  # good requests per client in each soak round


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def picture(seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)  # blocks of colour plus noise: a JPEG of real size
    im = np.kron(base, np.ones((40, 40, 1), np.uint8)) + rng.integers(0, 30, (480, 640, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(im.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


class Server:
    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None, ready_path="/v1/models"):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        end = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise SystemExit(f"{name} did not start")
            time.sleep(0.5)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ask(server: Server, image: str, question: str, model: str, max_tokens: int | None = None) -> dict:
    """One streamed request: time to the first chunk with text, total time, chunks and how it ended."""
    # sampled, not greedy: a random-weight model's greedy answer is often one control token repeated, which
    # decodes to no text at all; sampled tokens are text, on both servers alike
    body = {"model": model, "stream": True, "temperature": 1.0, "seed": 7, "max_tokens": max_tokens or MAX_TOKENS,
            "messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                      {"type": "image_url", "image_url": {"url": image}}]}]}
    t0 = time.perf_counter()
    first = None
    chunks, finish, text = 0, None, ""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "error": r.read().decode()[:300]}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return {"ok": False, "status": 200, "error": str(obj["error"])[:300]}
            ch = obj["choices"][0] if obj.get("choices") else {}
            delta = ch.get("delta") or {}
            # a token's chunk: one with content and no role (llava-edge sends its role chunk at once, empty;
            # llama_cpp.server sends its own with the first token, then that token's content)
            if "content" in delta and "role" not in delta:
                if first is None:
                    first = time.perf_counter() - t0
                chunks += 1
                text += delta["content"] or ""
            finish = ch.get("finish_reason") or finish
    return {"ok": True, "ttft": first, "total": time.perf_counter() - t0, "chunks": chunks, "finish": finish}


def section_ttft(servers: list[Server], rounds: int, seed: iter) -> dict:
    out = {s.name: [] for s in servers}
    for r in range(rounds + 1):  # the first round warms up and is not counted
        for s in servers:
            res = ask(s, picture(next(seed)), QUESTIONS[r % len(QUESTIONS)], s.model, max_tokens=1)
            assert res["ok"], res
            if r:
                out[s.name].append(res["ttft"])
            print(f"ttft {s.name} round {r}: {res['ttft']:.2f} s", flush=True)
    return {k: {"median_s": statistics.median(v), "runs_s": v} for k, v in out.items()}


def run_clients(server: Server, clients: int, per_client: int, seed: iter, bad_every: int = 0,
                first_slot: int = 0) -> dict:
    """``clients`` threads, ``per_client`` good requests each; with ``bad_every`` = B, a bad request goes
    before the good one in every slot numbered ``first_slot + ...`` that is a multiple of B - 1 (slots
    count on across calls, so 1 request in B is bad however many a call has)."""
    images = [[picture(next(seed)) for _ in range(per_client)] for _ in range(clients)]
    results: list[dict] = []
    lock = threading.Lock()
    rng = random.Random(next(seed))  # which kinds of bad request

    def client(i: int):
        for k in range(per_client):
            if bad_every and (first_slot + i * per_client + k) % (bad_every - 1) == 0:
                bad = send_bad(server, rng)
                with lock:
                    results.append({"bad": True, "ok": 400 <= bad < 500, "status": bad})
            res = ask(server, images[i][k], QUESTIONS[(i + k) % len(QUESTIONS)], server.model)
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    good = [r for r in results if not r.get("bad")]
    done = [r for r in good if r["ok"]]
    ttfts = sorted(r["ttft"] for r in done if r["ttft"] is not None)
    return {"wall_s": wall, "requests": len(good), "failed": len(good) - len(done),
            "ended_early": sum(r["finish"] != "length" for r in done),
            "tokens_per_s": sum(r["chunks"] for r in done) / wall,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))] if ttfts else None,
            "bad_requests": sum(1 for r in results if r.get("bad")),
            "bad_not_4xx": [r["status"] for r in results if r.get("bad") and not r["ok"]]}


def send_bad(server: Server, rng: random.Random) -> int:
    kind = rng.choice(["json", "image", "two", "model", "big"])
    url = server.url + "/v1/chat/completions"
    if kind == "json":
        return httpx.post(url, content=b"{oops", headers={"content-type": "application/json"}).status_code
    if kind == "big":
        return httpx.post(url, content=b"x" * (40 << 20), headers={"content-type": "application/json"}).status_code
    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    if kind == "two":
        good = {"type": "image_url", "image_url": {"url": picture(rng.randrange(10**9))}}
        img = [good, good]
    content = [{"type": "text", "text": "hi"}] + (img if isinstance(img, list) else [img])
    body = {"model": "gpt-nope" if kind == "model" else server.model,
            "messages": [{"role": "user", "content": content}]}
    return httpx.post(url, json=body).status_code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--llm", default="bf16")
    ap.add_argument("--mmproj", default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="load section: alternating runs per server")
    ap.add_argument("--soak-minutes", type=float, default=10)
    ap.add_argument("--sections", default="ttft,load,soak")
    ap.add_argument("--max-tokens", type=int, default=64, help="answer length (load and soak)")
    ap.add_argument("--image-tokens", type=int, default=0,
                    help="ttft and load: also a llava-edge server with `serve --image-tokens K` (a reduced-token "
                         "vision variant of the bundle: its answers differ from the full model's)")
    a = ap.parse_args()
    global MAX_TOKENS
    MAX_TOKENS = a.max_tokens
    sections = a.sections.split(",")
    from llava_edge import manifest

    m = manifest.read(a.bundle)
    llm = manifest.bundle_file(a.bundle, m.variant("llm", a.llm).file)
    mmproj = manifest.bundle_file(a.bundle, m.variant("mmproj", a.mmproj).file)
    cache = tempfile.mkdtemp(prefix="serve-load-cache-")
    edge_port, cpp_port = free_port(), free_port()
    edge = Server("llava-edge", edge_argv(a, edge_port), edge_port, env={"LLAVA_EDGE_CACHE": cache},
                  ready_path="/health")
    edge.model = "m"
    servers = [edge]
    reduced = f"llava-edge ({a.image_tokens} image tokens)"
    if a.image_tokens and ("ttft" in sections or "load" in sections):
        port = free_port()
        fewer = Server(reduced, [*edge_argv(a, port), "--image-tokens", str(a.image_tokens)], port,
                       env={"LLAVA_EDGE_CACHE": cache}, ready_path="/health")
        fewer.model = "m"
        servers.append(fewer)
    if "ttft" in sections or "load" in sections:
        cpp = Server("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--model", str(llm),
                                          "--clip_model_path", str(mmproj), "--chat_format", "llava-1-5",
                                          "--n_ctx", str(a.ctx), "--n_threads", str(a.threads),
                                          "--n_threads_batch", str(a.threads), "--port", str(cpp_port),
                                          "--host", "127.0.0.1", "--model_alias", "m", "--verbose", "False",
                                          # queue concurrent requests: by default a new request interrupts
                                          # the one streaming, so 3 of 4 clients get cut-off answers
                                          "--interrupt_requests", "False"],
                     cpp_port)
        cpp.model = "m"
        servers.append(cpp)
    seed = iter(range(10**9))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "bundle": str(a.bundle), "llm": a.llm, "mmproj": a.mmproj,
              "threads": a.threads, "max_tokens": MAX_TOKENS, "image_tokens": a.image_tokens or None,
              "versions": versions()}
    try:
        if "ttft" in sections:
            t = section_ttft(servers, a.rounds, seed)
            t["ratio"] = t["llava-edge"]["median_s"] / t["llama_cpp.server"]["median_s"]
            if reduced in t:
                t["ratio_reduced"] = t[reduced]["median_s"] / t["llama_cpp.server"]["median_s"]
            result["ttft"] = t
            print(f"ttft ratio {t['ratio']:.2f}x" + (f", {reduced} {t['ratio_reduced']:.2f}x" if reduced in t else ""),
                  flush=True)
        if "load" in sections:
            runs = {s.name: [] for s in servers}
            for rep in range(a.repeats):
                for s in servers:
                    r = run_clients(s, a.clients, a.requests_per_client, seed)
                    runs[s.name].append(r)
                    print(f"load {s.name} run {rep}: {r['tokens_per_s']:.1f} tok/s, p95 TTFT {r['ttft_p95_s']:.2f} s, "
                          f"{r['failed']} failed", flush=True)
            med = {k: {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in v),
                       "ttft_p95_s": statistics.median(x["ttft_p95_s"] for x in v)} for k, v in runs.items()}
            edge_m, cpp_m = med["llava-edge"], med["llama_cpp.server"]
            result["load"] = {"runs": runs, "median": med,
                              "tokens_per_s_ratio": edge_m["tokens_per_s"] / cpp_m["tokens_per_s"],
                              "ttft_p95_ratio": edge_m["ttft_p95_s"] / cpp_m["ttft_p95_s"]}
            if reduced in med:
                result["load"]["reduced"] = {"tokens_per_s_ratio": med[reduced]["tokens_per_s"] / cpp_m["tokens_per_s"],
                                             "ttft_p95_ratio": med[reduced]["ttft_p95_s"] / cpp_m["ttft_p95_s"]}
            print(f"load ratios: tokens/s {result['load']['tokens_per_s_ratio']:.2f}x, "
                  f"p95 TTFT {result['load']['ttft_p95_ratio']:.2f}x"
                  + (f"; {reduced}: {result['load']['reduced']}" if reduced in med else ""), flush=True)
        for s in servers[1:]:
            s.stop()
        servers = servers[:1]
        if "soak" in sections:
            # warm-up: one round shaped as the soak's (every sequence, the buffers of four prefills at once and
            # the in-memory caches filled as a round fills them), so that growth is measured from a loaded server
            run_clients(edge, a.clients, SOAK_PER_CLIENT, seed)
            rss0 = edge.rss_mb()
            end = time.monotonic() + a.soak_minutes * 60
            totals = {"requests": 0, "failed": 0, "bad_requests": 0, "bad_not_4xx": [], "rss_mb_by_round": []}
            while time.monotonic() < end:
                r = run_clients(edge, a.clients, SOAK_PER_CLIENT, seed, bad_every=20, first_slot=totals["requests"] + 1)
                for k in ("requests", "failed", "bad_requests"):
                    totals[k] += r[k]
                totals["bad_not_4xx"] += r["bad_not_4xx"]
                totals["rss_mb_by_round"].append(round(edge.rss_mb(), 1))
                print(f"soak: {totals['requests']} good, {totals['failed']} failed, {totals['bad_requests']} bad, "
                      f"RSS {totals['rss_mb_by_round'][-1]:.0f} MB", flush=True)
            rss1 = edge.rss_mb()
            result["soak"] = {**totals, "minutes": a.soak_minutes, "rss_after_warmup_mb": rss0, "rss_end_mb": rss1,
                              "rss_growth": rss1 / rss0 - 1}
    finally:
        for s in servers:
            s.stop()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k in ("ttft", "load", "soak")}, indent=1, default=str)[:3000])


def edge_argv(a: argparse.Namespace, port: int) -> list[str]:
    return [sys.executable, "-m", "llava_edge.cli", "serve", "--bundle", str(a.bundle), "--port", str(port),
            "--parallel", str(a.clients), "--llm-variant", a.llm, "--threads", str(a.threads), "--ctx", str(a.ctx),
            "--quiet", "--model-name", "m"]


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for p in ("llava-edge", "llama_cpp_python", "onnxruntime", "fastapi", "uvicorn"):
        try:
            out[p] = version(p)
        except Exception:  # noqa: BLE001
            out[p] = None
    return out


if __name__ == "__main__":
    main()
