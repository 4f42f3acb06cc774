"""``llava-edge serve`` against hostile clients: no request can hold the server, exhaust its memory, or reach it
from a web page.

The server runs in a child process on loopback, on the session's toy bundle (random weights: these tests look at
what the server does with requests, not at the answers' words), with one sequence and no queue, so that a
sequence still held by a request whose client has gone shows as a 503 for the next one. Its deadlines are short
(a few seconds) and every wait for them is long (a minute), so a slow machine makes the tests slower, not wrong.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import random
import time

import httpx
import pytest
from serve_helpers import (metric, open_fds, post_head, proc_status_mb, raw_connection, read_until_closed,
                           reset_peak_rss, serving)

HEADER_S = 3  # --header-timeout and --body-timeout of the server under test
KEEP_ALIVE_S = 1
CTX = 8192
ROUTES = ("/v1/chat/completions", "/api/chat", "/api/generate")
JSON = {"Content-Type": "application/json"}
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
# every wait long (httpx's default is 5 s): a loaded machine makes answers slow, not wrong
post, get, options = (functools.partial(f, timeout=120) for f in (httpx.post, httpx.get, httpx.options))


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with serving(bundle, tmp, "--parallel", "1", "--queue", "0", "--ctx", str(CTX), "--model-name", "toy",
                 "--header-timeout", str(HEADER_S), "--body-timeout", str(HEADER_S),
                 "--keep-alive", str(KEEP_ALIVE_S), env={"LLAVA_EDGE_CACHE": str(tmp / "cache")}) as s:
        yield s
    assert s.proc.returncode == 0, s.log_text()
    assert "Traceback" not in s.log_text()


def metrics(server) -> str:
    return get(server.url + "/metrics").text


def good_request(server, route="/v1/chat/completions") -> httpx.Response:
    body = HI if route != "/api/generate" else {"prompt": "hi", "options": {"num_predict": 1}}
    if route == "/api/chat":
        body = {"messages": HI["messages"], "stream": False, "options": {"num_predict": 1}}
    if route == "/api/generate":
        body["stream"] = False
    return post(server.url + route, json=body)


def assert_api_error(r: httpx.Response, route: str, status: int) -> str:
    """A JSON error in the route's API (Ollama's ``{"error": "..."}`` or OpenAI's object); its message."""
    assert r.status_code == status, (route, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    if route.startswith("/api/"):
        assert isinstance(err, str) and err
        return err
    assert err["message"] and err["type"], err
    return err["message"]


def access_lines(server) -> list[dict]:
    return [json.loads(x) for x in server.log_text().splitlines() if x.startswith('{"time"')]


def statuses(server, path: str) -> list[int]:
    return [x["status"] for x in access_lines(server) if x["path"] == path]


def new_statuses(server, path: str, since: int, n: int) -> list[int]:
    """The statuses of the ``n`` requests to ``path`` logged after the first ``since`` (a line is written once
    its answer has gone, so it may come a moment after the client has read the answer)."""
    end = time.monotonic() + 30
    while len(got := statuses(server, path)) < since + n:
        assert time.monotonic() < end, got[since:]
        time.sleep(0.05)
    return got[since:]


# -- parsing: bounded depth and size, a 400 in the API's JSON for every failure -------------------------------------
DEEP_ARRAY = "[" * 10_000 + "]" * 10_000  # 20 KB, 10,000 deep
DEEP_OBJECT = '{"a":' * 4_000 + "1" + "}" * 4_000


def deep_bodies(route: str, deep: str) -> dict[str, str]:
    if route == "/api/generate":
        return {"prompt": f'{{"prompt": {deep}}}', "images": f'{{"images": {deep}}}',
                "an unknown field": f'{{"prompt": "hi", "x": {deep}}}', "the whole body": deep}
    return {"messages": f'{{"messages": {deep}}}',
            "content": f'{{"messages": [{{"role": "user", "content": {deep}}}]}}',
            "an unknown field": f'{{"messages": [{{"role": "user", "content": "hi"}}], "x": {deep}}}',
            "the whole body": deep}


@pytest.mark.parametrize("route", ROUTES)
def test_deeply_nested_json_is_a_400_on_every_route(server, route):
    logged, sent = len(statuses(server, route)), 0
    for deep in (DEEP_ARRAY, DEEP_OBJECT):
        for where, body in deep_bodies(route, deep).items():
            r = post(server.url + route, content=body, headers=JSON)
            message = assert_api_error(r, route, 400)
            assert "deep" in message and "64" in message, (where, message)
            sent += 1
    # each was logged with the status the client got
    assert new_statuses(server, route, logged, sent) == [400] * sent
    # nesting within the bound is fine, in a field the server does not know
    r = post(server.url + route, content=json.dumps({**json.loads(good_request_body(route)),
                                                           "x": json.loads("[" * 60 + "]" * 60)}),
                   headers=JSON)
    assert r.status_code == 200, r.text


def good_request_body(route: str) -> str:
    if route == "/api/generate":
        return json.dumps({"prompt": "hi", "stream": False, "options": {"num_predict": 1}})
    if route == "/api/chat":
        return json.dumps({"messages": HI["messages"], "stream": False, "options": {"num_predict": 1}})
    return json.dumps(HI)


def test_json_structure_is_measured_before_parsing():
    from llava_edge.runtimes.serve.body import MAX_DEPTH, MAX_VALUES, ApiError, check_structure, parse_json

    check_structure(("[" * MAX_DEPTH + "]" * MAX_DEPTH).encode())
    with pytest.raises(ApiError, match=f"{MAX_DEPTH + 1} deep"):
        check_structure(("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)).encode())
    # brackets and quotes inside strings are text, escaped or not
    text = json.dumps({"a": "[" * 500 + '\\"[{' * 100 + "\\", "b": ['"]]"' * 50]}).encode()
    check_structure(text)
    assert parse_json(text)["b"] == ['"]]"' * 50]
    with pytest.raises(ApiError, match="more than"):
        check_structure(("[" + "{}," * MAX_VALUES + "{}]").encode())  # ~10^5 dicts: refused unparsed
    with pytest.raises(ApiError, match="more than"):
        check_structure(json.dumps(["a"] * (MAX_VALUES + 1)).encode())
    for bad, why in ((b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b'{"a": "\xff"}', "UTF-8"),
                     (b'{"a": 1' + b"0" * 5000 + b"}", "digits")):
        with pytest.raises(ApiError, match=why):
            parse_json(bad)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e309"])
def test_non_finite_numbers_are_named(server, value):
    name = "NaN" if value == "NaN" else "-Infinity" if value.startswith("-") else "Infinity"
    r = post(server.url + "/v1/chat/completions", headers=JSON,
                   content='{"messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % value)
    message = assert_api_error(r, "/v1/chat/completions", 400)
    assert f"must be a finite number, not {name}" in message, message
    r = post(server.url + "/api/chat", headers=JSON,
                   content='{"messages": [{"role": "user", "content": "hi"}], "options": {"seed": %s}}' % value)
    assert f"must be an integer, not {name}" in assert_api_error(r, "/api/chat", 400)


# -- a client that leaves a non-streaming request cancels it ---------------------------------------------------------
LONG = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "Tell me everything."}], "temperature": 0,
                                 "ignore_eos": True, "max_tokens": CTX - 100},
        "/api/chat": {"messages": [{"role": "user", "content": "Tell me everything."}], "stream": False,
                      "options": {"temperature": 0, "ignore_eos": True, "num_predict": CTX - 100}}}


