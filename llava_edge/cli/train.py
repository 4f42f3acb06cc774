"""``llava-edge train ...``: LLaVA's two stages and LoRA merging."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from . import options as o
from ._app import say, train_app


def _stage_config(stage: str, preset: str, **overrides):
    from ..train.presets import get_preset
    from ..video import check_frames

    if overrides.get("frames_upbound") is not None:
        check_frames(overrides["frames_upbound"], "--frames-upbound")
    return getattr(get_preset(preset), stage).with_(**overrides)


def _model_arg(model: Optional[str], vision: Optional[str], llm: Optional[str], projector_type: str,
               output: Path) -> str:
    """--model, or --vision + --llm assembled into a fresh LLaVA under OUTPUT/base."""
    if model and (vision or llm):
        raise UserError("give either --model or --vision with --llm, not both")
    if model:
        return model
    if not (vision and llm):
        raise UserError("give --model, or --vision and --llm to assemble a fresh LLaVA")
    from ..train.model_setup import assemble

    from ..checkpoint import resolve_path
    from ..llava_hf import write_side_files
    from ..tokenizer import read_settings

    m, tok, improc = assemble(vision, llm, projector_type)
    settings = read_settings(resolve_path(llm, "language model"))  # the LLM's own tokenizer settings
    base = output / "base"
    m.save_pretrained(base)
    write_side_files(base, tok, improc, patch_size=m.config.vision_config.patch_size, strategy="default",
                     conv_mode="plain", image_pad="square", legacy=settings.legacy, add_bos=settings.add_bos,
                     add_eos=settings.add_eos)
    return str(base)


@train_app.command("stage1")
def train_stage1(
    data: Path = typer.Option(..., "--data", help="LLaVA JSON caption file (blip_laion_cc_sbu_558k.json schema)"),
    image_folder: Path = typer.Option(..., "--image-folder"),
    output: Path = typer.Option(..., "--output"),
    model: Optional[str] = typer.Option(None, "--model", help="llava-hf style directory or hub id"),
    vision: Optional[str] = typer.Option(None, "--vision", help="CLIP vision model to start from"),
    llm: Optional[str] = typer.Option(None, "--llm", help="causal language model to start from"),
    projector_type: str = typer.Option("mlp2x_gelu", help="mlp2x_gelu (LLaVA-1.5) | linear (LLaVA)"),
    preset: o.Preset = "llava-1.5-7b",
    lr: o.Lr = None, global_batch: o.GlobalBatch = None, per_device_batch: o.PerDeviceBatch = None,
    epochs: o.Epochs = None, max_steps: o.MaxSteps = None, max_length: o.MaxLength = None,
    save_steps: o.SaveSteps = None, seed: o.TrainSeed = None, frames_upbound: o.FramesUpbound = None,
    video_folder: o.VideoFolder = None,
    image_aspect: str = typer.Option("square", help="square | pad"),
    resume: o.Resume = False, skip_bad: o.SkipBad = False, stop_after: o.StopAfter = 0,
    conv_mode: Optional[str] = typer.Option(None, "--conv-mode", help="LLaVA's --version: the conversation mode "
                                            "the records are rendered and masked with; default: the preset's "
                                            "(LLaVA: plain; xtuner's recipes: the language model's format)"),
):
    """Stage 1, feature alignment: only the projector learns, on image-caption pairs."""
    from ..train import stages

    cfg = _stage_config("stage1", preset, lr=lr, global_batch=global_batch, per_device_batch=per_device_batch,
                        epochs=epochs, max_steps=max_steps, max_length=max_length, save_steps=save_steps, seed=seed,
                        frames_upbound=frames_upbound)
    m = _model_arg(model, vision, llm, projector_type, output)
    if conv_mode is None:
        from ..train.presets import get_preset

        conv_mode = get_preset(preset).stage1_mode
    _check_train_mode(conv_mode)
    done = stages.stage1(m, data, image_folder, output, cfg, projector_type=projector_type, pad=image_aspect,
                         resume=resume, skip_bad=skip_bad, stop_after=stop_after, conv_mode=conv_mode,
                         video_folder=video_folder, log=say)
    if done:
        say(f"stage 1 done: {output} (projector: {output / 'mm_projector.safetensors'})")


@train_app.command("stage2")
def train_stage2(
    model: str = typer.Option(..., "--model", help="llava-hf style directory or hub id (base LLaVA)"),
    data: Path = typer.Option(..., "--data", help="LLaVA JSON instruction file (llava_v1_5_mix665k.json schema)"),
    image_folder: Path = typer.Option(..., "--image-folder"),
    output: Path = typer.Option(..., "--output"),
    projector: Optional[Path] = typer.Option(None, "--projector", help="Stage-1 mm_projector.safetensors"),
    preset: o.Preset = "llava-1.5-7b",
    lora: Optional[bool] = typer.Option(None, "--lora/--no-lora", help="LoRA on the language model"),
    lora_r: Optional[int] = typer.Option(None), lora_alpha: Optional[int] = typer.Option(None),
    projector_lr: Optional[float] = typer.Option(None),
    vision_lr: Optional[float] = typer.Option(None, "--vision-lr", help="Train the vision tower too, at this rate "
                                              "(LLaVA-NeXT's mm_vision_tower_lr, 2e-6 in its recipe); default: "
                                              "frozen, or the preset's (llava-next: 2e-6)"),
    family: Optional[str] = typer.Option(None, "--family", help="The model family to train: llava-next from a "
                                         "LLaVA-1.5 checkpoint starts a LLaVA-NeXT (LLaVA-1.6's grids, a new "
                                         "image_newline), assembled in OUTPUT/base; default: the checkpoint's"),
    lr: o.Lr = None, global_batch: o.GlobalBatch = None, per_device_batch: o.PerDeviceBatch = None,
    epochs: o.Epochs = None, max_steps: o.MaxSteps = None, max_length: o.MaxLength = None,
    save_steps: o.SaveSteps = None, seed: o.TrainSeed = None, frames_upbound: o.FramesUpbound = None,
    video_folder: o.VideoFolder = None,
    image_aspect: str = typer.Option("pad", help="pad (LLaVA-1.5) | square"),
    resume: o.Resume = False, skip_bad: o.SkipBad = False, stop_after: o.StopAfter = 0,
    conv_mode: Optional[str] = typer.Option(None, "--conv-mode", help="LLaVA's --version: the conversation mode "
                                            "the records are rendered and masked with; recorded in the output for "
                                            "export and chat; default: the preset's (LLaVA-1.5: v1 = vicuna_v1, "
                                            "OneVision: qwen_1_5, llava-phi-3-mini: phi3_chat)"),
    image_tokens: Optional[int] = typer.Option(None, "--image-tokens", help="Train with each image reduced to this "
                                               "many tokens (see quantize --image-tokens)"),
    token_method: str = typer.Option("pool", "--token-method", help="With --image-tokens: pool | dominant"),
    tune: str = typer.Option("all", "--tune", help="all (projector + language model) | projector (the recovery "
                             "fine-tune of a reduced-token variant: writes OUTPUT/mm_projector.safetensors for "
                             "quantize --projector)"),
):
    """Stage 2, visual instruction tuning: projector + language model (or LoRA) learn; the vision tower too with
    --vision-lr."""
    from ..train import stages

    cfg = _stage_config("stage2", preset, lr=lr, global_batch=global_batch, per_device_batch=per_device_batch,
                        epochs=epochs, max_steps=max_steps, max_length=max_length, save_steps=save_steps, seed=seed,
                        frames_upbound=frames_upbound, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
                        projector_lr=projector_lr, vision_lr=vision_lr)
    if conv_mode is None:
        from ..train.presets import get_preset

        conv_mode = get_preset(preset).conv_mode
    _check_train_mode(conv_mode)
    out = stages.stage2(model, data, image_folder, output, cfg, projector=projector, pad=image_aspect,
                        resume=resume, skip_bad=skip_bad, stop_after=stop_after, conv_mode=conv_mode,
                        image_tokens=image_tokens, token_method=token_method, tune=tune, family=family,
                        video_folder=video_folder, log=say)
    if out:
        say(f"stage 2 done: {out}" + (f" (projector: {out / 'mm_projector.safetensors'})" if tune == "projector"
                                      else ""))


def _check_train_mode(conv_mode: str) -> None:
    from ..templates import CHAT_TEMPLATE, TEMPLATES

    if conv_mode == CHAT_TEMPLATE:
        raise UserError("--conv-mode chat_template is for export and chat; train with one of LLaVA's modes "
                        f"({', '.join(TEMPLATES)})")
    if conv_mode not in TEMPLATES:
        raise UserError(f"unknown --conv-mode {conv_mode!r}; known: {', '.join(TEMPLATES)}")


@train_app.command("merge-lora")
def train_merge_lora(
    base: str = typer.Option(..., "--base"),
    adapter: Path = typer.Option(..., "--adapter"),
    output: Path = typer.Option(..., "--output"),
):
    """Fold a stage-2 LoRA adapter (and its projector) into a plain Hugging Face checkpoint."""
    from ..train import stages

    stages.merge_lora(base, adapter, output, log=say)
