"""``serve``'s ``logprobs`` / ``top_logprobs`` (OpenAI's, and Ollama's equal entries), against the runtime's logits.

The server runs in a child process on the trained toy (as tests/test_serve.py); every log-probability it
gives is compared with the float64 log-softmax of the logits ``EdgeLLaVA`` computes in-process for the same
prompt and the same answer tokens, fed one at a time as ``chat`` decodes them.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serve_helpers import serving, user_message

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

QUESTIONS = ("Describe the image in detail.", "What color are the shapes?")
MAX = 32
TOL = 1e-4


@pytest.fixture(scope="module")
def toy(trained_bundle):
    return trained_bundle


@pytest.fixture(scope="module")
def server(toy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served_logprobs")
    with serving(toy[0], tmp, "--parallel", "2", "--model-name", "toy", "--ctx", "2048",
                 env={"LLAVA_EDGE_CACHE": str(tmp / "cache")}) as s:
        yield s
    assert s.proc.returncode == 0, s.log_text()


@pytest.fixture(scope="module")
def runtime(toy):
    """The in-process runtime, loaded as the server loads it (one sequence instead of two)."""
    from llava_edge import EdgeLLaVA

    m = EdgeLLaVA.load(toy[0], device="cpu", prefix_cache=False, n_ctx=2048)
    yield m
    m.close()


@pytest.fixture(scope="module")
def by_bytes(runtime):
    """Each piece of the vocabulary (as the server renders it) -> the token ids that have it."""
    from llava_edge.runtimes.serve.logprobs import Pieces

    pieces, out = Pieces(runtime.llm), {}
    for t in range(runtime.llm.n_vocab):
        out.setdefault(pieces(t), []).append(t)
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    return z - (z.max() + np.log(np.exp(z - z.max()).sum()))


def check_against_runtime(runtime, by_bytes, image, question, content: list, top: int, greedy: bool = True):
    """Walk the answer's tokens through the in-process runtime: at each position the served logprob and
    alternatives equal the log-softmax of the runtime's own logits. Returns (log-softmax, token) of each."""
    slots, prepared, _ = runtime.conversation_slots(question, str(image))
    runtime.llm.reset()
    logits = runtime.prefill(slots, runtime.encode(prepared)[0])
    seen = []
    for i, e in enumerate(content):
        lp = log_softmax(logits)
        ids = by_bytes[bytes(e.get("bytes", []))]
        token = min(ids, key=lambda t: abs(lp[t] - e["logprob"]))
        assert abs(lp[token] - e["logprob"]) < TOL, (i, e, lp[token])
        seen.append((lp, token))
        if greedy:
            assert token == int(np.argmax(logits)), (i, e)
        assert len(e["top_logprobs"]) == top
        want = np.sort(lp)[::-1][:top]
        assert np.allclose([t["logprob"] for t in e["top_logprobs"]], want, atol=TOL, rtol=0), (i, e)
        for t in e["top_logprobs"]:
            assert any(abs(lp[x] - t["logprob"]) < TOL for x in by_bytes[bytes(t.get("bytes", []))]), (i, t)
        if top and greedy:  # the most likely alternative is the token itself
            assert (e["top_logprobs"][0]["token"], e["top_logprobs"][0]["bytes"]) == (e["token"], e["bytes"])
            assert abs(e["top_logprobs"][0]["logprob"] - e["logprob"]) < 1e-12
        logits = runtime.llm.feed_tokens([token])
    return seen


def post(server, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(server.url + path, json={"model": "toy", **body}, timeout=300)


def stream_events(server, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={"model": "toy", "stream": True, **body},
                      timeout=300) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]


def joined(content: list[dict]) -> str:
    return b"".join(bytes(e["bytes"]) for e in content).decode("utf-8")


ENTRY = {"token", "logprob", "bytes", "top_logprobs"}
ALTERNATIVE = {"token", "logprob", "bytes"}


