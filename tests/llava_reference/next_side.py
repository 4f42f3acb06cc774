"""LLaVA-1.6 (LLaVA-NeXT) checkpoints in LLaVA's own code: run with ``.venv-llava/bin/python`` (llava-torch
1.2.2.post1).

    next_side.py SUBCOMMAND REQUEST.json   ->   one JSON object on stdout (everything else goes to stderr)

``make``  {"out", "models": [{"name", "tokenizer_dir", "text": "llama" | "mistral", "pinpoints" (a list, or
    the string some LLaVA configs write), "seed", "image_size": 28, "patch_size": 14, "hidden_size": 64,
    "num_layers": 2, "num_heads": 4, "initializer_range": 0.3}]}
    Per model a tiny original-format LLaVA-1.6 checkpoint made with LLaVA's own classes
    (``LlavaLlamaForCausalLM``, or ``LlavaMistralForCausalLM`` for "mistral") in ``out/name``, configured
    as LLaVA-1.6 is (``image_aspect_ratio: anyres``, ``mm_patch_merge_type: spatial_unpad``, the pinpoints,
    ``mlp2x_gelu``, layer -2), with a random ``image_newline``, and its CLIP tower (transformers 4.36
    ``CLIPVisionModel`` + ``CLIPImageProcessor``) in ``out/name-clip``. Weights are float32 rounded to
    float16 values, as ``llava_side.py make-checkpoint`` makes them (LLaVA's builder loads in float16).
    Result: {"models": [{"name", "model_path", "vision_tower", "config"}]}.
``answer``  {"question", "max_new_tokens": 8, "models": [{"model_path", "cases": [{"id", "image": file}]}]}
    Every case of every model in one process. Per model ``load_pretrained_model`` (the class and the
    tokenizer it picks from the folder name), cast to float32 with the checkpoint's own values
    (``llava_side.to_float32``, and the rotary caches of every attention class rebuilt in float32); the
    conversation mode by run_llava.py's rule from the name. Per case, run_llava.py's steps: the picture
    through ``process_images`` (the anyres path), the prompt through ``tokenizer_image_token``, then the
    model's ``prepare_inputs_labels_for_multimodal`` (the image positions it builds), its forward (the
    logits after the prompt) and greedy ``generate``. Result: {"models": [{"model_path", "mode",
    "eos_id", "cases": [{"id", "size" ([width, height]), "grid" ([rows, cols] of tiles,
    ``get_anyres_image_grid_shape``), "tiles" (the base one included), "input_ids", "positions",
    "image_features" (the packed image positions), "first_logits", "first_margin" (top-1 minus top-2),
    "answer_ids", "answer"}]}]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import llava_side  # this folder is the script's own: sys.path[0]
from llava_side import _round_to_half, build_prompt, conv_mode_for, to_float32

_STDOUT = llava_side._STDOUT  # llava_side sent sys.stdout to stderr: the one JSON answer goes here


def make_one(spec: dict, out: Path) -> dict:
    import shutil

    import torch
    import transformers
    from transformers import CLIPVisionConfig
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM, LlavaMistralConfig, LlavaMistralForCausalLM

    name, seed = spec["name"], int(spec.get("seed", 0))
    size, patch = int(spec.get("image_size", 28)), int(spec.get("patch_size", 14))
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["tokenizer_dir"], use_fast=False)

    tower_dir = out / f"{name}-clip"
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                            image_size=size, patch_size=patch, projection_dim=32, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)
    llava_side.write_clip_tower(tower_dir, vcfg, seed)

    heads = int(spec.get("num_heads", 4))
    text = dict(
        vocab_size=len(tokenizer), hidden_size=int(spec.get("hidden_size", 64)), intermediate_size=128,
        num_hidden_layers=int(spec.get("num_layers", 2)), num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=float(spec.get("initializer_range", 0.3)),
        hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        use_cache=True, rope_theta=10000.0, torch_dtype="float32",
    )
    mm = dict(  # LLaVA-1.6's multimodal fields, as its train() writes them into config.json
        mm_vision_tower=str(tower_dir), mm_hidden_size=vcfg.hidden_size, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="spatial_unpad",
        image_aspect_ratio="anyres", image_grid_pinpoints=spec["pinpoints"], mm_use_im_start_end=False,
        mm_use_im_patch_token=False, mm_projector_lr=None, use_mm_proj=True, tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False, tokenizer_model_max_length=2048, tokenizer_padding_side="right",
    )
    if spec.get("text", "llama") == "mistral":
        cfg, cls = LlavaMistralConfig(**text, sliding_window=4096, **mm), LlavaMistralForCausalLM
    else:
        cfg, cls = LlavaConfig(**text, rope_scaling=None, pretraining_tp=1, **mm), LlavaLlamaForCausalLM
    torch.manual_seed(seed + 1)
    model = cls(cfg).eval()
    with torch.no_grad():  # LlavaMetaModel leaves it uninitialised (torch.empty) until training sets it
        model.get_model().image_newline.copy_(torch.randn(cfg.hidden_size))
    _round_to_half(model)
    model_dir = out / name
    model.save_pretrained(model_dir, safe_serialization=True)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        src = Path(spec["tokenizer_dir"]) / f
        if src.exists():
            shutil.copyfile(src, model_dir / f)
    return {"name": name, "model_path": str(model_dir), "vision_tower": str(tower_dir),
            "config": json.loads((model_dir / "config.json").read_text())}


def cmd_make(req: dict) -> dict:
    out = Path(req["out"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return {"models": [make_one(spec, out) for spec in req["models"]]}


def float32_rotary(model) -> None:
    """Rebuild every rotary cos/sin cache in float32: LLaVA's float16 load built them in float16, and
    ``to_float32`` rebuilds only Llama's class (Mistral has its own)."""
    import torch

    for m in model.modules():
        if hasattr(m, "_set_cos_sin_cache") and hasattr(m, "inv_freq"):
            m.inv_freq = 1.0 / (m.base ** (torch.arange(0, m.dim, 2).float().to(m.inv_freq.device) / m.dim))
            m._set_cos_sin_cache(seq_len=m.max_position_embeddings, device=m.inv_freq.device, dtype=torch.float32)


