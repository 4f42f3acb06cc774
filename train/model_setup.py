"""Which parameters each LLaVA stage trains, projector save/load, assembling a fresh LLaVA, and a LLaVA-NeXT
from a LLaVA-1.5.

transformers' ``LlavaMultiModalProjector`` is always linear -> act -> linear.
LLaVA's original ``linear`` projector is represented exactly inside it: the
activation is the identity and ``linear_2`` is an identity matrix that is never
trained, so the learned map is LLaVA's single linear layer and the checkpoint
still loads as a plain ``LlavaForConditionalGeneration`` everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

from llava_edge.errors import UserError

PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
PROJECTOR_FILE = "mm_projector.safetensors"
PROJECTOR_CONFIG = "mm_projector.json"
LORA_TOWER = ("--vision-lr with --lora: a LoRA adapter does not carry the vision tower's weights; train the tower "
              "in a full stage 2")


def projector_type(model) -> str:
    return "linear" if model.config.projector_hidden_act == "linear" else "mlp2x_gelu"


def _require_modules(model) -> None:
    for name in ("vision_tower", "multi_modal_projector", "language_model"):
        if not hasattr(model.model, name):
            raise UserError(f"the model has no {name}: not a LLaVA model (LlavaForConditionalGeneration, "
                            "LlavaNextForConditionalGeneration)")


def make_linear_projector(model) -> None:
    """Turn the projector into LLaVA's ``linear`` one (identity activation, fixed identity second layer)."""
    import torch

    model.config.projector_hidden_act = "linear"
    proj = model.model.multi_modal_projector
    from transformers.activations import ACT2FN

    proj.act = ACT2FN["linear"]
    with torch.no_grad():
        proj.linear_2.weight.copy_(torch.eye(proj.linear_2.weight.shape[0], dtype=proj.linear_2.weight.dtype))
        if proj.linear_2.bias is not None:
            proj.linear_2.bias.zero_()


def projector_parameters(model) -> list:
    proj = model.model.multi_modal_projector
    if projector_type(model) == "linear":
        return list(proj.linear_1.parameters())
    return list(proj.parameters())


def setup_stage1(model) -> list[dict]:
    """Feature alignment: everything frozen but the projector."""
    _require_modules(model)
    model.requires_grad_(False)
    params = projector_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return [{"params": params}]


def newline_parameters(model) -> list:
    """LLaVA-NeXT's ``image_newline`` (none in LLaVA-1.5)."""
    newline = getattr(model.model, "image_newline", None)
    return [newline] if newline is not None else []


def setup_stage2(model, lr: float, lora: dict | None = None, projector_lr: float | None = None,
                 vision_lr: float | None = None):
    """End-to-end fine-tuning: projector + language model train, and LLaVA-NeXT's ``image_newline`` (its
    repository trains every parameter outside the tower and the projector with the language model). The vision
    tower is frozen unless ``vision_lr`` is given; then it trains in a parameter group of its own at that rate
    (LLaVA-NeXT's ``mm_vision_tower_lr``). With LoRA: adapters on the language model and the projector, as in
    LLaVA-NeXT's LoRA runs (``image_newline`` frozen: the adapter and projector files would not carry it).

    Returns (model, param groups); with LoRA the model is a peft model.
    """
    _require_modules(model)
    if lora and vision_lr is not None:
        raise UserError(LORA_TOWER)
    model.requires_grad_(False)
    if lora:
        from peft import LoraConfig, get_peft_model

        lin = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama's linears
        cfg = LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias="none",
            # every linear layer of the language model; not the vision tower, not the projector
            target_modules=r".*language_model.*\.(" + "|".join(lin) + ")",
        )
        model = get_peft_model(model, cfg)
        lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
        base = model.get_base_model()
        proj = projector_parameters(base)
        for p in proj:
            p.requires_grad_(True)
        return model, [{"params": lora_params, "lr": lr}, {"params": proj, "lr": projector_lr or lr}]
    model.model.language_model.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    for p in projector_parameters(model) + newline_parameters(model):
        p.requires_grad_(True)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    if vision_lr is not None:
        tower = list(model.model.vision_tower.parameters())
        for p in tower:
            p.requires_grad_(True)
        groups.append({"params": tower, "lr": vision_lr})
    return model, groups


def save_projector(model, out: Path, state_dict: dict | None = None, token_reduction: dict | None = None) -> Path:
    """``mm_projector.safetensors`` (+ its config), as LLaVA's stage 1 hands to stage 2. ``token_reduction``:
    the reduced image tokens it was tuned for (``quantize --image-tokens K --projector`` checks it)."""
    from safetensors.torch import save_file

    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {}
    for k, v in sd.items():
        i = k.find("multi_modal_projector.")
        if i >= 0:
            tensors[k[i:]] = v.detach().to("cpu").contiguous()
    if not tensors:
        raise UserError("the model has no multi_modal_projector weights to save")
    save_file(tensors, str(out / PROJECTOR_FILE))
    config = {
        "projector_type": projector_type(model),
        "vision_hidden_size": model.config.vision_config.hidden_size,
        "text_hidden_size": model.config.text_config.hidden_size,
    }
    if token_reduction is not None:
        config["token_reduction"] = token_reduction
    (out / PROJECTOR_CONFIG).write_text(json.dumps(config, indent=2))
    return out / PROJECTOR_FILE


