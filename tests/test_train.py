"""Training: label masks, bad data, data order, which parameters learn, LoRA, resume, 2 processes."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from llava_edge.errors import UserError
from llava_edge.templates import get_template
from llava_edge.toy.data import FILES
from llava_edge.train.data import IGNORE_INDEX, LlavaDataset, load_records
from llava_edge.train.presets import get_preset
from llava_edge.train.sampler import epoch_order


@pytest.fixture(scope="module")
def tok(toy_model):
    from llava_edge.tokenizer import Tokenizer

    return Tokenizer(toy_model)


@pytest.fixture(scope="module")
def sp(toy_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(toy_model / "tokenizer.model"))


def _runs(labels):
    """Contiguous runs of learned label ids."""
    runs, cur = [], []
    for t in labels:
        if t == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("split,template", [("stage1", "plain"), ("stage2", "vicuna_v1")])
def test_learned_tokens_decode_to_the_answers(toy_data, toy_model, tok, split, template):
    from llava_edge.checkpoint import open_checkpoint

    ckpt = open_checkpoint(toy_model)
    records, _ = load_records(toy_data / FILES[split], toy_data)
    ds = LlavaDataset(records, get_template(template), tok, ckpt.image_token_id, 64, ckpt.image_spec(), 2048)
    for i, rec in enumerate(records):
        item = ds[i]  # the image is expanded to its positions as the item is read
        answers = [t.text for t in rec.turns if t.role == "assistant"]
        runs = _runs(item["labels"])
        if template == "plain":  # the caption and its newline (LLaVA's plain separator)
            assert [tok.decode(run) for run in runs] == [a + "\n" for a in answers], rec.id
        else:  # each answer and its end-of-sequence token
            assert [tok.decode(run) for run in runs] == answers, rec.id
            assert all(run[-1] == tok.eos_id for run in runs), rec.id
        assert item["input_ids"].count(ckpt.image_token_id) == (64 if rec.image else 0)
        assert not ds.items[i].mismatch


def test_stage1_ids_are_llavas(toy_data, toy_model, tok, sp):
    # LLaVA's tokenizer_image_token tokenizes the text after <image> as its own chunk (BOS dropped):
    # the stage-1 ids are [BOS, image x N] + SentencePiece(caption + "\n"), caption starting with '▁two',
    # and every caption token is learned, its word start included (LLaVA masks only BOS and the image).
    from llava_edge.checkpoint import open_checkpoint

    ckpt = open_checkpoint(toy_model)
    records, _ = load_records(toy_data / FILES["stage1"], toy_data)
    ds = LlavaDataset(records, get_template("plain"), tok, ckpt.image_token_id, 64, ckpt.image_spec(), 2048)
    items = [ds[i] for i in range(len(ds))]
    for rec, item in zip(records, items):
        caption = sp.encode(rec.turns[1].text + "\n")
        assert item["input_ids"] == [tok.bos_id] + [ckpt.image_token_id] * 64 + caption, rec.id
        assert item["labels"] == [IGNORE_INDEX] * 65 + caption, rec.id
    first = {sp.id_to_piece(item["input_ids"][65]) for item in items}
    assert all(t.startswith("\u2581") for t in first), first  # word-start pieces only


def _write(tmp_path, records, name="d.json"):
    (tmp_path / name).write_text(json.dumps(records))
    return tmp_path / name


def test_bad_records_are_named(toy_data, tmp_path):
    img = "images/eval_00000.png"
    ok = {"id": "ok", "image": img, "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}
    cases = {
        "missing": ({**ok, "id": "missing", "image": "images/nope.png"}, "image not found"),
        "noanswer": ({"id": "noanswer", "image": img, "conversations": [{"from": "human", "value": "<image>\nQ"}]},
                     "no assistant turn"),
        "escape": ({**ok, "id": "escape", "image": "../../etc/passwd"}, "escapes"),
    }
    for rid, (rec, msg) in cases.items():
        with pytest.raises(UserError, match=f"record {rid}: .*{msg}"):
            load_records(_write(tmp_path, [ok, rec]), toy_data)
    records, skipped = load_records(_write(tmp_path, [ok] + [c for c, _ in cases.values()]), toy_data, skip_bad=True)
    assert [r.id for r in records] == ["ok"] and skipped == 3
    with pytest.raises(UserError, match="no records"):
        load_records(_write(tmp_path, []), toy_data)


def test_unreadable_image_names_the_record(toy_data, toy_model, tok, tmp_path):
    from llava_edge.checkpoint import open_checkpoint

    (tmp_path / "bad.png").write_text("not a png")
    rec = {"id": "broken", "image": "bad.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}
    records, _ = load_records(_write(tmp_path, [rec]), tmp_path)
    ckpt = open_checkpoint(toy_model)
    ds = LlavaDataset(records, get_template("vicuna_v1"), tok, ckpt.image_token_id, 64, ckpt.image_spec(), 2048)
    with pytest.raises(UserError, match="record broken"):
        ds[0]


def test_order_is_the_same_for_any_world_size_and_groups_modalities():
    lengths = [100 + i if i % 5 else -(50 + i) for i in range(200)]
    order = epoch_order(lengths, 16, seed=1, epoch=0, group_by_modality=True)
    assert sorted(order) == list(range(200))
    assert order == epoch_order(lengths, 16, seed=1, epoch=0, group_by_modality=True)
    assert order != epoch_order(lengths, 16, seed=1, epoch=1, group_by_modality=True)
    full = len(order) - len(order) % 16
    for s in range(0, full - 16, 16):  # every full global batch holds one modality
        signs = {lengths[i] > 0 for i in order[s : s + 16]}
        assert len(signs) == 1


def _cfg(**kw):
    base = dict(max_steps=2, global_batch=4, per_device_batch=2, save_steps=100, lr=1e-3)
    base.update(kw)
    return get_preset("toy").stage1.with_(**base)


def _params(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_stage1_trains_only_the_projector(toy_model, toy_data, tmp_path):
    from llava_edge.train import stages

    out = stages.stage1(str(toy_model), toy_data / FILES["stage1"], toy_data, tmp_path / "s1", _cfg(), log=lambda _: None)
    before, after = _params(toy_model), _params(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)
    assert (out / "mm_projector.safetensors").is_file() and (out / "loss.png").is_file()
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(float(r["loss"]) > 0 for r in rows)
    assert json.loads((out / "llava_edge.json").read_text())["template"] == "plain"


def test_stage2_freezes_the_tower_and_lora_merges(toy_model, toy_data, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from llava_edge.train import stages

    cfg = get_preset("toy").stage2.with_(max_steps=2, global_batch=4, per_device_batch=2, lr=1e-3)
    full = stages.stage2(str(toy_model), toy_data / FILES["stage2"], toy_data, tmp_path / "full", cfg, log=lambda _: None)
    before, after = _params(toy_model), _params(full)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any("vision_tower" in k for k in changed)
    assert any("language_model.model.layers" in k for k in changed) and any("projector" in k for k in changed)

    lora_cfg = cfg.with_(lora=True, lora_r=4, lora_alpha=8, projector_lr=1e-3)
    adapter = stages.stage2(str(toy_model), toy_data / FILES["stage2"], toy_data, tmp_path / "lora", lora_cfg,
                            log=lambda _: None)
    assert (adapter / "adapter_config.json").is_file()
    merged = stages.merge_lora(str(toy_model), adapter, tmp_path / "merged", log=lambda _: None)
    m = _params(merged)
    changed = {k for k in before if not torch.equal(before[k], m[k])}
    assert not any("vision_tower" in k for k in changed)
    assert any("language_model.model.layers" in k for k in changed) and any("projector" in k for k in changed)
    assert LlavaForConditionalGeneration.from_pretrained(merged) is not None


def test_resume_continues_the_same_curve(toy_model, toy_data, tmp_path):
    from llava_edge.train import stages

    cfg = _cfg(max_steps=4)
    data = toy_data / FILES["stage1"]
    whole = stages.stage1(str(toy_model), data, toy_data, tmp_path / "whole", cfg, log=lambda _: None)
    assert stages.stage1(str(toy_model), data, toy_data, tmp_path / "cut", cfg, stop_after=2, log=lambda _: None) is None
    resumed = stages.stage1(str(toy_model), data, toy_data, tmp_path / "cut", cfg, resume=True, log=lambda _: None)
    a = [float(r["loss"]) for r in csv.DictReader(open(whole / "loss.csv"))]
    b = [float(r["loss"]) for r in csv.DictReader(open(resumed / "loss.csv"))]
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    pa, pb = _params(whole), _params(resumed)
    assert all(torch.allclose(pa[k], pb[k], atol=1e-6) for k in pa)


def test_two_processes_give_the_same_loss_curve(toy_model, toy_data, tmp_path):
    """torchrun with 2 gloo processes vs 1 process: same global batches, same curve."""
    curves = []
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "llava_edge.cli", "train", "stage1", "--model", str(toy_model),
               "--data", str(toy_data / FILES["stage1"]), "--image-folder", str(toy_data), "--output", str(out),
               "--preset", "toy", "--max-steps", "3", "--global-batch", "8", "--per-device-batch", "2"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        curves.append([float(x["loss"]) for x in csv.DictReader(open(out / "loss.csv"))])
    assert len(curves[0]) == len(curves[1]) == 3
    assert max(abs(x - y) for x, y in zip(*curves)) < 1e-4, curves


def test_generation_prompt_is_the_prefix_training_learns_from(toy_data, toy_model, tok):
    """What the runtime feeds (template.prompt) tokenizes to exactly the unlearned prefix of a training example."""
    from llava_edge.checkpoint import open_checkpoint

    vicuna_v1 = get_template("vicuna_v1")
    ckpt = open_checkpoint(toy_model)
    records, _ = load_records(toy_data / FILES["stage2"], toy_data)
    records = [r for r in records if r.image is not None]
    ds = LlavaDataset(records, vicuna_v1, tok, ckpt.image_token_id, 1, ckpt.image_spec(), 2048)
    for rec, item in zip(records, ds.items):
        assert rec.turns[0].image
        prompt = tok.encode_prompt(vicuna_v1.prompt(rec.turns[0].text), ckpt.image_token_id)
        n = len(prompt)
        assert item.input_ids[:n] == prompt, rec.id
        assert all(x == IGNORE_INDEX for x in item.labels[:n]) and item.labels[n] != IGNORE_INDEX, rec.id


def test_assemble_from_a_clip_tower_and_a_causal_lm(toy_model, toy_data, tmp_path):
    """--vision + --llm: a fresh LLaVA from separate base models, with a linear projector, through stage 1."""
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)

    from llava_edge.cli import main

    vision, llm = tmp_path / "clip", tmp_path / "llama"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=112, patch_size=14)).save_pretrained(vision)
    CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}).save_pretrained(vision)
    tok = AutoTokenizer.from_pretrained(toy_model)
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2)).save_pretrained(llm)
    tok.save_pretrained(llm)
    out = tmp_path / "s1"
    rc = main(["train", "stage1", "--vision", str(vision), "--llm", str(llm), "--projector-type", "linear",
               "--data", str(toy_data / FILES["stage1"]), "--image-folder", str(toy_data), "--output", str(out),
               "--preset", "toy", "--max-steps", "2", "--global-batch", "4", "--per-device-batch", "2"])
    assert rc == 0
    from transformers import LlavaForConditionalGeneration

    m = LlavaForConditionalGeneration.from_pretrained(out)
    assert m.config.projector_hidden_act == "linear"
    eye = torch.eye(32)
    assert torch.equal(m.model.multi_modal_projector.linear_2.weight, eye)  # LLaVA's single linear layer
    assert m.config.text_config.vocab_size % 64 == 0
    assert (out / "mm_projector.json").is_file()
