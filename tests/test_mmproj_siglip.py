"""llama.cpp's mmproj for a SigLIP tower in a ``LlavaForConditionalGeneration`` (LLaVA-Interleave's build).

The toy (``toy model --preset toy-siglip``: SigLIP, no class token, ``gelu_pytorch_tanh``, strategy ``full`` on
the last layer, 112 px of 14 px patches) is written as an mmproj and loaded by llama.cpp's own mtmd
(llama-cpp-python 0.3.36). Without a class token clip.cpp's LLaVA graph has nothing to misplace
(llama.cpp#25814 concerns CLIP only), so llama.cpp is compared with transformers' ``get_image_features``
directly, on identical pixels, and end to end: mtmd's whole path (its tokens, its image chunk, its decode) against
``LlavaForConditionalGeneration`` on the same ids.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from next_helpers import picture
from PIL import Image

import llava_edge.export.mmproj_gguf as mmproj_gguf
from llava_edge import towers
from llava_edge.checkpoint import Checkpoint, load_hf_model, open_checkpoint
from llava_edge.errors import UserError
from llava_edge.families import FAMILIES
from llava_edge.preprocess import preprocess
from llava_edge.runtimes import mtmd
from test_mmproj_gguf import assert_close

SIZE, PATCH = 112, 14
N_POS = (SIZE // PATCH) ** 2  # 64: every patch, no class token
# llama.cpp's letterbox colour for the 'mlp' projector, whatever the checkpoint's mean
PAD = mmproj_gguf.LLAMA_CPP_PAD_COLOR


@pytest.fixture(scope="module")
def siglip_toy(tmp_path_factory):
    from llava_edge.toy.model import write_toy_model

    return write_toy_model(tmp_path_factory.mktemp("mmproj_siglip") / "model", preset="toy-siglip", seed=0)


@pytest.fixture(scope="module")
def ckpt(siglip_toy):
    return open_checkpoint(siglip_toy)


@pytest.fixture(scope="module")
def text_gguf(ckpt, tmp_path_factory):
    from llava_edge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("mmproj_siglip_llm") / "b"
    export_bundle(ckpt, out, "gguf", log=lambda _: None)
    return out / "llm.f32.gguf"


@pytest.fixture(scope="module")
def mmproj(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("mmproj_siglip_gguf")
    logs: list[str] = []
    info = {q: mmproj_gguf.export_mmproj_gguf(ckpt, out / f"mmproj.{q}.gguf", q, log=logs.append)
            for q in mmproj_gguf.OUTTYPES}
    return out, info, logs


@pytest.fixture(scope="module")
def hf(ckpt):
    return load_hf_model(ckpt)


def hf_features(model, pixel_values: np.ndarray) -> np.ndarray:
    """transformers' own image features: ``hidden_states[-1]``, every token (``full``), the projector."""
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=torch.from_numpy(pixel_values)[None],
                                             vision_feature_layer=-1, vision_feature_select_strategy="full")
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.stack(list(feats)).numpy()[0]


def pixels(im: Image.Image, spec) -> np.ndarray:
    return preprocess(im, spec)


