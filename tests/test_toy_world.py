"""The toy world: deterministic data in LLaVA's format, and a real llava-hf style checkpoint."""

import hashlib
import json

import numpy as np
from PIL import Image

from llava_edge.checkpoint import open_checkpoint
from llava_edge.toy.data import FILES, write_dataset
from llava_edge.scenes import CELLS


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_dataset(tmp_path / name, seed=seed, n_stage1=5, n_stage2=5, n_eval=5)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_llava_schema_and_categories(toy_data):
    stage1 = json.loads((toy_data / FILES["stage1"]).read_text())
    stage2 = json.loads((toy_data / FILES["stage2"]).read_text())
    for rec in stage1 + stage2:
        assert set(rec) >= {"id", "conversations"}
        conv = rec["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
        if "image" in rec:
            assert (toy_data / rec["image"]).is_file()
            assert conv[0]["value"].count("<image>") == 1
            assert all("<image>" not in c["value"] for c in conv[1:])
    assert {r.get("category") for r in stage2 if "image" in r} == {"conversation", "detail", "reasoning", "vqa"}
    assert any(len(r["conversations"]) > 2 for r in stage2)  # multi-turn present
    assert any(r["conversations"][0]["value"].endswith("<image>") for r in stage1)  # both placements


def test_eval_answers_follow_from_the_scene(toy_data):
    records = json.loads((toy_data / FILES["eval"]).read_text())
    assert len(records) == 20
    for r in records:
        objs = r["scene"]["objects"]
        q = r["conversations"][0]["value"].split("\n")[1]
        assert r["conversations"][1]["value"] == r["answer"]
        assert len({(o["shape"], o["color"], o["size"]) for o in objs}) == 1  # one kind of object per scene
        o = objs[0]
        if r["category"] == "count":
            assert r["answer"] == str(len(objs))
        elif r["category"] in ("shape", "color", "size"):
            assert r["answer"] == o[r["category"]]
        elif r["category"] == "where":
            assert len(objs) == 1 and r["answer"] == o["cell"]
        elif r["category"] == "exists":
            color, shape = q.rstrip("?").split()[-2:]
            present = any(o["color"] == color and o["shape"] == shape for o in objs)
            assert r["answer"] == ("Yes" if present else "No")
        else:
            raise AssertionError(f"unknown category {r['category']}")


def test_images_show_their_scene(toy_data):
    r = json.loads((toy_data / FILES["eval"]).read_text())[0]
    im = np.asarray(Image.open(toy_data / r["image"]).convert("RGB"))
    assert im.shape == (128, 128, 3)
    for o in r["scene"]["objects"]:
        col, row = CELLS.index(o["cell"]) % 2, CELLS.index(o["cell"]) // 2
        centre = im[row * 64 + 24 : row * 64 + 40, col * 64 + 24 : col * 64 + 40].reshape(-1, 3).mean(0)
        assert np.abs(centre - 245).max() > 40  # something is drawn where the scene says


def test_toy_model_is_a_llava_hf_checkpoint(toy_model):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ckpt = open_checkpoint(toy_model)
    model = LlavaForConditionalGeneration.from_pretrained(toy_model)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 2e7
    proc = AutoProcessor.from_pretrained(toy_model)
    tok = proc.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == ckpt.image_token_id == len(tok) - 2
    assert tok.pad_token == "<pad>" and tok.convert_tokens_to_ids("<pad>") == len(tok) - 1
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert model.config.text_config.vocab_size % 64 == 0 and model.config.text_config.vocab_size >= len(tok)
    assert model.config.vision_feature_layer == -2 and model.config.projector_hidden_act == "gelu"
    # the processor expands <image> to one token per patch, as for llava-1.5
    ids = proc(text="USER: <image>\nHi ASSISTANT:", images=Image.new("RGB", (128, 128)), return_tensors="pt")["input_ids"]
    assert int((ids == ckpt.image_token_id).sum()) == ckpt.num_image_tokens() == 64
    assert tok.encode("unseen words ✓")[0] == 1  # BOS added; byte fallback covers any text
    assert tok.decode(tok.encode("unseen words ✓"), skip_special_tokens=True) == "unseen words ✓"


def test_pretraining_moves_the_halves_it_trains(toy_model):
    import torch

    from llava_edge.checkpoint import load_hf_model
    from llava_edge.tokenizer import Tokenizer
    from llava_edge.toy.pretrain import language_examples, pretrain_language, pretrain_vision

    ckpt = open_checkpoint(toy_model)
    model = load_hf_model(ckpt)
    tower0 = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    lm0 = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    proj0 = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    v = pretrain_vision(model, ckpt.image_spec(), steps=2, batch=4, log=lambda _: None)
    t = pretrain_language(model, Tokenizer(toy_model), steps=2, batch=4, log=lambda _: None)
    assert len(v) == len(t) == 2 and all(np.isfinite(v + t))
    assert any(not torch.equal(tower0[k], x) for k, x in model.model.vision_tower.state_dict().items())
    assert any(not torch.equal(lm0[k], x) for k, x in model.model.language_model.state_dict().items())
    assert all(torch.equal(proj0[k], x) for k, x in model.model.multi_modal_projector.state_dict().items())
    chats = [x for x in language_examples(20, 0) if not isinstance(x, str)]
    assert chats and all(t.role == "assistant" for c in chats for t in c[1::2])


def test_stage2_asks_is_there_more_often_than_the_held_out_set():
    # TRAIN_KIND_WEIGHTS: "Is there a ...?" three times as often in training; the held-out set asks kinds evenly
    import random

    from llava_edge.toy.data import TRAIN_KIND_WEIGHTS, short_qa
    from llava_edge.scenes import random_scene

    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(3000)]
    train = sum(short_qa(s, rng, TRAIN_KIND_WEIGHTS)[0] == "exists" for s in scenes) / len(scenes)
    held_out = sum(short_qa(s, rng)[0] == "exists" for s in scenes) / len(scenes)
    assert TRAIN_KIND_WEIGHTS["exists"] == 3
    assert 0.17 < held_out < 0.22 and 0.35 < train < 0.45, (held_out, train)


def test_ground_truth_of_a_held_out_image_is_printed(toy_data):
    import subprocess
    import sys

    from llava_edge.toy.data import detail
    from llava_edge.scenes import Scene

    r = json.loads((toy_data / FILES["eval"]).read_text())[3]
    out = subprocess.run([sys.executable, "-m", "llava_edge.toy.data", str(toy_data / FILES["eval"]), r["id"]],
                         capture_output=True, text=True, check=True).stdout
    scene = Scene.from_dict(r["scene"])
    assert scene.to_dict() == r["scene"]
    assert out.strip() == detail(scene) and scene.objects[0].color in out
