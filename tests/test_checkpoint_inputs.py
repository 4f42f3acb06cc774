"""Every checkpoint input ``export`` takes, and a one-line error for each bad one.

Inputs: a llava-hf directory (one safetensors file or shards with an index), a
hub id from the local cache (offline), a ``llava-edge train`` output, and an
original LLaVA repository checkpoint with its CLIP tower, converted. The
original-layout checkpoints are the toy renamed (tests/original_llava_layout.py),
so converting back must give the toy's tensors and logits.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from llava_edge.checkpoint import check_safetensors, open_checkpoint, resolve_model
from llava_edge.errors import UserError
from original_llava_layout import original_names, toy_tensors, write_clip_dir, write_original_llava

from llava_edge.toy.tokenizer import LEGACY


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg and isinstance(exc.value, UserError), msg
    return msg


def canonical(sd: dict) -> dict:
    """Tensor names independent of the llava-hf key layout a writer chose."""
    return {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in sd.items()}


def converted_tensors(ckpt) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in ckpt.weight_files():
        out.update(load_file(str(f)))
    return canonical(out)


def nothing_converted(cache: Path) -> bool:
    folder = cache / "converted"
    return not folder.exists() or not any(folder.iterdir())


@pytest.fixture(scope="module")
def original(toy_model, tmp_path_factory):
    """LLaVA-1.5 as released: .bin shards, SentencePiece-only tokenizer and rows, tower in a CLIP dir."""
    return write_original_llava(toy_model, tmp_path_factory.mktemp("orig") / "o")


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    src, clip = original
    return resolve_model(src, clip, cache_dir=tmp_path_factory.mktemp("cache"), log=lambda _: None)


@pytest.fixture(scope="module")
def toy_inputs(toy_model):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_model)
    ids = tok("USER: <image>\nWhat color is the square? ASSISTANT:", return_tensors="pt").input_ids
    n_img = open_checkpoint(toy_model).num_image_tokens()
    image_id = tok.convert_tokens_to_ids("<image>")
    pos = (ids[0] == image_id).nonzero()[0, 0]
    ids = torch.cat([ids[:, :pos], torch.full((1, n_img), image_id), ids[:, pos + 1:]], dim=1)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(1, 3, 112, 112, generator=g)
    return ids, pixels


def logits_of(model, inputs):
    import torch

    ids, pixels = inputs
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits[0]


# ----------------------------------------------------------------------------- original LLaVA, converted


def test_original_checkpoint_converts_to_the_toys_config_and_rows(converted, toy_model, original):
    toy = open_checkpoint(toy_model)
    assert converted.origin == original[0]
    for key in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy",
                "projector_hidden_act", "image_seq_length"):
        assert converted.config[key] == toy.config[key], key
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"):
        assert converted.text_config[key] == toy.text_config[key], key
    assert converted.vision_config == toy.vision_config
    # the mode LLaVA's run_llava.py picks for "llava-v1.5-*"; image_aspect_ratio: pad
    assert converted.recipe == {"template": "llava_v1", "image_pad": "pad"}
    tcfg = json.loads((converted.path / "tokenizer_config.json").read_text())
    assert (tcfg["legacy"], tcfg["add_bos_token"], tcfg["add_eos_token"]) == (LEGACY, True, False)
    assert converted.image_spec() == toy.image_spec()

    import torch

    got, want = converted_tensors(converted), canonical(toy_tensors(toy_model))
    assert sorted(got) == sorted(want)
    n_sp = toy.image_token_id  # the SentencePiece rows the original checkpoint had
    for name in want:
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(got[name][:n_sp], want[name][:n_sp]), name
            # new rows (<image>, <pad>, padding to a multiple of 64) are the mean row, as llava-hf's are near it
            mean = want[name][:n_sp].double().mean(0).float()
            assert torch.allclose(got[name][n_sp:], mean.expand(got[name].shape[0] - n_sp, -1), atol=1e-7), name
        else:
            assert torch.equal(got[name], want[name]), name


def test_converted_tokenizer_is_llava_hfs(converted, toy_model):
    """<image> and <pad> added after the SentencePiece vocabulary exactly as the toy (and llava-hf) has them."""
    assert json.loads((converted.path / "tokenizer.json").read_text()) == \
        json.loads((toy_model / "tokenizer.json").read_text())
    assert (converted.path / "tokenizer.model").read_bytes() == (toy_model / "tokenizer.model").read_bytes()


def test_converted_logits_equal_the_toys(converted, hf_model, toy_inputs):
    from llava_edge.checkpoint import load_hf_model

    model = load_hf_model(converted)
    got, want = logits_of(model, toy_inputs), logits_of(hf_model, toy_inputs)
    n_sp = converted.image_token_id
    assert (got[:, :n_sp] - want[:, :n_sp]).abs().max().item() <= 1e-6
    assert (got.argmax(-1) < n_sp).all()  # the mean rows never win a greedy step


def test_exact_round_trip_with_tower_inside_and_safetensors_shards(toy_model, tmp_path):
    """The toy's own tokenizer and rows kept: every tensor comes back byte-identical.

    The CLIP directory's tower is perturbed: the copy inside the LLaVA checkpoint must win.
    """
    import torch

    src, clip = write_original_llava(toy_model, tmp_path / "o", fresh_tokens=False, weights="safetensors",
                                     n_shards=3, tower_inside=True)
    sd = torch.load(clip / "pytorch_model.bin", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, clip / "pytorch_model.bin")
    ckpt = resolve_model(src, clip, cache_dir=tmp_path / "cache", log=lambda _: None)
    got, want = converted_tensors(ckpt), canonical(toy_tensors(toy_model))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert ckpt.image_token_id == open_checkpoint(toy_model).image_token_id


def test_linear_projector_is_llava_edges_linear_form(toy_model, toy_inputs, tmp_path):
    """LLaVA's single-linear projector -> identity activation + identity second layer (train/model_setup.py)."""
    from llava_edge.checkpoint import load_hf_model
    from llava_edge.train.model_setup import make_linear_projector, projector_type

    src, clip = write_original_llava(toy_model, tmp_path / "o", projector="linear", n_shards=1)
    ckpt = resolve_model(src, clip, cache_dir=tmp_path / "cache", log=lambda _: None)
    model = load_hf_model(ckpt)
    assert projector_type(model) == "linear"
    want = load_hf_model(open_checkpoint(toy_model))
    make_linear_projector(want)
    n = ckpt.image_token_id
    assert (logits_of(model, toy_inputs)[:, :n] - logits_of(want, toy_inputs)[:, :n]).abs().max().item() <= 1e-6


