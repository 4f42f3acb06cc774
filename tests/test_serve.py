"""``llava-edge serve`` with the official ``openai`` and ``ollama`` clients, against the in-process answers.

The server runs in a child process on a loopback port, on the session's trained toy
(``trained_toy``, shared with the toy gate and drift), exported to a bundle of its own.
Every answer is compared token for token with ``EdgeLLaVA`` answering alone, greedy.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cli_run import assert_one_line_error, le
from serve_helpers import metric, serving, user_message

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

QUESTIONS = ("Describe the image in detail.", "What color are the shapes?", "How many shapes are there?")
MAX = 48


@pytest.fixture(scope="module")
def toy(trained_bundle):
    """(bundle, eval images) of the trained toy."""
    return trained_bundle


@pytest.fixture(scope="module")
def solo(toy):
    """The in-process API answering alone: what every served answer must equal."""
    from llava_edge import EdgeLLaVA

    m = EdgeLLaVA.load(toy[0], device="cpu", prefix_cache=False)
    cache: dict = {}

    def answer(image, question, history=()):
        key = (str(image), question, tuple(history))
        if key not in cache:
            s = m.session(image)
            for q in history:
                s.ask(q, max_tokens=MAX)
            cache[key] = s.ask(question, max_tokens=MAX)
        return cache[key]

    yield answer
    m.close()


@pytest.fixture(scope="module")
def server(toy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    with serving(toy[0], tmp, "--parallel", "4", "--model-name", "toy", "--ctx", "8192",
                 env={"LLAVA_EDGE_CACHE": str(tmp / "cache")}) as s:
        yield s
    assert s.proc.returncode == 0, s.log_text()


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


# -- answers equal the in-process ones ----------------------------------------------------------------------------
def test_openai_client_answers_as_edge_llava(server, toy, solo):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["toy"]
    for image in toy[1][:3]:
        for q in QUESTIONS:
            want = solo(image, q)
            r = c.chat.completions.create(model="toy", messages=[user_message(q, image)], temperature=0,
                                          max_tokens=MAX)
            assert r.choices[0].message.content == want, (image.name, q)
            assert r.choices[0].finish_reason == "stop"
            u = r.usage
            assert u.prompt_tokens > 64 and u.completion_tokens > 0  # the toy's 64 image positions counted
            assert u.total_tokens == u.prompt_tokens + u.completion_tokens
            chunks = list(c.chat.completions.create(model="toy", messages=[user_message(q, image)], temperature=0,
                                                    max_tokens=MAX, stream=True,
                                                    stream_options={"include_usage": True}))
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert text == want, (image.name, q)
            assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
            assert chunks[-1].usage.completion_tokens == u.completion_tokens


def test_ollama_client_answers_as_edge_llava(server, toy, solo):
    c = ollama.Client(host=server.url)
    assert [m.model for m in c.list().models] == ["toy:latest"]
    assert c.ps().models and c.show("toy").capabilities == ["completion", "vision"]
    image, q = toy[1][1], QUESTIONS[2]
    want = solo(image, q)
    opts = {"temperature": 0, "num_predict": MAX}
    r = c.chat(model="toy", messages=[{"role": "user", "content": q, "images": [str(image)]}], options=opts)
    assert r.message.content == want and r.done and r.done_reason == "stop"
    assert r.prompt_eval_count > 64 and r.eval_count > 0
    parts = list(c.chat(model="toy", messages=[{"role": "user", "content": q, "images": [image.read_bytes()]}],
                        options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == want and parts[-1].done
    g = c.generate(model="toy", prompt=q, images=[str(image)], options=opts)
    assert g.response == want
    assert "".join(p.response for p in c.generate(model="toy", prompt=q, images=[str(image)], options=opts,
                                                   stream=True)) == want
    v = httpx.get(server.url + "/api/version").json()
    assert v["version"]


def test_a_conversation_sent_again_decodes_only_its_new_turn(server, toy, solo):
    """Stateless API, stateful speed: the second request shares the first's positions and decodes the rest."""
    c = client(server)
    image, q1, q2 = toy[1][4], QUESTIONS[0], QUESTIONS[1]
    first = c.chat.completions.create(model="toy", messages=[user_message(q1, image)], temperature=0, max_tokens=MAX)
    a1 = first.choices[0].message.content
    assert a1 == solo(image, q1)
    messages = [user_message(q1, image), {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    second = c.chat.completions.create(model="toy", messages=messages, temperature=0, max_tokens=MAX)
    assert second.choices[0].message.content == solo(image, q2, history=(q1,))
    cached = second.usage.prompt_tokens_details.cached_tokens
    # everything of the first prompt and its answer is held; only the new turn is decoded
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 2, (cached, first.usage)
    assert second.usage.prompt_tokens - cached < 30


# -- many clients at once -----------------------------------------------------------------------------------------
def test_eight_clients_at_once_get_the_answers_one_client_gets(server, toy, solo):
    before = httpx.get(server.url + "/metrics").text
    rng = random.Random(0)
    work = [(rng.choice(toy[1]), rng.choice(QUESTIONS), rng.random() < 0.3) for _ in range(8 * 25)]
    wants = [solo(image, q) for image, q, _ in work]

    def one(k: int):
        image, q, stream = work[k]
        c = client(server)
        if stream:
            chunks = list(c.chat.completions.create(model="toy", messages=[user_message(q, image)], temperature=0,
                                                    max_tokens=MAX, stream=True,
                                                    stream_options={"include_usage": True}))
            return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), chunks[-1].usage
        r = c.chat.completions.create(model="toy", messages=[user_message(q, image)], temperature=0, max_tokens=MAX)
        return r.choices[0].message.content, r.usage

    def client_loop(i: int):
        return [one(k) for k in range(i, len(work), 8)]

    with ThreadPoolExecutor(8) as pool:
        per_client = list(pool.map(client_loop, range(8)))
    got = {}
    for i, results in enumerate(per_client):
        for k, r in zip(range(i, len(work), 8), results):
            got[k] = r
    wrong = [k for k in range(len(work)) if got[k][0] != wants[k]]
    assert not wrong, [(work[k][0].name, work[k][1], got[k][0], wants[k]) for k in wrong[:3]]
    after = httpx.get(server.url + "/metrics").text
    d = lambda name, **kw: metric(after, name, **kw) - metric(before, name, **kw)  # noqa: E731
    assert d("llava_edge_requests_total", api="openai") == len(work)
    assert d("llava_edge_completion_tokens_total") == sum(u.completion_tokens for _, u in got.values())
    assert d("llava_edge_prompt_tokens_total") == sum(u.prompt_tokens for _, u in got.values())
    assert d("llava_edge_prompt_reused_tokens_total") == sum(u.prompt_tokens_details.cached_tokens
                                                             for _, u in got.values())
    assert d("llava_edge_time_to_first_token_seconds_count") == len(work)
    assert d("llava_edge_kv_reuse_hits_total") > len(work) / 2  # the system prompt and images come back
    assert metric(after, "llava_edge_queue_depth") == 0 and metric(after, "llava_edge_active_sequences") == 0


# -- bad requests: a 4xx JSON error each, and the server keeps serving ---------------------------------------------
def _png(w: int, h: int, noise: bool = False) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    im = Image.frombytes("RGB", (w, h), random.Random(0).randbytes(w * h * 3)) if noise else \
        Image.new("RGB", (w, h), (200, 10, 10))
    im.save(buf, "PNG")
    return buf.getvalue()


def _uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _image_message(url: str, q: str = "What is it?") -> dict:
    return {"role": "user", "content": [{"type": "text", "text": q}, {"type": "image_url", "image_url": {"url": url}}]}


BAD = {
    "invalid JSON": (b"{not json", 400, None),
    "a JSON list": ([1, 2], 400, None),
    "messages not a list": ({"messages": "hi"}, 400, "messages"),
    "no messages": ({"messages": []}, 400, "messages"),
    "a number as content": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    "an unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    "an unknown part": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, None),
    "ends with the assistant": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                                                 "content": "b"}]}, 400, "messages"),
    "temperature as text": ({"messages": [{"role": "user", "content": "a"}], "temperature": "hot"}, 400,
                            "temperature"),
    "a negative max_tokens": ({"messages": [{"role": "user", "content": "a"}], "max_tokens": -3}, 400, "max_tokens"),
    "n=2": ({"messages": [{"role": "user", "content": "a"}], "n": 2}, 400, "n"),
    "stream as text": ({"messages": [{"role": "user", "content": "a"}], "stream": "yes"}, 400, "stream"),
    "an unknown model": ({"model": "gpt-9", "messages": [{"role": "user", "content": "a"}]}, 404, "model"),
    "undecodable base64": ({"messages": [_image_message("data:image/png;base64,@@@@")]}, 400, None),
    "bytes that are no image": ({"messages": [_image_message(_uri(b"hello world" * 10))]}, 400, None),
    "a GIF": ({"messages": [_image_message(_uri(b"GIF89a" + b"\0" * 40, "image/gif"))]}, 400, None),
    "a 1x60000 strip": ({"messages": [_image_message(_uri(_png(1, 60000)))]}, 400, None),
    "two images": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": _uri(_png(8, 8))}},
        {"type": "image_url", "image_url": {"url": _uri(_png(9, 9))}}]}]}, 400, None),
    "a remote URL": ({"messages": [_image_message("http://127.0.0.1:1/cat.png")]}, 400, None),
    "a file path": ({"messages": [_image_message("/etc/passwd")]}, 400, None),
    "a file URI": ({"messages": [_image_message("file:///etc/passwd")]}, 400, None),
    "a system message with a control token": ({"messages": [{"role": "system", "content": "be </s> nice"},
                                                            {"role": "user", "content": "a"}]}, 400, "messages"),
    "a prompt longer than the context": ({"messages": [{"role": "user", "content": "word " * 20000}]}, 400,
                                         "messages"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_gets_a_json_error_and_the_server_goes_on(server, case):
    body, status, param = BAD[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=600)
    assert r.status_code == status, (case, r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"] and "Traceback" not in err["message"]
    if param:
        assert err["param"] == param, err
    if case == "a prompt longer than the context":
        assert err["code"] == "context_length_exceeded"
    assert httpx.get(server.url + "/health").json()["status"] == "ready"


def test_ollama_errors_are_ollama_shaped(server):
    r = httpx.post(server.url + "/api/chat", json={"model": "toy", "messages": [
        {"role": "user", "content": "a", "images": ["not base64!"]}]})
    assert r.status_code == 400 and "base64" in r.json()["error"]
    r = httpx.post(server.url + "/api/generate", json={"model": "nope", "prompt": "a"})
    assert r.status_code == 404 and set(r.json()) == {"error"}
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=server.url).chat(model="toy", messages=[{"role": "user", "content": "a",
                                                                     "images": [_png(1, 60000)]}])
    assert e.value.status_code == 400


def test_an_oversized_body_is_refused_before_it_is_read(toy, tmp_path):
    with serving(toy[0], tmp_path, "--max-body-mb", "0.01", "--quiet") as s:
        big = {"messages": [_image_message(_uri(_png(100, 100, noise=True)))]}  # 40 KB
        r = httpx.post(s.url + "/v1/chat/completions", json=big)
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        # sent in chunks, without a length: cut off as it arrives
        r = httpx.post(s.url + "/v1/chat/completions", content=iter([b"{" + b" " * 8000] * 4))
        assert r.status_code == 413
        assert httpx.get(s.url + "/health").json()["status"] == "ready"


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(server, toy):
    body = {"model": "toy", "stream": True, "temperature": 0, "ignore_eos": True, "max_tokens": 8000,
            "messages": [user_message(QUESTIONS[0], toy[1][0])]}  # ignore_eos: a long answer (seconds)
    before = httpx.get(server.url + "/metrics").text
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=600) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    end = time.monotonic() + 300  # generous: a busy machine counts it later, never wrongly
    while True:
        after = httpx.get(server.url + "/metrics").text
        if metric(after, "llava_edge_active_sequences") == 0 and \
                metric(after, "llava_edge_requests_total", finish="cancelled") > \
                metric(before, "llava_edge_requests_total", finish="cancelled"):
            break
        assert time.monotonic() < end, after
        time.sleep(0.1)
    r = client(server).chat.completions.create(model="toy", messages=[user_message(QUESTIONS[1], toy[1][0])],
                                                temperature=0, max_tokens=MAX)
    assert r.choices[0].finish_reason == "stop"