def test_the_file_holds_siglip_s_tower_as_clip_cpp_reads_it(ckpt, mmproj):
    import gguf

    out, info, logs = mmproj
    r = gguf.GGUFReader(str(out / "mmproj.f32.gguf"))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    vc = ckpt.vision_config
    n = vc["num_hidden_layers"]
    assert kv["clip.projector_type"] == "mlp"
    assert kv["clip.vision.feature_layer"] == [n] and kv["clip.vision.block_count"] == n  # layer -1: all of them
    assert kv["clip.use_gelu"] is True  # ggml_gelu, the tanh form: gelu_pytorch_tanh
    assert kv["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert kv["clip.vision.image_mean"] == pytest.approx([0.5] * 3)
    assert kv["clip.vision.image_std"] == pytest.approx([0.5] * 3)
    assert kv["clip.vision.image_size"] == SIZE and kv["clip.vision.patch_size"] == PATCH
    assert "clip.vision.image_grid_pinpoints" not in kv
    names = {t.name for t in r.tensors}
    # no class token, no pre-layernorm, and not the post_layernorm LLaVA reads around
    assert not names & {"v.class_embd", "v.pre_ln.weight", "v.pre_ln.bias", "v.post_ln.weight", "v.post_ln.bias"}
    assert {"v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight", f"v.blk.{n - 1}.ffn_up.weight",
            "mm.0.weight", "mm.2.bias"} <= names
    pos = next(t for t in r.tensors if t.name == "v.position_embd.weight")
    assert tuple(int(s) for s in reversed(pos.shape)) == (N_POS, vc["hidden_size"])
    assert info["f32"]["n_image_tokens"] == N_POS
    assert not any("25814" in line for line in logs)  # the class-token bug cannot touch a tower without one
    assert any("aspect not kept" in line for line in logs)


def test_llama_cpp_gives_every_patch_a_position(ckpt, mmproj, text_gguf):
    """64 for the toy (8 x 8 patches), whatever the picture's shape: llama.cpp letterboxes into one tile."""
    out, _, _ = mmproj
    sizes = [(112, 112), (300, 200), (50, 500), (1, 1)]
    got = mtmd.image_positions(out / "mmproj.f32.gguf", text_gguf, [np.asarray(picture(w, h)) for w, h in sizes])
    assert got == [[N_POS]] * len(sizes)
    tower = towers.for_config(ckpt.vision_config)
    assert tower.tokens(SIZE, PATCH, ckpt.config["vision_feature_select_strategy"]) == N_POS
    assert ckpt.config["image_seq_length"] == N_POS


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_llama_cpp_equals_transformers_image_features(ckpt, mmproj, text_gguf, hf, outtype):
    """A picture of the tower's size is not resized by llama.cpp: both sides see the same pixels."""
    out, _, _ = mmproj
    im = picture(SIZE, SIZE, seed=1)
    got, = mtmd.image_embeddings(out / f"mmproj.{outtype}.gguf", text_gguf, [np.asarray(im)])
    assert_close(got, hf_features(hf, pixels(im, ckpt.image_spec())), outtype)


def test_llama_cpp_resizes_a_square_picture_as_siglip_s_processor_does(ckpt, mmproj, text_gguf, hf):
    out, _, _ = mmproj
    im = picture(3 * SIZE, 3 * SIZE, seed=2)
    got, = mtmd.image_embeddings(out / "mmproj.f32.gguf", text_gguf, [np.asarray(im)])
    assert_close(got, hf_features(hf, pixels(im, ckpt.image_spec())))


@pytest.mark.parametrize("size", [(SIZE, 56), (56, SIZE)], ids=str)
def test_llama_cpp_letterboxes_what_siglip_squashes(ckpt, mmproj, text_gguf, hf, size):
    """A non-square picture: llama.cpp pads it centred with (122, 116, 104) (no resize needed at these sizes);
    SigLIP's processor stretches it to the tile. llama.cpp equals the model on its letterboxed pixels, not on
    the model's own."""
    out, _, _ = mmproj
    im = picture(*size, seed=3)
    got, = mtmd.image_embeddings(out / "mmproj.f32.gguf", text_gguf, [np.asarray(im)])
    boxed = Image.new("RGB", (SIZE, SIZE), PAD)
    boxed.paste(im, ((SIZE - size[0]) // 2, (SIZE - size[1]) // 2))
    spec = ckpt.image_spec()
    assert_close(got, hf_features(hf, pixels(boxed, spec)))
    with pytest.raises(AssertionError):
        assert_close(got, hf_features(hf, pixels(im, spec)))


def test_a_picture_squashed_beforehand_gets_the_model_s_features(ckpt, mmproj, text_gguf, hf):
    """The way round the letterbox: resize the picture to the tile with Pillow's bicubic (what SigLIP's
    processor does) before llama.cpp sees it; llama.cpp then resizes nothing."""
    out, _, _ = mmproj
    im = picture(300, 200, seed=7)
    squashed = np.asarray(im.resize((SIZE, SIZE), Image.BICUBIC))
    got, = mtmd.image_embeddings(out / "mmproj.f32.gguf", text_gguf, [squashed])
    assert_close(got, hf_features(hf, pixels(im, ckpt.image_spec())))


def _variant(siglip_toy, tmp_path, vision: dict, processor_size: int | None = None) -> Checkpoint:
    """The toy with another vision config (new random weights), its side files copied."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig.from_pretrained(siglip_toy)
    for k, v in vision.items():
        setattr(cfg.vision_config, k, v)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    cfg.image_seq_length = side * side
    with torch.random.fork_rng():
        torch.manual_seed(1)
        LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path / "model")
    for f in siglip_toy.iterdir():
        if not (tmp_path / "model" / f.name).exists():
            shutil.copy(f, tmp_path / "model" / f.name)
    if processor_size is not None:
        for name in ("preprocessor_config.json", "processor_config.json"):
            f = tmp_path / "model" / name
            if f.exists():
                d = json.loads(f.read_text())
                proc = d.get("image_processor", d)
                if "size" in proc:
                    proc["size"] = {"height": processor_size, "width": processor_size}
                f.write_text(json.dumps(d))
    return open_checkpoint(tmp_path / "model")


def test_the_convolution_drops_the_remainder_as_in_transformers(siglip_toy, text_gguf, tmp_path):
    """Interleave's 384 px of 14 px patches leave 6 px over (27 x 27 = 729 positions); here 118 px: 8 x 8 = 64.
    Both sides' stride-14 convolution ignores the last 6 rows and columns."""
    odd = _variant(siglip_toy, tmp_path, {"image_size": 118}, processor_size=118)
    assert odd.image_spec().crop == 118
    info = mmproj_gguf.export_mmproj_gguf(odd, tmp_path / "odd.gguf", log=lambda _: None)
    assert info["n_image_tokens"] == N_POS
    im = picture(118, 118, seed=4)
    assert mtmd.image_positions(tmp_path / "odd.gguf", text_gguf, [np.asarray(im)]) == [[N_POS]]
    got, = mtmd.image_embeddings(tmp_path / "odd.gguf", text_gguf, [np.asarray(im)])
    assert_close(got, hf_features(load_hf_model(odd), pixels(im, odd.image_spec())))


def test_a_written_post_layernorm_would_be_applied(ckpt, text_gguf, hf, tmp_path, monkeypatch):
    """Why ``post_layernorm`` is left out: clip.cpp applies a ``v.post_ln`` it finds, and LLaVA reads the last
    layer's output before it (SigLIP's ``last_hidden_state`` is after it)."""
    siglip = towers.TOWERS["siglip"]
    monkeypatch.setitem(towers.TOWERS, "siglip", dataclasses.replace(siglip, unused_modules=("head.",)))
    mmproj_gguf.export_mmproj_gguf(ckpt, tmp_path / "post_ln.gguf", log=lambda _: None)
    im = picture(SIZE, SIZE, seed=5)
    got, = mtmd.image_embeddings(tmp_path / "post_ln.gguf", text_gguf, [np.asarray(im)])
    px = torch.from_numpy(pixels(im, ckpt.image_spec()))[None]
    with torch.no_grad():
        normed = hf.model.multi_modal_projector(hf.model.vision_tower(px).last_hidden_state)[0].numpy()
    assert_close(got, normed)
    with pytest.raises(AssertionError):
        assert_close(got, hf_features(hf, px[0].numpy()))


def test_quick_gelu_would_be_caught(ckpt, text_gguf, hf, tmp_path, monkeypatch):
    """``clip.use_gelu`` matters: without it clip.cpp runs CLIP's quick-GELU, which the gate tells apart."""
    monkeypatch.setitem(mmproj_gguf._TOWER_ACTS, "gelu_pytorch_tanh", False)
    mmproj_gguf.export_mmproj_gguf(ckpt, tmp_path / "quick.gguf", log=lambda _: None)
    im = picture(SIZE, SIZE, seed=1)
    got, = mtmd.image_embeddings(tmp_path / "quick.gguf", text_gguf, [np.asarray(im)])
    with pytest.raises(AssertionError):
        assert_close(got, hf_features(hf, pixels(im, ckpt.image_spec())))


def llama_cpp_answer(mmproj_path, text_gguf, image: np.ndarray, prompt: str) -> tuple[list[int | None], np.ndarray]:
    """llama.cpp's whole multimodal path, as ``llama-mtmd-cli`` runs it: mtmd tokenizes ``prompt`` (its media
    marker becomes the image's chunk), ``mtmd_helper_eval_chunks`` encodes and decodes every chunk. Returns the
    ids it decoded (None for each image position) and the logits after the last one. f32 KV cache and no flash
    attention: llama.cpp's defaults round to f16."""
    import llama_cpp
    from llama_cpp import mtmd_cpp as M

    mtmd.silence_mtmd_logs()
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(), llama_cpp.llama_model_default_params())
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 512, 512, 512, 2, 2
    cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    lctx = llama_cpp.llama_init_from_model(model, cp)
    mp = M.mtmd_context_params_default()
    mp.use_gpu, mp.n_threads, mp.print_timings, mp.warmup = False, 2, False, False
    mp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = M.mtmd_init_from_file(str(mmproj_path).encode(), model, mp)
    h, w, _ = image.shape
    bitmap = M.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * image.size).from_buffer_copy(image.tobytes()))
    chunks = M.mtmd_input_chunks_init()
    try:
        text = prompt.replace("<image>", M.mtmd_default_marker().decode()).encode()
        inp = M.mtmd_input_text(text, len(text), True, True)
        assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (M.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        ids: list[int | None] = []
        for i in range(M.mtmd_input_chunks_size(chunks)):
            c = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                p = M.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                ids += [p[j] for j in range(n.value)]
            else:
                ids += [None] * M.mtmd_input_chunk_get_n_tokens(c)
        n_past = llama_cpp.llama_pos(0)
        assert M.mtmd_helper_eval_chunks(ctx, lctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        assert n_past.value == len(ids)
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(n_vocab,)).copy()
        return ids, logits
    finally:
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bitmap)
        M.mtmd_free(ctx)
        llama_cpp.llama_free(lctx)
        llama_cpp.llama_model_free(model)