def test_llava_mistral_converts_to_a_mistral_text_model(original, hf_model, toy_inputs, tmp_path):
    from llava_edge.checkpoint import load_hf_model

    src = _edit_original(original, tmp_path, architectures=["LlavaMistralForCausalLM"], sliding_window=None)
    ckpt = resolve_model(src, original[1], cache_dir=tmp_path / "cache", log=lambda _: None)
    assert ckpt.text_config["model_type"] == "mistral"
    n = ckpt.image_token_id
    got, want = logits_of(load_hf_model(ckpt), toy_inputs), logits_of(hf_model, toy_inputs)
    assert (got[:, :n] - want[:, :n]).abs().max().item() <= 1e-6


def test_conversion_is_cached_and_redone_when_the_source_changes(original, tmp_path):
    src, clip = original
    said: list[str] = []
    first = resolve_model(src, clip, cache_dir=tmp_path, log=said.append)
    again = resolve_model(src, clip, cache_dir=tmp_path, log=said.append)
    assert again.path == first.path and "using the converted checkpoint" in said[-1]
    cfg = src / "config.json"
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))
    try:
        changed = resolve_model(src, clip, cache_dir=tmp_path, log=said.append)
        assert changed.path != first.path and said[-1].startswith("converting")
    finally:
        os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns - 10**9))


def test_failed_conversion_leaves_nothing(original, tmp_path, monkeypatch):
    from llava_edge import weights

    real = weights.write_safetensors

    def crash_after_first(path, tensors, metadata=None):
        real(path, tensors, metadata)
        raise KeyboardInterrupt  # a kill half-way through writing

    monkeypatch.setattr(weights, "write_safetensors", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(*original, cache_dir=tmp_path, log=lambda _: None)
    assert nothing_converted(tmp_path)


def test_converted_checkpoint_exports_and_answers_like_the_toy(converted, runtime, toy_data, tmp_path):
    from llava_edge import EdgeLLaVA
    from llava_edge.export.bundle import export_bundle

    m = export_bundle(converted, tmp_path / "b", log=lambda _: None)
    assert m.llm["image_token_id"] == converted.image_token_id
    assert m.conv_mode == "llava_v1" and m.image["pad"] == "pad"
    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    edge = EdgeLLaVA.load(tmp_path / "b", kv_cache="f32", conv_mode="vicuna_v1")  # the toy's mode
    try:
        question = "What shape is at the top left?"
        assert edge.chat(image, question, max_tokens=12) == runtime.chat(image, question, max_tokens=12)
    finally:
        edge.close()


# ----------------------------------------------------------------------------- hub ids (offline cache)


def _fake_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / "0123abcd")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123abcd")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_ids_resolve_from_the_offline_cache(hub_cache, toy_model, original, tmp_path):
    _fake_hub_cache(hub_cache, "acme/toy-llava", toy_model)
    ckpt = resolve_model("acme/toy-llava")
    assert ckpt.path.is_relative_to(hub_cache) and ckpt.image_token_id == open_checkpoint(toy_model).image_token_id
    # an original checkpoint names its tower by hub id (mm_vision_tower: acme/clip-toy)
    _fake_hub_cache(hub_cache, "acme/clip-toy", original[1])
    conv = resolve_model(original[0], cache_dir=tmp_path / "conv", log=lambda _: None)
    assert json.loads((conv.path / "llava_edge_converted_from.json").read_text())["vision"].startswith(str(hub_cache))