def load_projector(model, path: str | Path) -> None:
    """Load a stage-1 projector before the model is wrapped (so it also works under ZeRO-3)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"projector file not found: {path}")
    cfg_file = path.with_name(PROJECTOR_CONFIG)
    if cfg_file.is_file():
        want = json.loads(cfg_file.read_text())["projector_type"]
        if want == "linear" and projector_type(model) != "linear":
            make_linear_projector(model)
    sd = {k[len("multi_modal_projector."):]: v for k, v in load_file(str(path)).items()
          if k.startswith("multi_modal_projector.")}
    proj = model.model.multi_modal_projector
    try:
        missing, unexpected = proj.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise UserError(f"projector {path} does not fit this model ({str(e).splitlines()[0]})") from None
    if missing or unexpected:
        raise UserError(f"projector {path} does not fit this model (missing {missing}, unexpected {unexpected})")


def assemble(vision: str, llm: str, projector: str = "mlp2x_gelu"):
    """A fresh LLaVA from a CLIP vision model and a causal LM, as LLaVA's stage 1 starts.

    Returns (model, tokenizer, image processor) with ``<image>`` and ``<pad>`` added the llava-hf way.
    """
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor,
                              CLIPVisionModel, LlavaForConditionalGeneration)

    from llava_edge.llava_hf import llava_config

    if projector not in PROJECTOR_TYPES:
        raise UserError(f"unknown --projector-type {projector!r}; choose {', '.join(PROJECTOR_TYPES)}")
    try:
        vcfg = AutoConfig.from_pretrained(vision)
        tower = CLIPVisionModel.from_pretrained(vision)
        lm = AutoModelForCausalLM.from_pretrained(llm)
        tok = AutoTokenizer.from_pretrained(llm)
        improc = CLIPImageProcessor.from_pretrained(vision)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the base models: {str(e).splitlines()[0]}") from None
    vcfg = getattr(vcfg, "vision_config", vcfg)
    tok.add_tokens(["<image>"], special_tokens=True)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    n = -(-len(tok) // 64) * 64
    lm.resize_token_embeddings(n)
    config = llava_config(vcfg, lm.config, tok.convert_tokens_to_ids("<image>"))
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if projector == "linear":
        make_linear_projector(model)
    return model, tok, improc


def as_family(ckpt, family, seed: int):
    """A LLaVA-1.5 checkpoint's model as a ``family`` model (LLaVA-NeXT): the same tower, projector and language
    model, the family's own config keys at the tower's size (``Family.config_extra``: LLaVA-1.6's five grids), and
    an ``image_newline`` drawn as LLaVA-NeXT draws it in ``initialize_vision_modules`` (llava/model/llava_arch.py):
    ``randn(hidden) * embed_std``, ``embed_std = 1 / sqrt(hidden)``, ``hidden`` the language model's width; from
    ``seed``, so every process of a run draws the same vector. Loaded in the checkpoint's own dtype."""
    import math

    import torch
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from llava_edge.llava_hf import llava_config

    try:
        src = AutoConfig.from_pretrained(ckpt.path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {ckpt.path}/config.json: {str(e).splitlines()[0]}") from None
    tile = int(src.vision_config.image_size)
    config = llava_config(src.vision_config, src.text_config, src.image_token_index,
                          projector_act=src.projector_hidden_act, feature_layer=src.vision_feature_layer,
                          strategy=src.vision_feature_select_strategy, family=family,
                          tie_word_embeddings=src.tie_word_embeddings,
                          multimodal_projector_bias=src.multimodal_projector_bias, **family.config_extra(tile))
    dtype = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"{ckpt.path}/config.json says dtype {dtype!r}: not one llava-edge trains")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists image_newline as missing, which is checked below
    try:  # the llava-hf layouts of both families name their weights alike: every tensor but image_newline loads
        model, info = family.hf_class().from_pretrained(ckpt.path, config=config, dtype=getattr(torch, dtype),
                                                        output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load {ckpt.path} as {family.title}: {str(e).strip().splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(level)
    missing = {k.split(".")[-1] for k in info["missing_keys"]}
    if missing != {"image_newline"} or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise UserError(f"{ckpt.path} does not map onto {family.title}: missing {sorted(info['missing_keys'])}, "
                        f"unexpected {sorted(info['unexpected_keys'])}")
    hidden = config.text_config.hidden_size
    draw = torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) * (1 / math.sqrt(hidden))
    with torch.no_grad():
        model.model.image_newline.copy_(draw.to(model.model.image_newline.dtype))
    return model
