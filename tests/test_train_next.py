"""Stage 2 on LLaVA-NeXT (anyres): each picture its own number of positions, transformers' loss, the vision tower
at its own rate, a LLaVA-NeXT started from a LLaVA-1.5, and one-line errors.

The reference side is transformers alone: ``LlavaNextImageProcessorPil`` makes the pixels and image sizes,
``LlavaNextProcessor`` counts each picture's image tokens, ``LlavaNextForConditionalGeneration`` gives the loss.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cli_run import assert_one_line_error  # tests/ is on sys.path under pytest
from next_helpers import hf_count

from llava_edge.train.data import IGNORE_INDEX

# (width, height): a tie, wide, tall, a strip, two tiles exactly: five different position counts at 112 px tiles
SIZES = [(112, 112), (300, 200), (60, 200), (400, 120), (224, 112)]
QUESTION = "What is in the picture?"


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 7 % 256], -1)
    return Image.fromarray((a + rng.integers(0, 40, a.shape)).clip(0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def next_toy(tmp_path_factory):
    from llava_edge.toy.model import write_toy_model

    return write_toy_model(tmp_path_factory.mktemp("next") / "model", preset="toy-next", seed=0)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A data file of one record per size (the last with a second round), the images beside it."""
    root = tmp_path_factory.mktemp("next_data")
    records = []
    for k, (w, h) in enumerate(SIZES):
        picture(w, h, k).save(root / f"p{k}.png")
        conv = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": f"Shapes, {k} of them."}]
        if k == len(SIZES) - 1:
            conv += [{"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "Mostly red."}]
        records.append({"id": f"r{k}", "image": f"p{k}.png", "conversations": conv})
    (root / "data.json").write_text(json.dumps(records))
    return root


def _cfg(**kw):
    from llava_edge.train.presets import get_preset

    base = dict(max_steps=2, global_batch=len(SIZES), per_device_batch=len(SIZES), lr=1e-3)
    return get_preset("toy").stage2.with_(**{**base, **kw})


def stage2_dataset(ckpt, data, folder, mode: str = "vicuna_v1", max_length: int = 2048):
    """The dataset stage 2 builds: the checkpoint family's image path, up to its largest picture's positions, the
    records' pictures placed by the mode's code."""
    from llava_edge.templates import get_template
    from llava_edge.tokenizer import Tokenizer
    from llava_edge.train.data import LlavaDataset, load_records

    records, _ = load_records(data, folder, origin=get_template(mode).origin)
    family = ckpt.family
    section, per_tile = family.image_section(ckpt), family.tokens_per_tile(ckpt)
    images = family.image_path(section, {}, per_tile, family.side_arrays(ckpt))
    tok = Tokenizer(ckpt.path)
    return LlavaDataset(records, get_template(mode), tok, ckpt.image_token_id,
                        family.max_positions(section, per_tile), images, max_length, family,
                        video_token_id=ckpt.video_token_id), tok


def _runs(labels):
    runs, cur = [], []
    for t in list(labels) + [IGNORE_INDEX]:
        if t == IGNORE_INDEX:
            runs, cur = (runs + [cur] if cur else runs), []
        else:
            cur.append(t)
    return runs


def test_each_picture_takes_its_own_positions_and_none_is_learned(next_toy, pictures):
    from llava_edge.checkpoint import open_checkpoint

    ckpt = open_checkpoint(next_toy)
    ds, tok = stage2_dataset(ckpt, pictures / "data.json", pictures)
    counts = []
    for i, rec in enumerate(ds.records):
        item = ds[i]
        ids, labels = item["input_ids"], item["labels"]
        n = hf_count(next_toy, Image.open(rec.image))
        at = [k for k, t in enumerate(ids) if t == ckpt.image_token_id]
        assert len(at) == n == item["images"][0].positions and at == list(range(at[0], at[0] + n)), rec.id
        counts.append(n)
        first = next(k for k, t in enumerate(labels) if t != IGNORE_INDEX)
        assert first > at[-1]  # the prompt and every image position before the first answer token: ignored
        assert all(t == IGNORE_INDEX for t in labels[:first])
        answers = [t.text for t in rec.turns if t.role == "assistant"]
        assert [tok.decode(r) for r in _runs(labels)] == answers, rec.id  # only the answers (and their </s>)
    assert len(set(counts)) == len(SIZES), counts  # one batch, five different position counts


def test_the_batch_and_the_first_loss_equal_transformers(next_toy, pictures, tmp_path):
    """The batch's pixels and image sizes are the image processor's (padded across the batch); the first step's
    loss is the transformers model's on the batch built independently (processor pixels, processor counts)."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil

    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.train import stages
    from llava_edge.train.data import collate
    from llava_edge.train.labels import label

    ckpt = open_checkpoint(next_toy)
    ds, tok = stage2_dataset(ckpt, pictures / "data.json", pictures)
    ims = [Image.open(r.image) for r in ds.records]
    ref = LlavaNextImageProcessorPil.from_pretrained(next_toy)(images=ims, return_tensors="np")
    ours = collate([ds[i] for i in range(len(ds))], tok.pad_id, ckpt.family)
    assert ours["pixel_values"].shape == ref["pixel_values"].shape  # (pictures, most tiles, 3, 112, 112)
    np.testing.assert_allclose(ours["pixel_values"].numpy(), ref["pixel_values"], atol=1e-5)
    assert ours["image_sizes"].tolist() == np.asarray(ref["image_sizes"]).tolist()

    out = stages.stage2(str(next_toy), pictures / "data.json", pictures, tmp_path / "s2", _cfg(max_steps=1),
                        log=lambda _: None)
    first = float(next(csv.DictReader(open(out / "loss.csv")))["loss"])

    # transformers' side: LLaVA's ids (labels.py, checked against LLaVA's own code elsewhere) with the image token
    # repeated as often as the processor says, right-padded
    from llava_edge.templates import get_template

    rows = []
    for rec, im in zip(ds.records, ims):
        lab = label(rec.turns, get_template("vicuna_v1"), tok, ckpt.image_token_id, True, 2048)
        i, n = lab.input_ids.index(ckpt.image_token_id), hf_count(next_toy, im)
        rows.append((lab.input_ids[:i] + [ckpt.image_token_id] * n + lab.input_ids[i + 1:],
                     lab.labels[:i] + [IGNORE_INDEX] * n + lab.labels[i + 1:]))
    width = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [tok.pad_id] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [IGNORE_INDEX] * (width - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    model = LlavaNextForConditionalGeneration.from_pretrained(next_toy, attn_implementation="eager")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels,
                     pixel_values=torch.from_numpy(np.asarray(ref["pixel_values"], np.float32)),
                     image_sizes=torch.from_numpy(np.asarray(ref["image_sizes"]))).loss.item()
    assert abs(first - want) < 1e-5, (first, want)

    # a checkpoint trained with LLaVA's own anyres code (a converted original LLaVA-1.6) trains through the same
    # transformers model, so its pictures are tiled and counted transformers' way: the same batch, the same loss
    llava_made = tmp_path / "llava_made"
    shutil.copytree(next_toy, llava_made)
    recipe = json.loads((llava_made / "llava_edge.json").read_text())
    (llava_made / "llava_edge.json").write_text(json.dumps({**recipe, "anyres_origin": "llava"}))
    out = stages.stage2(str(llava_made), pictures / "data.json", pictures, tmp_path / "s2_llava", _cfg(max_steps=1),
                        log=lambda _: None)
    assert abs(float(next(csv.DictReader(open(out / "loss.csv")))["loss"]) - want) < 1e-5
    assert "anyres_origin" not in json.loads((out / "llava_edge.json").read_text())  # read transformers' way now


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _largest_step(before, after, part: str) -> float:
    return max(float((after[k] - before[k]).abs().max()) for k in before if part in k)


def test_the_vision_tower_learns_only_with_its_own_rate(next_toy, pictures, tmp_path):
    """Two optimizer steps on one batch: the first at the warm-up's rate 0, the second at full rate. Both see the
    same gradient, so AdamW's second step moves every weight with a clear gradient by its group's rate: the
    tower's largest step is --vision-lr, the language model's --lr."""
    from llava_edge.train import stages

    frozen = stages.stage2(str(next_toy), pictures / "data.json", pictures, tmp_path / "frozen", _cfg(),
                           log=lambda _: None)
    tuned = stages.stage2(str(next_toy), pictures / "data.json", pictures, tmp_path / "tuned",
                          _cfg(vision_lr=1e-5), log=lambda _: None)
    before, off, on = _weights(next_toy), _weights(frozen), _weights(tuned)
    tower = [k for k in before if "vision_tower" in k]
    assert tower and all(torch.equal(before[k], off[k]) for k in tower)
    assert not all(torch.equal(before[k], on[k]) for k in tower)
    assert _largest_step(before, on, "vision_tower") == pytest.approx(1e-5, rel=0.05)
    assert _largest_step(before, on, "language_model") == pytest.approx(1e-3, rel=0.05)
    assert _largest_step(before, off, "language_model") == pytest.approx(1e-3, rel=0.05)
    newline = next(k for k in before if k.endswith("image_newline"))
    assert not torch.equal(before[newline], off[newline])  # learned with the language model, as LLaVA-NeXT does


def test_a_llava15_checkpoint_starts_a_llava_next(toy_model, pictures, tmp_path):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from llava_edge import families, manifest
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.cli import main
    from llava_edge.export.bundle import export_bundle
    from llava_edge.templates import get_template
    from llava_edge.tokenizer import Tokenizer

    out = tmp_path / "s2"
    rc = main(["train", "stage2", "--model", str(toy_model), "--family", "llava-next", "--data",
               str(pictures / "data.json"), "--image-folder", str(pictures), "--output", str(out), "--preset", "toy",
               "--max-steps", "1", "--global-batch", str(len(SIZES)), "--per-device-batch", str(len(SIZES))])
    assert rc == 0
    old = LlavaForConditionalGeneration.from_pretrained(toy_model).state_dict()
    base = LlavaNextForConditionalGeneration.from_pretrained(out / "base")
    new = base.state_dict()
    assert set(new) - set(old) == {"model.image_newline"} and not set(old) - set(new)
    assert all(torch.equal(old[k], new[k]) for k in old)  # tower, projector, language model: the 1.5 weights
    hidden = base.config.text_config.hidden_size
    newline, std = new["model.image_newline"], 1 / math.sqrt(hidden)  # LLaVA-NeXT: randn(hidden) / sqrt(hidden)
    assert newline.shape == (hidden,)
    assert abs(float(newline.std()) / std - 1) < 0.25 and abs(float(newline.mean())) < 4 * std / math.sqrt(hidden)
    next_family = families.FAMILIES["llava-next"]
    assert base.config.image_grid_pinpoints == next_family.config_extra(112)["image_grid_pinpoints"]

    ckpt = open_checkpoint(out)
    assert ckpt.family is next_family and ckpt.conv_mode == "vicuna_v1"
    assert isinstance(LlavaNextForConditionalGeneration.from_pretrained(out), LlavaNextForConditionalGeneration)
    im = picture(300, 200, 0)
    assert next_family.checkpoint_image_path(ckpt).prepare(im).positions == hf_count(out, im)
    prompt = get_template("vicuna_v1").prompt(QUESTION, image=True, history=[])
    image_id = ckpt.image_token_id
    assert Tokenizer(out).encode_prompt(prompt, image_id) == Tokenizer(toy_model).encode_prompt(prompt, image_id)
    bundle = tmp_path / "bundle"
    export_bundle(ckpt, bundle, log=lambda _: None)
    assert manifest.read(bundle).family == "llava-next"


def _error(capsys, argv, *words, progress=False):
    from llava_edge.cli import main

    rc = main(argv)
    assert_one_line_error(SimpleNamespace(returncode=rc, stderr=capsys.readouterr().err), *words, progress=progress)


@pytest.mark.parametrize("rate", ["0", "-2e-6", "nan"])
def test_a_bad_vision_rate_is_a_one_line_error(next_toy, pictures, tmp_path, capsys, rate):
    _error(capsys, ["train", "stage2", "--model", str(next_toy), "--data", str(pictures / "data.json"),
                    "--image-folder", str(pictures), "--output", str(tmp_path / "o"), "--preset", "toy",
                    "--vision-lr", rate], "--vision-lr", "positive")


def test_bad_combinations_are_one_line_errors(next_toy, toy_model, pictures, tmp_path, capsys):
    common = ["--data", str(pictures / "data.json"), "--image-folder", str(pictures), "--output",
              str(tmp_path / "o"), "--preset", "toy"]
    _error(capsys, ["train", "stage2", "--model", str(next_toy), *common, "--vision-lr", "2e-6", "--lora"],
           "--vision-lr", "--lora")
    _error(capsys, ["train", "stage2", "--model", str(next_toy), *common, "--vision-lr", "2e-6", "--tune",
                    "projector"], "--tune projector", "vision")
    _error(capsys, ["train", "stage2", "--model", str(next_toy), *common, "--image-tokens", "16"],
           "--image-tokens", "LLaVA-NeXT")
    # the toy's largest picture takes 336 positions (base tile 64 + a 2x2 grid of 16 x 17): checked before training
    _error(capsys, ["train", "stage2", "--model", str(next_toy), *common, "--max-length", "300"],
           "record r0", "336 positions", "--max-length", progress=True)  # after transformers' loading bar
    _error(capsys, ["train", "stage2", "--model", str(toy_model), *common, "--family", "llava-9"],
           "unknown --family", "llava-next")
    _error(capsys, ["train", "stage2", "--model", str(next_toy), *common, "--family", "llava-1.5"],
           "--family llava-1.5", "LLaVA-NeXT")