def test_stop_strings_and_seeds(server, toy, solo):
    c = client(server)
    image, q = toy[1][0], QUESTIONS[0]
    want = solo(image, q)
    word = want.split()[3]
    r = c.chat.completions.create(model="toy", messages=[user_message(q, image)], temperature=0, max_tokens=MAX,
                                  stop=[word])
    assert r.choices[0].message.content == want[:want.index(word)] and r.choices[0].finish_reason == "stop"
    sampled = [c.chat.completions.create(model="toy", messages=[user_message(q, image)], temperature=1.5, seed=s,
                                         max_tokens=MAX).choices[0].message.content for s in (5, 5, 6)]
    assert sampled[0] == sampled[1]  # a seed gives the same answer again ...
    assert len(set(sampled)) == 2  # ... and another seed another answer (at temperature 1.5, on this toy)


def test_images_batched_through_the_vision_graph(toy, solo):
    """Requests admitted together: one vision batch for their pictures, and the answers of each alone."""
    from llava_edge import EdgeLLaVA
    from llava_edge.runtimes.batching import BatchEngine, Request

    m = EdgeLLaVA.load(toy[0], device="cpu", prefix_cache=False, parallel=4)
    engine = BatchEngine(m)
    try:
        done, answers = threading.Semaphore(0), {}
        requests = []
        for image in toy[1][:4]:
            picture = m.prepare_image(str(image))
            slots = m.slots_for(m.template.prompt(QUESTIONS[1], image=True), picture.key, picture.positions)
            pieces = []

            def on_event(ev, pieces=pieces, name=image.name):
                if ev.kind == "text":
                    pieces.append(ev.text)
                else:
                    answers[name] = "".join(pieces)
                    done.release()
            requests.append(Request(slots, [picture], 0.0, 1.0, MAX, None, m.template.stop, on_event))
        with engine._cv:  # all four wait before the engine looks: they are admitted in one step
            for r in requests:
                engine._waiting.append(r)
            engine._cv.notify()
        for _ in requests:
            assert done.acquire(timeout=600)
        assert engine.stats["vision_batches"] == 1 and engine.stats["vision_images"] == 4
        for image in toy[1][:4]:
            assert answers[image.name] == solo(image, QUESTIONS[1])
    finally:
        engine.close()
        m.close()


