"""LLaVA-NeXT through export and the runtime, against transformers' own model and processor.

A tiny ``LlavaNextForConditionalGeneration`` checkpoint (``toy model --preset toy-next``: 112 px tiles on
LLaVA-1.6's five grids) is exported by the same code as a hub checkpoint. For pictures of many shapes
(ties, both sides within one tile, strips, 1 px, larger than every grid) the reference side is
transformers alone: ``LlavaNextImageProcessorPil`` makes the pixels and the processor's prompt the
image-token count, ``LlavaNextForConditionalGeneration`` packs and answers. The runtime side is the
bundle: llava-edge's tiles, the ONNX graph, numpy packing and llama.cpp.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from next_helpers import assert_logits_close, hf_answer, hf_count, picture

from llava_edge import manifest
from llava_edge.errors import UserError

# (width, height): exact ties, both sides within one tile, 1:10 and 10:1, 1 px, beyond every grid, ordinary
SIZES = [(112, 112), (300, 300), (100, 60), (60, 100), (50, 50), (1, 1), (40, 400), (400, 40), (900, 700),
         (640, 480), (480, 640), (224, 112), (250, 130)]
QUESTION = "What is in the image?"


# two towers: LLaVA-1.6's five grids at 112 px tiles, and 56 px tiles on grids that are not each other's
# transposes (where reading a pinpoint as height x width or width x height changes every picture's grid)
TOYS = {"112px-llava16-grids": None, "56px-own-grids": {"image_size": 56, "resize": 56,
                                                       "grids": [[56, 168], [112, 56], [168, 112]]}}


_built: dict = {}  # one build per toy and module, shared by the parametrized and the default fixtures


def _toy(name: str, tmp_path_factory):
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.export.bundle import export_bundle
    from llava_edge.toy.model import write_toy_model

    if name not in _built:
        model = write_toy_model(tmp_path_factory.mktemp("next") / "model", preset="toy-next", seed=0,
                                shape=TOYS[name])
        out = tmp_path_factory.mktemp("next_bundle") / "b"
        export_bundle(open_checkpoint(model), out, log=lambda _: None)
        _built[name] = (model, out)
    return _built[name]


@pytest.fixture(scope="module", params=list(TOYS))
def toy_name(request):
    return request.param


@pytest.fixture(scope="module")
def next_toy(toy_name, tmp_path_factory):
    return _toy(toy_name, tmp_path_factory)[0]


@pytest.fixture(scope="module")
def next_bundle(toy_name, tmp_path_factory):
    return _toy(toy_name, tmp_path_factory)[1]


@pytest.fixture(scope="module")
def next_hf(next_toy):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(next_toy, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def next_processor(next_toy):
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil.from_pretrained(next_toy)


@pytest.fixture(scope="module")
def next_runtime(next_bundle):
    from llava_edge import EdgeLLaVA

    m = EdgeLLaVA.load(next_bundle, device="cpu", kv_cache="f32", threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def default_toy(tmp_path_factory):
    """The 112 px toy on LLaVA-1.6's grids alone: for what is checked once, not per tower."""
    return _toy("112px-llava16-grids", tmp_path_factory)[0]


@pytest.fixture(scope="module")
def default_bundle(tmp_path_factory):
    return _toy("112px-llava16-grids", tmp_path_factory)[1]


@pytest.fixture(scope="module")
def default_runtime(default_bundle):
    from llava_edge import EdgeLLaVA

    m = EdgeLLaVA.load(default_bundle, device="cpu", kv_cache="f32", threads=1)
    yield m
    m.close()


def hf_inputs(next_processor, im: Image.Image) -> dict:
    out = next_processor(images=im, return_tensors="np")
    return {"pixel_values": torch.from_numpy(np.asarray(out["pixel_values"], np.float32)),
            "image_sizes": torch.from_numpy(np.asarray(out["image_sizes"]))}


