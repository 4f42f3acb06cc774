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


# -- LLaVA-NeXT: a tiled picture, llava-edge's exact positions against llama.cpp's, and the --image-tokens cap ------

CAP = 100  # below the toy's exact count for the benchmark picture, above one tile's 64


@pytest.fixture(scope="module")
def next_toy(tmp_path_factory):
    """``toy model --preset toy-next`` (112 px tiles, patch 14, LLaVA-1.6's five grids) and its bundle: ONNX,
    f32 GGUF and the LLaVA-NeXT mmproj."""
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.export.bundle import export_bundle
    from llava_edge.toy.model import write_toy_model

    model = write_toy_model(tmp_path_factory.mktemp("sbs_next") / "model", preset="toy-next", seed=0)
    out = tmp_path_factory.mktemp("sbs_next_bundle") / "b"
    export_bundle(open_checkpoint(model), out, log=lambda _: None)
    return model, out


@pytest.fixture(scope="module")
def next_report(side_by_side, next_toy, tmp_path_factory):
    model, bundle = next_toy
    out = tmp_path_factory.mktemp("sbs_next_out")
    assert side_by_side.main(["--model", str(model), "--bundle", str(bundle), "--out", str(out),
                              "--sections", "vision,ttft,decode,followup", "--rounds", "1", "--threads", "2",
                              "--llm", "f32", "--ttft-vision", "fp32", "--mmproj", "f32",
                              "--image-tokens", str(CAP), "--decode-tokens", "2"]) == 0
    return json.loads((out / "side_by_side.json").read_text()), (out / "side_by_side.md").read_text()


@pytest.fixture(scope="module")
def next_counts(next_toy):
    """(llava-edge's exact positions, llama.cpp's predicted ones, its tiles) for the 640x480 benchmark picture."""
    import llava_edge.export.mmproj_gguf as mmproj_gguf
    from llava_edge import anyres
    from llava_edge.bench import BENCH_IMAGE_SIZE
    from llava_edge.checkpoint import open_checkpoint

    ckpt = open_checkpoint(next_toy[0])
    spec = mmproj_gguf.anyres_settings(ckpt)
    w, h = BENCH_IMAGE_SIZE
    rows, cols = mmproj_gguf.llama_cpp_grid(w, h, spec.tile, mmproj_gguf.llama_cpp_pinpoints(spec))
    theirs = mmproj_gguf.llama_cpp_positions(w, h, spec.tile, spec.patch, mmproj_gguf.llama_cpp_pinpoints(spec))
    return anyres.num_positions(w, h, spec), theirs, 1 + rows * cols


def test_next_vision_race_encodes_every_tile_on_both_sides(next_report, next_counts):
    data, md = next_report
    ours, theirs, tiles = next_counts
    v = data["vision"]
    assert data["family"] == v["family"] == "llava-next" and v["image"] == "640x480 JPEG"
    clip = "llama.cpp CLIP f32"
    assert tiles > 1 and v["tiles"] == {"llava-edge": tiles, clip: tiles}
    assert v["positions"] == {"llava-edge": ours, clip: theirs} and ours != theirs
    assert tuple(v["grid"]) != (0, 0) and (1 + v["grid"][0] * v["grid"][1]) == tiles
    # the fp32 graph on all tiles as one batch equals Hugging Face's per-tile features
    assert v["quality_vs_hf"]["fp32"]["passes"] and v["best_gated_onnx"] == "fp32"
    assert set(v["median_s"]) == {"ONNX fp32", clip, "PyTorch eager (HF, cpu)"}
    assert v["ratio_best_vs_llama_cpp"] == pytest.approx(v["median_s"]["ONNX fp32"] / v["median_s"][clip])
    assert f"{clip} {tiles} tile(s), {theirs} positions" in md


def test_next_ttft_race_records_exact_capped_and_llama_cpp_positions(next_report, next_counts):
    data, md = next_report
    ours, theirs, tiles = next_counts
    td = data["ttft_decode"]
    t = td["llm"]["f32"]["ttft"]
    exact, capped = "llava-edge (fp32)", f"llava-edge (fp32, --image-tokens {CAP})"
    assert td["llama_cpp_handler"] == "Llava16ChatHandler" and td["image_tokens"] == [CAP]
    assert td["llama_cpp_image"] == {"tiles": tiles, "positions": theirs,
                                     "positions_per_tile": [theirs // tiles] * tiles}
    assert t["skipped"] == {} and capped in t["seconds"] and exact in t["seconds"]
    pos = t["image_positions"]
    assert pos[exact] == ours and pos["llama.cpp"] == theirs and ours < theirs
    assert pos[capped] <= CAP < ours
    # the image and the text around it: llama.cpp's prompt holds every one of its image positions
    for name in (exact, capped, "llama.cpp"):
        assert t["prompt_positions"][name] == pos[name] + t["text_positions"][name]
        assert 5 < t["text_positions"][name] < 80
    assert t["prompt_positions"][capped] < t["prompt_positions"][exact] < t["prompt_positions"]["llama.cpp"]
    assert t["ratios_vs_llama_cpp"][capped] == pytest.approx(t["median_s"][capped] / t["median_s"]["llama.cpp"])
    assert f"| {capped} |" in md and "Llava16ChatHandler" in md


def test_next_decode_and_followup_run_on_the_tiled_prompt(next_report, next_counts):
    data, _ = next_report
    ours, _, _ = next_counts
    res = data["ttft_decode"]["llm"]["f32"]
    assert res["decode"]["depth"] > ours and res["decode"]["tokens_per_s"]["llava-edge"] > 0
    f = res["followup"]
    assert f["positions_in_context"]["llava-edge (fp32)"] > ours
    assert f["positions_in_context"]["llama.cpp"] > next_counts[1]


def test_a_one_tile_family_without_reduced_variants_skips_the_cap_with_its_reason(side_by_side, toy_model, bundle,
                                                                                    tmp_path):
    out = tmp_path / "sbs"
    assert side_by_side.main(["--model", str(toy_model), "--bundle", str(bundle), "--out", str(out),
                              "--sections", "vision,ttft", "--rounds", "1", "--threads", "2", "--llm", "f32",
                              "--ttft-vision", "fp32", "--mmproj", "f32", "--ctx", "1024", "--image-tokens", "16",
                              "--ttft-new-picture-only"]) == 0
    data = json.loads((out / "side_by_side.json").read_text())
    v, td = data["vision"], data["ttft_decode"]
    n = json.loads((bundle / "manifest.json").read_text())["vision"]["num_image_tokens"]
    size = json.loads((bundle / "manifest.json").read_text())["vision"]["image_size"]
    assert v["image"] == f"{size}x{size} PNG" and v["grid"] is None
    assert v["tiles"] == {"llava-edge": 1, "llama.cpp CLIP f32": 1}
    assert v["positions"] == {"llava-edge": n, "llama.cpp CLIP f32": n}
    assert td["llama_cpp_handler"] == "Llava15ChatHandler"
    t = td["llm"]["f32"]["ttft"]
    assert set(t["seconds"]) == {"llava-edge (fp32)", "llama.cpp"}
    assert t["image_positions"] == {"llava-edge (fp32)": n, "llama.cpp": n}
    assert "16 image tokens" in t["skipped"]["--image-tokens 16"]
    assert "Not raced, --image-tokens 16:" in (out / "side_by_side.md").read_text()
