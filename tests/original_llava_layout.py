"""Test helper: the toy checkpoint rewritten in the original LLaVA repository's layout.

It renames the toy's keys the way haotian-liu/LLaVA names them (``model.*``,
``lm_head``, ``model.mm_projector.{0,2}`` or ``model.mm_projector`` for the
``linear`` projector), writes a Llama config with LLaVA's ``mm_*`` fields
(``architectures: [LlavaLlamaForCausalLM]`` and ``model_type: llava``, as the
released llava-v1.5 configs say), and moves the vision tower into a separate
CLIP checkpoint directory (a full ``CLIPModel`` config and ``pytorch_model.bin``
with ``vision_model.*`` next to text-tower tensors, like openai/clip-vit-*).

With ``fresh_tokens`` the tokenizer is LLaVA's (SentencePiece only, no
``<image>``/``<pad>``, pad = ``<unk>``) and the embedding has only the
SentencePiece rows, so converting back must add the tokens and rows the way
llava-hf does. Without it the toy's tokenizer and rows are kept, so converting
back must give exactly the toy's tensors.

Only for tests: it reads the toy's few-MB weights into memory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOY_TOWER_PREFIXES = ("vision_tower.vision_model.", "vision_tower.")  # llava-hf hub layout, transformers 5 save


def toy_tensors(toy: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(toy / "model.safetensors"))


def original_names(sd: dict) -> tuple[dict, dict]:
    """The toy's tensors as (LLaVA checkpoint tensors, CLIP ``vision_model.*`` tensors)."""
    llava, tower = {}, {}
    for k, v in sd.items():
        if k.startswith("language_model.model."):
            llava["model." + k[len("language_model.model."):]] = v
        elif k.startswith("language_model.lm_head."):
            llava["lm_head." + k[len("language_model.lm_head."):]] = v
        elif k.startswith("multi_modal_projector.linear_1."):
            llava["model.mm_projector.0." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("multi_modal_projector.linear_2."):
            llava["model.mm_projector.2." + k.rsplit(".", 1)[1]] = v
        else:
            prefix = next(p for p in TOY_TOWER_PREFIXES if k.startswith(p))
            tower["vision_model." + k[len(prefix):]] = v
    return llava, tower


def _save_shards(folder: Path, tensors: dict, weights: str, n_shards: int) -> None:
    import torch
    from safetensors.torch import save_file

    names = sorted(tensors)
    groups = [names[i::n_shards] for i in range(n_shards)]
    ext = "bin" if weights == "bin" else "safetensors"
    stem = "pytorch_model" if weights == "bin" else "model"
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}-{i + 1:05d}-of-{n_shards:05d}.{ext}" if n_shards > 1 else f"{stem}.{ext}"
        part = {k: tensors[k].contiguous().clone() for k in group}
        if weights == "bin":
            torch.save(part, folder / fname)
        else:
            save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    if n_shards > 1:
        index = folder / f"{stem}.{ext}.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_clip_dir(toy: Path, out: Path, tower: dict, seed: int = 0) -> Path:
    """A CLIPModel checkpoint whose vision half is the toy's tower."""
    import torch

    cfg = json.loads((toy / "config.json").read_text())
    out.mkdir(parents=True)
    vc = dict(cfg["vision_config"])
    vc.pop("model_type", None)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": vc["projection_dim"],
        "logit_scale_init_value": 2.6592, "vision_config": vc,
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "vocab_size": 100, "projection_dim": vc["projection_dim"]},
    }, indent=2))
    g = torch.Generator().manual_seed(seed)
    sd = dict(tower)
    sd["vision_model.embeddings.position_ids"] = torch.arange(
        tower["vision_model.embeddings.position_embedding.weight"].shape[0]).unsqueeze(0)
    sd["text_model.embeddings.token_embedding.weight"] = torch.randn(100, 64, generator=g)
    sd["visual_projection.weight"] = torch.randn(vc["projection_dim"], vc["hidden_size"], generator=g)
    sd["text_projection.weight"] = torch.randn(vc["projection_dim"], 64, generator=g)
    sd["logit_scale"] = torch.tensor(2.6592)
    torch.save({k: v.contiguous().clone() for k, v in sd.items()}, out / "pytorch_model.bin")
    proc = json.loads((toy / "processor_config.json").read_text())["image_processor"]
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=2))
    return out


