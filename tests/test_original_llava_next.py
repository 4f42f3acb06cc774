"""Original LLaVA-1.6 checkpoints: converted, exported and run by llava-edge, against LLaVA's own code.

Three tiny checkpoints are made with LLaVA's own classes (llava-torch 1.2.2.post1 in .venv-llava, see
tests/llava_reference/next_side.py) as LLaVA-1.6 ships them: ``image_aspect_ratio: anyres``,
``mm_patch_merge_type: spatial_unpad``, a learned ``image_newline``, the CLIP tower in its own folder, and
named as LLaVA's scripts expect: a Vicuna one (``LlavaLlamaForCausalLM``), a Mistral one
(``LlavaMistralForCausalLM``, its pinpoints written as a string as some LLaVA configs do) and a "34b" one
(Llama architecture with ChatML tokens, as Yi's). Their pinpoints are LLaVA-1.6's five at 56 px tiles
plus one whose transpose is not listed, so that reading them as (height, width), as transformers does,
changes the grid of a 3:2 picture as well as of ties.

For pictures of several shapes, LLaVA's ``process_images`` (anyres), ``tokenizer_image_token``,
``prepare_inputs_labels_for_multimodal``, forward and greedy ``generate`` are the reference; the bundle's
tiles, ONNX graph, numpy packing and llama.cpp are compared with them: image positions, their features,
the logits after the prompt and the greedy answer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from llava_reference import harness
from PIL import Image

from llava_edge import anyres
from llava_edge.errors import UserError

ok, why = harness.available()
needs_llava = pytest.mark.skipif(not ok, reason=why)

NEXT_SIDE = harness.HERE / "next_side.py"
LLAVA_IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX
CHATML_SPECIAL = ["<|im_start|>", "<|im_end|>"]
TILE, PATCH = 56, 14
# LLaVA-1.6's five grids at 56 px tiles, (width, height) as LLaVA reads them, and a 3x2 grid without its transpose
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168], [168, 112]]
MODELS = {  # folder name (LLaVA's scripts pick the conversation mode from it): language model, pinpoints as...
    "llava-v1.6-vicuna-tiny": ("llama", PINPOINTS, "llava_v1"),
    "llava-v1.6-mistral-tiny": ("mistral", str(PINPOINTS), "mistral_instruct"),
    "llava-v1.6-34b-tiny": ("llama", PINPOINTS, "chatml_direct"),
}
# (width, height): ties between transposed pinpoints (squares, both sides within one tile), 3:2 and 2:3 (the
# pinpoint without its transpose), a 1:10 strip, larger than every pinpoint, and one where LLaVA's int() and
# transformers' int(round(x, 7)) part in unpad (found by search)
SIZES = [(56, 56), (40, 40), (50, 30), (30, 50), (300, 200), (200, 300), (30, 300), (700, 500), (343, 392)]
QUESTION = "What is shown here?"
MAX_NEW = 8


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colours with noise: every tile differs, and resampling is exercised."""
    rng = np.random.default_rng([w, h, seed])
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256], -1)
    return Image.fromarray((a + rng.integers(0, 40, a.shape)).clip(0, 255).astype(np.uint8), "RGB")


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- LLaVA's side (one process per step)

@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[tuple[int, int], Path]:
    root = tmp_path_factory.mktemp("pictures")
    out = {}
    for w, h in SIZES:
        out[(w, h)] = root / f"{w}x{h}.png"
        picture(w, h).save(out[(w, h)])
    return out


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("llava16")
    toks = {extra: harness.llama_tokenizer_dir(root, False, CHATML_SPECIAL if extra else ()) for extra in (0, 1)}
    specs = [{"name": name, "text": text, "pinpoints": pins, "seed": k, "image_size": TILE, "patch_size": PATCH,
              "tokenizer_dir": str(toks[int(mode == "chatml_direct")])}
             for k, (name, (text, pins, mode)) in enumerate(MODELS.items())]
    made = harness.run("make", {"out": str(root / "models"), "models": specs}, script=NEXT_SIDE)
    return {m["name"]: m for m in made["models"]}


@pytest.fixture(scope="module")
def reference(originals, pictures) -> dict[str, dict]:
    """Every case of every checkpoint in LLaVA's code, in one process."""
    cases = [{"id": f"{w}x{h}", "image": str(p)} for (w, h), p in pictures.items()]
    req = {"question": QUESTION, "max_new_tokens": MAX_NEW,
           "models": [{"model_path": m["model_path"], "cases": cases} for m in originals.values()]}
    res = harness.run("answer", req, timeout=1200, script=NEXT_SIDE)
    return {Path(m["model_path"]).name: {**m, "cases": {c["id"]: c for c in m["cases"]}} for m in res["models"]}


