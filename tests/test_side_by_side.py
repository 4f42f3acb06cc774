"""bench/side_by_side.py on the toy bundle: the races run and record what docs/BENCHMARKS.md quotes.

One round each, so nothing here is a timing claim; what is checked is what the
script measures (which positions each pipeline evaluates, the ratios it derives).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench_script import load_bench_script


@pytest.fixture(scope="module")
def side_by_side():
    return load_bench_script("side_by_side")


@pytest.fixture(scope="module")
def report(side_by_side, toy_model, bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("sbs")
    assert side_by_side.main(["--model", str(toy_model), "--bundle", str(bundle), "--out", str(out),
                              "--sections", "ttft,followup", "--rounds", "1", "--threads", "2",
                              "--llm", "f32", "--ttft-vision", "fp32", "--mmproj", "f32", "--ctx", "1024"]) == 0
    return json.loads((out / "side_by_side.json").read_text()), (out / "side_by_side.md").read_text()


def test_a_follow_up_decodes_only_the_new_turn_while_llama_cpp_evaluates_everything_again(report, side_by_side):
    data, md = report
    f = data["ttft_decode"]["llm"]["f32"]["followup"]
    ours, theirs = "llava-edge (fp32)", "llama.cpp"
    n_image = json.loads((Path(data["bundle"]) / "manifest.json").read_text())["vision"]["num_image_tokens"]
    # llava-edge: the system prompt and the image stay cached; it decodes the new turn (and the first answer
    # again where the untrained toy's answer, re-tokenized from its text as LLaVA's chat does, gives other ids)
    decoded = f["llava_edge_decoded_positions"]
    assert len(decoded) == 2 and all(0 < d < side_by_side.ANSWER_TOKENS + 40 for d in decoded), decoded
    assert f["positions_in_context"][ours] > n_image + max(decoded)
    # llama.cpp's handler re-evaluates the whole conversation, image included
    assert f["positions_in_context"][theirs] > n_image
    assert set(f["seconds"]) == {ours, theirs} and all(len(v) == 1 for v in f["seconds"].values())
    assert f["ratios_vs_llama_cpp"][ours] == pytest.approx(f["median_s"][ours] / f["median_s"][theirs])
    assert f["first_answers"]["llama.cpp"] and f["answer_tokens"] == side_by_side.ANSWER_TOKENS
    assert "Follow-up question about the same image" in md and "image encoded again" in md


def test_the_first_turn_race_records_phases_and_positions(report):
    data, md = report
    t = data["ttft_decode"]["llm"]["f32"]["ttft"]
    ours, warm = "llava-edge (fp32)", "llava-edge (fp32, warm process, new image)"
    first = "llava-edge (fp32, nothing saved)"
    seen = "llava-edge (fp32, image seen before, new process)"
    assert set(t["prompt_positions"]) == {ours, first, warm, seen, "llama.cpp"}
    assert set(t["phases_median_s"][ours]) == {"preprocess_ms", "vision_encode_ms", "tokenize_ms", "prefill_ms"}
    assert t["ratios_vs_llama_cpp"][ours] == pytest.approx(t["median_s"][ours] / t["median_s"]["llama.cpp"])
    n = t["prompt_positions"][ours]
    n_image = json.loads((Path(data["bundle"]) / "manifest.json").read_text())["vision"]["num_image_tokens"]
    # an empty KV cache, nothing saved: every prompt position is decoded
    assert t["llava_edge_decoded_positions"][first] == [n, n]
    # an empty KV cache with the beginning saved by an earlier pass: the image and what follows it
    n_kept = n - t["llava_edge_decoded_positions"][ours][-1]
    assert n_kept >= 8 and t["llava_edge_decoded_positions"][ours][-1] > n_image
    # a warm process asked about a new image keeps the same beginning in its KV cache
    assert t["prompt_positions"][warm] == n
    assert t["llava_edge_decoded_positions"][warm][1:] == [n - n_kept], t
    # a picture seen before: its untimed first question saved the KV cache through the image; the timed
    # round loads it, runs no vision graph and decodes its own question only
    warmup, timed = t["llava_edge_decoded_positions"][seen]
    assert t["prompt_positions"][seen] == n and warmup > n_image and 0 < timed <= n - n_kept - n_image
    assert t["phases_median_s"][seen]["vision_encode_ms"] == 0 < t["phases_median_s"][ours]["vision_encode_ms"]
    assert "Time to first token" in md and "decoded)" in md and "image seen before" in md
