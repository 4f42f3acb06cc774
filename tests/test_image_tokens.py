"""Fewer image tokens: the reductions, the spliced vision graphs, their variants, the runtime, drift and the
recovery fine-tune, on the toy (an 8x8 patch grid: 64 image tokens)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cli_run import assert_one_line_error, le
from llava_edge.errors import UserError
from llava_edge.image_tokens import TokenReduction, plan, pool_shape
from llava_edge.quality import token_cosine


# ---- the reductions ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,grid,shape", [(16, 8, (4, 4)), (32, 8, (4, 8)), (144, 24, (12, 12)),
                                                (64, 24, (8, 8)), (192, 24, (8, 24)), (36, 24, (6, 6))])
def test_pooling_takes_the_most_nearly_square_grid_dividing_the_patches(tokens, grid, shape):
    assert pool_shape(tokens, grid) == shape
    assert plan("pool", tokens, grid).pool == shape


@pytest.mark.parametrize("tokens,dominant,contextual", [(64, 54, 10), (128, 108, 20), (192, 162, 30), (16, 14, 2),
                                                         (32, 27, 5), (2, 1, 1)])
def test_dominant_selection_keeps_about_five_sixths(tokens, dominant, contextual):
    r = plan("dominant", tokens, 24 if tokens > 60 else 8)
    assert (r.dominant, r.contextual) == (dominant, contextual)  # VisionZip's 54 + 10 of 64 on LLaVA-1.5


@pytest.mark.parametrize("method,tokens,words", [("pool", 20, "cannot pool"), ("pool", 64, "from 1 to 63"),
                                                 ("pool", 0, "from 1 to 63"), ("merge", 16, "unknown"),
                                                 ("dominant", 1, "at least 2")])
def test_impossible_reductions_are_one_line_errors(method, tokens, words):
    with pytest.raises(UserError, match=words):
        plan(method, tokens, 8)


def test_the_record_reads_back():
    r = plan("dominant", 16, 8)
    assert TokenReduction.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(UserError, match="not readable"):
        TokenReduction.from_dict({"method": "pool"})


def test_pooling_averages_blocks_and_selection_keeps_the_most_attended_patches():
    """The torch reduction, checked against a hand computation."""
    import torch

    from llava_edge.image_tokens import reduce_tokens

    feats = torch.arange(64 * 2, dtype=torch.float32).reshape(1, 64, 2)
    pooled = reduce_tokens(feats, None, plan("pool", 16, 8))
    block = feats[0].reshape(8, 8, 2)[:2, :2].reshape(4, 2).mean(0)  # the top-left 2x2 block
    assert torch.allclose(pooled[0, 0], block) and pooled.shape == (1, 16, 2)

    attention = torch.zeros(1, 64)
    attention[0, [50, 3, 17]] = torch.tensor([3.0, 2.0, 1.0])
    r = plan("dominant", 4, 8)  # 3 dominant + 1 contextual
    out = reduce_tokens(feats, attention, r)
    assert torch.equal(out[0, :3], feats[0, [3, 17, 50]])  # the three most attended, in spatial order
    rest = [i for i in range(64) if i not in (3, 17, 50)]
    assert torch.allclose(out[0, 3], feats[0, rest].mean(0))  # one contextual token: every other patch merged


# ---- the spliced graphs equal training's torch path ----------------------------------------------------------------
@pytest.fixture(scope="module")
def reduced(bundle, tmp_path_factory):
    """A copy of the session's toy bundle with reduced-token variants."""
    from llava_edge.quantize.command import quantize_bundle

    b = tmp_path_factory.mktemp("reduced") / "b"
    shutil.copytree(bundle, b)
    quantize_bundle(b, None, "fp32,int8", image_tokens="16,32", token_method="pool,dominant", log=lambda _: None)
    return b


@pytest.fixture(scope="module")
def pixels(bundle):
    import random

    from llava_edge import manifest
    from llava_edge.preprocess import ImageSpec, preprocess
    from llava_edge.scenes import random_scene, render

    spec = ImageSpec.from_dict(manifest.read(bundle).image)
    rng = random.Random(3)
    return np.stack([preprocess(render(random_scene(rng), rng=rng), spec) for _ in range(3)])