# ---------------------------------------------------------------- llava-edge's side

@pytest.fixture(scope="module")
def converted(originals, tmp_path_factory):
    """Each checkpoint through ``resolve_model`` (the conversion) and ``export_bundle``: (checkpoint, bundle)."""
    from llava_edge.checkpoint import resolve_model
    from llava_edge.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, m in originals.items():
        ckpt = resolve_model(m["model_path"], vision=m["vision_tower"], cache_dir=root / "cache", log=lambda _: None)
        bundle = root / f"{name}-bundle"
        export_bundle(ckpt, bundle, llm_outtype="f32", log=lambda _: None)
        out[name] = (ckpt, bundle)
    return out


@pytest.fixture(scope="module")
def runtimes(converted):
    from llava_edge import EdgeLLaVA

    out = {name: EdgeLLaVA.load(b, device="cpu", kv_cache="f32", threads=1, prefix_cache=False)
           for name, (_, b) in converted.items()}
    yield out
    for m in out.values():
        m.close()


@needs_llava
@pytest.mark.parametrize("name", list(MODELS))
def test_the_conversion_is_a_llava_next_checkpoint_read_as_llava_reads_it(name, originals, converted):
    from safetensors.numpy import load_file

    from llava_edge import manifest

    ckpt, bundle = converted[name]
    text, pins, mode = MODELS[name]
    cfg = json.loads((ckpt.path / "config.json").read_text())
    assert cfg["model_type"] == "llava_next" and cfg["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert cfg["image_grid_pinpoints"] == PINPOINTS  # as LLaVA lists them, a string parsed
    assert cfg["text_config"]["model_type"] == text
    assert ckpt.family.name == "llava-next" and ckpt.recipe["anyres_origin"] == "llava"
    assert ckpt.conv_mode == mode  # LLaVA's scripts' choice from the name

    stored = {}
    for f in ckpt.weight_files():
        stored.update(load_file(f))
    src = load_file(Path(originals[name]["model_path"]) / "model.safetensors")
    assert np.array_equal(stored["image_newline"], src["model.image_newline"])
    assert not any(k.startswith("model.") for k in stored)  # every tensor renamed into the llava-hf layout

    m = manifest.read(bundle)
    assert m.family == "llava-next" and m.conv_mode == mode
    spec = m.image["anyres"]
    assert (spec["orientation"], spec["rounding"], spec["tile"], spec["patch"]) == ("wh", "llava", TILE, PATCH)
    assert np.array_equal(np.load(bundle / m.arrays["image_newline"]["file"]), src["model.image_newline"])


@needs_llava
def test_the_pictures_cover_where_transformers_reading_differs(reference):
    """Reading the pinpoints as transformers does ((height, width), unpad rounded) gives other grids or positions
    than LLaVA's code for these pictures: without such cases the next test could pass with the wrong reading."""
    cases = reference["llava-v1.6-vicuna-tiny"]["cases"]
    hw = anyres.AnyresSpec(TILE, PATCH, PINPOINTS, "hw", "llava")
    rounded = anyres.AnyresSpec(TILE, PATCH, PINPOINTS, "wh", "hf")
    transposed = [s for s in SIZES if list(anyres.grid(*s, hw)) != cases[f"{s[0]}x{s[1]}"]["grid"]]
    assert len(transposed) >= 7, transposed
    assert any(anyres.num_positions(*s, rounded) != cases[f"{s[0]}x{s[1]}"]["positions"] for s in SIZES)


@needs_llava
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("name", list(MODELS))
def test_positions_features_logits_and_answers_equal_llavas(name, size, reference, runtimes, pictures):
    ref = reference[name]
    case = ref["cases"][f"{size[0]}x{size[1]}"]
    m, image = runtimes[name], pictures[size]
    assert m.conv_mode == ref["mode"]
    parts = m.template.prompt(QUESTION)
    assert m.tokenizer.encode_prompt(parts, LLAVA_IMAGE) == case["input_ids"]

    prepared = m.prepare_image(image)
    assert prepared.size == tuple(case["size"])
    assert (list(prepared.grid), prepared.tiles, prepared.positions) == (case["grid"], case["tiles"],
                                                                         case["positions"])
    _, feats = m.image_embeddings(image)
    want = np.asarray(case["image_features"], np.float32)
    assert feats.shape == want.shape
    assert np.abs(feats - want).max() <= 1e-4 * np.abs(want).max()

    logits = m.prompt_logits(image, parts)[-1]
    want = np.asarray(case["first_logits"], np.float32)
    assert np.abs(logits[: len(want)] - want).max() <= 1e-3 * np.abs(want).max()

    m.chat(image, QUESTION, max_tokens=MAX_NEW)
    got, ids = m.last_ids, case["answer_ids"]
    assert got == ids[: len(got)], (got, ids, case["answer"])
    if len(got) < len(ids):  # llava-edge stopped first: at the end of sequence or the mode's stop string
        assert m.last_stop in ("eos", "stop"), m.last_stop
        if m.last_stop == "eos":
            assert ids[len(got)] == ref["eos_id"]
    else:  # an answer LLaVA ended with its end of sequence is one token longer than llava-edge's
        assert len(got) == MAX_NEW


# ---------------------------------------------------------------- refused variants (no LLaVA code needed)

LLAVA16_CONFIG = {
    "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 32000,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "spatial_unpad",
    "image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS, "mm_use_im_start_end": False,
}


@pytest.mark.parametrize("changes, words", [
    ({"image_aspect_ratio": "anyres_max_9"}, ["'anyres_max_9'", "supported"]),
    ({"mm_patch_merge_type": "spatial"}, ["'spatial'", "spatial_unpad"]),
    ({"mm_patch_merge_type": "flat"}, ["'flat'", "'anyres'"]),
    ({"image_aspect_ratio": "pad"}, ["'pad'", "spatial_unpad"]),
    ({"image_grid_pinpoints": None}, ["LLaVA-NeXT", "image_grid_pinpoints"]),
    ({"image_grid_pinpoints": "[[56, 112], [112"}, ["image_grid_pinpoints", "not a list"]),
    ({"image_grid_pinpoints": [[56, 112], [0, 56]]}, ["image_grid_pinpoints", "not positive"]),
    ({"mm_vision_select_feature": "cls_patch"}, ["cls_patch", "'patch'"]),
], ids=["anyres_max", "spatial", "flat", "pad-unpad", "no-pinpoints", "bad-string", "zero-side", "cls_patch"])
def test_unsupported_llava_next_variants_get_one_line_errors(tmp_path, changes, words):
    from llava_edge.checkpoint import resolve_model

    src = tmp_path / "llava-v1.6-vicuna-7b"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**LLAVA16_CONFIG, **changes}))
    with pytest.raises(UserError) as e:
        resolve_model(src, cache_dir=tmp_path / "cache", log=lambda _: None)
    for w in words:
        assert w in one_line(e)
    assert not (tmp_path / "cache").exists()  # refused before any conversion


