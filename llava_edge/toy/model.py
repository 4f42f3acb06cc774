"""Write a toy LLaVA: a real ``LlavaForConditionalGeneration`` checkpoint, a few M parameters.

It has the llava-hf layout (config.json, safetensors, tokenizer and processor
files), so every later stage loads it through the same code as
``llava-hf/llava-1.5-7b-hf``. Weights are random here; ``llava-edge toy build``
(training issue) makes one that has learned.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .. import atomic
from ..checkpoint import write_recipe
from .tokenizer import IMAGE_TOKEN, build_hf_tokenizer, train_sentencepiece

# The shape of the toy. Real presets (llava-1.5-7b, ...) join this table in the
# benchmarks issue; every entry goes through the same builder.
PRESETS = {
    "toy": dict(
        image_size=112, patch_size=14, vision_hidden=128, vision_layers=4, vision_heads=4, vision_ffn=512,
        hidden=128, layers=4, heads=4, kv_heads=4, ffn=344, sp_vocab=1000, max_positions=2048,
        projector_act="gelu", resize=128,
    ),
}


def build_config(p: dict, vocab_size: int, image_token_id: int, pad_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=p["vision_hidden"], intermediate_size=p["vision_ffn"], num_hidden_layers=p["vision_layers"],
        num_attention_heads=p["vision_heads"], image_size=p["image_size"], patch_size=p["patch_size"],
        projection_dim=p["vision_hidden"], hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=p["hidden"], intermediate_size=p["ffn"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
        max_position_embeddings=p["max_positions"], rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id, tie_word_embeddings=False,
    )
    n_patches = (p["image_size"] // p["patch_size"]) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        projector_hidden_act=p["projector_act"], vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=n_patches, tie_word_embeddings=False,
    )


def write_toy_model(out: str | Path, preset: str = "toy", seed: int = 0) -> Path:
    """Build and save the checkpoint directory ``out`` (replaced atomically)."""
    import torch
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    p = PRESETS[preset]
    out = Path(out)
    with atomic.atomic_path(out) as tmp:
        tmp.mkdir()
        with tempfile.TemporaryDirectory() as sp_dir:
            train_sentencepiece(Path(sp_dir) / "tokenizer.model", p["sp_vocab"])
            tok = build_hf_tokenizer(sp_dir)
            shutil.copy(Path(sp_dir) / "tokenizer.model", tmp / "tokenizer.model")
        vocab = -(-len(tok) // 64) * 64  # llava-hf pads the embedding to a multiple of 64 (32064)
        config = build_config(p, vocab, tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.pad_token_id)
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": p["resize"]}, crop_size={"height": p["image_size"], "width": p["image_size"]}
        )
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tok, patch_size=p["patch_size"],
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
        )
        processor.save_pretrained(tmp)
        write_recipe(tmp, template="vicuna_v1", image_pad="pad")
    return out
