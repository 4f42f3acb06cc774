"""`llava-edge drift`: metrics on hand-checkable cases, LLaVA's evaluation formats and scoring, the command end to
end on the random toy, and the accuracy-drift gates on a trained toy built here (the toy build of the session)."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from llava_edge.cli import main
from llava_edge.drift import gates, metrics
from llava_edge.drift.formats import (
    SQA_PROMPT,
    EvalItem,
    pope_yes_no,
    read_eval,
    scienceqa_letter,
    score_pope,
    score_scienceqa,
)
from llava_edge.errors import UserError

# ---- metrics ---------------------------------------------------------------------------------------------------


def test_kl_of_two_token_distributions_by_hand():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108...
    got = metrics.kl_divergence(np.log(p)[None], np.log(q)[None])
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, rel=1e-12)
    assert metrics.kl_divergence(np.log(q)[None], np.log(p)[None])[0] != pytest.approx(expected)  # not symmetric


def test_kl_is_zero_for_the_same_distribution_and_ignores_a_logit_shift():
    logits = np.random.default_rng(0).normal(size=(5, 50)) * 4
    assert np.all(metrics.kl_divergence(logits, logits) == 0)
    assert np.abs(metrics.kl_divergence(logits, logits + 123.0)).max() < 1e-12


def test_token_drift_top1_and_probability_of_the_reference_token():
    ref = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    var = np.log(np.array([[0.6, 0.3, 0.1], [0.3, 0.45, 0.25]]))
    d = metrics.token_drift(ref, var, [0, 0])
    assert d.same_top1.tolist() == [True, False]
    assert d.p_ref == pytest.approx([0.7, 0.4])
    assert d.p_variant == pytest.approx([0.6, 0.3])
    assert d.delta_p == pytest.approx([-0.1, -0.1])
    s = metrics.summarize_tokens(d)
    assert s["top1"] == 0.5 and s["positions"] == 2
    assert s["dp_mean"] == pytest.approx(-0.1) and s["dp_rms"] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        metrics.token_drift(ref, var[:1], [0, 0])


def test_summary_percentiles():
    kl = np.array([0.0] * 99 + [1.0])
    d = metrics.TokenDrift(kl, np.ones(100, bool), np.full(100, 0.5), np.full(100, 0.5))
    s = metrics.summarize_tokens(d)
    assert s["kl_mean"] == pytest.approx(0.01)
    assert s["kl_p99"] == pytest.approx(0.01)  # linear interpolation between the 99th (0) and 100th (1) value
    assert s["kl_max"] == 1.0 and s["kl_median"] == 0.0 and s["top1"] == 1.0 and s["dp_rms"] == 0.0


def test_cosine_and_relative_error():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    b = np.array([[3.0, 0.0], [-1.0, -1.0], [5.0, 0.0], [0.0, 0.0]])
    assert metrics.cosine_rows(a, b) == pytest.approx([1.0, -1.0, 0.0, 1.0])
    x = np.random.default_rng(1).normal(size=(4, 8))
    assert metrics.relative_error(1.1 * x, x) == pytest.approx(0.1)
    v = metrics.summarize_vision([metrics.cosine_rows(x, x), metrics.cosine_rows(1.1 * x + 0.01, x)], [0.0, 0.1])
    assert v["images"] == 2 and v["tokens"] == 8 and v["cos_min"] < 1.0 and v["rel_error_max"] == 0.1


# ---- formats and scoring: small fixtures of each format, made from the toy world -------------------------------


def toy_scenes(folder: Path, n: int, seed: int = 5) -> list[tuple[str, object]]:
    """``n`` toy scenes saved as PNGs under ``folder/images``: (relative path, scene)."""
    from llava_edge.scenes import random_scene, render

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        scene = random_scene(rng)
        rel = f"images/s{i}.png"
        render(scene, 128, rng).save(folder / rel)
        out.append((rel, scene))
    return out


def write_scienceqa(folder: Path, n: int = 4) -> Path:
    """``llava_test_CQM-A.json`` as LLaVA's convert_sqa_to_llava.py writes it, about toy scenes (the last: no image)."""
    from llava_edge.scenes import SHAPES

    records = []
    for i, (rel, scene) in enumerate(toy_scenes(folder, n)):
        o = scene.objects[0]
        options = " ".join(f"({letter}) {s}" for letter, s in zip("ABC", SHAPES))
        question = f"Context: N/A\nQuestion: What shape is at the {o.cell}?\nOptions: {options}"
        answer = "ABC"[SHAPES.index(o.shape)]
        rec = {"id": str(i), "conversations": [{"from": "human", "value": f"{question}\n<image>"},
                                               {"from": "gpt", "value": f"The answer is {answer}."}]}
        if i < n - 1:
            rec["image"] = rel
        else:
            rec["conversations"][0]["value"] = question
        records.append(rec)
    path = folder / "llava_test_CQM-A.json"
    path.write_text(json.dumps(records, indent=2))
    return path