def test_remote_images_when_allowed_and_cors_when_asked(toy, tmp_path, solo):
    import http.server
    import socketserver

    site = tmp_path / "site"
    site.mkdir()
    image = toy[1][5]
    (site / "pic.png").write_bytes(image.read_bytes())
    (site / "huge.png").write_bytes(b"\x89PNG" + b"\0" * (21 << 20))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(site))  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{web.server_address[1]}"
        with serving(toy[0], tmp_path, "--allow-remote-images", "--cors", "http://app.test", "--quiet") as s:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
            r = c.chat.completions.create(model="toy", messages=[_image_message(base + "/pic.png", QUESTIONS[2])],
                                          temperature=0, max_tokens=MAX)
            assert r.choices[0].message.content == solo(image, QUESTIONS[2])
            url = s.url + "/v1/chat/completions"
            r = httpx.post(url, json={"messages": [_image_message(base + "/huge.png")]})
            assert r.status_code == 413, r.text
            r = httpx.post(url, json={"messages": [_image_message(base + "/nothing.png")]})
            assert r.status_code == 400 and "404" in r.json()["error"]["message"]
            pre = {"Origin": "http://app.test", "Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "authorization,content-type"}
            r = httpx.options(url, headers=pre)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.test"
            r = httpx.options(url, headers={**pre, "Origin": "http://evil.test"})
            assert r.headers.get("access-control-allow-origin") is None
        web.shutdown()


def test_no_cors_unless_asked(server):
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://evil.test"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert httpx.get(server.url + "/v1/models").status_code == 200  # API clients send no Origin


# -- safe by default ------------------------------------------------------------------------------------------------
def test_a_public_address_needs_a_key():
    r = le("serve", "--host", "0.0.0.0", "--port", "9")
    assert_one_line_error(r, "--api-key", "--insecure")


def test_keys_queue_time_limit_image_dir_and_a_graceful_stop(toy, tmp_path, solo):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    image = toy[1][2]
    (pictures / "a.png").write_bytes(image.read_bytes())
    (tmp_path / "secret.png").write_bytes(image.read_bytes())
    (pictures / "link.png").symlink_to(tmp_path / "secret.png")
    long = {"model": "toy", "temperature": 0, "ignore_eos": True, "max_tokens": 2500,
            "messages": [user_message(QUESTIONS[0], image)]}  # seconds of answer
    # time limits far above what the answer needs on an idle machine (seconds): a busy one must not turn the
    # long answer into a 504 or a killed stop
    with serving(toy[0], tmp_path, "--parallel", "1", "--queue", "0", "--api-key", "sesame", "--timeout", "900",
                 "--image-dir", str(pictures), "--ctx", "4096", "--grace", "900") as s:
        url = s.url + "/v1/chat/completions"
        ok = {"Authorization": "Bearer sesame"}
        assert httpx.get(s.url + "/health").status_code == 200  # open, for probes
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer sesam"}).status_code == 401
        assert httpx.get(s.url + "/api/tags").status_code == 401
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        # a file under --image-dir answers as the same picture sent inline
        r = c.chat.completions.create(model="toy", messages=[_image_message("a.png", QUESTIONS[2])], temperature=0,
                                      max_tokens=MAX)
        assert r.choices[0].message.content == solo(image, QUESTIONS[2])
        for path, status in (("../secret.png", 403), (str(tmp_path / "secret.png"), 403), ("link.png", 403),
                             ("missing.png", 404)):
            r = httpx.post(url, headers=ok, json={"messages": [_image_message(path)]})
            assert r.status_code == status, (path, r.text)
        # one sequence, no queue: a second request while one answers is told to come back
        results = {}

        def long_answer():
            results["long"] = httpx.post(url, headers=ok, json=long, timeout=1200)

        t = threading.Thread(target=long_answer)
        t.start()
        while t.is_alive() and metric(httpx.get(s.url + "/metrics", headers=ok).text,
                                      "llava_edge_active_sequences") < 1:
            time.sleep(0.01)
        assert t.is_alive(), "the long answer ended before the second request could be sent"
        busy = httpx.post(url, headers=ok, json={"messages": [{"role": "user", "content": "hi"}]})
        assert busy.status_code == 503 and busy.headers["retry-after"] and \
            busy.json()["error"]["code"] == "queue_full"
        # SIGTERM while the long answer streams: it is finished, then the server exits cleanly
        code = s.stop()
        t.join()
        assert results["long"].status_code == 200, results["long"].text
        assert results["long"].json()["choices"][0]["finish_reason"] == "length"
        assert code == 0, s.log_text()


def test_a_request_over_the_time_limit_gets_504(toy, tmp_path):
    with serving(toy[0], tmp_path, "--timeout", "0.5", "--ctx", "2048", "--quiet") as s:
        long = {"temperature": 0, "ignore_eos": True, "max_tokens": 1800,
                "messages": [{"role": "user", "content": "Tell me everything."}]}
        r = httpx.post(s.url + "/v1/chat/completions", json=long, timeout=600)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert httpx.get(s.url + "/health").json()["status"] == "ready"


def test_the_chat_page_is_self_contained(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "<script>" in html and "v1/chat/completions" in html
    # nothing loaded from elsewhere: no absolute or protocol-relative URL in a src/href/import/url()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?(https?:)?//""", html, re.I)


def test_access_log_lines_are_json(server):
    lines = [json.loads(x) for x in server.log_text().splitlines() if x.startswith("{")]
    assert lines and all({"method", "path", "status", "ms"} <= set(x) for x in lines)
    assert any(x["path"] == "/v1/chat/completions" and x["status"] == 200 for x in lines)


def test_health_says_loading_until_the_model_is_there():
    from llava_edge.runtimes.serve import Server, ServeOptions

    gate = threading.Event()

    def load():
        gate.wait(10)
        raise ValueError("no such bundle")

    s = Server(ServeOptions(), load)
    t = threading.Thread(target=s.load)
    t.start()
    assert s.state == "loading"
    gate.set()
    t.join()
    assert s.state == "failed" and "no such bundle" in s.error


def test_no_torch_in_the_server(server):
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libllama" in maps and "onnxruntime" in maps  # the model is loaded ...
    assert "libtorch" not in maps  # ... and torch is not


# -- the chat page in a real browser (Chromium from the distribution; `make test-browser` installs it) ------------
def _browser():
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (make test-browser)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium and chromedriver on this machine (make test-browser installs them)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_the_chat_page_in_a_browser_asks_follows_up_and_resets(server, toy, solo):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(server.url + "/")
        wait.until(lambda b: b.find_element(By.ID, "status").text == "ready")
        image = toy[1][3]
        browser.find_element(By.ID, "image-input").send_keys(str(image))
        wait.until(lambda b: b.find_element(By.ID, "preview").is_displayed())
        answers = []
        for q in QUESTIONS[:2]:
            box = browser.find_element(By.ID, "question")
            box.send_keys(q)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) == len(answers) + 1)
            answers.append(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text)
        # the page sends no max_tokens: the answers end on their own, as the toy's do within MAX tokens
        assert answers[0] == solo(image, QUESTIONS[0])
        assert answers[1] == solo(image, QUESTIONS[1], history=(QUESTIONS[0],))
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        browser.find_element(By.ID, "reset").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
        assert not browser.find_element(By.ID, "preview").is_displayed()
    finally:
        browser.quit()