def answer_model(spec: dict, question: str, max_new_tokens: int) -> dict:
    import torch
    from PIL import Image
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import (get_anyres_image_grid_shape, get_model_name_from_path, process_images,
                                tokenizer_image_token)
    from llava.model.builder import load_pretrained_model
    from llava.utils import disable_torch_init

    torch.manual_seed(0)
    disable_torch_init()
    path = spec["model_path"]
    name = get_model_name_from_path(path)
    tokenizer, model, image_processor, _ = load_pretrained_model(path, None, name, device_map="cpu", device="cpu")
    restored = to_float32(model, path)
    float32_rotary(model)
    model.eval()
    mode = conv_mode_for(name)
    prompt = build_prompt(mode, question, image=True)
    ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    at = ids[0].tolist().index(IMAGE_TOKEN_INDEX)
    cases = []
    for case in spec["cases"]:
        image = Image.open(case["image"]).convert("RGB")
        sizes = [image.size]
        pixels = process_images([image], image_processor, model.config).to(dtype=torch.float32)
        with torch.inference_mode():
            *_, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pixels,
                                                                       image_sizes=sizes)
            n = embeds.shape[1] - (ids.shape[1] - 1)
            logits = model(input_ids=ids, images=pixels, image_sizes=sizes).logits[0, -1].float()
            out = model.generate(ids, images=pixels, image_sizes=sizes, do_sample=False, num_beams=1,
                                 max_new_tokens=max_new_tokens, use_cache=True, output_scores=True,
                                 return_dict_in_generate=True)
        answer_ids = out.sequences[0, out.sequences.shape[1] - len(out.scores):].tolist()
        cols, rows = get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints,
                                                 model.get_vision_tower().config.image_size)
        top = torch.topk(logits, 2).values
        cases.append({
            "id": case["id"], "size": list(image.size), "grid": [rows, cols], "tiles": int(pixels.shape[1]),
            "input_ids": ids[0].tolist(), "positions": int(n),
            "image_features": embeds[0, at : at + n].float().tolist(),
            "first_logits": logits.tolist(), "first_margin": float(top[0] - top[1]),
            "answer_ids": answer_ids,
            "answer": tokenizer.batch_decode(out.sequences, skip_special_tokens=True)[0].strip(),
        })
    return {"model_path": path, "mode": mode, "eos_id": tokenizer.eos_token_id, "restored": restored,
            "cases": cases}


def cmd_answer(req: dict) -> dict:
    return {"models": [answer_model(m, req["question"], int(req.get("max_new_tokens", 8))) for m in req["models"]]}


COMMANDS = {"make": cmd_make, "answer": cmd_answer}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in COMMANDS:
        print(f"usage: next_side.py {{{','.join(COMMANDS)}}} REQUEST.json", file=sys.stderr)
        return 2
    result = COMMANDS[argv[0]](json.loads(Path(argv[1]).read_text(encoding="utf-8")))
    _STDOUT.write(json.dumps(result, ensure_ascii=False) + "\n")
    _STDOUT.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