def run_graph(path, px):
    from llava_edge.quantize.vision import run_graph as run

    return run(path, px)


@pytest.mark.parametrize("name,method,tokens", [("fp32-pool16", "pool", 16), ("fp32-pool32", "pool", 32),
                                                ("fp32-dominant16", "dominant", 16),
                                                ("fp32-dominant32", "dominant", 32)])
def test_the_spliced_graph_computes_what_training_computes(reduced, hf_model, pixels, name, method, tokens):
    import torch

    from llava_edge.image_tokens import image_features

    with torch.no_grad():
        want = image_features(hf_model, torch.from_numpy(pixels), plan(method, tokens, 8)).numpy()
    r = plan(method, tokens, 8)
    for batch in (pixels[:1], pixels):  # the batch stays dynamic
        got = run_graph(reduced / f"vision.{name}.onnx", batch)
        assert got.shape == (len(batch), tokens, hf_model.config.text_config.hidden_size)
        kept = tokens - r.contextual  # every token of pooling; the dominant ones of selection
        assert np.abs(got[:, :kept] - want[: len(batch), :kept]).max() < 1e-5
        # a merged token averages the patches most similar to its target: on random weights two targets can be
        # equally similar to within float rounding, and the two computations may put a patch in either
        cos = token_cosine(got[:, kept:], want[: len(batch), kept:])
        assert cos.size == 0 or cos.min() > 0.999