# -- OpenAI ------------------------------------------------------------------------------------------------------------
def test_greedy_logprobs_equal_the_runtimes_logits(server, toy, runtime, by_bytes):
    """Non-streaming and streaming, with the official client: top-1 is the greedy token, every number is the
    runtime's log-softmax, the entries are OpenAI's types and spell the answer."""
    from openai.types.chat import ChatCompletionTokenLogprob

    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    for image, q, top in ((toy[1][0], QUESTIONS[0], 5), (toy[1][1], QUESTIONS[1], 20), (toy[1][2], QUESTIONS[1], 0)):
        messages = [user_message(q, image)]
        r = c.chat.completions.create(model="toy", messages=messages, temperature=0, max_tokens=MAX, logprobs=True,
                                      top_logprobs=top)
        choice = r.choices[0]
        content = [e.model_dump() for e in choice.logprobs.content]
        assert all(isinstance(e, ChatCompletionTokenLogprob) for e in choice.logprobs.content)
        assert len(content) == r.usage.completion_tokens > 0
        assert joined(content).strip() == choice.message.content.strip()
        check_against_runtime(runtime, by_bytes, image, q, content, top)

        chunks = list(c.chat.completions.create(model="toy", messages=messages, temperature=0, max_tokens=MAX,
                                                logprobs=True, top_logprobs=top, stream=True))
        streamed = [e.model_dump() for ch in chunks if ch.choices and ch.choices[0].logprobs
                    for e in ch.choices[0].logprobs.content or []]
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == choice.message.content
        assert [(e["token"], e["bytes"]) for e in streamed] == [(e["token"], e["bytes"]) for e in content]
        for a, b in zip(streamed, content):  # the second request reuses the first's cells: equal within rounding
            assert abs(a["logprob"] - b["logprob"]) < TOL
            assert [t["bytes"] for t in a["top_logprobs"]] == [t["bytes"] for t in b["top_logprobs"]]

    # the raw JSON holds exactly OpenAI's fields
    raw = post(server, {"messages": [user_message(QUESTIONS[0], toy[1][0])], "temperature": 0, "max_tokens": 8,
                        "logprobs": True, "top_logprobs": 2}).json()
    lp = raw["choices"][0]["logprobs"]
    assert set(lp) == {"content", "refusal"} and lp["refusal"] is None
    for e in lp["content"]:
        assert set(e) == ENTRY and all(set(t) == ALTERNATIVE for t in e["top_logprobs"])
        assert isinstance(e["logprob"], float) and all(isinstance(b, int) for b in e["bytes"])


def test_sampled_tokens_get_the_models_logprobs_before_temperature(server, toy, runtime, by_bytes):
    """At temperature 1.5 and top_p 0.9 the chosen tokens' logprobs are those of the model's own distribution
    (OpenAI's and llama.cpp's meaning), not of the tempered one they were drawn from."""
    image, q = toy[1][3], QUESTIONS[0]
    body = {"messages": [user_message(q, image)], "temperature": 1.5, "top_p": 0.9, "seed": 7, "max_tokens": 24,
            "logprobs": True, "top_logprobs": 3}
    r = post(server, body).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] > 0
    seen = check_against_runtime(runtime, by_bytes, image, q, content, 3, greedy=False)
    tempered = [log_softmax(lp / 1.5)[token] for lp, token in seen]  # lp / T: the logits / T, shifted
    assert max(abs(t - e["logprob"]) for t, e in zip(tempered, content)) > 1e-3  # they are not the tempered ones
    # streamed, the same seed draws the same tokens, with the same numbers
    events = stream_events(server, body)
    streamed = [e for ev in events if ev["choices"] for e in (ev["choices"][0]["logprobs"] or {}).get("content") or []]
    assert [e["bytes"] for e in streamed] == [e["bytes"] for e in content]
    assert np.allclose([e["logprob"] for e in streamed], [e["logprob"] for e in content], atol=TOL, rtol=0)