def write_pope(folder: Path, n: int = 4) -> Path:
    """``llava_pope_test.jsonl`` plus ``coco/coco_pope_random.json`` labels, about toy scenes."""
    from llava_edge.scenes import COLORS, SHAPES

    rng = random.Random(3)
    lines, labels = [], []
    for i, (rel, scene) in enumerate(toy_scenes(folder, n, seed=9)):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        text = f"Is there a {color} {shape} in the image?\nAnswer the question using a single word or phrase."
        lines.append({"question_id": i, "image": rel, "text": text, "category": "random"})
        labels.append({"question_id": i, "label": "yes" if scene.count(shape, color) else "no"})
    (folder / "coco").mkdir(exist_ok=True)
    (folder / "coco" / "coco_pope_random.json").write_text("".join(json.dumps(x) + "\n" for x in labels))
    path = folder / "llava_pope_test.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_toy_eval_set_reads_back(tmp_path):
    from llava_edge.toy.data import write_eval_questions

    assert write_eval_questions(tmp_path, n=5) == tmp_path / "eval.json"
    s = read_eval(tmp_path / "eval.json")
    records = json.loads((tmp_path / "eval.json").read_text())
    assert s.format == "toy" and len(s.items) == 5
    assert [i.gold for i in s.items] == [r["answer"] for r in records]
    assert all(i.image.is_file() and "<image>" not in i.question for i in s.items)
    assert s.score([r["answer"] + "." for r in records])["accuracy"] == 1.0  # LLaVA's normalisation
    assert s.score(["nonsense"] * 5)["accuracy"] == 0.0


def test_scienceqa_file(tmp_path):
    s = read_eval(write_scienceqa(tmp_path))
    assert s.format == "scienceqa" and len(s.items) == 4
    first = s.items[0]
    assert first.question.endswith("\n" + SQA_PROMPT) and first.question.startswith("Context: N/A\nQuestion: ")
    assert "<image>" not in first.question and first.choices == 3 and first.gold in "ABC"
    assert s.items[-1].image is None


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), (" C ", "C"), ("A. circle", "A"), ("The answer is C.", "C"), ("so The answer is B", "B"),
    ("circle", "FAILED"), ("b", "FAILED"), ("The answer is F.", "FAILED"), ("A.circle", "FAILED"),
])
def test_scienceqa_letter_as_llava_extracts_it(text, letter):
    assert scienceqa_letter(text) == letter


def test_scienceqa_scoring_counts_image_questions_and_option_range():
    items = [EvalItem("1", "q", Path("a.png"), "A", choices=2), EvalItem("2", "q", Path("b.png"), "B", choices=2),
             EvalItem("3", "q", Path("c.png"), "C", choices=2), EvalItem("4", "q", None, "A", choices=2)]
    s = score_scienceqa(items, ["A", "The answer is A.", "C", "A"])
    assert s["accuracy"] == pytest.approx(1 / 3)  # C is past the two choices: wrong, as LLaVA scores it
    assert s["accuracy_all"] == pytest.approx(2 / 4) and s["n"] == 3 and s["n_all"] == 4


def test_pope_file_and_labels_from_the_annotation_folder(tmp_path):
    s = read_eval(write_pope(tmp_path))
    assert s.format == "pope" and len(s.items) == 4
    assert all(i.gold in ("yes", "no") and i.category == "random" for i in s.items)
    assert s.items[0].question.startswith("Is there a ")


