"""The toy's two-picture question ("Which picture has more shapes?") for families trained with several pictures.

- its records carry both pictures as LLaVA-NeXT's multi-image data does (``image``: a list, one ``<image>`` per
  picture in the human turn) and their answer follows from the two scenes' shape counts, never a tie;
- without ``several`` the data are the one-picture world's, byte for byte; with it the captions are too;
- the held-out score reports the kind against its chance; a one-picture family refuses such a record in one line;
- the evaluation's features for two pictures equal transformers' OneVision model given both pictures as one sample;
- a tiny ``toy build --preset toy-onevision`` trains on them through train stage1/stage2 (mode ``qwen_1_5``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_run import assert_one_line_error, le
from llava_edge.errors import UserError
from llava_edge.scenes import Scene
from llava_edge.toy.data import FILES, MORE_ANSWERS, MORE_KIND, MORE_QUESTION, write_dataset
from llava_edge.toy.evaluate import pictures_of, score


def _digest(folder: Path, pattern: str = "*") -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob(pattern)):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    write_dataset(out, seed=2, n_stage1=10, n_stage2=80, n_eval=60, several=True)
    return out


def test_two_picture_records_name_both_pictures_and_answer_from_the_scenes(two):
    evals = [r for r in json.loads((two / FILES["eval"]).read_text()) if r["category"] == MORE_KIND]
    train = [r for r in json.loads((two / FILES["stage2"]).read_text()) if r.get("category") == MORE_KIND]
    assert evals and train
    answers = set()
    for r in evals + train:
        assert isinstance(r["image"], list) and len(r["image"]) == 2 and len(set(r["image"])) == 2
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"] == "<image>\n" * 2 + MORE_QUESTION
        for name in r["image"]:
            assert Image.open(two / name).size == (128, 128)
        answers.add(gpt["value"])
    for r in evals:
        a, b = (Scene.from_dict(s) for s in r["scenes"])
        assert len(a.objects) != len(b.objects)
        assert r["answer"] == r["conversations"][1]["value"]
        assert r["answer"] == MORE_ANSWERS[0 if len(a.objects) > len(b.objects) else 1]
        # each picture is its own scene: a shape is drawn in every cell that holds one
        for scene, name in zip((a, b), r["image"]):
            im = np.asarray(Image.open(two / name).convert("RGB")).astype(int)
            for o in scene.objects:
                k = ["top left", "top right", "bottom left", "bottom right"].index(o.cell)
                r0, c0 = (k // 2) * 64, (k % 2) * 64
                assert np.abs(im[r0 + 24:r0 + 40, c0 + 24:c0 + 40].reshape(-1, 3).mean(0) - 245).max() > 40
    assert answers == set(MORE_ANSWERS)


def test_one_picture_world_unchanged_and_captions_stay_one_picture(tmp_path, two):
    write_dataset(tmp_path / "a", seed=2, n_stage1=10, n_stage2=80, n_eval=60)
    write_dataset(tmp_path / "b", seed=2, n_stage1=10, n_stage2=80, n_eval=60, several=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert not any(isinstance(r.get("image"), list) for f in FILES.values()
                   for r in json.loads((tmp_path / "a" / f).read_text()))
    assert (tmp_path / "a" / FILES["stage1"]).read_bytes() == (two / FILES["stage1"]).read_bytes()
    assert _digest(tmp_path / "a", "stage1_*") == _digest(two, "stage1_*")


def test_score_reports_the_kind_against_chance(two):
    records = json.loads((two / FILES["eval"]).read_text())
    more = [r for r in records if r["category"] == MORE_KIND]
    # right on every other question, right on the first half of the two-picture ones
    answers, k = [], 0
    for r in records:
        if r["category"] == MORE_KIND:
            answers.append(r["answer"] if k < len(more) // 2 else "the other one")
            k += 1
        else:
            answers.append(r["answer"])
    s = score(records, answers)
    assert s["two_pictures"] == {"accuracy": (len(more) // 2) / len(more), "n": len(more), "chance": 0.5}
    assert s["per_category"][MORE_KIND] == s["two_pictures"]["accuracy"]
    one = [r for r in records if r["category"] != MORE_KIND]
    assert "two_pictures" not in score(one, [r["answer"] for r in one])


def test_a_one_picture_family_refuses_a_two_picture_record(toy_model, two, tmp_path):
    from llava_edge.toy.evaluate import evaluate_hf

    records = [r for r in json.loads((two / FILES["eval"]).read_text()) if r["category"] == MORE_KIND][:1]
    f = two / "one_two_picture_question.json"
    f.write_text(json.dumps(records))
    with pytest.raises(UserError) as e:
        evaluate_hf(toy_model, f)
    assert "\n" not in str(e.value) and "one picture a conversation" in str(e.value)


def test_two_picture_features_equal_transformers_onevision(two, tmp_path):
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.templates import expand_images, get_template
    from llava_edge.tokenizer import Tokenizer
    from llava_edge.drift.reference import generation_inputs
    from llava_edge.toy.evaluate import question_of
    from llava_edge.toy.model import write_toy_model

    model_dir = write_toy_model(tmp_path / "ov", "toy-onevision", seed=1)
    ckpt = open_checkpoint(model_dir)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir).eval()
    family, images = ckpt.family, ckpt.family.checkpoint_image_path(ckpt)
    r = next(r for r in json.loads((two / FILES["eval"]).read_text()) if r["category"] == MORE_KIND)
    pics = [Image.open(two / n).convert("RGB") for n in pictures_of(r)]
    prepared = [images.prepare(p, alone=False) for p in pics]
    tok, img = Tokenizer(model_dir), ckpt.image_token_id
    ids = expand_images(tok.encode_prompt(get_template(ckpt.conv_mode).prompt(question_of(r), image=2), img), img,
                        [[img] * p.positions for p in prepared])
    ours = generation_inputs(hf, family, ids, prepared, images)
    ref = LlavaOnevisionImageProcessorPil.from_pretrained(model_dir)(images=[pics], return_tensors="np")
    with torch.no_grad():
        got = hf(**ours).logits
        want = hf(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(np.asarray(ref["pixel_values"])),
                  image_sizes=torch.from_numpy(np.asarray(ref["image_sizes"])),
                  batch_num_images=torch.from_numpy(np.asarray(ref["batch_num_images"]))).logits
    assert list(ref["batch_num_images"]) == [2]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_toy_build_refuses_real_presets_in_one_line(tmp_path):
    r = le("toy", "build", "--out", tmp_path / "x", "--preset", "llava-onevision-qwen2-0.5b")
    assert_one_line_error(r, "toy-onevision", "llava-onevision-qwen2-0.5b")


def test_tiny_onevision_build_trains_on_two_pictures_in_qwen_mode(tmp_path):
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.toy.build import BuildSize, build

    size = BuildSize(n_stage1=8, n_stage2=24, n_eval=14, vision_steps=1, language_steps=1, stage1_epochs=1,
                     stage2_epochs=1)
    result = build(tmp_path / "b", seed=0, size=size, preset="toy-onevision", log=lambda _: None)
    out = tmp_path / "b"
    stage2 = json.loads((out / "data" / FILES["stage2"]).read_text())
    evals = json.loads((out / "data" / FILES["eval"]).read_text())
    assert any(isinstance(r.get("image"), list) for r in stage2)
    assert open_checkpoint(out / "model").conv_mode == "qwen_1_5"
    assert (out / "model" / "tokenizer.json").is_file() and not (out / "model" / "tokenizer.model").exists()
    assert result["n"] == len(evals) == 14
    n_more = sum(r["category"] == MORE_KIND for r in evals)
    assert (result.get("two_pictures") or {}).get("n", 0) == n_more
    assert json.loads((out / "eval.json").read_text())["per_category"] == result["per_category"]
