"""Training a SigLIP + Qwen2 LLaVA-OneVision: records with several pictures (LLaVA-NeXT's JSON: ``"image": [..]``),
placed as each code base's ``preprocess_multimodal`` places them, labeled as LLaVA-NeXT's ``preprocess_qwen``
labels them, batched and scored as transformers' ``LlavaOnevisionForConditionalGeneration`` takes them; stage 1
and stage 2 end to end, and one-line errors.

References: the two ``preprocess_multimodal`` functions transcribed below from LLaVA 1.2.2's and LLaVA-NeXT's
``llava/train/train.py``; ``LlavaOnevisionImageProcessorPil`` for pixels (several pictures of a sample nested,
as its processor takes them); the model's own ``get_image_features`` for each picture's count; its forward for
the loss.
"""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

from cli_run import assert_one_line_error  # tests/ is on sys.path under pytest
from next_helpers import hf_answer, picture
from test_qwen_labels import IMAGE_INDEX, qwen, reference_source  # noqa: F401 - qwen is a fixture
from test_several_images import _ids, _last_slots
from test_train_next import stage2_dataset

from llava_edge.errors import UserError
from llava_edge.templates import IMAGE_PLACEHOLDER, TEMPLATES, flat, message_parts
from llava_edge.train.data import IGNORE_INDEX, collate, load_records
from llava_edge.train.labels import label


def llava_preprocess_multimodal(value: str) -> str:
    """LLaVA 1.2.2's, for one sentence."""
    if IMAGE_PLACEHOLDER in value:
        value = value.replace(IMAGE_PLACEHOLDER, "").strip()
        value = IMAGE_PLACEHOLDER + "\n" + value
        value = value.strip()
    return value


def next_preprocess_multimodal(value: str) -> str:
    """LLaVA-NeXT's, for one sentence."""
    num_im = len(re.findall(IMAGE_PLACEHOLDER, value))
    if num_im == 1 and IMAGE_PLACEHOLDER in value and not value.startswith(IMAGE_PLACEHOLDER):
        value = value.replace(IMAGE_PLACEHOLDER, "").strip()
        value = IMAGE_PLACEHOLDER + "\n" + value
        value = value.strip()
    return value


ONE = ["What is it? <image>", "<image>\nWhat is it?", "<image>What is it?", "  <image> What is it?  ",
       "<image>\n\nWhat is it?", "<image>", "Look: <image> here."]
SEVERAL = ["<image>\n<image>\nWhich picture has more shapes?", "Picture 1: <image>\nPicture 2: <image>\nCompare.",
           "<image><image><image>Three?", "First <image>, then <image>; and <image>\n"]


