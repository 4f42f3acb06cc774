"""``llava-edge toy ...``: the toy world's data, models, build and ablation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from ._app import toy_app, say


@toy_app.command("data")
def toy_data(
    out: Path = typer.Option(..., "--out", help="Folder for images/ and the JSON files"),
    seed: int = typer.Option(0, help="Same seed, same dataset"),
    n_stage1: int = typer.Option(2000, help="Caption records (stage 1)"),
    n_stage2: int = typer.Option(2000, help="Instruction records (stage 2)"),
    n_eval: int = typer.Option(200, help="Held-out evaluation questions"),
    image_size: Optional[int] = typer.Option(None, help="Rendered image side in pixels (default: 128; the detail "
                                             "world's 224)"),
    detail: bool = typer.Option(False, "--detail", help="The detail world: patterned shapes and a pattern question "
                                "that one tile's pixels cannot answer"),
    two_pictures: bool = typer.Option(False, "--two-pictures", help="Also ask which of two pictures has more "
                                      "shapes (for families trained with several pictures a conversation)"),
):
    """Synthetic shape scenes in LLaVA's JSON conversation format."""
    from ..toy.data import DETAIL_IMAGE_SIZE, write_dataset

    if image_size is None:
        image_size = DETAIL_IMAGE_SIZE if detail else 128

    for n in (n_stage1, n_stage2, n_eval):
        if n < 0:
            raise UserError("record counts must be zero or more")
    if image_size < 16:
        raise UserError("--image-size must be at least 16")
    paths = write_dataset(out, seed, n_stage1, n_stage2, n_eval, image_size, detail, several=two_pictures)
    for split, p in paths.items():
        say(f"{split}: {p}")


@toy_app.command("model")
def toy_model(
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write"),
    preset: str = typer.Option("toy", help="Model shape: toy | toy-next (LLaVA-NeXT) | toy-siglip | toy-onevision "
                               "(SigLIP + Qwen2) | llava-1.5-7b | llava-1.5-13b | tinyllava-1.1b | "
                               "llava-v1.6-mistral-7b | llava-onevision-qwen2-0.5b | llava-interleave-qwen-0.5b"),
    seed: int = typer.Option(0, help="Weight initialisation seed"),
    layers: Optional[int] = typer.Option(None, "--layers", help="Shorten the language model to N decoder layers"),
    dtype: str = typer.Option("bfloat16", help="Real-size presets' stored weights: bfloat16 | float16 (toy: fp32)"),
):
    """A random-weight LlavaForConditionalGeneration checkpoint in the llava-hf layout.

    Real-size presets carry the published configuration (CLIP ViT-L/14-336, 576 image
    tokens, ...) and are written tensor by tensor, never held in memory.
    """
    from ..toy.model import DTYPES, preset_shape, write_toy_model

    preset_shape(preset, layers)  # unknown preset or bad --layers: one-line error
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; choose {', '.join(DTYPES)}")
    write_toy_model(out, preset, seed, layers=layers, dtype=dtype)
    say(f"wrote {out}")


@toy_app.command("build")
def toy_build(
    out: Path = typer.Option(..., "--out", help="Folder for data, every stage's output and the final model"),
    seed: int = typer.Option(0),
    preset: str = typer.Option("toy", help="Model shape: toy (LLaVA-1.5, one tile) | toy-next (LLaVA-NeXT, anyres) | "
                               "toy-siglip (one SigLIP tile) | toy-onevision (LLaVA-OneVision: SigLIP tiles, Qwen2, "
                               "two-picture questions)"),
    detail: bool = typer.Option(False, "--detail", help="The detail world: patterned shapes and a pattern question "
                                "that one tile's pixels cannot answer"),
    n_eval: int = typer.Option(200, "--n-eval", help="Held-out evaluation questions"),
):
    """The whole recipe on the toy world: pretrain the halves, stage 1, stage 2, evaluate."""
    from ..toy.build import BuildSize, build, small_presets
    from ..toy.model import preset_shape

    if preset_shape(preset).get("real"):
        raise UserError(f"toy build trains the small presets ({', '.join(small_presets())}), not {preset}")
    if n_eval < 1:
        raise UserError("--n-eval must be at least 1")
    build(out, seed=seed, size=BuildSize(n_eval=n_eval), log=say, preset=preset, detail=detail)


@toy_app.command("ablation")
def toy_ablation(
    build: Path = typer.Option(..., "--build", help="A `toy build` folder (its base, stage 1 and data are reused)"),
    variant: Optional[list[str]] = typer.Option(None, "--variant", help="Only these (mix, no-stage1, only-<category>)"),
):
    """LLaVA's ablations on the toy: no stage 1, each instruction category alone, the mix."""
    from ..toy.ablation import run

    run(build, log=say, variants=variant)
    say(f"results: {build / 'ablation.md'}")