def test_hub_id_not_in_the_offline_cache(hub_cache, original, tmp_path):
    with pytest.raises(UserError) as e:
        resolve_model("acme/never-downloaded")
    assert "acme/never-downloaded" in one_line(e) and "cache" in one_line(e)
    with pytest.raises(UserError) as e:  # the tower named by the config is not cached either
        resolve_model(original[0], cache_dir=tmp_path / "conv")
    assert "vision tower 'acme/clip-toy'" in one_line(e)
    assert nothing_converted(tmp_path / "conv")


# ----------------------------------------------------------------------------- llava-hf directories


@pytest.fixture(scope="module")
def sharded(hf_model, toy_model, tmp_path_factory):
    """The toy saved by transformers in shards with model.safetensors.index.json."""
    out = tmp_path_factory.mktemp("sharded") / "m"
    hf_model.save_pretrained(out, max_shard_size="3MB")
    for f in toy_model.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json",) and not (out / f.name).exists():
            shutil.copyfile(f, out / f.name)
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_sharded_safetensors_are_read_like_one_file(sharded, toy_model):
    from llava_edge.export.llm_gguf import text_tensors

    ckpt = open_checkpoint(sharded)
    assert len(ckpt.weight_files()) > 1
    assert ckpt.fingerprint() != open_checkpoint(toy_model).fingerprint()
    assert sorted(text_tensors(ckpt)) == sorted(text_tensors(open_checkpoint(toy_model)))