def _write(folder, records: list[dict]):
    for r in records:
        for name in (r["image"] if isinstance(r.get("image"), list) else [r.get("image")]):
            if name and not (folder / name).exists():
                picture(64, 48, seed=len(name)).save(folder / name)
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def _record(value: str, rid: str = "r", answer: str = "Two.") -> dict:
    n = value.count(IMAGE_PLACEHOLDER)
    return {"id": rid, "image": [f"p{k}.png" for k in range(n)] if n > 1 else "p0.png",
            "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]}


@pytest.mark.parametrize("origin,reference", [("llava", llava_preprocess_multimodal),
                                              ("llava-next", next_preprocess_multimodal)])
def test_pictures_stand_where_each_code_base_puts_them(origin, reference, tmp_path):
    values = ONE + (SEVERAL if origin == "llava-next" else [])
    records, _ = load_records(_write(tmp_path, [_record(v, f"r{i}") for i, v in enumerate(values)]), tmp_path,
                              origin=origin)
    for v, r in zip(values, records):
        assert flat(message_parts(r.turns[0])) == reference(v), v
        assert len(r.images) == v.count(IMAGE_PLACEHOLDER)


def test_several_pictures_are_labeled_as_llava_next_does(qwen, tmp_path):  # noqa: F811 - the fixture
    """Ids and labels of several-picture records in the qwen_1_5 mode equal LLaVA-NeXT's preprocess_multimodal +
    preprocess_qwen on transformers' tokenizer (the real Qwen2 vocabulary), the image token at each marker."""
    hf, tok = qwen
    image_id = hf.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    raw = [_record(v, f"r{i}") for i, v in enumerate(SEVERAL + ["Before <image> after."])]
    raw[0]["conversations"] += [{"from": "human", "value": "And the colours?"}, {"from": "gpt", "value": "Red."}]
    records, _ = load_records(_write(tmp_path, raw), tmp_path, origin="llava-next")
    for r, rec in zip(raw, records):
        source = [dict(s, value=next_preprocess_multimodal(s["value"])) for s in r["conversations"]]
        want_ids, want_labels = reference_source(hf, source)
        got = label(rec.turns, TEMPLATES["qwen_1_5"], tok, image_id, True, max_length=4096)
        assert [IMAGE_INDEX if i == image_id else i for i in got.input_ids] == want_ids, rec.id
        assert got.labels == want_labels and not got.mismatch, rec.id
        assert got.input_ids.count(image_id) == len(rec.images)


@pytest.mark.parametrize("record,origin,words", [
    (dict(_record("<image>\n<image>\nWhich?"), image=["p0.png"]), "llava-next", ["1 picture", "2 <image>"]),
    (dict(_record("Which?"), image=["p0.png", "p1.png"]), "llava-next", ["2 picture", "0 <image>"]),
    ({"id": "r", "image": ["p0.png", "p1.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhich?"}, {"from": "gpt", "value": "<image> this"}]},
     "llava-next", ["in an answer"]),
    (_record("<image>\n<image>\nWhich?"), "llava", ["2 pictures", "qwen_1_5"]),
    (dict(_record("<image>\n<image>\nWhich?"), image=["p0.png", 3]), "llava-next", ["3", "not a file name"]),
    (dict(_record("<image>\n<image>\nWhich?"), image=["p0.png", "../x.png"]), "llava-next", ["escapes"]),
    (dict(_record("<image>\nWhat happens?"), video="clip.mp4"), "llava-next", ["an image and a video"]),
    ({**_record("<image>\nWhat happens?"), "image": None, "video": "gone.mp4"}, "llava-next", ["video not found"]),
    ({**_record("<image>\nWhat happens?"), "image": None, "video": "../x.mp4"}, "llava-next", ["escapes"]),
])
def test_bad_several_picture_records_are_one_line_errors(record, origin, words, tmp_path):
    for name in ("p0.png", "p1.png"):
        picture(32, 32).save(tmp_path / name)
    (tmp_path / "data.json").write_text(json.dumps([record]))
    with pytest.raises(UserError) as e:
        load_records(tmp_path / "data.json", tmp_path, origin=origin)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