@pytest.mark.parametrize("route", list(LONG))
def test_a_client_that_leaves_a_non_streaming_request_frees_its_sequence(server, route):
    api = "openai" if route.startswith("/v1") else "ollama"
    before, logged = metrics(server), len(statuses(server, route))
    body = json.dumps(LONG[route]).encode()
    s = raw_connection(server.url, post_head(route, len(body)) + body)
    end = time.monotonic() + 60
    while metric(metrics(server), "llava_edge_active_sequences") < 1:  # it is answering
        assert time.monotonic() < end, server.log_text()[-2000:]
        time.sleep(0.02)
    s.close()
    while True:
        after = metrics(server)
        cancelled = metric(after, "llava_edge_requests_total", api=api, finish="cancelled") - \
            metric(before, "llava_edge_requests_total", api=api, finish="cancelled")
        if cancelled and metric(after, "llava_edge_active_sequences") == 0:
            break
        assert time.monotonic() < end, after
        time.sleep(0.02)
    assert cancelled == 1
    # cut short, not answered to the end for nobody
    tokens = metric(after, "llava_edge_completion_tokens_total") - metric(before, "llava_edge_completion_tokens_total")
    assert tokens < CTX - 100, tokens
    assert metric(after, "llava_edge_requests_total", api=api, finish="max_tokens") == \
        metric(before, "llava_edge_requests_total", api=api, finish="max_tokens")
    # one sequence and no queue: had the request kept it, this would be a 503
    r = good_request(server, route)
    assert r.status_code == 200, r.text
    assert new_statuses(server, route, logged, 2) == [499, 200]


