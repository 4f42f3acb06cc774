"""The llama.cpp multimodal projector GGUF ("mmproj"): its layout, and what llama.cpp's own CLIP computes from it.

Measured against Hugging Face on the toy checkpoint. llama.cpp's LLaVA graph in
the llama-cpp-python 0.3.36 build puts the class token after the patches while
its inputs still assume it first (upstream ggml-org/llama.cpp#25814): each patch
gets its neighbour's position embedding, patch 0 is dropped and the projected
class token becomes the last image token. No file layout can undo that, so the
exact checks compare llama.cpp with a torch re-enactment of that graph built
from the Hugging Face modules (same weights, same layers), and the direct
comparison with ``get_image_features`` is a strict xfail that turns red when
llama.cpp is fixed.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

import llava_edge.export.mmproj_gguf as mmproj_gguf
from llava_edge.runtimes import mtmd
from llava_edge.checkpoint import Checkpoint, open_checkpoint
from llava_edge.errors import UserError
from llava_edge.preprocess import ImageSpec, preprocess
from llava_edge.scenes import random_scene, render

# per image token; the f32 path differs only by ggml's GELU and summation order
# (measured: cosine 1.00000, max abs 5e-4 of the output's range)
MIN_COSINE = 0.99999
MAX_REL_ERROR = 2e-3
# bf16 keeps 8 significant bits, and llama.cpp's bf16 matmuls round the activations to bf16 as well
# (measured on the toy: cosine 0.99998, max abs 6e-3 of the range); a wrong layer or token order gives < 0.99
BF16_MIN_COSINE = 0.9999
BF16_MAX_REL_ERROR = 1.5e-2


@pytest.fixture(scope="module")
def ckpt(toy_model):
    return open_checkpoint(toy_model)


@pytest.fixture(scope="module")
def mmproj(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("mmproj")
    info = {q: mmproj_gguf.export_mmproj_gguf(ckpt, out / f"mmproj.{q}.gguf", q, log=lambda _: None)
            for q in mmproj_gguf.OUTTYPES}
    return out, info


@pytest.fixture(scope="module")
def text_gguf(bundle):
    return bundle / "llm.f32.gguf"


def scene(size: int, seed: int):
    rng = random.Random(seed)
    return render(random_scene(rng), size, rng)


def same_geometry(ckpt) -> ImageSpec:
    """The checkpoint's normalization with resize == crop == the tower's size (LLaVA-1.5's 336/336)."""
    s = ckpt.vision_config["image_size"]
    return replace(ckpt.image_spec(), resize=s, crop=s)


def llama_cpp_llava_graph_in_torch(hf_model, pixel_values: np.ndarray, feature_layers: list[int]) -> np.ndarray:
    """What llama.cpp's ``clip_graph_llava`` computes, with the Hugging Face modules.

    Patch embeddings, then the class embedding appended last; position
    embeddings added by index; pre-layernorm; encoder layers up to the deepest
    feature layer; the selected hidden states concatenated in layer order;
    rows 1..n_patches kept; the projector. Only the class token's place
    differs from CLIP (ggml-org/llama.cpp#25814).
    """
    tower, projector = hf_model.model.vision_tower, hf_model.model.multi_modal_projector
    emb = tower.embeddings
    with torch.no_grad():
        x = torch.from_numpy(pixel_values)[None]
        patches = emb.patch_embedding(x).flatten(2).transpose(1, 2)
        seq = torch.cat([patches, emb.class_embedding.expand(1, 1, -1)], dim=1) + emb.position_embedding.weight[None]
        hidden = [tower.pre_layrnorm(seq)]
        for layer in tower.encoder.layers[: max(feature_layers)]:
            h = layer(hidden[-1], None)
            hidden.append(h[0] if isinstance(h, tuple) else h)
        h = torch.cat([hidden[i] for i in sorted(feature_layers)], dim=-1)
        return projector(h[:, 1 : patches.shape[1] + 1])[0].numpy()


def hf_image_features(hf_model, pixel_values: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        feats = hf_model.model.get_image_features(
            pixel_values=torch.from_numpy(pixel_values)[None], vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        ).pooler_output
    return torch.stack(list(feats)).numpy()[0]


def assert_close(got: np.ndarray, ref: np.ndarray, outtype: str = "f32") -> None:
    min_cos, max_rel = (BF16_MIN_COSINE, BF16_MAX_REL_ERROR) if outtype == "bf16" else (MIN_COSINE, MAX_REL_ERROR)
    assert got.shape == ref.shape
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert cos.min() >= min_cos and rel <= max_rel, f"cosine min {cos.min():.6f}, max error {rel:.2e} of range"


def test_gguf_keys_tensors_and_shapes_follow_the_config(ckpt, mmproj):
    import gguf
    from safetensors import safe_open

    out, info = mmproj
    r = gguf.GGUFReader(str(out / "mmproj.f32.gguf"))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    vc, tc = ckpt.vision_config, ckpt.text_config
    n_keep = vc["num_hidden_layers"] + 1 + ckpt.config["vision_feature_layer"]  # -2 -> all but the last
    spec = ckpt.image_spec()
    assert kv["general.architecture"] == "clip" and kv["general.type"] == "mmproj"
    assert kv["clip.projector_type"] == "mlp" and kv["clip.has_vision_encoder"] is True
    assert kv["clip.vision.image_size"] == vc["image_size"] and kv["clip.vision.patch_size"] == vc["patch_size"]
    assert kv["clip.vision.embedding_length"] == vc["hidden_size"]
    assert kv["clip.vision.feed_forward_length"] == vc["intermediate_size"]
    assert kv["clip.vision.attention.head_count"] == vc["num_attention_heads"]
    assert kv["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(vc["layer_norm_eps"])
    assert kv["clip.vision.projection_dim"] == tc["hidden_size"]
    assert kv["clip.vision.block_count"] == n_keep and kv["clip.vision.feature_layer"] == [n_keep]
    assert kv["clip.use_gelu"] is (vc["hidden_act"] == "gelu")
    assert kv["clip.vision.image_mean"] == pytest.approx(spec.mean)
    assert kv["clip.vision.image_std"] == pytest.approx(spec.std)

    blk = [f"v.blk.{i}.{n}.{p}" for i in range(n_keep) for p in ("weight", "bias")
           for n in ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down", "ln1", "ln2")]
    expected = {"v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "v.pre_ln.bias",
                "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", *blk}
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == expected  # no v.post_ln, no layer after the feature layer
    assert info["f32"]["n_tensors"] == len(expected)
    n_patches = (vc["image_size"] // vc["patch_size"]) ** 2
    shapes = {  # Hugging Face order; GGUF stores ggml's (reversed) order
        "v.patch_embd.weight": (vc["hidden_size"], 3, vc["patch_size"], vc["patch_size"]),
        "v.position_embd.weight": (n_patches + 1, vc["hidden_size"]),
        "v.blk.0.ffn_up.weight": (vc["intermediate_size"], vc["hidden_size"]),
        "mm.0.weight": (tc["hidden_size"], vc["hidden_size"]),
        "mm.2.weight": (tc["hidden_size"], tc["hidden_size"]),
    }
    for name, shape in shapes.items():
        assert tuple(int(s) for s in reversed(tensors[name].shape)) == shape, name
    with safe_open(str(ckpt.weight_files()[0]), framework="pt") as f:
        for name, key in [("mm.0.weight", "multi_modal_projector.linear_1.weight"),
                          ("mm.2.bias", "multi_modal_projector.linear_2.bias"),
                          ("v.blk.2.attn_q.weight", "vision_tower.encoder.layers.2.self_attn.q_proj.weight")]:
            ref = f.get_tensor(key).numpy()
            assert np.array_equal(np.asarray(tensors[name].data).reshape(ref.shape), ref), name


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_16_bit_types_keep_vectors_in_f32(mmproj, outtype):
    import gguf

    out, _ = mmproj
    r = gguf.GGUFReader(str(out / f"mmproj.{outtype}.gguf"))
    Q, F32 = gguf.GGMLQuantizationType, gguf.GGMLQuantizationType.F32
    matrix = {"f16": Q.F16, "bf16": Q.BF16}[outtype]
    types = {t.name: (t.tensor_type, len(t.shape)) for t in r.tensors}
    assert all(tt == (F32 if nd == 1 else matrix) for tt, nd in types.values())
    assert types["v.patch_embd.weight"][0] == matrix  # the patch convolution too: llama.cpp's im2col takes both
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]
    assert r.fields["general.file_type"].contents() == file_type
    assert (out / f"mmproj.{outtype}.gguf").stat().st_size < 0.6 * (out / "mmproj.f32.gguf").stat().st_size
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_bf16_holds_the_checkpoints_weights_rounded_to_nearest_even(ckpt, mmproj):
    """The bits torch's own float32 -> bfloat16 conversion gives (round to nearest, ties to even)."""
    import gguf
    from safetensors import safe_open

    out, _ = mmproj
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / "mmproj.bf16.gguf")).tensors}
    with safe_open(str(ckpt.weight_files()[0]), framework="pt") as f:
        for name, key in [("mm.0.weight", "multi_modal_projector.linear_1.weight"),
                          ("v.blk.1.ffn_up.weight", "vision_tower.encoder.layers.1.mlp.fc1.weight"),
                          ("v.patch_embd.weight", "vision_tower.embeddings.patch_embedding.weight")]:
            ref = f.get_tensor(key).float().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            got = np.asarray(tensors[name].data).view(np.uint16).reshape(ref.shape)
            assert np.array_equal(got, ref), name


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_llama_cpp_runs_exactly_llavas_layers_on_identical_pixels(ckpt, mmproj, text_gguf, hf_model, outtype):
    """An image of the tower's size is not resized by llama.cpp: both sides see the same pixels."""
    out, info = mmproj
    im = scene(ckpt.vision_config["image_size"], seed=1)
    got, = mtmd.image_embeddings(out / f"mmproj.{outtype}.gguf", text_gguf, [np.asarray(im)])
    px = preprocess(im, same_geometry(ckpt))
    assert_close(got, llama_cpp_llava_graph_in_torch(hf_model, px, info[outtype]["feature_layers"]), outtype)


def test_without_the_feature_layer_key_llama_cpp_drops_one_more_layer(ckpt, text_gguf, hf_model, tmp_path, monkeypatch):
    """Why ``clip.vision.feature_layer`` is written: without it clip.cpp runs block_count - 1 layers.

    That is what the legacy converter's files get (ggml-org/llama.cpp#25817).
    """
    monkeypatch.setattr(mmproj_gguf, "FEATURE_LAYER_KEY", "llava_edge.test.unread")
    path = tmp_path / "no_feature_layer.gguf"
    n_keep = mmproj_gguf.export_mmproj_gguf(ckpt, path, log=lambda _: None)["block_count"]
    im = scene(ckpt.vision_config["image_size"], seed=2)
    got, = mtmd.image_embeddings(path, text_gguf, [np.asarray(im)])
    px = preprocess(im, same_geometry(ckpt))
    assert_close(got, llama_cpp_llava_graph_in_torch(hf_model, px, [n_keep - 1]))
    with pytest.raises(AssertionError):
        assert_close(got, llama_cpp_llava_graph_in_torch(hf_model, px, [n_keep]))


def test_llama_cpp_resizes_a_square_image_like_pillow(ckpt, mmproj, text_gguf, hf_model):
    """llama.cpp's own preprocessing of a larger square image equals ours when resize == crop (LLaVA-1.5's geometry)."""
    out, info = mmproj
    im = scene(3 * ckpt.vision_config["image_size"], seed=3)
    got, = mtmd.image_embeddings(out / "mmproj.f32.gguf", text_gguf, [np.asarray(im)])
    px = preprocess(im, same_geometry(ckpt))
    assert_close(got, llama_cpp_llava_graph_in_torch(hf_model, px, info["f32"]["feature_layers"]))


@pytest.mark.parametrize("size", [(112, 56), (56, 112)])
def test_llama_cpp_letterboxes_like_llavas_expand2square(ckpt, mmproj, text_gguf, hf_model, size):
    """Nothing to resize: llama.cpp's padding (colour, centring) equals LLaVA's pad-to-square exactly."""
    out, info = mmproj
    im = scene(ckpt.vision_config["image_size"], seed=4).resize(size)
    got, = mtmd.image_embeddings(out / "mmproj.f32.gguf", text_gguf, [np.asarray(im)])
    px = preprocess(im, same_geometry(ckpt))
    assert_close(got, llama_cpp_llava_graph_in_torch(hf_model, px, info["f32"]["feature_layers"]))


def test_several_feature_layers_are_concatenated_like_llava(toy_model, text_gguf, tmp_path):
    """``vision_feature_layer: [1, -1]`` (Granite-Vision style): layer 1 and the full depth, concatenated."""
    import shutil

    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from llava_edge.checkpoint import load_hf_model

    cfg = LlavaConfig.from_pretrained(toy_model)
    cfg.vision_feature_layer = [1, -1]
    with torch.random.fork_rng():
        torch.manual_seed(1)
        LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path / "model")
    for f in toy_model.iterdir():
        if not (tmp_path / "model" / f.name).exists():
            shutil.copy(f, tmp_path / "model" / f.name)
    multi = open_checkpoint(tmp_path / "model")
    info = mmproj_gguf.export_mmproj_gguf(multi, tmp_path / "mmproj.gguf", log=lambda _: None)
    n = multi.vision_config["num_hidden_layers"]
    assert info["feature_layers"] == [1, n] and info["block_count"] == n
    im = scene(multi.vision_config["image_size"], seed=5)
    got, = mtmd.image_embeddings(tmp_path / "mmproj.gguf", text_gguf, [np.asarray(im)])
    model = load_hf_model(multi)
    assert_close(got, llama_cpp_llava_graph_in_torch(model, preprocess(im, same_geometry(multi)), [1, n]))