# -- the OneVision toy --------------------------------------------------------------------------------------
SIZES = {"single": [(300, 200)], "two": [(640, 480), (90, 300)], "three": [(120, 120), (200, 60), (64, 256)]}


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    from llava_edge.toy.model import write_toy_model

    return write_toy_model(tmp_path_factory.mktemp("ov") / "model", preset="toy-onevision", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One record with one picture (tiled), one with two, one with three (one tile each), one text-only."""
    root = tmp_path_factory.mktemp("ov_data")
    records = []
    for k, (kind, sizes) in enumerate(SIZES.items()):
        names = [f"{kind}{i}.png" for i in range(len(sizes))]
        for i, (w, h) in enumerate(sizes):
            picture(w, h, seed=10 * k + i).save(root / names[i])
        question = "\n".join(f"Picture {i + 1}: <image>" for i in range(len(names))) + "\nWhat do you see?"
        records.append({"id": kind, "image": names if len(names) > 1 else names[0],
                        "conversations": [{"from": "human", "value": question},
                                          {"from": "gpt", "value": f"{len(names)} picture(s) of colours."}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Say hi."},
                                                     {"from": "gpt", "value": "Hi!"}]})
    (root / "data.json").write_text(json.dumps(records))
    return root


def _reference_inputs(model_dir, folder):
    """The image processor's inputs for the records with pictures, each record's pictures nested as one sample."""
    from PIL import Image
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    proc = LlavaOnevisionImageProcessorPil.from_pretrained(model_dir)
    samples = [[Image.open(folder / f"{kind}{i}.png") for i in range(len(sizes))] for kind, sizes in SIZES.items()]
    ref = proc(images=samples, return_tensors="np")
    return {"pixel_values": torch.from_numpy(np.asarray(ref["pixel_values"], np.float32)),
            "image_sizes": torch.from_numpy(np.asarray(ref["image_sizes"])),
            "batch_num_images": torch.from_numpy(np.asarray(ref["batch_num_images"]))}


def test_the_batch_and_the_first_loss_equal_transformers(onevision, data, tmp_path):
    """Pixels, image sizes and pictures per sample equal the image processor's; each picture takes the positions
    transformers' model gives it (a lone picture tiled, each of several one tile and a newline); the first step's
    loss equals the model's on the batch built independently."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.templates import get_template
    from llava_edge.train import stages
    from llava_edge.train.presets import get_preset

    ckpt = open_checkpoint(onevision)
    ds, tok = stage2_dataset(ckpt, data / "data.json", data, "qwen_1_5", 4096)
    ref = _reference_inputs(onevision, data)
    items = [ds[i] for i in range(len(ds))]
    ours = collate(items, tok.pad_id, ckpt.family)
    assert ours["pixel_values"].shape == ref["pixel_values"].shape  # (6 pictures, most tiles, 3, 112, 112)
    np.testing.assert_allclose(ours["pixel_values"].numpy(), ref["pixel_values"].numpy(), atol=1e-5)
    assert ours["image_sizes"].tolist() == ref["image_sizes"].tolist()
    assert ours["batch_num_images"].tolist() == ref["batch_num_images"].tolist() == [1, 2, 3]

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(onevision, attn_implementation="eager").eval()
    cfg = model.config
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=ref["pixel_values"], image_sizes=ref["image_sizes"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=cfg.vision_aspect_ratio, batch_num_images=ref["batch_num_images"]).pooler_output
    counts = [len(f) for f in feats]
    side = 112 // 14
    assert counts[0] > side * side + 1 and counts[1:] == [side * side + 1] * 5

    rows, at = [], 0
    for rec, item in zip(ds.records, items):
        lab = label(rec.turns, get_template("qwen_1_5"), tok, ckpt.image_token_id, bool(rec.images), 4096)
        n = counts[at: at + len(rec.images)]
        at += len(rec.images)
        assert [p.positions for p in item["images"]] == n, rec.id
        ids, labels, k = [], [], 0
        for t, y in zip(lab.input_ids, lab.labels):
            if t == ckpt.image_token_id:
                ids += [t] * n[k]
                labels += [IGNORE_INDEX] * n[k]
                k += 1
            else:
                ids.append(t)
                labels.append(y)
        assert item["input_ids"] == ids and item["labels"] == labels, rec.id
        rows.append((ids, labels))
    width = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [tok.pad_id] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [IGNORE_INDEX] * (width - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels, **ref).loss.item()

    cfg = get_preset("toy").stage2.with_(max_steps=1, global_batch=4, per_device_batch=4, lr=1e-3,
                                         group_by_modality=False, max_length=4096)
    out = stages.stage2(str(onevision), data / "data.json", data, tmp_path / "s2", cfg, conv_mode="qwen_1_5",
                        log=lambda _: None)
    first = float(next(csv.DictReader(open(out / "loss.csv")))["loss"])
    assert abs(first - want) < 1e-5, (first, want)


def test_stage1_then_stage2_then_chat_with_two_pictures(onevision, data, tmp_path):
    """Stage 1 (plain captions, the projector alone) then stage 2 (qwen_1_5, several pictures) write a OneVision
    checkpoint that records its mode; exported, it answers two pictures as transformers' model of it does."""
    from llava_edge import EdgeLLaVA
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.export.bundle import export_bundle
    from llava_edge.train import stages
    from llava_edge.train.presets import get_preset
    from transformers import LlavaOnevisionForConditionalGeneration

    captions = [{"id": f"c{k}", "image": "single0.png" if k % 2 else "two0.png",
                 "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                   {"from": "gpt", "value": "Colours in bands."}]} for k in range(4)]
    (data / "captions.json").write_text(json.dumps(captions))
    preset = get_preset("toy")
    s1 = stages.stage1(str(onevision), data / "captions.json", data, tmp_path / "s1",
                       preset.stage1.with_(max_steps=2, global_batch=2, per_device_batch=2, max_length=4096),
                       log=lambda _: None)
    s2 = stages.stage2(str(onevision), data / "data.json", data, tmp_path / "s2",
                       preset.stage2.with_(max_steps=2, global_batch=2, per_device_batch=2, max_length=4096),
                       projector=s1 / "mm_projector.safetensors", conv_mode="qwen_1_5", log=lambda _: None)
    ckpt = open_checkpoint(s2)
    assert ckpt.family.name == "llava-onevision" and ckpt.conv_mode == "qwen_1_5"
    before = LlavaOnevisionForConditionalGeneration.from_pretrained(onevision).state_dict()
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(s2, attn_implementation="eager").eval()
    after = hf.state_dict()
    part = {k: k.split(".")[1] if k.startswith("model.") else k.split(".")[0] for k in before}
    moved = {part[k] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"multi_modal_projector", "language_model", "lm_head", "image_newline"}, moved  # tower frozen

    bundle = export_bundle(ckpt, tmp_path / "bundle", log=lambda _: None)
    from PIL import Image

    pics = [Image.open(data / "two0.png"), Image.open(data / "two1.png")]
    m = EdgeLLaVA.load(tmp_path / "bundle", device="cpu", kv_cache="f32", threads=1, prefix_cache=False)
    try:
        s = m.session(pics)
        ids = _ids(_last_slots(m, s, "What do you see?"), m.image_token_id)
        answer = s.ask("What do you see?", max_tokens=6)
        assert isinstance(answer, str) and bundle is not None
        ref = _reference_inputs(s2, data)
        two = {"pixel_values": ref["pixel_values"][1:3], "image_sizes": ref["image_sizes"][1:3],
               "batch_num_images": torch.tensor([2])}
        want, new = hf_answer(hf, m.eos_id, 6, input_ids=torch.tensor([ids]), **two)
        assert m.last_ids[: len(new)] == new
    finally:
        m.close()


def test_a_one_picture_family_refuses_a_several_picture_record_in_one_line(toy_model, tmp_path):
    """LLaVA-1.5's CLIP toy was trained with one picture a conversation: stage 2 names the record and the limit."""
    from cli_run import le

    path = _write(tmp_path, [_record("<image>\n<image>\nWhich?", "twice")])
    r = le("train", "stage2", "--model", toy_model, "--data", path, "--image-folder", tmp_path, "--output",
           tmp_path / "out", "--preset", "toy", "--max-steps", "1", "--conv-mode", "qwen_1_5")
    assert_one_line_error(r, "twice", "2 pictures", "one picture a conversation", progress=True)


def test_the_onevision_preset_trains_in_its_qwen_mode_with_the_tower(onevision, data, tmp_path):
    """``--preset llava-onevision-0.5b`` without ``--conv-mode`` trains in LLaVA-NeXT's qwen_1_5 mode (what its
    finetune scripts pass) and records it; its tower learns (mm_vision_tower_lr)."""
    from cli_run import le
    from safetensors.torch import load_file

    out = tmp_path / "s2"
    r = le("train", "stage2", "--model", onevision, "--data", data / "data.json", "--image-folder", data,
           "--output", out, "--preset", "llava-onevision-0.5b", "--max-steps", "2", "--global-batch", "2",
           "--per-device-batch", "2", "--max-length", "4096", timeout=900)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "llava_edge.json").read_text())["template"] == "qwen_1_5"
    before, after = load_file(str(onevision / "model.safetensors")), load_file(str(out / "model.safetensors"))
    tower = [k for k in before if "vision_tower" in k]
    assert tower and any(not torch.equal(before[k], after[k]) for k in tower)


def llava_next_frame_numbers(total: int, avg_fps: float, video_fps: int = 1, frames_upbound: int = 32) -> list[int]:
    """LLaVA-NeXT's process_video_with_decord (llava/utils.py), its choice of frames, transcribed."""
    avg = round(avg_fps / video_fps)
    frame_idx = [i for i in range(0, total, avg)]
    if frames_upbound > 0 and len(frame_idx) > frames_upbound:
        frame_idx = np.linspace(0, total - 1, frames_upbound, dtype=int).tolist()
    return frame_idx


@pytest.mark.parametrize("upbound, frames", [(32, [0, 10, 20]), (2, [0, 24])])
def test_a_video_record_trains_as_llava_next_samples_it_and_transformers_scores_it(onevision, upbound, frames,
                                                                                   tmp_path):
    """A LLaVA-NeXT video record (``"video": file``, ``<image>`` where it goes): its frames as LLaVA-NeXT's training
    takes them (one a second, at most --frames-upbound: 3 of a 2.5 s clip at 10 frames a second, or 2 spread over
    it), each resized to the tile; its positions hold the model's video token, as many as transformers' model gives
    the video (each frame pooled 2x2, one newline); the first step's loss equals the model's on
    ``pixel_values_videos`` built from the decoded frames independently."""
    import av
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.image_transforms import normalize, resize
    from transformers.image_utils import PILImageResampling

    from test_video import write_video
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.train import stages
    from llava_edge.train.presets import get_preset

    write_video(tmp_path / "clip.mp4", 25)  # 25 frames at 10 a second
    records = [{"id": "v", "video": "clip.mp4",
                "conversations": [{"from": "human", "value": "What happens? <image>"},
                                  {"from": "gpt", "value": "The picture gets brighter."}]}]
    (tmp_path / "video.json").write_text(json.dumps(records))
    with av.open(str(tmp_path / "clip.mp4")) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
        rate = float(c.streams.video[0].average_rate)
    assert llava_next_frame_numbers(len(decoded), rate, frames_upbound=upbound) == frames

    ckpt = open_checkpoint(onevision)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(onevision, attn_implementation="eager").eval()
    cfg = model.config
    size = cfg.vision_config.image_size
    want_pixels = np.stack([np.stack([normalize(resize(decoded[i], (size, size), resample=PILImageResampling.BICUBIC,
                                                       input_data_format="channels_last") / 255.0,
                                                mean=[0.5] * 3, std=[0.5] * 3, input_data_format="channels_last"
                                                ).transpose(2, 0, 1) for i in frames])]).astype(np.float32)

    ds, tok = stage2_dataset(ckpt, tmp_path / "video.json", tmp_path, "qwen_1_5", 4096)
    ds.frames_upbound = upbound
    item = ds[0]
    batch = collate([item], tok.pad_id, ckpt.family)
    assert "pixel_values" not in batch
    np.testing.assert_allclose(batch["pixel_values_videos"].numpy(), want_pixels, atol=1e-5)
    with torch.no_grad():
        feats = model.model.get_video_features(
            pixel_values_videos=torch.from_numpy(want_pixels), vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
    positions = feats[0].shape[0]  # the pooled frames and one newline
    assert positions == len(frames) * (-(-(size // cfg.vision_config.patch_size) // 2)) ** 2 + 1
    ids, labels = item["input_ids"], item["labels"]
    assert ids.count(cfg.video_token_id) == positions and ids.count(cfg.image_token_id) == 0
    lab = label(ds.records[0].turns, TEMPLATES["qwen_1_5"], tok, ckpt.image_token_id, True, 4096)
    at = lab.input_ids.index(ckpt.image_token_id)
    assert ids == lab.input_ids[:at] + [cfg.video_token_id] * positions + lab.input_ids[at + 1:]
    assert labels == lab.labels[:at] + [IGNORE_INDEX] * positions + lab.labels[at + 1:]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                     labels=torch.tensor([labels]), pixel_values_videos=torch.from_numpy(want_pixels)).loss.item()

    run = get_preset("toy").stage2.with_(max_steps=1, global_batch=1, per_device_batch=1, lr=1e-3,
                                         group_by_modality=False, max_length=4096, frames_upbound=upbound)
    out = stages.stage2(str(onevision), tmp_path / "video.json", tmp_path, tmp_path / "s2", run,
                        conv_mode="qwen_1_5", log=lambda _: None)
    first = float(next(csv.DictReader(open(out / "loss.csv")))["loss"])
    assert abs(first - want) < 1e-5, (first, want)


def test_a_video_record_on_a_family_without_video_is_one_line(toy_model, tmp_path):
    from cli_run import le
    from test_video import write_video

    write_video(tmp_path / "clip.mp4", 5)
    path = _write(tmp_path, [{"id": "clip", "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "Nothing."}]}])
    r = le("train", "stage2", "--model", toy_model, "--data", path, "--image-folder", tmp_path, "--output",
           tmp_path / "out", "--preset", "toy", "--max-steps", "1")
    assert_one_line_error(r, "clip", "video", "take no video", progress=True)
