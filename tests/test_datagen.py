"""``data generate``, ``data captions`` and ``eval judge`` against a real OpenAI-compatible server.

The server is ``llava-edge serve`` on the trained toy, started by the tests on loopback:
a model that writes badly (it knows only its shape scenes), so most answers are
rejected, and that is tested as such. Records it does write well enough (descriptions)
train (``train stage2`` runs a step on them).
"""

from __future__ import annotations

import http.server
import json
import signal
import socketserver
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
from serve_helpers import metric, serving

from llava_edge.datagen.kinds import KINDS, Rejected, load_prompts, parse
from llava_edge.datagen.sources import read_coco
from llava_edge.judge import parse_scores

CODE = "import sys; from llava_edge.cli import main; sys.exit(main(sys.argv[1:]))"


def le(*args, timeout=600):
    return subprocess.run([sys.executable, "-c", CODE, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def server(trained_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datagen-serve")
    with serving(trained_bundle[0], tmp, "--parallel", "2", "--ctx", "8192", "--model-name", "toy", "--quiet",
                 env={"LLAVA_EDGE_CACHE": str(tmp / "cache")}) as s:
        yield s


def write_coco(folder, images, captions=None):
    """COCO-format captions and instances for ``images`` (640x480 declared), as COCO publishes them."""
    ims = [{"id": i + 1, "file_name": p.name, "width": 640, "height": 480} for i, p in enumerate(images)]
    caps = [{"id": 100 + i, "image_id": i + 1, "caption": (captions or ["Some shapes on a light background."])[
        i % len(captions or [0])]} for i in range(len(images))]
    inst = [{"id": 200 + i, "image_id": i + 1, "bbox": [64, 48, 128, 96], "category_id": 7}
            for i in range(len(images))]
    (folder / "captions.json").write_text(json.dumps({"images": ims, "annotations": caps}))
    (folder / "instances.json").write_text(json.dumps({"images": ims, "annotations": inst,
                                                       "categories": [{"id": 7, "name": "shape"}]}))
    return folder / "captions.json", folder / "instances.json"


# -- inputs and prompts, as specified ------------------------------------------------------------------------------
def test_coco_boxes_become_corners_from_0_to_1_with_3_decimals(tmp_path, trained_bundle):
    caps, inst = write_coco(tmp_path, trained_bundle[1][:2], ["A cat.", "A dog."])
    pics = read_coco(caps, inst)
    assert [p.image for p in pics] == [p.name for p in trained_bundle[1][:2]]
    assert pics[0].captions == ["A cat."] and pics[0].boxes == [("shape", [0.1, 0.1, 0.3, 0.3])]
    assert pics[0].context() == "Captions:\nA cat.\n\nObjects:\nshape: [0.100, 0.100, 0.300, 0.300]"


def test_each_kind_is_asked_with_its_system_prompt_and_few_shot_exchange(tmp_path):
    prompts = load_prompts(list(KINDS))
    for kind, p in prompts.items():
        msgs = p.messages("Captions:\nA cat.")
        assert msgs[0] == {"role": "system", "content": p.system} and msgs[-1] == {"role": "user",
                                                                                   "content": "Captions:\nA cat."}
        assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * len(p.examples) and p.examples
        for ctx, response in p.examples:  # the built-in examples pass their own checks
            parse(kind, response)
    r = le("data", "generate", "--out", tmp_path / "x.json", "--kinds", "detail,reasoning", "--show-prompts")
    assert r.returncode == 0 and prompts["detail"].system in r.stdout and prompts["reasoning"].system in r.stdout
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("kind,text,reason", [
    ("conversation", "", "empty"),
    ("conversation", "There are three shapes.", "format"),
    ("conversation", "Q: How many?\nQ: Why?", "format"),
    ("conversation", "Q: What is in the caption?\nA: A cat.", "mentions_context"),
    ("conversation", "Q: Where is it?\nA: At [0.1, 0.2], by the coordinates.", "mentions_context"),
    ("conversation", "USER: hi\nASSISTANT: hello", "format"),
    ("reasoning", "Q: a?\nA: b because of many reasons that are long enough to count.\nQ: c?\nA: d", "format"),
    ("reasoning", "Q: Why?\nA: Because.", "too_short"),
    ("detail", "Q: What?\nA: This is a description that is long enough to pass the bound but has turns.", "format"),
    ("detail", "A cat.", "too_short"),
    ("detail", "x" * 4000, "too_long"),
])
def test_a_bad_answer_is_rejected_with_its_reason(kind, text, reason):
    with pytest.raises(Rejected) as e:
        parse(kind, text)
    assert e.value.reason == reason


def test_answers_in_format_are_read_into_turns():
    assert parse("conversation", "**Q1:** How many dogs?\n**A1:** Two.\nQuestion: Colors?\nAnswer: Brown and white.") \
        == [("How many dogs?", "Two."), ("Colors?", "Brown and white.")]
    text = "The picture shows a bright kitchen with a wooden table and two chairs beside it."
    assert parse("detail", text) == [("", text)]


# -- generate against the server ---------------------------------------------------------------------------------
def test_generate_rejects_and_counts_what_a_bad_writer_writes_and_resumes_without_redoing(server, trained_bundle,
                                                                                         tmp_path):
    caps, inst = write_coco(tmp_path, trained_bundle[1][:4])
    out = tmp_path / "data.json"
    args = ("data", "generate", "--captions", caps, "--instances", inst, "--images", trained_bundle[1][0].parent,
            "--llm", server.url + "/v1", "--model", "toy", "--out", out, "--max-tokens", "64", "--parallel", "3")
    r = le(*args)
    assert r.returncode == 0, r.stderr
    journal = [json.loads(x) for x in (tmp_path / "data.json.journal.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in journal) == sorted(f"{i}/{k}" for i in range(1, 5) for k in KINDS)
    assert all(e["tokens_in"] > 0 and e["tokens_out"] > 0 for e in journal)
    # the toy writes no Q:/A: conversation: every one rejected with its reason, none crashed
    conv = [e for e in journal if e["kind"] == "conversation"]
    assert all(e["status"] == "rejected" and e["reason"] for e in conv)
    kept = [e["record"] for e in journal if e["status"] == "kept"]
    records = json.loads(out.read_text())
    assert {r["id"] for r in records} <= {r["id"] for r in kept}
    assert "conversation: 4 requested, 0 kept, 4 rejected (" in r.stderr, r.stderr
    before = httpx.get(server.url + "/metrics").text
    again = le(*args)  # nothing left to do: no request, the same output
    assert again.returncode == 0, again.stderr
    assert metric(httpx.get(server.url + "/metrics").text, "llava_edge_requests_total") == \
        metric(before, "llava_edge_requests_total")
    assert json.loads(out.read_text()) == records


STALL_AFTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from llava_edge.datagen.llm import Endpoint

    marker, allowed = Path(sys.argv[1]), int(sys.argv[2])
    real, calls = Endpoint.complete, [0]

    def complete(self, *args, **kw):
        calls[0] += 1
        if calls[0] > allowed:
            marker.write_text(str(calls[0]))
            time.sleep(3600)  # killed here, before this request goes out
        return real(self, *args, **kw)

    Endpoint.complete = complete
    from llava_edge.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def test_an_interrupted_run_resumes_without_duplicates_and_its_output_trains(server, trained_bundle, tmp_path,
                                                                            trained_toy):
    # the toy writes its long description when the picture's notes ask for one; the same answer for every
    # picture, so all but one are duplicates
    prompts = tmp_path / "prompts" / "detail"
    prompts.mkdir(parents=True)
    (prompts / "system.txt").write_text("Describe the image in detail.")
    (prompts / "examples.json").write_text("[]")
    images = trained_bundle[1][0].parent
    pics = sorted(images.glob("eval_*.png"))[:40]
    caps, inst = write_coco(tmp_path, pics, ["Describe the image in detail."])
    out = tmp_path / "detail.json"
    args = ["data", "generate", "--captions", str(caps), "--images", str(images),
            "--llm", server.url + "/v1", "--model", "toy", "--out", str(out), "--kinds", "detail", "--prompts",
            str(tmp_path / "prompts"), "--temperature", "0", "--parallel", "1", "--max-tokens", "64"]
    journal, stalled = tmp_path / "detail.json.journal.jsonl", tmp_path / "stalled"
    # the run stops before its 6th request and is killed there, whatever this machine's speed: one request at a
    # time, so 5 items are journaled by then, and none after
    p = subprocess.Popen([sys.executable, "-c", STALL_AFTER, str(stalled), "5", *args], stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 600  # only stops a hang: 5 answers of the toy take seconds
    while not stalled.exists():
        if p.poll() is not None:
            pytest.fail(f"data generate ended before its 6th request: {p.stderr.read()}")
        assert time.monotonic() < deadline, "data generate never reached its 6th request"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    first = journal.read_text().count("\n")
    assert first == 5 and not out.exists()
    r = le(*args)
    assert r.returncode == 0, r.stderr
    keys = [json.loads(x)["key"] for x in journal.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len(pics)  # everything once: nothing redone, nothing twice
    records = json.loads(out.read_text())
    assert len(records) == 1 and f"1 kept, 0 rejected, {len(pics) - 1} duplicates" in r.stderr  # the same words
    rec = records[0]
    assert rec["conversations"][0]["value"].count("<image>") == 1 and rec["conversations"][1]["from"] == "gpt"
    root, _ = trained_toy
    t = le("train", "stage2", "--model", root / "model", "--data", out, "--image-folder", images, "--output",
           tmp_path / "trained", "--preset", "toy", "--max-steps", "1", "--global-batch", "1",
           "--per-device-batch", "1")
    assert t.returncode == 0, t.stderr
    assert (tmp_path / "trained").is_dir()


def test_overload_and_timeouts_are_retried(trained_bundle, tmp_path):
    """One sequence and no queue: parallel requests get 503 with Retry-After and are retried until they pass;
    a request timeout too short for any answer is retried, then counted as failed, not journaled."""
    caps, inst = write_coco(tmp_path, trained_bundle[1][:6])
    with serving(trained_bundle[0], tmp_path, "--parallel", "1", "--queue", "0", "--ctx", "8192",
                 "--quiet") as s:
        out = tmp_path / "a.json"
        # the last of the six is turned away (Retry-After: 1 s) while the five before it are answered one at a
        # time: the most retries the command allows, so that a slow machine's longer answers do not run it out
        r = le("data", "generate", "--captions", caps, "--llm", s.url, "--model", "toy", "--out", out, "--kinds",
               "conversation", "--max-tokens", "48", "--parallel", "6", "--retries", "100")
        assert r.returncode == 0, r.stderr
        journal = [json.loads(x) for x in (tmp_path / "a.json.journal.jsonl").read_text().splitlines()]
        assert len(journal) == 6 and sum(e["retries"] for e in journal) > 0
        r = le("data", "generate", "--captions", caps, "--llm", s.url, "--model", "toy", "--out", tmp_path / "b.json",
               "--kinds", "detail", "--request-timeout", "0.001", "--retries", "2", "--parallel", "2")
        assert r.returncode == 0, r.stderr
        assert "failed (retried on the next run)" in r.stderr
        assert (tmp_path / "b.json.journal.jsonl").read_text() == ""
        assert json.loads((tmp_path / "b.json").read_text()) == []


def test_429_is_retried_after_its_retry_after(tmp_path):
    """Hosted APIs answer 429 with Retry-After when rate-limited: waited for, then retried."""
    from llava_edge.datagen.llm import Endpoint

    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["content-length"]))
            calls.append(time.monotonic())
            if len(calls) < 3:
                self.send_response(429)
                self.send_header("Retry-After", "0.2")
                self.end_headers()
                return
            body = json.dumps({"choices": [{"message": {"content": "ok"}}],
                               "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), Handler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        c = Endpoint(f"http://127.0.0.1:{web.server_address[1]}/v1", "m", max_retries=5)
        done = c.complete([{"role": "user", "content": "hi"}])
        web.shutdown()
    assert done.text == "ok" and done.retries == 2 and done.prompt_tokens == 3
    assert calls[1] - calls[0] >= 0.19 and calls[2] - calls[1] >= 0.19


# -- captions ----------------------------------------------------------------------------------------------------
def test_captions_become_stage1_records(tmp_path, trained_bundle):
    caps, _ = write_coco(tmp_path, trained_bundle[1][:3], ["A red square.", "Two circles.", "A triangle."])
    r = le("data", "captions", "--in", caps, "--out", tmp_path / "s1.json")
    assert r.returncode == 0, r.stderr
    from llava_edge.datagen.captions import BRIEF

    recs = json.loads((tmp_path / "s1.json").read_text())
    assert [x["conversations"][1]["value"] for x in recs] == ["A red square.", "Two circles.", "A triangle."]
    for x in recs:
        human = x["conversations"][0]["value"]
        assert human.count("<image>") == 1 and human.replace("<image>", "").strip() in BRIEF
    (tmp_path / "pairs.jsonl").write_text('{"image": "a.png", "caption": "A cat."}\n')
    assert le("data", "captions", "--in", tmp_path / "pairs.jsonl", "--out", tmp_path / "s2.json").returncode == 0
    bad = le("data", "captions", "--in", tmp_path / "nothing.json", "--out", tmp_path / "s3.json")
    assert bad.returncode == 2 and bad.stderr.startswith("error: input not found")


# -- the judge -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,scores", [
    ("8 7\nAssistant 1 is more detailed.", (8, 7)),
    ("8, 6.5\nBoth fine.", (8, 6.5)),
    ("**9 10**", (9, 10)),
    ("Scores: 7/10 and 4/10. The second misses the dog.", (7, 4)),
    ("Assistant 1 receives a score of 8, and Assistant 2 a 6, because ...", (8, 6)),
    ("I would rate them as follows.\nAssistant 1: 9\nAssistant 2: 3\nExplanation ...", (9, 3)),
    ("Here is my assessment.\n\n10 9\n\nBoth are good.", (10, 9)),
    ("The first answer is good, the second poor.", None),
    ("", None),
])
def test_judge_scores_are_read_from_free_form_text(text, scores):
    assert parse_scores(text) == scores


def test_judge_end_to_end_is_resumable_and_reports(server, trained_bundle, tmp_path):
    images = trained_bundle[1][:4]
    qs = [{"question_id": i, "image": p.name, "text": q, "category": c} for i, (p, q, c) in enumerate(zip(
        images, ["What color are the shapes?", "Describe the image in detail.", "How many shapes are there?",
                 "Why might the shapes be arranged like this?"], ["conv", "detail", "conv", "complex"]))]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in qs) + "\n")
    (tmp_path / "ref.jsonl").write_text("\n".join(json.dumps({"question_id": q["question_id"],
                                                              "text": "A reference answer."}) for q in qs) + "\n")
    (tmp_path / "ctx.jsonl").write_text("\n".join(json.dumps({"image": p.name, "caption": ["Shapes."]})
                                                  for p in images) + "\n")
    args = ("eval", "judge", "--bundle", trained_bundle[0], "--questions", tmp_path / "q.jsonl", "--references",
            tmp_path / "ref.jsonl", "--context", tmp_path / "ctx.jsonl", "--images", images[0].parent, "--judge",
            server.url + "/v1", "--judge-model", "toy", "--report", tmp_path / "report", "--max-tokens", "48")
    r = le(*args)
    assert r.returncode == 0, r.stderr
    report = tmp_path / "report"
    reviews = [json.loads(x) for x in (report / "reviews.jsonl").read_text().splitlines()]
    assert len(reviews) == 4 and {x["category"] for x in reviews} == {"conversation", "detail", "reasoning"}
    answers = [json.loads(x) for x in (report / "answers.jsonl").read_text().splitlines()]
    from llava_edge import EdgeLLaVA

    m = EdgeLLaVA.load(trained_bundle[0], device="cpu", prefix_cache=False)
    want = {str(q["question_id"]): m.chat(images[i], q["text"], max_tokens=48) for i, q in enumerate(qs)}
    m.close()
    assert {a["key"]: a["answer"] for a in answers} == want  # the bundle's answers, as `chat` gives them
    summary = json.loads((report / "summary.json").read_text())
    # the toy judge writes no scores: counted as unreadable, not averaged, not crashed on
    assert summary["unparsed"] == sum(1 for x in reviews if x["scores"] is None)
    assert "| overall |" in (report / "report.md").read_text()
    before = httpx.get(server.url + "/metrics").text
    assert le(*args).returncode == 0  # resumed: nothing asked again
    assert metric(httpx.get(server.url + "/metrics").text, "llava_edge_requests_total") == \
        metric(before, "llava_edge_requests_total")


def test_relative_scores_per_category_and_the_report(tmp_path):
    from llava_edge.judge import summarize, write_report

    rows = [{"category": "conversation", "scores": [8, 6]}, {"category": "conversation", "scores": [6, 6]},
            {"category": "detail", "scores": [10, 5]}, {"category": "reasoning", "scores": None}]
    s = summarize(rows)
    assert s["categories"]["conversation"] == {"questions": 2, "scored": 2, "reference": 7, "model": 6,
                                               "relative": 85.7}
    assert s["categories"]["detail"]["relative"] == 50.0 and s["categories"]["reasoning"]["scored"] == 0
    assert s["overall"]["relative"] == round(100 * (17 / 3) / 8, 1) and s["unparsed"] == 1
    write_report(tmp_path, s, rows)
    assert "| conversation | 2 | 2 | 6 | 7 | 85.7% |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "summary.json").read_text()) == s
