"""`llava-edge drift` with several pictures a prompt, for models trained with several (LLaVA-OneVision,
LLaVA-Interleave's SigLIP build), on tiny random toys.

* The reference's prompts of two and three pictures equal transformers' model given the pictures nested per
  sample (its own image processor on ``images=[[a, b]]``, the runtime's prompt ids with each picture's image
  tokens), computed here independently of drift's reference code: first-answer-token logits and greedy ids.
* The command measures them by default and says how many prompts had 1, 2 and 3 pictures; the fp32 pair
  reproduces the reference on every picture count, an int8 vision graph visibly does not.
* A model trained with one picture a conversation refuses multi-picture drift in one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from next_helpers import assert_logits_close, hf_answer, toy_bundle

from llava_edge.cli import main
from llava_edge.drift.formats import EvalItem, EvalSet, read_eval, with_pictures
from llava_edge.errors import UserError

QUESTIONS = 3


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    from llava_edge.toy.data import write_eval_questions

    return write_eval_questions(tmp_path_factory.mktemp("questions"), n=QUESTIONS)


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    return toy_bundle(tmp_path_factory, "toy-onevision", seed=2)


@pytest.fixture(scope="module")
def interleave(tmp_path_factory):
    return toy_bundle(tmp_path_factory, "toy-siglip", seed=2)


# ---- the prompts --------------------------------------------------------------------------------------------


def test_each_one_picture_question_is_asked_after_other_pictures_of_the_set(tmp_path):
    pics = [tmp_path / f"{c}.png" for c in "abc"]
    items = [EvalItem("q0", "What?", pics[0], "red"), EvalItem("q1", "Where?", pics[1], "left"),
             EvalItem("q2", "Which?", pics[2], "b"), EvalItem("t", "Text only?", None, "yes")]
    got = with_pictures(EvalSet("toy", items, "x"), (1, 3))
    by_id = {i.id: i for i in got.items}
    assert [i.id for i in got.items] == ["q0", "q1", "q2", "t", "q0+2", "q1+2", "q2+2"]
    assert by_id["q1+2"].pictures == (pics[2], pics[0], pics[1])  # the next ones, wrapping; its own last
    assert by_id["q1+2"].question == "Where?" and by_id["q1+2"].gold is None  # among others: not scored
    assert got.picture_counts() == {"0": 1, "1": 3, "3": 3}
    only_two = with_pictures(EvalSet("toy", items, "x"), (2,))
    assert only_two.picture_counts() == {"0": 1, "2": 3}
    with pytest.raises(UserError, match="--pictures 4 needs 4 different pictures"):
        with_pictures(EvalSet("toy", items, "x"), (1, 4))


def test_a_toy_record_may_name_several_pictures(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "eval.json").write_text(json.dumps([
        {"id": "m", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nSame shape?"}, {"from": "gpt", "value": "Yes"}]}]))
    item = read_eval(tmp_path / "eval.json").items[0]
    assert item.pictures == (tmp_path / "a.png", tmp_path / "b.png") and item.question == "Same shape?"
    assert item.gold == "Yes"


# ---- the reference against transformers with nested pictures ----------------------------------------------


def _hf_nested(preset: str, model) -> tuple[object, object]:
    """transformers' model, and a function giving its inputs for one sample holding some pictures, from its own
    image processor (OneVision's on nested pictures)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    if preset == "toy-onevision":
        hf = LlavaOnevisionForConditionalGeneration.from_pretrained(model, attn_implementation="eager").eval()
        proc = LlavaOnevisionImageProcessorPil.from_pretrained(model)

        def nested(pics: list) -> dict:
            ref = proc(images=[pics], return_tensors="np")
            assert list(ref["batch_num_images"]) == [len(pics)]
            return {k: torch.from_numpy(np.asarray(ref[k])) for k in ("pixel_values", "image_sizes",
                                                                      "batch_num_images")}
        return hf, nested
    hf = LlavaForConditionalGeneration.from_pretrained(model, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(model).image_processor
    return hf, lambda pics: {"pixel_values": torch.from_numpy(np.concatenate(
        [np.asarray(proc(images=p, return_tensors="np")["pixel_values"], np.float32) for p in pics]))}


@pytest.mark.parametrize("preset", ["toy-onevision", "toy-siglip"])
def test_reference_of_several_pictures_is_transformers_on_nested_pictures(preset, questions, request):
    from PIL import Image

    from llava_edge import EdgeLLaVA
    from llava_edge.drift.reference import compute_reference
    from llava_edge.runtimes.llm import ImageSlot

    model, bundle = request.getfixturevalue("onevision" if preset == "toy-onevision" else "interleave")
    items = with_pictures(read_eval(questions), (1, 2, 3)).items
    # the first question among two pictures, the last among three; then each about its own picture alone
    several = [[i for i in items if len(i.pictures) == n][k] for n, k in ((2, 0), (3, -1))]
    alone = [EvalItem(i.id, i.question, i.image) for i in several]
    m = EdgeLLaVA.load(bundle, device="cpu", vision_variant="fp32", llm_variant="f32", kv_cache="f32", threads=1,
                       prefix_cache=False)
    try:
        ref = compute_reference(model, several + alone, m.conv_mode, m.manifest.chat_template, max_new_tokens=4,
                                log=lambda _: None).items
        hf, nested = _hf_nested(preset, model)
        for item, r, one in zip(several, ref, ref[len(several):]):
            pics = [Image.open(p).convert("RGB") for p in item.pictures]
            slots, _, _ = m.conversation_slots(item.question, pics)
            ids = [m.image_token_id if isinstance(s, ImageSlot) else s for s in slots]
            want, new = hf_answer(hf, m.eos_id, 4, input_ids=torch.tensor([ids]), **nested(pics))
            assert r.positions == len(ids) and len(r.image_features) == len(pics)
            assert_logits_close(r.logits[0], want)
            assert [t for t in r.answer_ids if t != m.eos_id] == new
            # the pictures are in it: the same question about its own picture alone starts elsewhere
            assert np.abs(one.logits[0] - r.logits[0]).max() > 1e-3
    finally:
        m.close()


# ---- the command --------------------------------------------------------------------------------------------


def test_drift_measures_two_and_three_pictures_by_default(onevision, questions, tmp_path, capsys):
    from llava_edge.quantize.command import quantize_bundle

    model, bundle = onevision
    quantize_bundle(bundle, None, "int8", threads=1, log=lambda _: None)
    out = tmp_path / "report"
    rc = main(["drift", str(bundle), "--reference", str(model), "--eval", str(questions), "--report", str(out),
               "--variants", "fp32:f32,int8:f32", "--kv-cache", "f32", "--threads", "1", "--max-tokens", "3"])
    err = capsys.readouterr().err
    assert rc == 0, err
    result = json.loads((out / "drift.json").read_text())
    per = {str(n): QUESTIONS for n in (1, 2, 3)}
    assert result["eval"]["pictures"] == per and result["eval"]["questions"] == 3 * QUESTIONS
    assert (f"{3 * QUESTIONS} questions: {QUESTIONS} with 1 picture, {QUESTIONS} with 2, {QUESTIONS} with 3"
            in (out / "drift.md").read_text())
    pairs = {f"{p['vision']}:{p['llm']}": p for p in result["pairs"]}
    exact, int8 = pairs["fp32:f32"], pairs["int8:f32"]
    assert exact["prompt_mismatches"] == 0 and exact["answer_agreement"] == 1.0
    assert exact["vision_drift"]["images"] == QUESTIONS * (1 + 2 + 3) and exact["vision_drift"]["cos_min"] > 0.9999
    for n in per:
        e, q = exact["by_pictures"][n], int8["by_pictures"][n]
        assert e["prompts"] == QUESTIONS and e["answer_agreement"] == 1.0
        assert e["token_drift"]["positions"] >= QUESTIONS and e["token_drift"]["top1"] == 1.0
        assert e["token_drift"]["kl_mean"] < 1e-6
        # the measure sees a real difference on every picture count
        assert q["token_drift"]["kl_mean"] > 10 * e["token_drift"]["kl_mean"]
    assert int8["vision_drift"]["rel_error_mean"] > 10 * exact["vision_drift"]["rel_error_mean"]


def test_drift_pictures_one_keeps_one_picture_a_prompt(interleave, questions, capsys):
    model, bundle = interleave
    rc = main(["drift", str(bundle), "--reference", str(model), "--eval", str(questions), "--pictures", "1",
               "--variants", "fp32:f32", "--kv-cache", "f32", "--threads", "1", "--max-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"{QUESTIONS} questions, {QUESTIONS} with an image" in out and "By pictures a prompt" not in out


@pytest.fixture(scope="module")
def one_picture(tmp_path_factory):
    return toy_bundle(tmp_path_factory, "toy-next", seed=2)


@pytest.mark.parametrize("args", [["--pictures", "2"], ["--pictures", "1,3"]])
def test_a_one_picture_family_refuses_multi_picture_drift_in_one_line(one_picture, questions, tmp_path, capsys,
                                                                      args):
    model, bundle = one_picture
    rc = main(["drift", str(bundle), "--reference", str(tmp_path / "not-loaded"), "--eval", str(questions), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "trained with one picture a conversation" in err and "LLaVA-NeXT" in err


def test_a_one_picture_family_refuses_a_file_of_several_pictures(one_picture, tmp_path, capsys):
    from next_helpers import picture

    model, bundle = one_picture
    for name in ("a.png", "b.png"):
        picture(120, 90).save(tmp_path / name)
    (tmp_path / "eval.json").write_text(json.dumps([
        {"id": "m", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "Same?"}]}]))
    rc = main(["drift", str(bundle), "--reference", str(model), "--eval", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "prompts with 2 pictures" in err and "one picture a conversation" in err


@pytest.mark.parametrize("value", ["0", "two", ""])
def test_bad_picture_counts_fail_before_measuring(onevision, tmp_path, capsys, value):
    _, bundle = onevision
    rc = main(["drift", str(bundle), "--reference", str(tmp_path / "not-loaded"), "--pictures", value])
    err = capsys.readouterr().err
    assert rc == 2 and "--pictures takes picture counts" in err and len(err.strip().splitlines()) == 1
