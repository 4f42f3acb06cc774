"""LLaVA's two training stages and LoRA merging, as the CLI runs them.

stage 1 (feature alignment): conversation mode ``plain``, only the projector learns.
stage 2 (visual instruction tuning): mode ``vicuna_v1`` (LLaVA-1.5's ``--version v1``), projector +
language model learn (or LoRA adapters on the language model), vision tower frozen.
``conv_mode`` takes another of LLaVA's modes; the output records the mode it was trained with.
Each stage writes a checkpoint directory that ``export`` and the next stage take.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from llava_edge.checkpoint import load_hf_model, open_checkpoint, write_recipe
from llava_edge.errors import UserError
from llava_edge.templates import get_template
from llava_edge.tokenizer import Tokenizer

from . import model_setup
from .data import LlavaDataset, load_records
from .loop import load_dtype, precision_engine, train, upcast_trainable
from .presets import StageConfig

SIDE_FILES = (  # tokenizer and processor files that travel with a checkpoint
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "processor_config.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
)


def copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _load(model: str, dtype: str = "float32"):
    """Checkpoint, model (in ``dtype``: see the bf16 policy in loop.py) and tokenizer (LLaVA's ids)."""
    ckpt = open_checkpoint(model)
    m = load_hf_model(ckpt, dtype=dtype, attn_implementation="sdpa")
    return ckpt, m, Tokenizer(ckpt.path)


def _dataset(ckpt, model, tok, template: str, data, image_folder, pad: str, max_length: int, skip_bad: bool, log,
             image_tokens: int | None = None, images_only: bool = False):
    from dataclasses import replace

    records, skipped = load_records(data, image_folder, skip_bad=skip_bad)
    if skipped:
        log(f"skipped {skipped} bad record(s) of {skipped + len(records)}")
    if images_only:  # a text-only record gives the projector no gradient
        text_only = sum(r.image is None for r in records)
        records = [r for r in records if r.image is not None]
        if text_only:
            log(f"left out {text_only} text-only record(s): only the projector learns")
        if not records:
            raise UserError("no record has an image: the projector has nothing to learn from")
    spec = replace(ckpt.image_spec(), pad=pad)
    ds = LlavaDataset(records, get_template(template), tok, model.config.image_token_index,
                      image_tokens or ckpt.num_image_tokens(), spec, max_length)
    if ds.mismatched:
        log(f"{len(ds.mismatched)} record(s) teach nothing: LLaVA's label rule finds their rounds do not add up "
            f"(\"tokenization mismatch\") and ignores every label, as LLaVA does; first: "
            f"{', '.join(ds.mismatched[:5])}")
    return ds


def _log_precision(model, cfg: StageConfig, upcast: int, log) -> None:
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.requires_grad})
    log(f"precision: engine {precision_engine()}, loaded {load_dtype(cfg)}, {upcast} trainable tensors upcast, "
        f"trainable dtypes {', '.join(dtypes)}, autocast bf16 {cfg.bf16 and precision_engine() != 'cpu'}")


def _save_full(acc, model, ckpt, out: Path, template: str, pad: str) -> None:
    """``model`` as prepared: under ZeRO-3 only the engine can gather the partitioned weights."""
    sd = acc.get_state_dict(model)  # gathers partitioned parameters (FSDP, ZeRO-3)
    if acc.is_main_process:
        acc.unwrap_model(model).save_pretrained(out, state_dict=sd, safe_serialization=True)
        model_setup.save_projector(acc.unwrap_model(model), out, sd)
        copy_side_files(ckpt.path, out)
        write_recipe(out, template=template, image_pad=pad, toy=bool(ckpt.recipe.get("toy")))


def stage1(model: str, data, image_folder, output, cfg: StageConfig, projector_type: str | None = None,
           pad: str = "square", resume: bool = False, skip_bad: bool = False, stop_after: int = 0,
           conv_mode: str = "plain", log=print) -> Path | None:
    output = Path(output)
    ckpt, m, tok = _load(model, load_dtype(cfg))
    if projector_type == "linear" and model_setup.projector_type(m) != "linear":
        model_setup.make_linear_projector(m)
    ds = _dataset(ckpt, m, tok, conv_mode, data, image_folder, pad, cfg.max_length, skip_bad, log)
    groups = model_setup.setup_stage1(m)
    _log_precision(m, cfg, upcast_trainable(m, cfg), log)
    for g in groups:
        g["lr"] = cfg.lr
    acc, trained = train(m, groups, ds, cfg, output, tok.pad_id, resume=resume, stop_after=stop_after, log=log)
    if trained is None:  # stopped early on request: the checkpoint is in OUTPUT/checkpoint-last
        return None
    _save_full(acc, trained, ckpt, output, conv_mode, pad)
    return output