def test_a_stop_string_leaves_its_tokens_out(server, toy):
    """The entries are the tokens with text in the content: a token all inside the stop string is left out,
    one that ends inside it is kept; streamed as whole."""
    image, q = toy[1][0], QUESTIONS[0]
    base = {"messages": [user_message(q, image)], "temperature": 0, "max_tokens": MAX, "logprobs": True}
    r = post(server, base).json()
    full, tokens = r["choices"][0]["message"]["content"], [e["token"] for e in r["choices"][0]["logprobs"]["content"]]

    def begins(i: int) -> int:  # where token i's text begins in the content
        return len("".join(tokens[:i]).lstrip())

    # a word of the answer whose token, and the end of it, appear first where the token stands
    at = next(i for i, t in enumerate(tokens) if i >= 2 and len(t.strip()) >= 4 and full.find(t) == begins(i)
              and full.find(t.strip()[2:]) == begins(i) + len(t) - len(t.strip()) + 2)
    word = tokens[at]
    for stop, kept in ((word, at), (word.strip()[2:], at + 1)):  # the whole token; the end of its word
        r = post(server, {**base, "stop": [stop]}).json()
        content = r["choices"][0]["message"]["content"]
        entries = r["choices"][0]["logprobs"]["content"]
        assert content == full[: full.index(stop)] and r["choices"][0]["finish_reason"] == "stop", (stop, content)
        assert [e["token"] for e in entries] == tokens[:kept], (stop, content)
        assert joined(entries).strip().startswith(content.strip())
        streamed = [e for ev in stream_events(server, {**base, "stop": [stop]}) if ev["choices"]
                    for e in (ev["choices"][0]["logprobs"] or {}).get("content") or []]
        assert [e["bytes"] for e in streamed] == [e["bytes"] for e in entries]


def test_without_logprobs_there_are_none(server, toy):
    """Not asked (or ``logprobs: false``): ``logprobs`` is null in the response and in every chunk, and a
    request that asks, answered in the same batch, changes nothing for one that does not."""
    image = toy[1][0]
    for extra in ({}, {"logprobs": False}, {"logprobs": None, "top_logprobs": None}):
        body = {"messages": [user_message(QUESTIONS[1], image)], "temperature": 0, "max_tokens": 8, **extra}
        r = post(server, body).json()
        assert "logprobs" in r["choices"][0] and r["choices"][0]["logprobs"] is None
        events = stream_events(server, body)
        assert all(ev["choices"][0]["logprobs"] is None for ev in events if ev["choices"])
    plain = {"messages": [user_message(QUESTIONS[0], toy[1][4])], "temperature": 0, "max_tokens": MAX}
    alone = post(server, plain).json()["choices"][0]["message"]["content"]
    asks = {**plain, "messages": [user_message(QUESTIONS[0], toy[1][5])], "logprobs": True, "top_logprobs": 20}
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda body: post(server, body).json(), [plain, asks])
    assert a["choices"][0]["message"]["content"] == alone and a["choices"][0]["logprobs"] is None
    assert len(b["choices"][0]["logprobs"]["content"]) == b["usage"]["completion_tokens"]


