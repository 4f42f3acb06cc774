"""LLaVA's two training stages and LoRA merging, as the CLI runs them.

stage 1 (feature alignment): conversation mode ``plain``, only the projector learns.
stage 2 (visual instruction tuning): mode ``vicuna_v1`` (LLaVA-1.5's ``--version v1``), projector +
language model learn (or LoRA adapters on the language model), vision tower frozen unless it is given
a rate of its own (LLaVA-NeXT's recipe). A LLaVA-1.5 checkpoint can start a LLaVA-NeXT stage 2.
``conv_mode`` takes another of LLaVA's modes; the output records the mode it was trained with.
Each stage writes a checkpoint directory that ``export`` and the next stage take. Pictures become
positions the way the checkpoint's model family says (``llava_edge.families``).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from llava_edge import families
from llava_edge.checkpoint import load_hf_model, open_checkpoint, write_recipe
from llava_edge.errors import UserError
from llava_edge.templates import get_template
from llava_edge.tokenizer import Tokenizer

from . import model_setup
from .data import LlavaDataset, load_records
from .loop import load_dtype, precision_engine, train, upcast_trainable
from .presets import StageConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")
SIDE_FILES = (*TOKENIZER_FILES, "processor_config.json", "preprocessor_config.json")  # travel with a checkpoint


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
             image_tokens: int | None = None, images_only: bool = False, frames_upbound: int = 32,
             video_fps: float = 1.0, video_folder=None):
    from dataclasses import replace

    records, skipped = load_records(data, image_folder, skip_bad=skip_bad, origin=get_template(template).origin,
                                    video_folder=video_folder)
    if skipped:
        log(f"skipped {skipped} bad record(s) of {skipped + len(records)}")
    if images_only:  # a text-only record gives the projector no gradient
        text_only = sum(r.image is None for r in records)
        records = [r for r in records if r.image is not None]
        if text_only:
            log(f"left out {text_only} text-only record(s): only the projector learns")
        if not records:
            raise UserError("no record has an image: the projector has nothing to learn from")
    family = ckpt.family
    hf_recipe = family.hf_recipe(ckpt.recipe)
    if hf_recipe != ckpt.recipe:
        # transformers' model packs the features in training: pictures are tiled and counted its way, and the
        # output is read its way
        log(f"{ckpt.path} was trained with LLaVA's own anyres packing; training goes on with transformers'")
        ckpt = replace(ckpt, recipe=hf_recipe)
    if image_tokens:  # a reduced-token run: LLaVA-1.5's one tile, reduced to image_tokens positions in the model
        images, most = replace(ckpt.image_spec(), pad=pad), image_tokens
    else:
        section, per_tile = {**family.image_section(ckpt), "pad": pad}, family.tokens_per_tile(ckpt)
        images = family.image_path(section, {}, per_tile, family.side_arrays(ckpt))
        most = family.max_positions(section, per_tile)
    ds = LlavaDataset(records, get_template(template), tok, model.config.image_token_index, most, images,
                      max_length, family, video_token_id=ckpt.video_token_id,
                      frames_upbound=frames_upbound, video_fps=video_fps)
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
           conv_mode: str = "plain", video_folder=None, log=print) -> Path | None:
    output = Path(output)
    ckpt, m, tok = _load(model, load_dtype(cfg))
    if projector_type == "linear" and model_setup.projector_type(m) != "linear":
        model_setup.make_linear_projector(m)
    ds = _dataset(ckpt, m, tok, conv_mode, data, image_folder, pad, cfg.max_length, skip_bad, log,
                  frames_upbound=cfg.frames_upbound, video_fps=cfg.video_fps, video_folder=video_folder)
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
           tune: str = "all", family: str | None = None, video_folder=None, log=print) -> Path | None:
    """``image_tokens``: train with the image reduced to that many tokens by ``token_method``
    (``llava_edge/image_tokens.py``); ``tune="projector"``: only the projector learns, the recovery fine-tune of
    a reduced-token variant (``quantize --image-tokens K --projector OUTPUT``). ``cfg.vision_lr``: the vision
    tower learns at that rate. ``family``: the model family to train (``llava-next`` from a LLaVA-1.5
    checkpoint: assembled first in OUTPUT/base, see :func:`model_setup.as_family`)."""
    output = Path(output)
    if tune not in ("all", "projector"):
        raise UserError(f"unknown --tune {tune!r}: all (projector + language model) | projector")
    if tune == "projector" and cfg.lora:
        raise UserError("--tune projector trains the projector alone: drop --lora")
    if cfg.vision_lr is not None:
        if not (math.isfinite(cfg.vision_lr) and cfg.vision_lr > 0):
            raise UserError(f"--vision-lr must be a positive learning rate, not {cfg.vision_lr}")
        if tune == "projector":
            raise UserError("--tune projector trains the projector alone: the vision tower cannot learn too "
                            "(drop --vision-lr, or use a preset that does not set it)")
        if cfg.lora:
            raise UserError(model_setup.LORA_TOWER)
    if family is not None:
        model = _start_as(model, family, output, cfg.seed, resume, log)
    if image_tokens and not (fam := open_checkpoint(model).family).reduces_tokens:
        raise UserError(f"--image-tokens reduces one tile's tokens: {fam.title} checkpoints are not supported")
    ckpt, m, tok = _load(model, load_dtype(cfg))
    reduction = _reduction(m, image_tokens, token_method) if image_tokens else None
    if projector:  # before accelerate.prepare: under ZeRO-3 the parameters are still whole here
        model_setup.load_projector(m, projector)
    ds = _dataset(ckpt, m, tok, conv_mode, data, image_folder, pad, cfg.max_length, skip_bad, log,
                  image_tokens=reduction.tokens if reduction else None, images_only=tune == "projector",
                  frames_upbound=cfg.frames_upbound, video_fps=cfg.video_fps, video_folder=video_folder)
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
    m, groups = model_setup.setup_stage2(m, cfg.lr, lora, cfg.projector_lr, cfg.vision_lr)
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


def _start_as(model: str, name: str, output: Path, seed: int, resume: bool, log) -> str:
    """The checkpoint to train as family ``name``: ``model`` itself when it is one, else (from a LLaVA-1.5
    checkpoint) the assembled model in OUTPUT/base, written by the main process while the others wait;
    ``resume`` takes the one written before."""
    import torch
    from accelerate import PartialState

    if name not in families.FAMILIES:
        raise UserError(f"unknown --family {name!r}; known: {', '.join(families.FAMILIES)}")
    target, ckpt = families.FAMILIES[name], open_checkpoint(model)
    if ckpt.family is target:
        return model
    if ckpt.family.name != families.DEFAULT:
        raise UserError(f"--family {name}: {ckpt.path} is {ckpt.family.title}, and llava-edge turns only "
                        f"{families.FAMILIES[families.DEFAULT].title} checkpoints into another family")
    base = output / "base"
    state = PartialState(cpu=not torch.cuda.is_available())  # as loop.train makes it: gloo on CPU
    with state.main_process_first():
        if state.is_main_process and not (resume and (base / "config.json").is_file()):
            _write_as(ckpt, target, base, seed)
            log(f"assembled {target.title} from {ckpt.path} in {base} (image_newline drawn with seed {seed})")
    return str(base)


def _write_as(ckpt, family, out: Path, seed: int) -> None:
    """``model_setup.as_family`` saved as a llava-hf checkpoint of ``family``: the family's processor, the
    source's recipe and its tokenizer files as they are (the same ids); replaced atomically."""
    from transformers import AutoTokenizer

    from llava_edge import atomic
    from llava_edge.llava_hf import write_side_files
    from llava_edge.tokenizer import read_settings

    m = model_setup.as_family(ckpt, family, seed)
    spec, settings = ckpt.image_spec(), read_settings(ckpt.path)
    with atomic.atomic_path(out) as tmp:
        m.save_pretrained(tmp, safe_serialization=True)
        write_side_files(tmp, AutoTokenizer.from_pretrained(ckpt.path),
                         family.hf_image_processor(spec.resize, spec.crop, m.config.to_dict()),
                         patch_size=m.config.vision_config.patch_size,
                         strategy=m.config.vision_feature_select_strategy, conv_mode=ckpt.conv_mode,
                         image_pad=ckpt.recipe["image_pad"], legacy=settings.legacy, add_bos=settings.add_bos,
                         add_eos=settings.add_eos, toy=bool(ckpt.recipe.get("toy")), family=family)
        for name in TOKENIZER_FILES:  # transformers' save leaves out tokenizer.model, which export reads
            if (ckpt.path / name).is_file():
                shutil.copyfile(ckpt.path / name, tmp / name)


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