def write_original_llava(toy: Path, out: Path, *, fresh_tokens: bool = True, weights: str = "bin",
                         n_shards: int = 2, projector: str = "mlp2x_gelu", tower_inside: bool = False,
                         vision_tower: str = "acme/clip-toy") -> tuple[Path, Path]:
    """Write ``out/llava-v1.5-toy`` (original layout) and ``out/clip`` (its tower); return both paths."""
    import sentencepiece as spm

    from llava_edge.toy.tokenizer import LEGACY  # the toy's tokenizer settings, as its "release" would say

    toy = Path(toy)
    cfg = json.loads((toy / "config.json").read_text())
    tc = cfg["text_config"]
    llava_t, tower = original_names(toy_tensors(toy))
    clip = write_clip_dir(toy, out / "clip", tower)

    n_sp = spm.SentencePieceProcessor(model_file=str(toy / "tokenizer.model")).vocab_size()
    if fresh_tokens:  # LLaVA's checkpoint knows only the SentencePiece vocabulary
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            llava_t[k] = llava_t[k][:n_sp]
    if projector == "linear":  # LLaVA's single linear layer: the toy's first projector layer
        llava_t["model.mm_projector.weight"] = llava_t.pop("model.mm_projector.0.weight")
        llava_t["model.mm_projector.bias"] = llava_t.pop("model.mm_projector.0.bias")
        del llava_t["model.mm_projector.2.weight"], llava_t["model.mm_projector.2.bias"]
    if tower_inside:  # what LLaVA saves when the tower was trained too
        llava_t.update({"model.vision_tower.vision_tower." + k: v for k, v in tower.items()})

    src = out / "llava-v1.5-toy"  # LLaVA's scripts pick the conversation mode from the name: llava_v1
    src.mkdir(parents=True)
    _save_shards(src, llava_t, weights, n_shards)
    vocab = n_sp if fresh_tokens else tc["vocab_size"]
    (src / "config.json").write_text(json.dumps({
        "_name_or_path": "./checkpoints/toy-vicuna", "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava", "bos_token_id": tc["bos_token_id"], "eos_token_id": tc["eos_token_id"],
        "pad_token_id": 0, "hidden_act": tc["hidden_act"], "hidden_size": tc["hidden_size"],
        "intermediate_size": tc["intermediate_size"], "initializer_range": 0.02,
        "max_position_embeddings": tc["max_position_embeddings"], "num_attention_heads": tc["num_attention_heads"],
        "num_hidden_layers": tc["num_hidden_layers"], "num_key_value_heads": tc["num_key_value_heads"],
        "pretraining_tp": 1, "rms_norm_eps": tc["rms_norm_eps"], "rope_scaling": None,
        "rope_theta": tc["rope_parameters"]["rope_theta"], "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.31.0", "use_cache": True, "vocab_size": vocab,
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "image_grid_pinpoints": None,
        "mm_hidden_size": cfg["vision_config"]["hidden_size"], "mm_projector_type": projector,
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": cfg["vision_feature_layer"], "mm_vision_tower": vision_tower,
        "tune_mm_mlp_adapter": False, "use_mm_proj": True, "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
    }, indent=2))
    shutil.copyfile(toy / "tokenizer.model", src / "tokenizer.model")
    if fresh_tokens:  # LLaVA-1.5's tokenizer files: the slow Llama tokenizer, <unk> as pad
        (src / "tokenizer_config.json").write_text(json.dumps({
            "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": None, "legacy": LEGACY, "model_max_length": 2048,
            "padding_side": "right", "clean_up_tokenization_spaces": False, "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
        }, indent=2))
        (src / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}))
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(toy / name, src / name)
    return src, clip