def stage2(model: str, data, image_folder, output, cfg: StageConfig, projector: str | None = None,
           pad: str = "pad", resume: bool = False, skip_bad: bool = False, stop_after: int = 0,
           conv_mode: str = "vicuna_v1", image_tokens: int | None = None, token_method: str = "pool",
           tune: str = "all", log=print) -> Path | None:
    """``image_tokens``: train with the image reduced to that many tokens by ``token_method``
    (``llava_edge/image_tokens.py``); ``tune="projector"``: only the projector learns, the recovery fine-tune of
    a reduced-token variant (``quantize --image-tokens K --projector OUTPUT``)."""
    output = Path(output)
    if tune not in ("all", "projector"):
        raise UserError(f"unknown --tune {tune!r}: all (projector + language model) | projector")
    if tune == "projector" and cfg.lora:
        raise UserError("--tune projector trains the projector alone: drop --lora")
    ckpt, m, tok = _load(model, load_dtype(cfg))
    reduction = _reduction(m, image_tokens, token_method) if image_tokens else None
    if projector:  # before accelerate.prepare: under ZeRO-3 the parameters are still whole here
        model_setup.load_projector(m, projector)
    ds = _dataset(ckpt, m, tok, conv_mode, data, image_folder, pad, cfg.max_length, skip_bad, log,
                  image_tokens=reduction.tokens if reduction else None, images_only=tune == "projector")
    if tune == "projector":
        groups = model_setup.setup_stage1(m)  # everything frozen but the projector, as in stage 1
        for g in groups:
            g["lr"] = cfg.projector_lr or cfg.lr
        _log_precision(m, cfg, upcast_trainable(m, cfg), log)
        acc, trained = train(m, groups, ds, cfg, output, tok.pad_id, resume=resume, stop_after=stop_after, log=log)
        if trained is None:
            return None
        sd = acc.get_state_dict(trained)  # every process takes part in gathering partitioned weights
        if acc.is_main_process:
            model_setup.save_projector(acc.unwrap_model(trained), output, sd,
                                       token_reduction=reduction.to_dict() if reduction else None)
        return output
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout) if cfg.lora else None
    m, groups = model_setup.setup_stage2(m, cfg.lr, lora, cfg.projector_lr)
    _log_precision(m, cfg, upcast_trainable(m, cfg), log)
    acc, trained = train(m, groups, ds, cfg, output, tok.pad_id, resume=resume, stop_after=stop_after, log=log)
    if trained is None:  # stopped early on request: the checkpoint is in OUTPUT/checkpoint-last
        return None
    if lora:
        sd = acc.get_state_dict(trained)  # the engine gathers ZeRO-3 partitions; the unwrapped module cannot
        if acc.is_main_process:
            peft_model = acc.unwrap_model(trained)
            peft_model.save_pretrained(output / "adapter", state_dict=sd)
            model_setup.save_projector(peft_model.get_base_model(), output, sd)
            copy_side_files(ckpt.path, output / "adapter")
            write_recipe(output / "adapter", template=conv_mode, image_pad=pad, toy=bool(ckpt.recipe.get("toy")))
        return output / "adapter"
    _save_full(acc, trained, ckpt, output, conv_mode, pad)
    return output


def _reduction(m, image_tokens: int, method: str):
    """The reduction to train with, installed into ``m``; checked against the model's patch grid."""
    from llava_edge import image_tokens as it

    vc = m.config.vision_config
    grid = int(vc.image_size) // int(vc.patch_size)
    r = it.plan(method, image_tokens, grid)
    it.install(m, r)
    return r


def merge_lora(base: str, adapter: str, output, log=print) -> Path:
    """Base model + stage-2 LoRA adapter (+ its projector) -> a plain Hugging Face checkpoint."""
    from peft import PeftModel

    output = Path(output)
    ckpt, m, _ = _load(base)
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"not a LoRA adapter directory (no adapter_config.json): {adapter}")
    proj = adapter.parent / model_setup.PROJECTOR_FILE
    if proj.is_file():
        model_setup.load_projector(m, proj)
    merged = PeftModel.from_pretrained(m, str(adapter)).merge_and_unload()
    merged.save_pretrained(output, safe_serialization=True)
    copy_side_files(ckpt.path, output)
    recipe = adapter / "llava_edge.json"
    if recipe.is_file():
        shutil.copyfile(recipe, output / "llava_edge.json")
    log(f"merged {adapter} into {output}")
    return output