def test_llama_cpp_answers_with_transformers_first_token(ckpt, mmproj, text_gguf, hf):
    """End to end on llama.cpp's side (mtmd's tokens, image chunk and decode) against the model on the same ids
    and the same pixels."""
    out, _, _ = mmproj
    im = picture(SIZE, SIZE, seed=6)
    ids, got = llama_cpp_answer(out / "mmproj.f32.gguf", text_gguf, np.asarray(im),
                                "USER: <image>\nWhat is in the image? ASSISTANT:")
    assert ids.count(None) == N_POS
    full = [ckpt.image_token_id if t is None else t for t in ids]
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([full]),
                  pixel_values=torch.from_numpy(pixels(im, ckpt.image_spec()))[None]).logits[0, -1].numpy()
    got = got[: len(want)]
    assert int(got.argmax()) == int(want.argmax())
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def _with(ckpt, vision: dict | None = None, family: str | None = None, **config) -> Checkpoint:
    cfg = {**ckpt.config, **config}
    if vision:
        cfg["vision_config"] = {**ckpt.vision_config, **vision}
    return Checkpoint(ckpt.path, cfg, ckpt.recipe, family=FAMILIES[family] if family else ckpt.family)


@pytest.mark.parametrize("change, words", [
    (dict(vision_feature_select_strategy="default"), "use 'full'"),
    (dict(family="llava-next"), "OneVision"),
    (dict(vision={"model_type": "clip_vision_model"}, vision_feature_select_strategy="default"), "lack a class"),
], ids=["default-strategy", "tiled", "clip-config-siglip-weights"])
def test_what_llama_cpp_cannot_do_is_one_line(ckpt, tmp_path, change, words):
    bad = _with(ckpt, **change)
    with pytest.raises(UserError, match=words) as e:
        mmproj_gguf.export_mmproj_gguf(bad, tmp_path / "m.gguf", log=lambda _: None)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_export_target_mmproj_on_the_siglip_toy(siglip_toy, tmp_path):
    from cli_run import le

    from llava_edge import manifest

    r = le("export", "--model", siglip_toy, "--out", tmp_path / "b", "--target", "mmproj")
    assert r.returncode == 0, r.stderr
    assert {v.kind for v in manifest.read(tmp_path / "b").variants} >= {"llm", "mmproj"}