@pytest.mark.parametrize("text,parsed", [
    ("Yes", "yes"), ("No", "no"), ("No, there is not.", "no"), ("Yes, there is a dog. No cat.", "yes"),
    ("There is not a dog", "no"), ("nope", "yes"), ("no.", "no"),
])
def test_pope_yes_no_as_llava_parses_it(text, parsed):
    assert pope_yes_no(text) == parsed


def test_pope_metrics_by_hand():
    items = [EvalItem(str(i), "q", None, g, "random") for i, g in enumerate(["yes", "yes", "no", "no"])]
    s = score_pope(items, ["Yes", "No", "Yes", "No"])  # TP, FN, FP, TN
    assert (s["tp"], s["fn"], s["fp"], s["tn"]) == (1, 1, 1, 1)
    assert s["accuracy"] == s["precision"] == s["recall"] == s["f1"] == s["yes_ratio"] == 0.5
    assert s["per_category"]["random"]["accuracy"] == 0.5


def test_bad_evaluation_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_eval(tmp_path / "nope.json")
    f = write_scienceqa(tmp_path / "sqa")
    with pytest.raises(UserError, match="unknown evaluation format"):
        read_eval(f, "vqav2")
    (tmp_path / "sqa" / "images" / "s0.png").unlink()
    with pytest.raises(UserError, match="image"):
        read_eval(f)
    (tmp_path / "odd.json").write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(UserError, match="format"):
        read_eval(tmp_path / "odd.json")


# ---- gates ------------------------------------------------------------------------------------------------------


def fake_pair(vision: str, llm: str, *, top1=1.0, kl=0.0, cos=1.0, drop=0.0) -> dict:
    return {"vision": vision, "llm": llm, "vision_precision": vision, "llm_precision": llm,
            "token_drift": {"top1": top1, "kl_mean": kl}, "vision_drift": {"cos_min": cos},
            "accuracy_drop_points": drop}


def verdict(pair: dict, gate: str) -> dict:
    return next(v for v in gates.evaluate([pair]) if v["gate"] == gate)


def test_gate_limits_at_their_boundaries():
    assert verdict(fake_pair("fp32", "f16", top1=0.995, kl=0.001, cos=0.999), "f16")["ok"]
    assert not verdict(fake_pair("fp16", "f32", top1=0.9949), "f16")["ok"]
    assert not verdict(fake_pair("fp16", "f32", cos=0.9989), "f16")["ok"]
    assert not verdict(fake_pair("fp32", "f32", drop=-0.5), "f16")["ok"]  # unchanged means unchanged
    assert verdict(fake_pair("int8", "q8_0", top1=0.97, kl=0.01, drop=2.0), "q8_0")["ok"]
    v = verdict(fake_pair("int8", "q8_0", kl=0.0101), "q8_0")
    assert not v["ok"] and "kl_mean" in gates.describe(v)
    assert verdict(fake_pair("int4", "q4_k_m", top1=0.5, kl=0.05, drop=5.0), "q4")["ok"]  # no top-1 limit
    assert not verdict(fake_pair("int4", "q4_k_m", drop=5.1), "q4")["ok"]
    assert not verdict(fake_pair("int8", "iq4_nl", kl=0.06), "q4")["ok"]  # every 4-bit type
    no_gold = fake_pair("fp32", "q8_0")
    no_gold["accuracy_drop_points"] = None
    assert verdict(no_gold, "q8_0")["ok"]  # no gold answers: accuracy does not decide


def test_which_pairs_a_gate_covers():
    covered = {(v["gate"], v["pair"]) for v in gates.evaluate([
        fake_pair("int8", "f32"), fake_pair("int4", "q8_0"), fake_pair("fp16", "q8_0"), fake_pair("int4", "q4_k_m"),
        fake_pair("fp32", "q4_0")])}
    assert covered == {("q8_0", "fp16:q8_0"), ("q4", "int4:q4_k_m"), ("q4", "fp32:q4_0")}


def test_fail_on_names():
    measured = [("fp32", "f32"), ("int8", "q8_0")]
    assert gates.parse_fail_on(None, measured) == []
    assert gates.parse_fail_on("all", measured) == ["f16", "q8_0"]  # all: the gates that cover a measured pair
    assert gates.parse_fail_on("Q8_0, f16,q8_0", measured) == ["q8_0", "f16"]
    with pytest.raises(UserError, match="unknown gate"):
        gates.parse_fail_on("q2_k", measured)
    with pytest.raises(UserError, match="gate q4 covers none"):
        gates.parse_fail_on("q4_k_m", measured)  # the 4-bit gate's older name


