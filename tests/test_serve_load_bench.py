"""bench/serve_load.py's soak mixes bad requests in at 1 in 20, whatever a call's size.

The HTTP side is replaced (``ask`` and ``send_bad``): what is checked is how the
script schedules and counts requests, not a server.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from bench_script import load_bench_script


FAKE = SimpleNamespace(model="m", url="http://127.0.0.1:1")


@pytest.fixture(scope="module")
def serve_load():
    return load_bench_script("serve_load")


def test_soak_sends_one_bad_request_in_twenty(serve_load, monkeypatch):
    sent = {"good": 0, "bad": 0}
    monkeypatch.setattr(serve_load, "picture", lambda seed: "data:")

    def ask(server, image, question, model, max_tokens=None):
        sent["good"] += 1
        return {"ok": True, "ttft": 0.1, "total": 0.2, "chunks": 3, "finish": "length"}

    def send_bad(server, rng):
        sent["bad"] += 1
        return 400

    monkeypatch.setattr(serve_load, "ask", ask)
    monkeypatch.setattr(serve_load, "send_bad", send_bad)
    seed, totals = itertools.count(), {"requests": 0, "bad_requests": 0, "failed": 0}
    for _ in range(30):  # 30 calls of 4 clients x 4 requests, as the soak makes them
        r = serve_load.run_clients(FAKE, 4, 4, seed, bad_every=20, first_slot=totals["requests"] + 1)
        for k in totals:
            totals[k] += r[k]
        assert r["bad_not_4xx"] == []
    assert totals["requests"] == sent["good"] == 480 and totals["failed"] == 0
    assert totals["bad_requests"] == sent["bad"] == 480 // 19  # one before every 19th good request: 5.0% of all
    assert 0.048 <= sent["bad"] / (sent["bad"] + sent["good"]) <= 0.052


def test_load_runs_have_no_bad_requests(serve_load, monkeypatch):
    monkeypatch.setattr(serve_load, "picture", lambda seed: "data:")
    monkeypatch.setattr(serve_load, "ask", lambda *a, **k: {"ok": True, "ttft": 1.0, "total": 2.0, "chunks": 64,
                                                             "finish": "length"})
    monkeypatch.setattr(serve_load, "send_bad", lambda *a: pytest.fail("a bad request in a load run"))
    r = serve_load.run_clients(FAKE, 4, 3, itertools.count())
    assert r["requests"] == 12 and r["bad_requests"] == 0 and r["failed"] == 0
    assert r["tokens_per_s"] == pytest.approx(12 * 64 / r["wall_s"])
    assert r["ttft_p95_s"] == 1.0
