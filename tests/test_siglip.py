"""A SigLIP vision tower in a ``LlavaForConditionalGeneration`` (how LLaVA-Interleave is built), against
transformers' own model and image processor.

``toy model --preset toy-siglip`` builds one: SigLIP (no class token, ``gelu_pytorch_tanh``, mean/std 0.5),
``vision_feature_select_strategy: full`` on the last layer, the picture resized to the tile as it is. The
reference side is transformers alone: ``SiglipImageProcessorPil`` makes the pixels,
``LlavaForConditionalGeneration`` the features, logits and answers. The runtime side is the bundle: numpy
preprocessing, the ONNX graph and llama.cpp.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from next_helpers import assert_logits_close, hf_answer, picture, toy_bundle

from llava_edge import manifest
from llava_edge.preprocess import ImageSpec, preprocess

SIZES = [(112, 112), (300, 200), (200, 300), (1, 1), (640, 480), (50, 500), (97, 113), (1500, 40)]
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_bundle(tmp_path_factory, "toy-siglip", seed=0)


@pytest.fixture(scope="module")
def hf(toy):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(toy[0], attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def processor(toy):
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil.from_pretrained(toy[0])


@pytest.fixture(scope="module")
def runtime(toy):
    from llava_edge import EdgeLLaVA

    m = EdgeLLaVA.load(toy[1], device="cpu", kv_cache="f32", threads=1, prefix_cache=False)
    yield m
    m.close()


def test_the_toy_is_a_siglip_llava_and_the_bundle_records_siglip_s_preprocessing(toy, hf):
    model, bundle = toy
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model"
    assert cfg["vision_feature_select_strategy"] == "full" and cfg["vision_feature_layer"] == -1
    m = manifest.read(bundle)
    assert m.family == "llava-1.5"
    side = cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]
    assert m.vision["num_image_tokens"] == side * side == cfg["image_seq_length"]  # every patch, no class token
    assert m.image["squash"] is True and m.image["mean"] == [0.5, 0.5, 0.5]
    # the processor transformers saved counts the same positions
    proc = json.loads((model / "processor_config.json").read_text())
    assert proc["num_additional_image_tokens"] == 0


def test_a_clip_bundle_s_image_settings_do_not_name_squash():
    spec = ImageSpec.from_processor_config({"size": {"shortest_edge": 336}, "crop_size": {"height": 336,
                                                                                          "width": 336}})
    assert "squash" not in spec.to_dict() and not spec.squash
    assert ImageSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pixels_equal_siglip_s_image_processor(size, toy, processor):
    im = picture(*size)
    spec = ImageSpec.from_dict(manifest.read(toy[1]).image)
    want = np.asarray(processor(images=im, return_tensors="np")["pixel_values"][0], np.float32)
    got = preprocess(im, spec)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_the_graph_reads_the_last_layer_not_its_post_layernorm(toy, hf, processor, runtime):
    """LLaVA takes ``hidden_states[-1]``; SigLIP's ``last_hidden_state`` is that through ``post_layernorm``:
    the graph equals the first and not the second."""
    im = picture(300, 200)
    px = torch.from_numpy(np.asarray(processor(images=im, return_tensors="np")["pixel_values"], np.float32))
    with torch.no_grad():
        want = hf.model.get_image_features(pixel_values=px, vision_feature_layer=-1,
                                           vision_feature_select_strategy="full").pooler_output[0].numpy()
        normed = hf.model.multi_modal_projector(hf.model.vision_tower(px).last_hidden_state)[0].numpy()
    _, got = runtime.image_embeddings(im)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(normed - want).max() > 100 * np.abs(got - want).max()


@pytest.mark.parametrize("size", [(300, 200), (1, 1), (640, 480)], ids=str)
def test_first_answer_token_logits_and_greedy_answers_equal_transformers(size, hf, processor, runtime):
    m = runtime
    im = picture(*size, seed=1)
    parts = m.template.prompt(QUESTION, image=True, history=[])
    ids = m.tokenizer.encode_prompt(parts, m.image_token_id)
    i = ids.index(m.image_token_id)
    full = ids[:i] + [m.image_token_id] * m.n_image_tokens + ids[i + 1 :]
    px = torch.from_numpy(np.asarray(processor(images=im, return_tensors="np")["pixel_values"], np.float32))
    want, new = hf_answer(hf, m.eos_id, 8, input_ids=torch.tensor([full]), pixel_values=px)
    assert_logits_close(m.prompt_logits(im, parts)[-1], want)
    m.chat(im, QUESTION, max_tokens=8)
    assert m.last_ids[: len(new)] == new


def test_quantized_vision_variants_and_the_mmproj(toy, tmp_path):
    """fp16, int8 and int4 graphs of the SigLIP tower are made and measured against the fp32 graph (int4,
    weight-only blocks of 32, stays correlated with it); llama.cpp's mmproj is written (tests/test_mmproj_siglip.py
    checks what llama.cpp computes with it)."""
    from cli_run import le

    model, bundle = toy
    out = tmp_path / "b"
    r = le("export", "--model", model, "--out", out, "--target", "onnx")
    assert r.returncode == 0, r.stderr
    r = le("quantize", out, "--vision", "fp16,int8,int4")
    assert r.returncode == 0, r.stderr
    m = manifest.read(out)
    assert {"fp16", "int8", "int4"} <= {v.name for v in m.find("vision")}
    quality = {name: m.variant("vision", name).extra["quality"] for name in ("int8", "int4")}
    assert quality["int4"]["against"] == "fp32" and quality["int4"]["min_cosine"] > 0.9, quality
    assert quality["int8"]["min_cosine"] > quality["int4"]["min_cosine"], quality  # more bits, closer
    r = le("export", "--model", model, "--out", out, "--target", "mmproj")
    assert r.returncode == 0, r.stderr
    assert manifest.read(out).find("mmproj")


@pytest.mark.parametrize("shape", [{"text": "qwen2"}, {"text": "phi3", "tower": "clip", "strategy": "default",
                                                       "feature_layer": -2, "image_pad": "pad", "resize": 128}],
                         ids=["siglip-qwen2 (Interleave)", "clip-phi3 (llava-phi-3-mini)"])
def test_other_language_models_answer_as_transformers(shape, tmp_path_factory):
    """LLaVA-1.5-style checkpoints with another language model: SigLIP + Qwen2 (LLaVA-Interleave's build) and CLIP +
    Phi-3 (xtuner's llava-phi-3-mini): exported (llama.cpp's qwen2 / phi3 architecture) and answering with the
    first-answer-token logits and greedy ids of transformers' LlavaForConditionalGeneration."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_edge import EdgeLLaVA

    model, bundle = toy_bundle(tmp_path_factory, "toy-siglip", seed=3, shape=shape)
    assert json.loads((model / "config.json").read_text())["text_config"]["model_type"] == shape["text"]
    hf = LlavaForConditionalGeneration.from_pretrained(model, attn_implementation="eager").eval()
    image_processor = AutoProcessor.from_pretrained(model).image_processor
    m = EdgeLLaVA.load(bundle, device="cpu", kv_cache="f32", threads=1, prefix_cache=False)
    try:
        im = picture(300, 200, seed=2)
        prepared = m.prepare_image(im)
        parts = m.template.prompt(QUESTION, image=True, history=[])
        ids = m.tokenizer.encode_prompt(parts, m.image_token_id)
        i = ids.index(m.image_token_id)
        full = ids[:i] + [m.image_token_id] * prepared.positions + ids[i + 1 :]
        px = torch.from_numpy(prepared.pixels)
        if shape.get("image_pad") != "pad":  # transformers' own processor where the checkpoint is read as it does
            want_px = np.asarray(image_processor(images=im, return_tensors="np")["pixel_values"], np.float32)
            np.testing.assert_allclose(prepared.pixels, want_px, atol=1e-6)
        want, new = hf_answer(hf, m.eos_id, 8, input_ids=torch.tensor([full]), pixel_values=px)
        assert_logits_close(m.prompt_logits(im, parts)[-1], want)
        m.chat(im, QUESTION, max_tokens=8)
        assert m.last_ids[: len(new)] == new
    finally:
        m.close()


def test_the_siglip_graphs_for_tensorrt_hold_only_ops_its_parser_takes(toy, tmp_path):
    """The fp32 graph and its fp16 form (what `export --target tensorrt` builds from) pass TensorRT's op check: the
    tanh GELU written out, no class token. Building an engine needs a GPU."""
    from llava_edge.export.tensorrt_ops import check_tensorrt_ops
    from llava_edge.export.vision_fp16 import convert_vision_fp16

    fp16 = tmp_path / "vision.fp16.onnx"
    convert_vision_fp16(toy[1] / "vision.fp32.onnx", fp16)
    for path in (toy[1] / "vision.fp32.onnx", fp16):
        r = check_tensorrt_ops(path)
        assert {"Tanh", "Pow", "LayerNormalization", "Softmax", "Conv"} <= set(r.ops), r.ops  # SigLIP's own ops
        assert r.ok, r.message()