# ---- the command, end to end on the random toy -------------------------------------------------------------------


@pytest.fixture(scope="module")
def drift_bundle(bundle, tmp_path_factory):
    """A copy of the session's toy bundle with q8_0 and int8 variants added."""
    from llava_edge.quantize.command import quantize_bundle

    b = tmp_path_factory.mktemp("drift") / "b"
    shutil.copytree(bundle, b)
    quantize_bundle(b, "q8_0", "int8", threads=1, log=lambda _: None)
    return b


def test_drift_command_writes_the_report(drift_bundle, toy_model, tmp_path, capsys):
    sqa = write_scienceqa(tmp_path / "sqa", n=3)
    out = tmp_path / "report"
    rc = main(["drift", str(drift_bundle), "--reference", str(toy_model), "--eval", str(sqa), "--report", str(out),
               "--variants", "fp32:f32,int8:q8_0", "--fail-on", "f16", "--kv-cache", "f32", "--threads", "1",
               "--max-tokens", "4"])
    err = capsys.readouterr().err
    assert rc == 0, err
    result = json.loads((out / "drift.json").read_text())
    assert result["reference"]["device"] == "cpu" and result["reference"]["dtype"] == "float32"
    assert "fp32 on the CPU" in (out / "drift.md").read_text()
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["eval"] == {"format": "scienceqa", "source": str(sqa), "questions": 3, "with_image": 2, "gold": True,
                              "pictures": {"0": 1, "1": 2}}  # a one-picture model: each question as the file has it
    pairs = {f"{p['vision']}:{p['llm']}": p for p in result["pairs"]}
    assert list(pairs) == ["fp32:f32", "int8:q8_0"]
    exact, quant = pairs["fp32:f32"], pairs["int8:q8_0"]
    # every reference answer token was compared (max 4 new tokens, EOS included when produced)
    assert 3 <= exact["token_drift"]["positions"] <= 12
    # f32 GGUF + fp32 ONNX with an f32 KV cache reproduce the fp32 reference
    assert exact["token_drift"]["top1"] == 1.0 and exact["token_drift"]["kl_mean"] < 1e-6
    assert exact["vision_drift"]["images"] == 2 and exact["vision_drift"]["cos_min"] > 0.9999
    assert exact["answer_agreement"] == 1.0 and exact["accuracy_drop_points"] == 0 and exact["prompt_mismatches"] == 0
    # quantization shows up in every measure
    assert quant["token_drift"]["kl_mean"] > 10 * exact["token_drift"]["kl_mean"]
    assert quant["vision_drift"]["rel_error_mean"] > 10 * exact["vision_drift"]["rel_error_mean"]
    assert [v["gate"] for v in result["gates"]] == ["f16", "q8_0"] and result["gates"][0]["ok"]
    assert result["fail_on"] == ["f16"] and result["notes"] == []