def test_the_toy_is_a_llava_next_checkpoint_and_the_bundle_says_so(next_toy, next_bundle):
    from llava_edge.checkpoint import open_checkpoint

    cfg = json.loads((next_toy / "config.json").read_text())
    assert cfg["model_type"] == "llava_next" and cfg["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert open_checkpoint(next_toy).family.name == "llava-next"
    m = manifest.read(next_bundle)
    assert m.family == "llava-next" and m.conv_mode == "vicuna_v1"
    assert m.image["anyres"]["pinpoints"] == [list(p) for p in cfg["image_grid_pinpoints"]]
    assert m.image["anyres"]["orientation"] == "hw" and m.image["anyres"]["rounding"] == "hf"
    assert m.vision["num_image_tokens"] == (cfg["vision_config"]["image_size"] // 14) ** 2  # per tile, no CLS
    newline = np.load(next_bundle / m.arrays["image_newline"]["file"])
    from safetensors.numpy import load_file

    stored = load_file(next_toy / "model.safetensors")
    key = next(k for k in stored if k.endswith("image_newline"))
    assert np.array_equal(newline, stored[key])


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_tiles_positions_and_packed_features_equal_transformers(size, next_toy, next_hf, next_processor,
                                                                next_runtime):
    im = picture(*size)
    prepared = next_runtime.prepare_image(im)
    ref = hf_inputs(next_processor, im)
    ref_px = ref["pixel_values"][0, : prepared.tiles].numpy()
    assert prepared.pixels.shape == ref_px.shape
    np.testing.assert_allclose(prepared.pixels, ref_px, atol=1e-5)
    assert prepared.positions == hf_count(next_toy, im)

    with torch.no_grad():
        want = next_hf.model.get_image_features(**ref).pooler_output[0].numpy()
    key, got = next_runtime.image_embeddings(im)
    assert got.shape == want.shape == (prepared.positions, next_hf.config.text_config.hidden_size)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_first_answer_token_logits_and_greedy_answers_equal_transformers(size, next_toy, next_hf, next_processor,
                                                                         next_runtime):
    m = next_runtime
    im = picture(*size, seed=1)
    parts = m.template.prompt(QUESTION, image=True, history=[])
    ids = m.tokenizer.encode_prompt(parts, m.image_token_id)
    n = hf_count(next_toy, im)
    i = ids.index(m.image_token_id)
    full = ids[:i] + [m.image_token_id] * n + ids[i + 1 :]
    ref = hf_inputs(next_processor, im)
    want, new = hf_answer(next_hf, m.eos_id, 8, input_ids=torch.tensor([full]), **ref)
    assert_logits_close(m.prompt_logits(im, parts)[-1], want)
    m.chat(im, QUESTION, max_tokens=8)
    assert m.last_ids[: len(new)] == new


def test_the_context_holds_the_largest_picture(default_bundle):
    """A profile's context cap never cuts a picture: LLaVA-1.6's shape (336 px tiles, five grids, up to 2928
    positions) on a Jetson (cap 2048) gets the largest picture and room for the conversation."""
    import copy

    from test_runtime_profiles import JETSON, ORIN

    from llava_edge import families
    from llava_edge.runtimes.devices import TEXT_ROOM, plan_runtime

    m = copy.deepcopy(manifest.read(default_bundle))
    m.image["anyres"].update(tile=336, patch=14, pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                           [336, 1008]])
    m.image.update(crop=336, resize=336)
    m.vision["num_image_tokens"] = 576
    m.llm["n_ctx_train"] = 4096
    most = families.by_name(m.family).max_positions(m.image, 576)
    assert most == 576 + 48 * 49  # the 2x2 grid, nothing unpadded
    plan = plan_runtime(m, "jetson", hardware=JETSON, trt_platform=lambda: dict(ORIN))
    assert plan.n_ctx == most + TEXT_ROOM and "largest picture" in plan.ctx_why
    m.llm["n_ctx_train"] = 3000  # never beyond what the model was trained with
    assert plan_runtime(m, "jetson", hardware=JETSON, trt_platform=lambda: dict(ORIN)).n_ctx == 3000


def test_no_picture_takes_more_than_the_bound(next_runtime):
    m = manifest.read(next_runtime.bundle)
    most = next_runtime.family.max_positions(m.image, next_runtime.n_image_tokens)
    sizes = [(2000, 1500), (224, 224), (112, 336), (336, 112), (56, 168), (168, 112), *SIZES]
    counts = [next_runtime.prepare_image(picture(w, h)).positions for w, h in sizes]
    assert max(counts) <= most


def test_explain_shows_the_grid_and_the_positions(default_runtime):
    prepared = default_runtime.prepare_image(picture(300, 200))
    line = default_runtime.images.describe(prepared)
    rows, cols = prepared.grid
    assert f"{rows}x{cols} tiles" in line and f"{prepared.positions} positions" in line


def test_bad_pictures_get_one_line_errors(default_runtime):
    with pytest.raises(UserError) as e:
        default_runtime.prepare_image(np.zeros((0, 5, 3), np.uint8))
    assert "\n" not in str(e.value) and "pixels" in str(e.value)
    with pytest.raises(UserError) as e:
        default_runtime.prepare_image(picture(1, 200))  # beyond the aspect limit
    assert "\n" not in str(e.value) and "aspect" in str(e.value)


def test_max_tiles_bounds_a_picture_at_export_and_at_load(default_toy, default_bundle, tmp_path):
    from llava_edge import EdgeLLaVA
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.export.bundle import export_bundle

    big = picture(640, 480)  # a 2x2 grid at 112 px tiles
    rt = EdgeLLaVA.load(default_bundle, device="cpu", threads=1, prefix_cache=False, max_tiles=2)
    try:
        with pytest.raises(UserError) as e:
            rt.prepare_image(big)
        assert "\n" not in str(e.value) and "--max-tiles" in str(e.value) and "4" in str(e.value)
        assert rt.prepare_image(picture(200, 100)).grid == (1, 2)  # within the bound: served
    finally:
        rt.close()
    out = tmp_path / "b"
    m = export_bundle(open_checkpoint(default_toy), out, target="onnx", max_tiles=3, log=lambda _: None)
    assert m.image["anyres"]["max_tiles"] == 3
    with pytest.raises(UserError):
        export_bundle(open_checkpoint(default_toy), tmp_path / "c", target="onnx", max_tiles=0, log=lambda _: None)


def test_max_tiles_on_a_one_tile_family_is_refused(bundle):
    from llava_edge import EdgeLLaVA

    with pytest.raises(UserError) as e:
        EdgeLLaVA.load(bundle, device="cpu", max_tiles=2)
    assert "LLaVA-1.5" in str(e.value) and "\n" not in str(e.value)


def test_cli_export_quantize_and_chat_explain(default_toy, tmp_path):
    """As a user would: export, an int8 vision variant, a refused reduced-token variant, and `chat --explain` naming the family, the grid and the positions (as a device without torch)."""
    from cli_run import assert_one_line_error, le

    out = tmp_path / "b"
    r = le("export", "--model", default_toy, "--out", out, "--target", "all")
    assert r.returncode == 0, r.stderr
    r = le("quantize", out, "--vision", "int8", "--llm", "q8_0")
    assert r.returncode == 0, r.stderr
    r = le("quantize", out, "--image-tokens", "16", "--vision", "int8")
    assert_one_line_error(r, "LLaVA-NeXT", progress=True)
    img = tmp_path / "wide.png"
    picture(300, 130).save(img)
    r = le("chat", "--bundle", out, "--image", img, "--vision-variant", "int8", "--explain", "--max-tokens", "4",
           "--device", "cpu", "What is it?", block_torch=True)
    assert r.returncode == 0, r.stderr
    assert "model family: LLaVA-NeXT" in r.stderr and "tiles of 112 px" in r.stderr and "positions" in r.stderr
    r = le("chat", "--bundle", out, "--image", img, "--max-tiles", "1", "--device", "cpu", "What is it?",
           block_torch=True)
    assert_one_line_error(r, "--max-tiles")


def test_drift_against_transformers_llava_next(default_bundle, default_toy, tmp_path, capsys):
    """The drift tool's reference is transformers' LlavaNextForConditionalGeneration prompted as LLaVA prompts
    it; the exact variants reproduce it on pictures of several shapes."""
    from test_drift import write_scienceqa

    from llava_edge.cli import main

    sqa = write_scienceqa(tmp_path / "sqa", n=4)
    for i, size in enumerate([(128, 128), (300, 120), (90, 260)]):  # a tie, a wide and a tall grid
        picture(*size, seed=i).save(tmp_path / "sqa" / "images" / f"s{i}.png")
    out = tmp_path / "report"
    rc = main(["drift", str(default_bundle), "--reference", str(default_toy), "--eval", str(sqa), "--report", str(out),
               "--variants", "fp32:f32", "--kv-cache", "f32", "--threads", "1", "--max-tokens", "4"])
    assert rc == 0, capsys.readouterr().err
    pair = json.loads((out / "drift.json").read_text())["pairs"][0]
    assert pair["token_drift"]["top1"] == 1.0 and pair["token_drift"]["kl_mean"] < 1e-6
    assert pair["vision_drift"]["images"] == 3 and pair["vision_drift"]["cos_min"] > 0.9999
    assert pair["answer_agreement"] == 1.0 and pair["prompt_mismatches"] == 0


def test_info_shows_the_family_and_the_tiles(default_bundle):
    from cli_run import le

    r = le("info", default_bundle)
    assert r.returncode == 0, r.stderr
    assert "llava-next" in r.stdout and "112 px tiles" in r.stdout and "height x width (transformers)" in r.stdout


def test_bench_times_a_tiled_picture(default_bundle, tmp_path):
    """`llava-edge bench` on a LLaVA-NeXT bundle: its prompt holds the tiled picture's positions."""
    from llava_edge import EdgeLLaVA
    from llava_edge.bench import time_chat_pass

    m = EdgeLLaVA.load(default_bundle, device="cpu", threads=1, prefix_cache=False)
    try:
        im = picture(300, 200)
        r = time_chat_pass(m, im, QUESTION, decode_tokens=2)
        assert r["prompt_positions"] > m.prepare_image(im).positions > m.n_image_tokens
        assert r["prefill_tokens"] == r["prompt_positions"] and r["vision_encode_ms"] > 0
    finally:
        m.close()


def test_drift_reference_of_a_checkpoint_trained_with_llavas_code(default_toy, tmp_path, capsys):
    """A converted original LLaVA-1.6 reads its pinpoints and unpads as LLaVA's code does, which transformers'
    class does not: the reference then feeds the class's tile features packed as LLaVA packs them, and the
    bundle reproduces it (on a tie, where the two readings give different grids, too)."""
    import shutil

    from test_drift import write_scienceqa

    from llava_edge import anyres
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.cli import main
    from llava_edge.export.bundle import export_bundle

    ckpt_dir = tmp_path / "as-llava"
    shutil.copytree(default_toy, ckpt_dir)
    recipe = json.loads((ckpt_dir / "llava_edge.json").read_text())
    (ckpt_dir / "llava_edge.json").write_text(json.dumps({**recipe, "anyres_origin": "llava"}))
    ckpt = open_checkpoint(ckpt_dir)
    bundle = export_bundle(ckpt, tmp_path / "b", target="onnx", log=lambda _: None) and tmp_path / "b"
    export_bundle(ckpt, bundle, target="gguf", log=lambda _: None)
    spec = anyres.AnyresSpec.from_dict(manifest.read(bundle).image["anyres"])
    assert (spec.orientation, spec.rounding) == ("wh", "llava")
    hf_spec = anyres.AnyresSpec.from_config(ckpt.config, "hf")
    assert anyres.grid(100, 100, spec) != anyres.grid(100, 100, hf_spec)  # the readings part on this picture

    sqa = write_scienceqa(tmp_path / "sqa", n=3)
    for i, size in enumerate([(100, 100), (300, 120)]):
        picture(*size, seed=i).save(tmp_path / "sqa" / "images" / f"s{i}.png")
    out = tmp_path / "report"
    rc = main(["drift", str(bundle), "--reference", str(ckpt_dir), "--eval", str(sqa), "--report", str(out),
               "--variants", "fp32:f32", "--kv-cache", "f32", "--threads", "1", "--max-tokens", "4"])
    assert rc == 0, capsys.readouterr().err
    pair = json.loads((out / "drift.json").read_text())["pairs"][0]
    assert pair["token_drift"]["top1"] == 1.0 and pair["token_drift"]["kl_mean"] < 1e-6
    assert pair["vision_drift"]["images"] == 2 and pair["vision_drift"]["cos_min"] > 0.9999
    assert pair["answer_agreement"] == 1.0 and pair["prompt_mismatches"] == 0


def test_the_streaming_writer_names_llava_next_tensors_as_save_pretrained(default_toy):
    from safetensors import safe_open
    from transformers import LlavaNextConfig

    from llava_edge.toy.model import saved_tensor_names

    with safe_open(str(default_toy / "model.safetensors"), "pt") as st:
        written = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    assert "image_newline" in written
    assert saved_tensor_names(LlavaNextConfig.from_pretrained(default_toy)) == written


def test_the_llava_v1_6_mistral_7b_shape(tmp_path):
    """The real-shape preset (random weights, for timing at size): llava-hf's LLaVA-1.6 Mistral configuration."""
    from llava_edge.toy.model import saved_tensor_names, write_skeleton

    config = write_skeleton(tmp_path / "m", "llava-v1.6-mistral-7b", layers=1)
    assert type(config).__name__ == "LlavaNextConfig" and config.text_config.model_type == "mistral"
    assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert config.text_config.num_key_value_heads == 8 and config.text_config.rope_parameters["rope_theta"] == 1e6
    names = saved_tensor_names(config)
    assert names["image_newline"] == (4096,) and names["language_model.lm_head.weight"] == (32064, 4096)


def test_a_new_process_reuses_a_tiled_picture_s_saved_cells(default_bundle, tmp_path, monkeypatch):
    """The KV cells through a tiled picture, saved after the first answer, are keyed by its pixels and size: a
    new process asked about it again runs no vision graph and answers as one that saved nothing; the same
    tiles under another picture size (another unpad) are not taken for it."""
    from test_prefix_cache import ask_new_process

    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    im = picture(300, 200)
    first = ask_new_process(default_bundle, im)
    want = ask_new_process(default_bundle, im, "How many shapes are there?", prefix_cache=False)
    got = ask_new_process(default_bundle, im, "How many shapes are there?")
    assert got.stats["vision_encodes"] == 0 and got.stats["image_prefix_loads"] == 1
    assert np.array_equal(got.logits, want.logits) and got.answer == want.answer
    assert first.stats["vision_encodes"] == 1

    from llava_edge import families

    p = families.PreparedImage("", np.zeros((3, 3, 8, 8), np.float32), 1, (300, 200))
    assert families.pixels_key(p.pixels, (300, 200)) != families.pixels_key(p.pixels, (301, 200))


def test_serve_answers_tiled_pictures_as_chat_does(default_bundle, tmp_path):
    """`serve` on a LLaVA-NeXT bundle, driven by the official openai client: the greedy answer equals
    `EdgeLLaVA.chat`'s, usage counts the picture's positions, and --max-tiles refuses a larger picture with a
    JSON 4xx naming the limit."""
    from openai import BadRequestError, OpenAI
    from serve_helpers import serving, user_message

    from llava_edge import EdgeLLaVA

    img = tmp_path / "wide.png"
    picture(300, 130).save(img)
    big = tmp_path / "big.png"
    picture(640, 480).save(big)
    m = EdgeLLaVA.load(default_bundle, device="cpu", threads=1, prefix_cache=False)
    try:
        want = m.chat(str(img), QUESTION, max_tokens=8)
        slots, _, _ = m.conversation_slots(QUESTION, str(img))
    finally:
        m.close()
    with serving(default_bundle, tmp_path, "--device", "cpu", "--threads", "1", "--no-prefix-cache",
                 "--max-tiles", "3") as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="-")
        r = c.chat.completions.create(model="b", messages=[user_message(QUESTION, img)], max_tokens=8,
                                      temperature=0)
        assert r.choices[0].message.content == want
        assert r.usage.prompt_tokens == len(slots)
        with pytest.raises(BadRequestError) as e:
            c.chat.completions.create(model="b", messages=[user_message(QUESTION, big)], max_tokens=2)
        assert "--max-tiles" in str(e.value)
