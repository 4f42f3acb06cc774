"""LLaVA-OneVision (one picture a conversation) through export and the runtime, against transformers' own model
and image processor.

``toy model --preset toy-onevision`` builds a ``LlavaOnevisionForConditionalGeneration``: a SigLIP tower
with 112 px tiles on OneVision's 36 grids, ``anyres_max_9``, every token of the last layer, and a Qwen2
language model (q/k/v biases; llama.cpp's ``qwen2`` architecture in the GGUF). The reference side is
transformers alone: ``LlavaOnevisionImageProcessorPil`` makes the pixels, ``LlavaOnevisionModel`` packs
(its packed length is the count), ``LlavaOnevisionForConditionalGeneration`` answers. The runtime side is
the bundle: llava-edge's tiles, the ONNX graph, numpy packing and llama.cpp.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from next_helpers import assert_logits_close, hf_answer, picture, toy_bundle

from llava_edge import manifest

# ties, within one tile, strips 1:10 and 10:1, 1 px, larger than every grid, and where the 9-tile cap shrinks
SIZES = [(112, 112), (300, 300), (100, 60), (1, 1), (60, 600), (600, 60), (640, 480), (480, 640),
         (1000, 800), (250, 130)]
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_bundle(tmp_path_factory, "toy-onevision", seed=0)


@pytest.fixture(scope="module")
def hf(toy):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(toy[0], attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def processor(toy):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    return LlavaOnevisionImageProcessorPil.from_pretrained(toy[0])


@pytest.fixture(scope="module")
def runtime(toy):
    from llava_edge import EdgeLLaVA

    m = EdgeLLaVA.load(toy[1], device="cpu", kv_cache="f32", threads=1, prefix_cache=False)
    yield m
    m.close()


def hf_inputs(processor, im) -> dict:
    out = processor(images=im, return_tensors="np")
    return {"pixel_values": torch.from_numpy(np.asarray(out["pixel_values"], np.float32)),
            "image_sizes": torch.from_numpy(np.asarray(out["image_sizes"])),
            "batch_num_images": torch.from_numpy(np.asarray(out["batch_num_images"]))}


def hf_features(hf, inputs) -> np.ndarray:
    cfg = hf.config
    with torch.no_grad():
        return hf.model.get_image_features(
            **inputs, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=cfg.vision_aspect_ratio).pooler_output[0].numpy()


def test_the_toy_is_a_onevision_checkpoint_and_the_bundle_says_so(toy, hf):
    model, bundle = toy
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["model_type"] == "llava_onevision" and cfg["text_config"]["model_type"] == "qwen2"
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model"
    m = manifest.read(bundle)
    assert m.family == "llava-onevision"
    a = m.image["anyres"]
    assert a["max_grid"] == 9 and len(a["pinpoints"]) == 36 and (a["orientation"], a["rounding"]) == ("hw", "hf")
    assert m.image["squash"] is True and m.vision["num_image_tokens"] == 64 and m.llm["arch"] == "qwen2"
    stored = np.load(bundle / m.arrays["image_newline"]["file"])
    assert np.array_equal(stored, hf.model.image_newline.detach().numpy())
    llm = next(v for v in m.variants if v.kind == "llm")
    from gguf import GGUFReader

    assert bytes(GGUFReader(bundle / llm.file).fields["general.architecture"].parts[-1]).decode() == "qwen2"


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_tiles_positions_and_packed_features_equal_transformers(size, hf, processor, runtime):
    im = picture(*size)
    prepared = runtime.prepare_image(im)
    ref = hf_inputs(processor, im)
    ref_px = ref["pixel_values"][0, : prepared.tiles].numpy()
    assert prepared.pixels.shape == ref_px.shape
    np.testing.assert_allclose(prepared.pixels, ref_px, atol=1e-5)
    want = hf_features(hf, ref)
    assert prepared.positions == len(want)
    _, got = runtime.image_embeddings(im)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_the_cap_is_exercised(runtime):
    """At least one of the sizes has a grid over 9 tiles' worth of patches, which anyres_max_9 shrinks."""
    from llava_edge import anyres

    spec = runtime.images.grid
    shrunk = [s for s in SIZES if anyres.packed_grid_size(*s, spec) != anyres.unpadded_size(*s, spec)]
    assert shrunk


@pytest.mark.parametrize("size", [(300, 300), (640, 480), (60, 600)], ids=str)
def test_first_answer_token_logits_and_greedy_answers_equal_transformers(size, hf, processor, runtime):
    m = runtime
    im = picture(*size, seed=1)
    parts = m.template.prompt(QUESTION, image=True, history=[])
    ids = m.tokenizer.encode_prompt(parts, m.image_token_id)
    ref = hf_inputs(processor, im)
    n = len(hf_features(hf, ref))
    i = ids.index(m.image_token_id)
    full = ids[:i] + [m.image_token_id] * n + ids[i + 1 :]
    want, new = hf_answer(hf, m.eos_id, 8, input_ids=torch.tensor([full]), **ref)
    assert_logits_close(m.prompt_logits(im, parts)[-1], want)
    m.chat(im, QUESTION, max_tokens=8)
    assert m.last_ids[: len(new)] == new