# -- prompts that cannot fit are refused from their length -----------------------------------------------------------
def test_an_oversized_prompt_is_refused_before_it_is_tokenized(server):
    pid = server.proc.pid
    assert good_request(server).status_code == 200
    text = "word " * (8 << 20 >> 2)  # 10 MB of text, about 2 million tokens
    reset_peak_rss(pid)
    rss = proc_status_mb(pid, "VmRSS")
    start = time.monotonic()
    r = post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]})
    took = time.monotonic() - start
    message = assert_api_error(r, "/v1/chat/completions", 400)
    assert r.json()["error"]["code"] == "context_length_exceeded"
    # the refusal from the text's length (tokenizing says "positions"), with the bound it used
    assert f"{len(text.encode()):,} bytes of text" in message and f"{CTX} positions" in message, message
    # tokenizing it would take some 50 bytes of memory per byte of text (hundreds of MB); the body, its JSON
    # and its string take a few times the text's size
    peak = proc_status_mb(pid, "VmHWM") - rss
    assert peak < 10 * len(text) / 2**20, (peak, len(text))
    # refused, it takes the time to send and parse 10 MB, a fraction of a second; 10 s is a loaded machine's
    # margin (the refusal's path and its memory above are what show it was not tokenized)
    assert took < 10, took
    # past the bound by a little: also refused from its length
    bound = int(message.split("stands for ")[1].split(" bytes")[0]) * CTX
    r = post(server.url + "/api/generate", json={"prompt": "x" * (bound + 1), "stream": False})
    assert "bytes of text" in assert_api_error(r, "/api/generate", 400)
    # within the bound but over the context in tokens: refused once tokenized, by its count of positions
    r = post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "word " * (bound // 5 - 10)}]})
    message = assert_api_error(r, "/v1/chat/completions", 400)
    assert "positions" in message and "bytes of text" not in message, message
    # and a turn count over the context
    turns = [{"role": ("user", "assistant")[i % 2], "content": ""} for i in range(CTX + 1)]
    r = post(server.url + "/v1/chat/completions", json={"messages": turns})
    assert "turns" in assert_api_error(r, "/v1/chat/completions", 400)
    assert metric(metrics(server), "llava_edge_requests_refused_total", reason="context_length") >= 4


# -- slow clients and connections -------------------------------------------------------------------------------------
def test_half_open_connections_are_dropped_after_their_deadline(server):
    pid = server.proc.pid
    assert good_request(server).status_code == 200
    fds = open_fds(pid)
    opened = time.monotonic()
    half_heads = [raw_connection(server.url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
                  for _ in range(20)]
    silent = raw_connection(server.url)
    short_body = raw_connection(server.url, post_head("/v1/chat/completions", 1000) + b'{"messages": [')
    # a keep-alive connection that goes idle after its answer
    idle = raw_connection(server.url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    end = time.monotonic() + 60
    # held by the server (23, less the connection or two of the requests before that may still be closing)
    while open_fds(pid) < fds + 20:
        assert time.monotonic() < end, (open_fds(pid), fds)
        time.sleep(0.05)
    # good requests are served meanwhile, on both APIs
    for route in ROUTES:
        assert good_request(server, route).status_code == 200
    for s in (*half_heads, silent):
        assert read_until_closed(s) == b""  # closed without a word (socket.timeout after 60 s if never)
        s.close()
    assert time.monotonic() - opened >= HEADER_S  # by the deadline, not at once
    reply = read_until_closed(short_body)
    assert reply.startswith(b"HTTP/1.1 408 ") and b"connection: close" in reply.lower(), reply
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert "did not arrive" in body["error"]["message"], body
    assert read_until_closed(idle).startswith(b"HTTP/1.1 200 ")  # answered, then closed once idle
    for s in (short_body, idle):
        s.close()
    end = time.monotonic() + 60
    while open_fds(pid) > fds + 2:  # nothing lasting (a file or two the server may have opened meanwhile aside)
        assert time.monotonic() < end, (open_fds(pid), fds)
        time.sleep(0.1)


def test_a_client_leaving_mid_body_is_one_log_line(server):
    s = raw_connection(server.url, post_head("/api/chat", 1000) + b'{"messages": [')
    time.sleep(0.2)
    s.close()
    end = time.monotonic() + 60
    while not any(x["path"] == "/api/chat" and x["status"] == 499 for x in access_lines(server)[-5:]):
        assert time.monotonic() < end, server.log_text()[-2000:]
        time.sleep(0.05)
    log = server.log_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log


# -- browsers ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", (*ROUTES, "/api/show"))
def test_the_json_apis_take_only_application_json(server, route):
    body = good_request_body(route) if route != "/api/show" else json.dumps({"model": "toy"})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = post(server.url + route, content=body, headers=headers)
        message = assert_api_error(r, route, 415)
        assert "application/json" in message, message
    r = post(server.url + route, content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_a_foreign_origin_or_host_is_refused_and_the_page_still_works(server):
    url = server.url + "/v1/chat/completions"
    port = server.url.rsplit(":", 1)[1]
    for origin in ("http://evil.test", "null", f"http://evil.test:{port}", "http://localhost:3000"):
        for r in (post(url, json=HI, headers={"Origin": origin}),
                  post(url, content=json.dumps(HI), headers={"Origin": origin, "Content-Type": "text/plain"}),
                  get(server.url + "/v1/models", headers={"Origin": origin}),
                  options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST"})):
            assert_api_error(r, "/v1/chat/completions", 403)
            assert "access-control-allow-origin" not in r.headers
    # DNS rebinding: evil.test resolved to 127.0.0.1, so the page is same-origin with itself, but Host says so
    for host in (f"evil.test:{port}", "evil.test", f"127.0.0.1.evil.test:{port}", f"localhost.evil.test:{port}"):
        r = post(url, json=HI, headers={"Host": host, "Origin": f"http://{host}"})
        assert "Host" in assert_api_error(r, "/v1/chat/completions", 403)
        assert get(server.url + "/", headers={"Host": host}).status_code == 403
        assert "error" in post(server.url + "/api/chat", json=HI, headers={"Host": host}).json()
    # the chat page, from the server's own origin, under each loopback name
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost.:{port}", f"[::1]:{port}",
                 f"app.localhost:{port}"):
        page = get(server.url + "/", headers={"Host": host})
        assert page.status_code == 200 and "v1/chat/completions" in page.text
        # what its script sends: a same-origin POST (with Origin) of JSON
        r = post(url, json=HI, headers={"Host": host, "Origin": f"http://{host}"})
        assert r.status_code == 200, (host, r.text)
    # API clients send no Origin
    assert good_request(server).status_code == 200


def test_cors_origins_and_hosts_behind_a_proxy_when_given(bundle, tmp_path):
    with serving(bundle, tmp_path, "--cors", "http://app.test", "--allow-host", "llm.example", "--max-connections",
                 "6", "--header-timeout", str(HEADER_S), "--quiet") as s:
        url = s.url + "/v1/chat/completions"
        r = options(url, headers={"Origin": "http://app.test", "Access-Control-Request-Method": "POST",
                                        "Access-Control-Request-Headers": "content-type"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.test"
        r = post(url, json=HI, headers={"Origin": "http://app.test"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.test"
        assert post(url, json=HI, headers={"Origin": "http://evil.test"}).status_code == 403
        assert post(url, json=HI, headers={"Host": "llm.example"}).status_code == 200
        assert post(url, json=HI, headers={"Host": "other.example"}).status_code == 403
        # a cap on connections: beyond it uvicorn answers 503, until the deadline frees their places
        held = [raw_connection(s.url, b"GET /health HTTP/1.1\r\nHo") for _ in range(6)]
        assert get(s.url + "/health").status_code == 503
        for c in held:
            assert read_until_closed(c) == b""
            c.close()
        assert get(s.url + "/health").status_code == 200


# -- memory -------------------------------------------------------------------------------------------------------------
def _png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 48), random.Random(1).randbytes(64 * 48 * 3)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_rss_after_the_battery_stays_near_its_warm_value(server):
    pid = server.proc.pid
    url = server.url + "/v1/chat/completions"
    picture = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                         {"type": "image_url", "image_url": {"url": _png()}}]}],
               "max_tokens": 8}

    def warm_up():
        for _ in range(3):
            assert post(url, json=picture).status_code == 200
            assert post(url, json={**HI, "max_tokens": 8}).status_code == 200
            assert good_request(server, "/api/chat").status_code == 200

    warm_up()
    warm = proc_status_mb(pid, "VmRSS")
    for _ in range(3):
        for route in ROUTES:
            assert post(server.url + route, content=DEEP_ARRAY, headers=JSON).status_code == 400
        # bodies just under the 32 MB limit: a prompt of 30 MB, an "image" of 23 MB
        r = post(url, json={"messages": [{"role": "user", "content": "word " * (6 << 20)}]})
        assert r.status_code == 400
        junk = "data:image/png;base64," + base64.b64encode(random.Random(2).randbytes(23 << 20)).decode()
        r = post(url, json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": junk}}]}]})
        assert r.status_code == 400
        # over it: declared, and chunked
        c = raw_connection(server.url, post_head("/v1/chat/completions", 40 << 20))
        assert c.recv(65536).startswith(b"HTTP/1.1 413 ")
        c.close()
        chunk = b" " * (1 << 20)
        r = post(url, content=iter([b"{"] + [chunk] * 40), headers=JSON)
        assert r.status_code == 413
        r = post(url, json={"messages": "x"}, headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        # a client that leaves
        body = json.dumps(LONG["/v1/chat/completions"]).encode()
        c = raw_connection(server.url, post_head("/v1/chat/completions", len(body)) + body)
        time.sleep(0.3)
        c.close()
    end = time.monotonic() + 60
    while metric(metrics(server), "llava_edge_active_sequences"):
        assert time.monotonic() < end
        time.sleep(0.05)
    warm_up()
    after = proc_status_mb(pid, "VmRSS")
    assert after <= warm * 1.10, (warm, after)