@pytest.mark.xfail(strict=True, reason="llama.cpp#25814: the LLaVA graph appends the class token after the patches")
def test_llama_cpp_equals_hf_image_features(ckpt, mmproj, text_gguf, hf_model):
    out, _ = mmproj
    im = scene(ckpt.vision_config["image_size"], seed=1)
    got, = mtmd.image_embeddings(out / "mmproj.f32.gguf", text_gguf, [np.asarray(im)])
    assert_close(got, hf_image_features(hf_model, preprocess(im, same_geometry(ckpt))))


@pytest.mark.parametrize("change, words", [
    ({"vision_feature_select_strategy": "full"}, "class token"),
    ({"projector_hidden_act": "relu"}, "mlp"),
    ({"multimodal_projector_bias": False}, "mlp"),
    ({"vision_feature_layer": [-2, -3]}, "increasing order"),
    ({"vision_feature_layer": -9}, "outside"),
])
def test_unsupported_checkpoints_are_one_line_user_errors(ckpt, tmp_path, change, words):
    bad = Checkpoint(ckpt.path, {**ckpt.config, **change}, ckpt.recipe)
    with pytest.raises(UserError, match=words) as e:
        mmproj_gguf.export_mmproj_gguf(bad, tmp_path / "m.gguf", log=lambda _: None)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_unsupported_tower_and_outtype(ckpt, tmp_path):
    vision = {**ckpt.vision_config, "model_type": "siglip_vision_model"}
    siglip = Checkpoint(ckpt.path, {**ckpt.config, "vision_config": vision}, ckpt.recipe)
    with pytest.raises(UserError, match="CLIP vision tower"):
        mmproj_gguf.export_mmproj_gguf(siglip, tmp_path / "m.gguf", log=lambda _: None)
    with pytest.raises(UserError, match="f32, f16, bf16"):
        mmproj_gguf.export_mmproj_gguf(ckpt, tmp_path / "m.gguf", "q4_0", log=lambda _: None)
