"""Write a random-weight LLaVA: a real ``LlavaForConditionalGeneration`` checkpoint.

It has the llava-hf layout (config.json, safetensors, tokenizer and processor
files), so every later stage loads it through the same code as
``llava-hf/llava-1.5-7b-hf``. Weights are random here; ``llava-edge toy build``
(training issue) makes one that has learned.

Two sizes of preset:

- ``toy``: a few M parameters, built as a torch model and saved with
  ``save_pretrained`` (fp32), small enough for tests on 2 CPU cores.
- real shapes (``llava-1.5-7b``, ``llava-1.5-13b``, ``tinyllava-1.1b``): the
  published configurations, so every stage can be timed at real size without
  downloading anything. These are written tensor by tensor from numpy random
  data (bf16 or fp16 on disk) and never held in memory: a 7B checkpoint is
  14 GB, the writer's peak memory is one chunk of one tensor. ``layers``
  shortens the language model where the full one does not fit.

The tokenizer is trained on the toy world's text (a real vocabulary cannot be
made without a download), in the style of the preset's language model: the
toy's SentencePiece one for Llama-style presets, a byte-level BPE with Qwen2's
pipeline and specials for ``text="qwen2"`` (``toy/tokenizer.py``); the
embedding is padded to the real model's row count (32064 for LLaVA-1.5), as
llava-hf pads its own.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .. import atomic, towers
from ..errors import UserError
from ..families import DEFAULT, FAMILIES
from .tokenizer import (IMAGE_TOKEN, LEGACY, MODE, QWEN_MODE, build_hf_tokenizer, build_qwen2_tokenizer,
                        family_markers, train_sentencepiece)

_CLIP_L_336 = dict(  # openai/clip-vit-large-patch14-336, the tower of LLaVA-1.5 and TinyLLaVA
    image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16, vision_ffn=4096,
    projection_dim=768, resize=336,
)

_SIGLIP_SO400M_384 = dict(  # google/siglip-so400m-patch14-384 as LLaVA-OneVision and -Interleave store it (26 layers)
    image_size=384, patch_size=14, vision_hidden=1152, vision_layers=26, vision_heads=16, vision_ffn=4304,
    resize=384, tower="siglip", strategy="full", feature_layer=-1, image_pad="square",
)

# The shape of each model. ``real`` presets are streamed to disk (see the module docstring).
SHAPES = {
    "toy": dict(
        image_size=112, patch_size=14, vision_hidden=128, vision_layers=4, vision_heads=4, vision_ffn=512,
        hidden=128, layers=4, heads=4, kv_heads=4, ffn=344, sp_vocab=1000, max_positions=2048,
        projector_act="gelu", resize=128,
    ),
    # the same shapes as a LLaVA-NeXT (LlavaNextForConditionalGeneration): 112 px tiles on LLaVA-1.6's grids
    "toy-next": dict(
        image_size=112, patch_size=14, vision_hidden=128, vision_layers=4, vision_heads=4, vision_ffn=512,
        hidden=128, layers=4, heads=4, kv_heads=4, ffn=344, sp_vocab=1000, max_positions=2048,
        projector_act="gelu", resize=112, family="llava-next",
    ),
    # a SigLIP tower in a LlavaForConditionalGeneration, read as LLaVA-Interleave is (every token of the last
    # layer, the picture resized to the tile as it is)
    "toy-siglip": dict(
        image_size=112, patch_size=14, vision_hidden=128, vision_layers=4, vision_heads=4, vision_ffn=512,
        hidden=128, layers=4, heads=4, kv_heads=4, ffn=344, sp_vocab=1000, max_positions=2048,
        projector_act="gelu", resize=112, tower="siglip", strategy="full", feature_layer=-1, image_pad="square",
    ),
    # a LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): SigLIP tiles of 112 px on OneVision's 36 grids,
    # anyres_max_9, every token of the last layer, a Qwen2 language model (q/k/v biases)
    "toy-onevision": dict(
        image_size=112, patch_size=14, vision_hidden=128, vision_layers=4, vision_heads=4, vision_ffn=512,
        hidden=128, layers=4, heads=4, kv_heads=2, ffn=344, sp_vocab=1000, max_positions=8192,
        projector_act="gelu", resize=112, tower="siglip", strategy="full", feature_layer=-1, image_pad="square",
        family="llava-onevision", text="qwen2",
    ),
    # llava-hf/llava-1.5-7b-hf: Vicuna-7B v1.5 (Llama-2 7B shape) + CLIP-L/14-336, 576 image tokens
    "llava-1.5-7b": dict(
        _CLIP_L_336, hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, sp_vocab=1000,
        max_positions=4096, projector_act="gelu", vocab=32064, real=True,
    ),
    # llava-hf/llava-1.5-13b-hf: Vicuna-13B v1.5 + CLIP-L/14-336
    "llava-1.5-13b": dict(
        _CLIP_L_336, hidden=5120, layers=40, heads=40, kv_heads=40, ffn=13824, sp_vocab=1000,
        max_positions=4096, projector_act="gelu", vocab=32064, real=True,
    ),
    # llava-hf/llava-v1.6-mistral-7b-hf: Mistral-7B-Instruct-v0.2 (8 KV heads, rope theta 1e6) + CLIP-L/14-336 on
    # LLaVA-1.6's five grids (1176 to 2928 positions a picture)
    "llava-v1.6-mistral-7b": dict(
        _CLIP_L_336, hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, sp_vocab=1000,
        max_positions=32768, projector_act="gelu", vocab=32064, real=True, family="llava-next", text="mistral",
        rope_theta=1e6,
    ),
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf: Qwen2-0.5B (2 KV heads, tied embeddings) + SigLIP-so400m/14-384 with
    # 26 stored layers, every token of the last, on OneVision's 36 grids with anyres_max_9
    "llava-onevision-qwen2-0.5b": dict(
        _SIGLIP_SO400M_384, hidden=896, layers=24, heads=14, kv_heads=2, ffn=4864, sp_vocab=1000,
        max_positions=32768, projector_act="gelu", vocab=152000, real=True, family="llava-onevision", text="qwen2",
        rope_theta=1e6, rms_eps=1e-6, tie=True,
    ),
    # llava-hf/llava-interleave-qwen-0.5b-hf: Qwen1.5-0.5B-Chat (16 KV heads, tied embeddings) + the same tower in a
    # LlavaForConditionalGeneration, one tile of 729 positions a picture
    "llava-interleave-qwen-0.5b": dict(
        _SIGLIP_SO400M_384, hidden=1024, layers=24, heads=16, kv_heads=16, ffn=2816, sp_vocab=1000,
        max_positions=32768, projector_act="gelu", vocab=152000, real=True, text="qwen2", rope_theta=1e6,
        rms_eps=1e-6, tie=True,
    ),
    # bczhou/tiny-llava-v1-hf: TinyLlama-1.1B (grouped-query attention, 4 KV heads) + CLIP-L/14-336
    "tinyllava-1.1b": dict(
        _CLIP_L_336, hidden=2048, layers=22, heads=32, kv_heads=4, ffn=5632, sp_vocab=1000,
        max_positions=2048, projector_act="gelu", vocab=32064, real=True,
    ),
}

DTYPES = {"bfloat16": "BF16", "float16": "F16"}  # what real presets store, as safetensors names it
SHARD_BYTES = 5_000_000_000  # llava-hf's 7B ships as shards of about this size


def preset_shape(preset: str, layers: int | None = None) -> dict:
    """The preset's shape, with the language model cut to ``layers`` decoder layers if given."""
    if preset not in SHAPES:
        raise UserError(f"unknown preset {preset!r}; known: {', '.join(SHAPES)}")
    p = dict(SHAPES[preset])
    if layers is not None:
        if layers < 1:
            raise UserError(f"--layers must be at least 1, not {layers}")
        p["layers"] = layers
    return p