def test_drift_defaults_to_generated_toy_questions_and_prints_the_table(drift_bundle, toy_model, capsys):
    rc = main(["drift", str(drift_bundle), "--reference", str(toy_model), "--limit", "2", "--variants", "*:f32",
               "--threads", "1", "--max-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "toy held-out questions (seed 0, 2 generated)" in out
    assert "| fp32 | f32 |" in out and "| int8 | f32 |" in out and "| fp32 | q8_0 |" not in out


def test_drift_command_fails_a_gate_against_another_model(drift_bundle, tmp_path, capsys):
    """The reference is a different checkpoint: the f16 gate must fail, exit 1, and the report still be written."""
    from llava_edge.toy.model import write_toy_model

    other = write_toy_model(tmp_path / "other", seed=1)
    pope = write_pope(tmp_path / "pope", n=2)
    out = tmp_path / "report"
    rc = main(["drift", str(drift_bundle), "--reference", str(other), "--eval", str(pope), "--report", str(out),
               "--variants", "fp32:f32", "--fail-on", "all", "--threads", "1", "--max-tokens", "3"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAILED gate f16 on fp32:f32" in err and "not the weights the bundle was exported from" in err
    result = json.loads((out / "drift.json").read_text())
    assert result["eval"]["format"] == "pope" and not result["gates"][0]["ok"]
    assert result["pairs"][0]["token_drift"]["kl_mean"] > 0.01


@pytest.mark.parametrize("args,words", [
    (["--variants", "fp32:q4_k_m"], ["no llm variant 'q4_k_m'"]),
    (["--variants", "fp32:f32:q8_0"], ["VISION:LLM"]),
    (["--variants", "fp32:f32", "--fail-on", "q8_0"], ["gate q8_0 covers none"]),
    (["--fail-on", "fastest"], ["unknown gate"]),
    (["--limit", "0"], ["--limit"]),
])
def test_drift_bad_arguments_fail_before_measuring(drift_bundle, tmp_path, capsys, args, words):
    rc = main(["drift", str(drift_bundle), "--reference", str(tmp_path / "not-loaded"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err


# ---- the accuracy-drift gates on the trained toy (the session's `trained_toy` build, shared with the toy -----
# ---- gate of tests/test_toy_build.py: about 6.5 minutes of training on 2 cores, once per session) ----------


# every full-token pair (a build re-used through LLAVA_EDGE_TRAINED_TOY may hold reduced ones too)
FULL_TOKEN_PAIRS = ",".join(f"{v}:{x}" for x in ("f32", "f16", "q8_0", "q4_k_m")
                            for v in ("fp32", "fp16", "int8", "int8-static", "int4"))


@pytest.fixture(scope="module")
def trained_drift(trained_toy):
    """The toy built by the real recipe, exported and quantized, measured with every gate."""
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.drift.run import drift_bundle
    from llava_edge.export.bundle import export_bundle
    from llava_edge.quantize.command import quantize_bundle

    root, built = trained_toy
    ckpt = open_checkpoint(root / "model")
    b = root / "bundle"
    for target, dtype, outtype in (("onnx", "fp16", "f32"), ("gguf", "fp32", "f32"), ("gguf", "fp32", "f16")):
        export_bundle(ckpt, b, target, dtype, outtype, log=lambda _: None)
    quantize_bundle(b, "q8_0,q4_k_m", "int8,int8-static,int4", threads=1, log=lambda _: None)
    result, failed = drift_bundle(b, root / "model", eval_file=root / "data" / "eval.json", fail_on="all",
                                  max_tokens=12, threads=1, report=root / "report", variants=FULL_TOKEN_PAIRS,
                                  log=lambda _: None)
    # the tokens gate, on a reduced-token variant against the full model (pooling 64 -> 32 tokens)
    quantize_bundle(b, None, "fp32", image_tokens="32", token_method="pool", log=lambda _: None)
    reduced, reduced_failed = drift_bundle(b, root / "model", eval_file=root / "data" / "eval.json", fail_on="tokens",
                                           max_tokens=12, threads=1, variants="fp32-pool32:f32", log=lambda _: None)
    result["gates"] += reduced["gates"]
    return built, result, failed + reduced_failed


@pytest.mark.parametrize("gate", list(gates.GATES))
def test_trained_toy_meets_the_gate(trained_drift, gate):
    _, result, _ = trained_drift
    verdicts = [v for v in result["gates"] if v["gate"] == gate]
    assert verdicts, f"no pair measured for gate {gate}"
    assert all(v["ok"] for v in verdicts), "; ".join(gates.describe(v) for v in verdicts if not v["ok"])


def test_trained_toy_reference_answers_as_the_build_evaluation(trained_drift):
    """The drift reference prompts and decodes as `toy build`'s evaluation: same answers, same accuracy."""
    built, result, _ = trained_drift
    ref = result["reference"]
    if ref["device"] == "cpu" and ref["dtype"] == "float32":  # the same computation as `toy build` ran on a CPU
        assert ref["score"]["accuracy"] == pytest.approx(built["accuracy"])
    else:  # fp16 on a GPU against the build's fp32 evaluation: a near tie may tip
        assert abs(ref["score"]["accuracy"] - built["accuracy"]) <= 0.01
    assert result["pairs"][0]["vision"] == "fp32" and result["pairs"][0]["llm"] == "f32"