BAD = {
    "top_logprobs over 20": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "a negative top_logprobs": ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    "top_logprobs as text": ({"logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
    "a fractional top_logprobs": ({"logprobs": True, "top_logprobs": 2.5}, "top_logprobs"),
    "top_logprobs a boolean": ({"logprobs": True, "top_logprobs": True}, "top_logprobs"),
    "top_logprobs without logprobs": ({"top_logprobs": 2}, "top_logprobs"),
    "top_logprobs with logprobs false": ({"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    "logprobs as text": ({"logprobs": "yes"}, "logprobs"),
    "logprobs a number (the legacy API's)": ({"logprobs": 5}, "logprobs"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_logprobs_requests_are_one_line_400s(server, case):
    extra, param = BAD[case]
    r = post(server, {"messages": [{"role": "user", "content": "a"}], **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert param in err["message"] and "\n" not in err["message"], err
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="toy", messages=[{"role": "user", "content": "a"}], **extra)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_no_legacy_completions_route(server):
    """This server has no ``/v1/completions`` (so no legacy ``logprobs: int``): it is a 404 in OpenAI's form."""
    r = post(server, {"prompt": "a", "logprobs": 2}, "/v1/completions")
    assert r.status_code == 404 and "error" in r.json()


# -- Ollama --------------------------------------------------------------------------------------------------------
def test_ollama_logprobs_are_the_same_entries(server, toy, runtime, by_bytes):
    """``/api/chat`` and ``/api/generate`` with the official client: Ollama's top-level ``logprobs``, streamed
    per line and whole, equal to the runtime's log-softmax (and to OpenAI's entries)."""
    c = ollama.Client(host=server.url)
    image, q = toy[1][1], QUESTIONS[0]
    opts = {"temperature": 0, "num_predict": MAX}
    r = c.chat(model="toy", messages=[{"role": "user", "content": q, "images": [str(image)]}], options=opts,
               logprobs=True, top_logprobs=4)
    raw = post(server, {"messages": [{"role": "user", "content": q, "images": [_b64(image)]}], "options": opts,
                        "logprobs": True, "top_logprobs": 4, "stream": False}, "/api/chat").json()
    content = raw["logprobs"]
    assert len(content) == r.eval_count == len(r.logprobs) > 0
    assert [(e.token, len(e.top_logprobs)) for e in r.logprobs] == [(e["token"], 4) for e in content]
    assert np.allclose([e.logprob for e in r.logprobs], [e["logprob"] for e in content], atol=TOL, rtol=0)
    check_against_runtime(runtime, by_bytes, image, q, content, 4)
    parts = list(c.chat(model="toy", messages=[{"role": "user", "content": q, "images": [str(image)]}], options=opts,
                        logprobs=True, top_logprobs=4, stream=True))
    streamed = [e for p in parts for e in p.logprobs or []]
    assert [e.token for e in streamed] == [e["token"] for e in content]
    assert np.allclose([e.logprob for e in streamed], [e["logprob"] for e in content], atol=TOL, rtol=0)
    g = c.generate(model="toy", prompt=q, images=[str(image)], options=opts, logprobs=True, top_logprobs=4)
    assert g.response == r.message.content
    assert [e.token for e in g.logprobs] == [e["token"] for e in content]
    assert np.allclose([e.logprob for e in g.logprobs], [e["logprob"] for e in content], atol=TOL, rtol=0)
    o = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0).chat.completions.create(
        model="toy", messages=[user_message(q, image)], temperature=0, max_tokens=MAX, logprobs=True, top_logprobs=4)
    assert [e.token for e in o.choices[0].logprobs.content] == [e["token"] for e in content]
    # not asked: no logprobs at all, as Ollama answers
    plain = post(server, {"prompt": q, "options": opts, "stream": False}, "/api/generate").json()
    assert "logprobs" not in plain
    # top_logprobs 0: the token's own logprob, no alternatives (Ollama leaves the empty list out)
    zero = post(server, {"prompt": q, "options": {**opts, "num_predict": 4}, "stream": False, "logprobs": True,
                         "top_logprobs": 0}, "/api/generate").json()
    assert zero["logprobs"] and all(set(e) == {"token", "logprob", "bytes"} for e in zero["logprobs"])


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
@pytest.mark.parametrize("extra, words", [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                                          ({"logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
                                          ({"logprobs": "yes"}, "logprobs")])
def test_bad_ollama_logprobs_are_400s(server, path, extra, words):
    body = {"messages": [{"role": "user", "content": "a"}]} if path == "/api/chat" else {"prompt": "a"}
    r = post(server, {**body, **extra, "stream": False}, path)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"] and "\n" not in r.json()["error"]


def _b64(path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()