def build_config(p: dict, vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int | None = 1,
                 eos_token_id: int = 2):
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    from ..llava_hf import llava_config

    tower = towers.by_name(p.get("tower", "clip"))
    extra = {"projection_dim": p.get("projection_dim", p["vision_hidden"])} if tower.class_token else {}
    vision = tower.hf_config(
        hidden_size=p["vision_hidden"], intermediate_size=p["vision_ffn"], num_hidden_layers=p["vision_layers"],
        num_attention_heads=p["vision_heads"], image_size=p["image_size"], patch_size=p["patch_size"], **extra,
    )
    text_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
                  "phi3": Phi3Config}[p.get("text", "llama")]
    text = text_class(
        vocab_size=vocab_size, hidden_size=p["hidden"], intermediate_size=p["ffn"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
        max_position_embeddings=p["max_positions"], rms_norm_eps=p.get("rms_eps", 1e-5),
        rope_theta=p.get("rope_theta", 10000.0), bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=p.get("tie", False),
    )
    family = FAMILIES[p.get("family", DEFAULT)]
    return llava_config(vision, text, image_token_id, projector_act=p["projector_act"],
                        tie_word_embeddings=p.get("tie", False),
                        family=family, feature_layer=p.get("feature_layer", -2), strategy=p.get("strategy", "default"),
                        **family.config_extra(p["image_size"], p.get("grids")))


def qwen_text(p: dict) -> bool:
    """Whether the preset's language model is Qwen2 (its tokenizer and conversation mode are Qwen's)."""
    return p.get("text") == "qwen2"


def _tokenizer_and_config(tmp: Path, p: dict):
    """Train the toy tokenizer (SentencePiece into ``tmp``, or Qwen2's BPE); returns (HF tokenizer, LlavaConfig)."""
    if qwen_text(p):
        tok = build_qwen2_tokenizer(p["sp_vocab"], family_markers(FAMILIES[p.get("family", DEFAULT)]),
                                    p["max_positions"])
        ids = dict(bos_token_id=None, eos_token_id=tok.eos_token_id)
    else:
        with tempfile.TemporaryDirectory() as sp_dir:
            train_sentencepiece(Path(sp_dir) / "tokenizer.model", p["sp_vocab"])
            tok = build_hf_tokenizer(sp_dir)
            shutil.copy(Path(sp_dir) / "tokenizer.model", tmp / "tokenizer.model")
        ids = {}
    vocab = -(-len(tok) // 64) * 64  # llava-hf pads the embedding to a multiple of 64 (32064)
    vocab = max(vocab, p.get("vocab", 0))
    config = build_config(p, vocab, tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.pad_token_id, **ids)
    family = FAMILIES[p.get("family", DEFAULT)]
    if family.takes_video:  # the video token of this vocabulary, where transformers' default is Qwen2's id
        video = tok.convert_tokens_to_ids(family_markers(family)[1])
        if video is not None and video != tok.unk_token_id:
            config.video_token_id = video
    return tok, config


def _write_processor(tmp: Path, p: dict, tok, config) -> None:
    from ..llava_hf import write_side_files

    family = FAMILIES[p.get("family", DEFAULT)]
    image_processor = family.hf_image_processor(p["resize"], p["image_size"], config.to_dict())
    # legacy: as build_hf_tokenizer made it (a byte-level BPE has no word-start rule to choose); Qwen2 adds no BOS
    qwen = qwen_text(p)
    write_side_files(tmp, tok, image_processor, patch_size=p["patch_size"], strategy=p.get("strategy", "default"),
                     conv_mode=QWEN_MODE if qwen else MODE, image_pad=p.get("image_pad", "pad"), legacy=LEGACY,
                     add_bos=not qwen, toy=True, family=family,
                     class_token=towers.by_name(p.get("tower", "clip")).class_token)


def write_toy_model(out: str | Path, preset: str = "toy", seed: int = 0, layers: int | None = None,
                    dtype: str = "bfloat16", shape: dict | None = None) -> Path:
    """Build and save the checkpoint directory ``out`` (replaced atomically).

    ``toy`` is saved in fp32 through ``save_pretrained``; real presets are streamed in ``dtype``. ``shape``
    overrides keys of a small preset's shape (e.g. ``image_size``, a tiled family's ``grids``).
    """
    p = {**preset_shape(preset, layers), **(shape or {})}
    if shape and p.get("real"):
        raise UserError("shape overrides are for the small presets")
    if p.get("real"):
        return write_streamed_model(out, preset, seed, layers, dtype)
    import torch

    out = Path(out)
    with atomic.atomic_path(out) as tmp:
        tmp.mkdir()
        tok, config = _tokenizer_and_config(tmp, p)
        torch.manual_seed(seed)
        model = FAMILIES[p.get("family", DEFAULT)].hf_class()(config).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        _write_processor(tmp, p, tok, config)
    return out


def write_skeleton(out: str | Path, preset: str, layers: int | None = None, dtype: str = "bfloat16"):
    """config.json, tokenizer, processor and recipe files, no weights; returns the ``LlavaConfig``.

    For benchmarks that build the weights directly on the GPU instead of reading 14 GB from disk.
    """
    p = preset_shape(preset, layers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok, config = _tokenizer_and_config(out, p)
    config.dtype = dtype
    config.save_pretrained(out)
    _write_processor(out, p, tok, config)
    return config


# --- streaming safetensors writer -------------------------------------------------------------
# safetensors' own writers (save_file, save_model) take every tensor at once, in memory; a 7B
# checkpoint would need 14 GB of RAM to write. The format is simple (8-byte header length, a JSON
# header of names/dtypes/shapes/byte ranges, then the raw data), so it is written here by hand:
# the header first, computed from the shapes alone, then each tensor's bytes chunk by chunk.

_CHUNK = 1 << 22  # values generated at a time: 16 MB of float32


def saved_tensor_names(config) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, named as ``save_pretrained`` writes a llava-hf checkpoint.

    The shapes come from the model built on the meta device (no memory); the names are mapped
    from the in-memory layout (``model.language_model.*``) to the saved one
    (``language_model.model.*``), which the toy's ``save_pretrained`` output is tested against.
    """
    import torch

    from ..families import FAMILIES

    family = next(f for f in FAMILIES.values() if f.hf_config_class_name == type(config).__name__)
    with torch.device("meta"):
        model = family.hf_class()(config)
    renames = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
               ("model.image_newline", "image_newline"))
    shapes, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # a tied weight (Qwen2's lm_head is its embedding) is stored once, as save_pretrained does
            continue
        seen.add(id(t))
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        shapes[name] = tuple(t.shape)
    return shapes


def _fill(name: str, shape: tuple[int, ...]) -> float | None:
    """A constant for norms (1) and biases (0); None: random with std 0.02, as transformers' init."""
    if len(shape) == 1:
        leaf = name.rsplit(".", 2)
        if leaf[-1] == "weight" and "norm" in leaf[-2]:  # layernorm / RMSNorm gains (and CLIP's pre_layrnorm)
            return 1.0
        if leaf[-1] == "bias":
            return 0.0
    return None


def _random_chunks(name: str, shape: tuple[int, ...], st_dtype: str, rng):
    """The tensor's values in chunks of ``_CHUNK``, as stored bytes (one generator per tensor: the values do
    not depend on the sharding)."""
    import numpy as np

    n = int(np.prod(shape, dtype=np.int64))
    const = _fill(name, shape)
    done = 0
    while done < n:
        k = min(_CHUNK, n - done)
        if const is not None:
            x = np.full(k, const, np.float32)
        else:  # uniform with std 0.02: numpy draws it 6x faster than a normal, and weights are random anyway
            x = rng.random(k, np.float32)
            x -= 0.5
            x *= 0.02 * 12**0.5
        if st_dtype == "BF16":  # the upper half of a float32 is its bfloat16 (truncated)
            yield (x.view(np.uint32) >> 16).astype("<u2")
        else:
            yield x.astype("<f2")
        done += k


def write_streamed_model(out: str | Path, preset: str, seed: int = 0, layers: int | None = None,
                         dtype: str = "bfloat16", shard_bytes: int = SHARD_BYTES) -> Path:
    """A real-size checkpoint written tensor by tensor (peak memory: one chunk), replaced atomically."""
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; choose {', '.join(DTYPES)}")
    preset_shape(preset, layers)  # a bad preset or layer count fails before anything is written
    import numpy as np

    from ..weights import OutTensor, write_sharded

    st_dtype = DTYPES[dtype]
    out = Path(out)
    with atomic.atomic_path(out) as tmp:
        config = write_skeleton(tmp, preset, layers, dtype)
        shapes = saved_tensor_names(config)
        order = {name: i for i, name in enumerate(sorted(shapes))}
        tensors = [OutTensor(name, st_dtype, shape, (lambda name=name, shape=shape: _random_chunks(
            name, shape, st_dtype, np.random.default_rng([seed, order[name]])))) for name, shape in shapes.items()]
        write_sharded(tmp, tensors, shard_bytes)
    return out