def test_pinpoints_that_are_not_whole_tiles_are_refused_before_converting(tmp_path):
    from transformers import CLIPVisionConfig

    from llava_edge.checkpoint import resolve_model

    src = tmp_path / "llava-v1.6-vicuna-7b"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**LLAVA16_CONFIG, "image_grid_pinpoints": [[56, 112], [60, 56]]}))
    tower = tmp_path / "clip"
    CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     image_size=TILE, patch_size=PATCH).save_pretrained(tower)
    with pytest.raises(UserError) as e:
        resolve_model(src, vision=tower, cache_dir=tmp_path / "cache", log=lambda _: None)
    assert "[60, 56]" in one_line(e) and f"{TILE} px tile" in one_line(e)
    converted = tmp_path / "cache" / "converted"
    assert not converted.exists() or not any(converted.iterdir())


@needs_llava
def test_a_checkpoint_without_its_image_newline_is_refused(originals, tmp_path):
    from safetensors.torch import load_file, save_file

    from llava_edge.checkpoint import resolve_model

    m = originals["llava-v1.6-vicuna-tiny"]
    src = Path(shutil.copytree(m["model_path"], tmp_path / "llava-v1.6-vicuna-tiny"))
    sd = load_file(str(src / "model.safetensors"))
    del sd["model.image_newline"]
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as e:
        resolve_model(src, vision=m["vision_tower"], cache_dir=tmp_path / "cache", log=lambda _: None)
    assert "model.image_newline" in one_line(e)


@needs_llava
def test_an_unknown_anyres_origin_in_the_recipe_is_refused(converted, tmp_path):
    from llava_edge.checkpoint import RECIPE_FILE, open_checkpoint, write_recipe

    ckpt, _ = converted["llava-v1.6-vicuna-tiny"]
    copy = Path(shutil.copytree(ckpt.path, tmp_path / "converted"))
    recipe = json.loads((copy / RECIPE_FILE).read_text())
    (copy / RECIPE_FILE).write_text(json.dumps({**recipe, "anyres_origin": "llama.cpp"}))
    bad = open_checkpoint(copy)
    with pytest.raises(UserError) as e:
        bad.family.image_section(bad)
    assert "'llama.cpp'" in one_line(e) and "hf, llava" in one_line(e)
    with pytest.raises(UserError) as e:
        write_recipe(copy, template="llava_v1", image_pad="square", anyres_origin="llama.cpp")
    assert "'llama.cpp'" in one_line(e)