def test_drift_against_transformers_onevision(toy, tmp_path, capsys):
    """The drift tool's reference is transformers' LlavaOnevisionForConditionalGeneration; the exact variants
    reproduce it on tiled pictures of several sizes (one a prompt: tests/test_drift_several_images.py measures
    several)."""
    from test_drift import write_scienceqa

    from llava_edge.cli import main

    model, bundle = toy
    sqa = write_scienceqa(tmp_path / "sqa", n=4)  # three with a picture
    for i, size in enumerate([(128, 128), (640, 480), (90, 260)]):
        picture(*size, seed=i).save(tmp_path / "sqa" / "images" / f"s{i}.png")
    out = tmp_path / "report"
    rc = main(["drift", str(bundle), "--reference", str(model), "--eval", str(sqa), "--report", str(out),
               "--variants", "fp32:f32", "--kv-cache", "f32", "--threads", "1", "--max-tokens", "4",
               "--pictures", "1"])
    assert rc == 0, capsys.readouterr().err
    pair = json.loads((out / "drift.json").read_text())["pairs"][0]
    assert pair["token_drift"]["top1"] == 1.0 and pair["token_drift"]["kl_mean"] < 1e-6
    assert pair["vision_drift"]["images"] == 3 and pair["vision_drift"]["cos_min"] > 0.9999
    assert pair["answer_agreement"] == 1.0 and pair["prompt_mismatches"] == 0


def test_cli_export_quantize_chat_and_the_refused_mmproj(toy, tmp_path):
    from cli_run import assert_one_line_error, le

    model, _ = toy
    out = tmp_path / "b"
    r = le("export", "--model", model, "--out", out, "--target", "all")
    assert r.returncode == 0, r.stderr
    assert "mmproj: skipped" in r.stderr and "OneVision" in r.stderr
    r = le("quantize", out, "--vision", "int8", "--llm", "q8_0")
    assert r.returncode == 0, r.stderr
    img = tmp_path / "p.png"
    picture(640, 480).save(img)
    r = le("chat", "--bundle", out, "--image", img, "--explain", "--max-tokens", "3", "--device", "cpu",
           "--image-tokens", "200", "What is it?", block_torch=True)
    assert r.returncode == 0, r.stderr
    assert "model family: LLaVA-OneVision" in r.stderr and "at most 200 a picture" in r.stderr
    r = le("export", "--model", model, "--out", tmp_path / "m", "--target", "mmproj")
    assert_one_line_error(r, "OneVision", progress=True)


def test_the_tensorrt_profile_takes_every_tile_of_the_largest_picture_by_default(toy, tmp_path, monkeypatch):
    """Without --trt-max-batch the engine's profile reaches the most tiles one picture sends (1 + 36 on
    OneVision's grids); asked for fewer, export refuses in one line. TensorRT's builder is a stand-in here (no
    GPU): the wiring only."""
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.errors import UserError
    from llava_edge.export import bundle as bundle_mod
    from llava_edge.export.bundle import TensorRTOptions, export_bundle
    from llava_edge.runtimes import tensorrt_vision

    model, _ = toy
    calls = []

    def fake_build(onnx_path, engine_path, **kw):
        calls.append(kw)
        engine_path.write_bytes(b"engine")
        return {"precision": kw["precision"], "min_batch": 1, "opt_batch": kw["opt_batch"],
                "max_batch": kw["max_batch"], "image_size": 112, "input": "pixel_values", "output": "image_embeds"}

    monkeypatch.setattr(bundle_mod, "tensorrt_unavailable", lambda: None)
    monkeypatch.setattr(tensorrt_vision, "running_platform", lambda device=0: {"gpu": "stand-in"})
    monkeypatch.setattr(bundle_mod, "build_engine", fake_build)
    ckpt = open_checkpoint(model)
    m = export_bundle(ckpt, tmp_path / "b", "tensorrt", log=lambda _: None)
    assert calls[-1]["max_batch"] == 37 == ckpt.family.most_tiles(m.image)
    with pytest.raises(UserError) as e:
        export_bundle(ckpt, tmp_path / "c", "tensorrt", tensorrt=TensorRTOptions(max_batch=8), log=lambda _: None)
    assert "\n" not in str(e.value) and "--max-tiles 7" in str(e.value)


@pytest.mark.parametrize("preset", ["llava-onevision-qwen2-0.5b", "llava-interleave-qwen-0.5b"])
def test_the_0_5b_shapes_are_llava_hf_s_configurations(preset, tmp_path):
    """The real-shape presets (random weights, for timing at size) carry llava-hf's published configurations, and
    the streaming writer's names equal a model's own state with the tied embedding stored once."""
    from llava_edge.toy.model import saved_tensor_names, write_skeleton

    config = write_skeleton(tmp_path / "m", preset, layers=1)
    v, t = config.vision_config, config.text_config
    assert (v.model_type, v.hidden_size, v.num_hidden_layers, v.intermediate_size, v.image_size, v.patch_size) == (
        "siglip_vision_model", 1152, 26, 4304, 384, 14)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert t.model_type == "qwen2" and t.tie_word_embeddings and t.vocab_size == 152000
    assert t.rope_parameters["rope_theta"] == 1e6 and t.rms_norm_eps == 1e-6
    names = saved_tensor_names(config)
    assert "language_model.lm_head.weight" not in names
    if preset == "llava-onevision-qwen2-0.5b":
        assert type(config).__name__ == "LlavaOnevisionConfig" and config.vision_aspect_ratio == "anyres_max_9"
        assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) == (896, 14, 2, 4864)
        assert len(config.image_grid_pinpoints) == 36 and max(max(g) for g in config.image_grid_pinpoints) == 2304
        assert names["image_newline"] == (896,)
    else:
        assert type(config).__name__ == "LlavaConfig"
        assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) == (1024, 16, 16, 2816)
    assert names["language_model.model.embed_tokens.weight"] == (152000, t.hidden_size)
