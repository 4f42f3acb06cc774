"""bench/vs_transformers.py on the LLaVA-OneVision toy: both sides answer about the same positions, and the
script records what docs/BENCHMARKS.md quotes.

One round, a few tokens: nothing here is a timing claim.
"""

from __future__ import annotations

import json

import pytest

from bench_script import load_bench_script
from next_helpers import toy_bundle

NEW_TOKENS = 3


@pytest.fixture(scope="module")
def vs():
    return load_bench_script("vs_transformers")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_bundle(tmp_path_factory, "toy-onevision")


@pytest.fixture(scope="module")
def report(vs, toy, tmp_path_factory):
    model, bundle = toy
    out = tmp_path_factory.mktemp("vs_transformers")
    assert vs.main(["--model", str(model), "--bundle", str(bundle), "--out", str(out), "--rounds", "1",
                    "--threads", "2", "--variants", "fp32:f32", "--new-tokens", str(NEW_TOKENS)]) == 0
    return json.loads((out / "vs_transformers.json").read_text()), (out / "vs_transformers.md").read_text()


def test_both_sides_answer_about_the_same_positions(report, vs, toy):
    data, md = report
    ours = "llava-edge (fp32, f32)"
    tile = json.loads((toy[1] / "manifest.json").read_text())["vision"]["num_image_tokens"]
    one, two = data["scenes"]["one"], data["scenes"]["two"]
    for s in (one, two):
        # transformers' count is what its own image path produced, not the prompt's: they agree with llava-edge's
        assert set(s["image_positions"]) == {vs.HF, ours}
        assert s["image_positions"][vs.HF] == s["image_positions"][ours]
        assert s["prompt_positions"][vs.HF] == s["prompt_positions"][ours] > s["image_positions"][ours]
        # no saved prefix: llava-edge decodes the whole prompt, as transformers does
        assert s["llava_edge_decoded_positions"][ours] == [s["prompt_positions"][ours]] * 2
        # end of sequence ignored on both sides: every answer has its full length
        assert all(n == NEW_TOKENS for runs in s["tokens_answered"].values() for n in runs)
    # one picture is tiled; two pictures in one prompt are one tile and one newline each
    assert one["image_positions"][ours] > tile + 1
    assert two["image_positions"][ours] == 2 * (tile + 1)
    assert data["transformers"]["dtype"] == "float32"


def test_ratios_and_report(report, vs):
    data, md = report
    ours = "llava-edge (fp32, f32)"
    for scene, s in data["scenes"].items():
        assert all(len(v) == 1 for v in s["ttft_s"].values())
        assert s["ttft_ratio_vs_transformers"][ours] == pytest.approx(
            s["median_ttft_s"][ours] / s["median_ttft_s"][vs.HF])
        assert s["decode_ratio_vs_transformers"][ours] == pytest.approx(
            s["median_decode_tokens_per_s"][ours] / s["median_decode_tokens_per_s"][vs.HF])
        assert set(s["phases_median_s"][vs.HF]) == set(s["phases_median_s"][ours]) == {
            "preprocess", "vision_encode", "prefill"}
        assert s["phases_median_s"][ours]["vision_encode"] > 0 < s["phases_median_s"][vs.HF]["vision_encode"]
        assert f"Scene `{scene}`" in md and f"| {ours} |" in md


@pytest.mark.parametrize("args, says", [(["--scenes", "three"], "--scenes"), (["--variants", "int8"], "--variants"),
                                        (["--variants", "int8:q8_0:q4"], "--variants")])
def test_bad_arguments_are_refused_in_one_line(vs, toy, tmp_path, capsys, args, says):
    model, bundle = toy
    with pytest.raises(SystemExit):
        vs.main(["--model", str(model), "--bundle", str(bundle), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert "error:" in err[-1] and says in err[-1]
    assert not (tmp_path / "o").exists()