def test_missing_shard_is_named(sharded, tmp_path):
    m = _copy(sharded, tmp_path)
    shard = sorted(m.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(UserError) as e:
        open_checkpoint(m)
    assert "missing weight shard" in one_line(e) and shard.name in one_line(e)


def test_index_listing_a_tensor_its_shard_lacks(sharded, tmp_path):
    m = _copy(sharded, tmp_path)
    index = json.loads((m / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.model.layers.9.mlp.up_proj.weight"] = sorted(index["weight_map"].values())[0]
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as e:
        open_checkpoint(m)
    assert "layers.9.mlp.up_proj" in one_line(e)


@pytest.mark.parametrize("damage", ["truncated", "trailing", "empty", "header", "bad_offsets"])
def test_corrupt_safetensors_names_the_file(toy_model, tmp_path, damage):
    m = _copy(toy_model, tmp_path)
    f = m / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if damage == "truncated":  # an interrupted download: header intact, data cut short
        f.write_bytes(data[:-1000])
    elif damage == "trailing":
        f.write_bytes(data + b"\0" * 16)
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "header":
        f.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4
        raw = json.dumps(header).encode()
        raw += b" " * (n - len(raw)) if len(raw) <= n else b""
        f.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(UserError) as e:
        open_checkpoint(m)
    assert "corrupt safetensors" in one_line(e) and str(f) in one_line(e)


def test_the_toy_and_its_safetensors_pass_the_checks(toy_model):
    header = check_safetensors(toy_model / "model.safetensors")
    assert "language_model.lm_head.weight" in header


def test_train_outputs_are_accepted_and_states_and_adapters_explained(toy_model, tmp_path):
    from safetensors.torch import save_file

    out = _copy(toy_model, tmp_path)  # what stage 1/2 write: a full checkpoint + the projector + a state
    projector = {k: v for k, v in toy_tensors(toy_model).items() if "projector" in k}
    save_file(projector, str(out / "mm_projector.safetensors"))
    (out / "mm_projector.json").write_text("{}")
    (out / "checkpoint-last").mkdir()
    (out / "checkpoint-last" / "model.safetensors").write_bytes((toy_model / "model.safetensors").read_bytes())
    (out / "checkpoint-last" / "optimizer.bin").write_bytes(b"x")
    (out / "checkpoint-last" / "random_states_0.pkl").write_bytes(b"x")
    ckpt = resolve_model(out)
    assert [f.name for f in ckpt.weight_files()] == ["model.safetensors"]
    with pytest.raises(UserError) as e:
        resolve_model(out / "checkpoint-last")
    assert "training state" in one_line(e) and "--resume" in one_line(e)
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError) as e:
        resolve_model(out / "adapter")
    assert "LoRA adapter" in one_line(e) and "merge-lora" in one_line(e)
    with pytest.raises(UserError) as e:
        resolve_model(out, vision=str(out))
    assert "--vision" in one_line(e)


# ----------------------------------------------------------------------------- unsupported models


def _config_dir(tmp_path: Path, config: dict) -> Path:
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("config, names", [
    ({"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl"}, ["Qwen2VL", "qwen2_vl"]),
    ({"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3"}, ["idefics3"]),
    ({"model_type": "bert"}, ["bert"]),
])
def test_unsupported_architecture_lists_the_supported_ones(tmp_path, config, names):
    with pytest.raises(UserError) as e:
        resolve_model(_config_dir(tmp_path, config))
    msg = one_line(e)
    for word in [*names, "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                 "LlavaOnevisionForConditionalGeneration", "llama", "mistral", "qwen2", "LlavaLlamaForCausalLM"]:
        assert word in msg


def test_a_llava_next_checkpoint_without_pinpoints_is_named_as_such(tmp_path):
    cfg = {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
           "text_config": {"model_type": "mistral"}, "vision_config": {"model_type": "clip_vision_model"}}
    with pytest.raises(UserError) as e:
        resolve_model(_config_dir(tmp_path, cfg))
    assert "image_grid_pinpoints" in one_line(e)


def test_unsupported_language_model_in_a_llava_checkpoint(tmp_path, toy_model):
    cfg = json.loads((toy_model / "config.json").read_text())
    cfg["text_config"]["model_type"] = "gemma"
    with pytest.raises(UserError) as e:
        resolve_model(_config_dir(tmp_path, cfg))
    assert "gemma" in one_line(e) and "llama, mistral, qwen2, phi3" in one_line(e)


def _edit_original(original, tmp_path: Path, **changes) -> Path:
    src = Path(shutil.copytree(original[0], tmp_path / "llava"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize("changes, words", [
    ({"architectures": ["LlavaMptForCausalLM"]}, ["LlavaMptForCausalLM", "LlavaLlamaForCausalLM"]),
    ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad"}, ["LLaVA-NeXT"]),
    ({"mm_use_im_start_end": True}, ["mm_use_im_start_end"]),
    ({"mm_projector_type": "mlp3x_gelu"}, ["mlp3x_gelu", "mlp2x_gelu, linear"]),
    ({"mm_vision_select_feature": "cls"}, ["cls", "patch, cls_patch"]),
    ({"mm_hidden_size": 1024}, ["1024", "--vision"]),
    ({"num_hidden_layers": 5}, ["5", "layers"]),
    ({"mm_vision_tower": str(Path("/nonexistent/clip-vit"))}, ["vision tower directory not found"]),
])
def test_unconvertible_original_checkpoints(original, tmp_path, changes, words):
    src = _edit_original(original, tmp_path, **changes)
    with pytest.raises(UserError) as e:
        resolve_model(src, cache_dir=tmp_path / "cache", vision=None if "mm_vision_tower" in changes else original[1])
    for w in words:
        assert w in one_line(e)
    assert nothing_converted(tmp_path / "cache")


def test_original_checkpoint_errors_name_the_file(original, tmp_path):
    src = Path(shutil.copytree(original[0], tmp_path / "llava"))
    shard = sorted(src.glob("pytorch_model-*.bin"))[-1]
    kept = shard.read_bytes()
    shard.unlink()
    with pytest.raises(UserError) as e:
        resolve_model(src, original[1], cache_dir=tmp_path / "cache")
    assert "missing weight shard" in one_line(e) and shard.name in one_line(e)
    shard.write_bytes(kept[: len(kept) // 2])  # a truncated download
    with pytest.raises(UserError) as e:
        resolve_model(src, original[1], cache_dir=tmp_path / "cache")
    assert str(shard) in one_line(e)
    assert nothing_converted(tmp_path / "cache")


def test_original_lora_and_projector_only_checkpoints(original, tmp_path):
    src = Path(shutil.copytree(original[0], tmp_path / "lora"))
    (src / "non_lora_trainables.bin").write_bytes(b"x")
    with pytest.raises(UserError) as e:
        resolve_model(src, original[1], cache_dir=tmp_path / "cache")
    assert "LoRA" in one_line(e)
    proj = tmp_path / "stage1"
    proj.mkdir()
    shutil.copyfile(original[0] / "config.json", proj / "config.json")
    (proj / "mm_projector.bin").write_bytes(b"x")
    with pytest.raises(UserError) as e:
        resolve_model(proj, original[1], cache_dir=tmp_path / "cache")
    assert "only a projector" in one_line(e)


def test_open_checkpoint_points_original_checkpoints_to_export(original):
    with pytest.raises(UserError) as e:
        open_checkpoint(original[0])
    assert "LlavaLlamaForCausalLM" in one_line(e) and "export" in one_line(e)


def test_tokenizer_larger_than_the_original_embedding(original, tmp_path, toy_model):
    """LLaVA's tokenizer must fit its embedding before <image> is added (the GGUF check is llm_gguf's)."""
    import torch

    src = Path(shutil.copytree(original[0], tmp_path / "llava"))
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        sd = torch.load(src / shard, weights_only=True)
        cut = ("model.embed_tokens.weight", "lm_head.weight")
        sd = {k: (v[:900].clone() if k in cut else v) for k, v in sd.items()}
        torch.save(sd, src / shard)
    with pytest.raises(UserError) as e:
        resolve_model(src, original[1], cache_dir=tmp_path / "cache")
    assert "1000 tokens" in one_line(e) and "900 rows" in one_line(e)


def test_a_killed_conversion_is_cleaned_up_and_redone(original, tmp_path):
    from llava_edge.original_llava import converted_path

    src, clip = original
    final = converted_path(src, clip, tmp_path)
    dead = final.parent / f".{final.name}.999999999.partial"  # no such process: what `kill -9` leaves
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"half")
    ckpt = resolve_model(src, clip, cache_dir=tmp_path, log=lambda _: None)
    assert ckpt.path == final and not dead.exists()


@pytest.mark.slow
def test_conversion_streams(toy_model, tmp_path):
    """Converting ~1 GB of fp16 weights grows anonymous memory by a fraction of that (largest tensor 66 MB)."""
    import threading
    import time

    import torch

    _, tower = original_names(toy_tensors(toy_model))
    clip = write_clip_dir(toy_model, tmp_path / "clip", tower)
    H, F, L, V = 1024, 2816, 32, 32000
    src = tmp_path / "llava"
    src.mkdir()
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    shards: list[dict] = [{"model.embed_tokens.weight": r(V, H)}, {}]
    for i in range(L):
        d, p = shards[i * 2 // L], f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            d[p + f"self_attn.{n}.weight"] = r(H, H)
        d[p + "mlp.gate_proj.weight"], d[p + "mlp.up_proj.weight"], d[p + "mlp.down_proj.weight"] = \
            r(F, H), r(F, H), r(H, F)
        d[p + "input_layernorm.weight"], d[p + "post_attention_layernorm.weight"] = r(H), r(H)
    shards[1].update({"model.norm.weight": r(H), "lm_head.weight": r(V, H), "model.mm_projector.0.weight": r(H, 128),
                      "model.mm_projector.0.bias": r(H), "model.mm_projector.2.weight": r(H, H),
                      "model.mm_projector.2.bias": r(H)})
    weight_map = {}
    for i, sd in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save(sd, src / name)
        weight_map.update({k: name for k in sd})
    total = sum(v.numel() * v.element_size() for sd in shards for v in sd.values())
    del shards, sd, d
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": H, "intermediate_size": F,
        "num_hidden_layers": L, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": V,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "torch_dtype": "float16", "bos_token_id": 1,
        "eos_token_id": 2, "mm_hidden_size": 128, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_tower": str(clip), "image_aspect_ratio": "pad"}))
    shutil.copyfile(toy_model / "tokenizer.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))

    def anon() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon"))

    import gc

    gc.collect()
    base, peak, done = anon(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.002)

    t = threading.Thread(target=watch)
    t.start()
    try:
        ckpt = resolve_model(src, cache_dir=tmp_path / "cache", log=lambda _: None)
    finally:
        done.set()
        t.join()
    assert sum(f.stat().st_size for f in ckpt.weight_files()) > total
    assert peak[0] - base < 0.25 * total, f"grew {(peak[0] - base) / 1e6:.0f} MB for {total / 1e6:.0f} MB of weights"