def test_the_full_path_is_llava_s_own(hf_model, pixels):
    import torch

    from llava_edge.image_tokens import image_features

    cfg = hf_model.config
    with torch.no_grad():
        want = hf_model.model.get_image_features(
            pixel_values=torch.from_numpy(pixels), vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
        got = image_features(hf_model, torch.from_numpy(pixels), None)
    assert torch.allclose(torch.stack(list(want)), got, atol=1e-6)


def test_the_variants_record_their_tokens_and_are_kept_when_up_to_date(reduced):
    from llava_edge import manifest
    from llava_edge.quantize.command import quantize_bundle

    m = manifest.read(reduced)
    names = [v.name for v in m.find("vision")]
    for n in ("fp32-pool16", "int8-pool16", "fp32-dominant16", "int8-dominant16", "fp32-pool32", "int8-dominant32"):
        assert n in names
    v = m.find("vision", name="int8-dominant16")[0]
    assert m.image_tokens(v) == 16 and v.token_reduction == plan("dominant", 16, 8)
    assert v.extra["token_reduction"] == {"method": "dominant", "tokens": 16, "grid": 8, "dominant": 14,
                                          "contextual": 2}
    assert v.extra["quality"]["against"] == "fp32" and v.extra["quality"]["reference"] == "fp32-dominant16"
    assert m.image_tokens(m.find("vision", name="fp32")[0]) == 64
    out = quantize_bundle(reduced, None, "int8", image_tokens="16", token_method="pool", log=lambda _: None)
    assert [(o.name, o.made) for o in out] == [("int8-pool16", False)]


def test_the_full_count_is_the_ordinary_variant(reduced, tmp_path):
    from llava_edge import manifest
    from llava_edge.quantize.command import quantize_bundle

    b = tmp_path / "b"
    shutil.copytree(reduced, b)
    out = quantize_bundle(b, None, "int4", image_tokens="64,16", log=lambda _: None)
    assert [o.name for o in out] == ["int4", "int4-pool16"]
    assert manifest.read(b).find("vision", name="int4")[0].token_reduction is None


@pytest.mark.parametrize("args,words", [
    (["--image-tokens", "20"], ["cannot pool", "16"]),
    (["--image-tokens", "16", "--token-method", "merge"], ["unknown --token-method"]),
    (["--image-tokens", "sixteen"], ["whole numbers"]),
    (["--image-tokens", "16", "--vision", "int3"], ["unknown --vision type"]),
    (["--projector", "nowhere"], ["--image-tokens"]),
])
def test_bad_reductions_are_one_line_errors(reduced, args, words):
    assert_one_line_error(le("quantize", reduced, *args), *words, progress=True)


# ---- the runtime --------------------------------------------------------------------------------------------------
def test_a_reduced_variant_is_never_chosen_unasked(reduced):
    from llava_edge import EdgeLLaVA, manifest

    m = manifest.read(reduced)
    m.variants.sort(key=lambda v: v.token_reduction is None)  # reduced ones first: still not the default
    manifest.write(reduced, m)
    rt = EdgeLLaVA.load(reduced, device="cpu", threads=1)
    try:
        assert rt.vision_variant.token_reduction is None and rt.n_image_tokens == 64
    finally:
        rt.close()


def test_asking_for_fewer_tokens_feeds_that_many_positions(reduced, toy_data):
    from llava_edge import EdgeLLaVA

    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    rt = EdgeLLaVA.load(reduced, device="cpu", threads=1, image_tokens=16, token_method="pool", prefix_cache=False)
    full = EdgeLLaVA.load(reduced, device="cpu", threads=1, prefix_cache=False)
    try:
        assert rt.vision_variant.name == "int8-pool16" and rt.n_image_tokens == 16  # the cpu profile's int8
        assert "image tokens: 16 of 64 (8x8 patches averaged to 4x4, training-free); accuracy cost not measured" \
            in rt.explain()
        slots, _, _ = rt.conversation_slots("What is this?", image)
        full_slots, _, _ = full.conversation_slots("What is this?", image)
        assert len(full_slots) - len(slots) == 64 - 16
        answer = rt.chat(image, "What is this?", max_tokens=4)
        assert isinstance(answer, str) and rt.stats["prefill_tokens"] == len(slots)
    finally:
        rt.close()
        full.close()


def test_choosing_by_count_and_method(reduced):
    from llava_edge import manifest
    from llava_edge.runtimes.devices import plan_runtime

    m = manifest.read(reduced)
    pick = lambda **kw: plan_runtime(m, "cpu", **kw).vision.name  # noqa: E731
    assert pick(image_tokens=16) == "int8-pool16"  # no drift record: pool before dominant
    # int8 unless its selection moved tokens too far from the fp32 graph's (on random weights, near-ties flip)
    int8_ok = m.find("vision", name="int8-dominant16")[0].extra["quality"]["min_cosine"] >= 0.99
    assert pick(image_tokens=16, token_method="dominant") == ("int8" if int8_ok else "fp32") + "-dominant16"
    assert pick(image_tokens=32, token_method="pool") == "int8-pool32"
    assert pick(image_tokens=64) == pick() == "fp32"  # the full count: the ordinary choice (no full int8 here)
    with pytest.raises(UserError, match="no vision variant with 24 image tokens; it has 16 \\(dominant\\)"):
        pick(image_tokens=24)
    with pytest.raises(UserError, match="one or the other"):
        plan_runtime(m, "cpu", image_tokens=16, vision_variant="fp32")


def test_chat_with_a_count_the_bundle_lacks_is_one_line(reduced, toy_data):
    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    assert_one_line_error(le("chat", "what?", "--image", image, "--bundle", reduced, "--image-tokens", "24"),
                          "no vision variant with 24 image tokens", "llava-edge quantize")


def test_saved_image_cells_are_keyed_by_the_variant_s_token_count(reduced, toy_data, tmp_path, monkeypatch):
    """A picture saved through the full graph is not loaded for 16 tokens, nor 16-token cells for the full graph."""
    from llava_edge import EdgeLLaVA

    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    image = sorted((toy_data / "images").glob("eval_*.png"))[1]

    def ask(**kw):
        rt = EdgeLLaVA.load(reduced, device="cpu", threads=1, **kw)
        try:
            answer = rt.chat(image, "What shape is it?", max_tokens=3)
            return answer, dict(rt.stats), rt.n_image_tokens
        finally:
            rt.close()

    ask()  # the full graph saves the picture's cells
    _, stats, n = ask(image_tokens=16, token_method="pool")
    assert n == 16 and stats["vision_encodes"] == 1 and stats["image_prefix_loads"] == 0
    _, stats, _ = ask(image_tokens=16, token_method="pool")  # its own cells, saved by the previous process
    assert stats["vision_encodes"] == 0 and stats["image_prefix_loads"] == 1
    _, stats, _ = ask(image_tokens=16, token_method="dominant")
    assert stats["vision_encodes"] == 1 and stats["image_prefix_loads"] == 0


# ---- drift -------------------------------------------------------------------------------------------------------
def test_drift_measures_a_reduced_variant_against_the_full_model_and_records_it(reduced, toy_model, tmp_path):
    from llava_edge import EdgeLLaVA, manifest
    from llava_edge.drift.run import drift_bundle
    from llava_edge.toy.data import write_eval_questions

    b = tmp_path / "b"
    shutil.copytree(reduced, b)
    questions = write_eval_questions(tmp_path, n=4)
    result, failed = drift_bundle(b, toy_model, eval_file=questions, variants="fp32:f32,fp32-pool16:f32",
                                  fail_on="tokens", max_tokens=4, threads=1, record=True,
                                  gate_limit="tokens.accuracy_drop_max=100,tokens.kl_mean_max=10",
                                  log=lambda _: None)
    full, pooled = result["pairs"]
    assert full["image_tokens"] == 64 and full["token_reduction"] is None
    assert pooled["image_tokens"] == 16 and pooled["token_reduction"]["method"] == "pool"
    # the graph against the torch reduction on the same model: the same features
    assert pooled["vision_drift"]["tokens"] == 16 * 4 and pooled["vision_drift"]["cos_min"] > 0.9999
    assert pooled["token_drift"]["positions"] == full["token_drift"]["positions"]  # the reference's answer tokens
    gates_of = {v["pair"]: v["gate"] for v in result["gates"]}
    assert gates_of == {"fp32:f32": "f16", "fp32-pool16:f32": "tokens"} and not failed
    limits = {c["metric"]: c["limit"] for v in result["gates"] if v["gate"] == "tokens" for c in v["checks"]}
    assert limits == {"kl_mean": 10.0, "accuracy_drop_points": 100.0}

    m = manifest.read(b)
    rec = m.drift_records(m.find("vision", name="fp32-pool16")[0])["f32"]
    assert rec["image_tokens"] == 16 and rec["gates"] == {"tokens": True} and rec["questions"] == 4
    assert rec["answer_agreement"] == pooled["answer_agreement"]
    assert "f32" in m.drift_records(m.find("vision", name="fp32")[0])
    rt = EdgeLLaVA.load(b, device="cpu", threads=1, image_tokens=16, token_method="pool")
    try:
        assert rt.vision_variant.name == "fp32-pool16"  # the measured one before the unmeasured int8
        assert f"measured with f32 on 4 questions" in rt.explain() and "answers as the reference's" in rt.explain()
    finally:
        rt.close()
    # a record whose file changed is not read
    v = m.find("vision", name="fp32-pool16")[0]
    v.extra["drift"]["f32"]["sha256"]["vision"] = "0" * 64
    assert m.drift_records(v) == {}


@pytest.mark.parametrize("text,words", [("tokens.accuracy_drop_max", "GATE.LIMIT=VALUE"),
                                        ("nogate.kl_mean_max=1", "GATE.LIMIT=VALUE"),
                                        ("tokens.kl_mean_max=lots", "not a number")])
def test_bad_gate_limits(text, words):
    from llava_edge.drift import gates

    with pytest.raises(UserError, match=words):
        gates.with_limits(text)
    assert gates.with_limits("tokens.answer_agreement_min=0.5")["tokens"].answer_agreement_min == 0.5
    assert gates.with_limits("q8_0.top1_min=none")["q8_0"].top1_min is None


def test_precision_gates_do_not_cover_reduced_variants():
    from llava_edge.drift import gates

    pair = {"vision_precision": "fp32", "llm_precision": "f32", "token_reduction": {"tokens": 16}}
    assert [g.name for g in gates.GATES.values() if g.covers(pair)] == ["tokens"]
    pair["token_reduction"] = None
    assert [g.name for g in gates.GATES.values() if g.covers(pair)] == ["f16"]


# ---- the recovery fine-tune ----------------------------------------------------------------------------------------
def test_a_projector_tuned_for_the_reduction_becomes_its_own_variant(reduced, toy_model, toy_data, tmp_path,
                                                                      hf_model, pixels):
    import torch

    from llava_edge import manifest
    from llava_edge.image_tokens import image_features
    from llava_edge.train import model_setup

    out = tmp_path / "tuned"
    r = le("train", "stage2", "--model", toy_model, "--data", toy_data / "stage2_instruct.json", "--image-folder", toy_data,
           "--output", out, "--preset", "toy", "--image-tokens", "16", "--token-method", "pool", "--tune",
           "projector", "--max-steps", "2", "--per-device-batch", "4", "--global-batch", "4", timeout=600)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "mm_projector.json").read_text())
    assert meta["token_reduction"]["tokens"] == 16 and meta["token_reduction"]["method"] == "pool"
    assert not (out / "model.safetensors").exists()  # the projector alone learned and is written

    b = tmp_path / "b"
    shutil.copytree(reduced, b)
    r = le("quantize", b, "--image-tokens", "16", "--token-method", "pool", "--projector", out)
    assert r.returncode == 0, r.stderr
    v = manifest.read(b).find("vision", name="fp32-pool16-tuned")[0]
    assert v.extra["projector"]["sha256"] == manifest.sha256_file(out / "mm_projector.safetensors")
    tuned = type(hf_model)(hf_model.config).eval()
    tuned.load_state_dict(hf_model.state_dict())
    model_setup.load_projector(tuned, out / "mm_projector.safetensors")
    with torch.no_grad():
        want = image_features(tuned, torch.from_numpy(pixels), plan("pool", 16, 8)).numpy()
        before = image_features(hf_model, torch.from_numpy(pixels), plan("pool", 16, 8)).numpy()
    assert unused_weights(b / v.file) == []  # the replaced weights are gone, not left for onnxruntime to warn of
    got = run_graph(b / v.file, pixels)
    assert np.abs(got - want).max() < 1e-5 and np.abs(got - before).max() > 1e-4  # the tuned projector, not the old

    assert_one_line_error(le("quantize", b, "--image-tokens", "32", "--projector", out),
                          "tuned for pool 16 tokens, not pool 32", progress=True)
    assert_one_line_error(le("quantize", b, "--image-tokens", "16", "--projector", toy_model),
                          "projector file not found", progress=True)

    # drift compares the tuned graph's features with the reference's through the same tuned projector
    from llava_edge.drift.run import drift_bundle
    from llava_edge.toy.data import write_eval_questions

    questions = write_eval_questions(tmp_path, n=2)

    def vision_drift():
        result, _ = drift_bundle(b, toy_model, eval_file=questions, variants="fp32-pool16-tuned:f32", max_tokens=2,
                                 threads=1, log=lambda _: None)
        return result["pairs"][0]["vision_drift"], result["notes"]

    drift, notes = vision_drift()
    assert drift["tokens"] == 2 * 16 and drift["cos_min"] > 0.9999 and not any("tuned" in n for n in notes)
    out.rename(tmp_path / "moved")  # its projector gone: said, and nothing compared against the wrong one
    drift, notes = vision_drift()
    assert drift == {"images": 0} and any("fp32-pool16-tuned" in n and "not there" in n for n in notes)


def test_bench_times_a_reduced_variant_with_its_positions(reduced, tmp_path, monkeypatch):
    from llava_edge.bench import BenchSettings, run_bench

    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    report = run_bench(reduced, BenchSettings(runs=1, decode_tokens=2, threads=1, device="cpu"),
                       "fp32:f32,int8-pool16:f32", log=lambda _: None)
    full, pooled = report["results"]
    assert pooled["vision"] == "int8-pool16"
    assert full["prefill_tokens"] - pooled["prefill_tokens"] == 64 - 16  # the same prompt, 48 image positions fewer


def unused_weights(path) -> list[str]:
    import onnx

    g = onnx.load(str(path)).graph
    used = {i for n in g.node for i in n.input}
    return [t.name for t in g.initializer if t.name not in used]


def test_a_spliced_graph_keeps_no_unused_weights(reduced):
    for f in sorted(reduced.glob("vision.fp32-*.onnx")):
        assert unused_weights(f) == [], f.name
