"""``llava-edge``: the command line. Thin: each command calls the library.

Heavy libraries (torch, transformers) are imported inside the commands that
need them, so ``llava-edge chat`` and ``info`` start without them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError

app = typer.Typer(
    help="Train, export, quantize and run LLaVA-style vision-language models on the edge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
toy_app = typer.Typer(help="The toy world: synthetic data and small real LLaVA checkpoints.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
train_app = typer.Typer(help="LLaVA's two training stages, and LoRA merging.", no_args_is_help=True)
app.add_typer(train_app, name="train")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@toy_app.command("data")
def toy_data(
    out: Path = typer.Option(..., "--out", help="Folder for images/ and the JSON files"),
    seed: int = typer.Option(0, help="Same seed, same dataset"),
    n_stage1: int = typer.Option(2000, help="Caption records (stage 1)"),
    n_stage2: int = typer.Option(2000, help="Instruction records (stage 2)"),
    n_eval: int = typer.Option(200, help="Held-out evaluation questions"),
    image_size: int = typer.Option(128, help="Rendered image side in pixels"),
):
    """Synthetic shape scenes in LLaVA's JSON conversation format."""
    from .toy.data import write_dataset

    for n in (n_stage1, n_stage2, n_eval):
        if n < 0:
            raise UserError("record counts must be zero or more")
    if image_size < 16:
        raise UserError("--image-size must be at least 16")
    paths = write_dataset(out, seed, n_stage1, n_stage2, n_eval, image_size)
    for split, p in paths.items():
        say(f"{split}: {p}")


@toy_app.command("model")
def toy_model(
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write"),
    preset: str = typer.Option("toy", help="Model shape"),
    seed: int = typer.Option(0, help="Weight initialisation seed"),
):
    """A random-weight LlavaForConditionalGeneration checkpoint in the llava-hf layout."""
    from .toy.model import PRESETS, write_toy_model

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    write_toy_model(out, preset, seed)
    say(f"wrote {out}")


@toy_app.command("build")
def toy_build(
    out: Path = typer.Option(..., "--out", help="Folder for data, every stage's output and the final model"),
    seed: int = typer.Option(0),
):
    """The whole recipe on the toy world: pretrain the halves, stage 1, stage 2, evaluate."""
    from .toy.build import build

    build(out, seed=seed, log=say)


@toy_app.command("ablation")
def toy_ablation(
    build: Path = typer.Option(..., "--build", help="A `toy build` folder (its base, stage 1 and data are reused)"),
    variant: Optional[list[str]] = typer.Option(None, "--variant", help="Only these (mix, no-stage1, only-<category>)"),
):
    """LLaVA's ablations on the toy: no stage 1, each instruction category alone, the mix."""
    from .toy.ablation import run

    run(build, log=say, variants=variant)
    say(f"results: {build / 'ablation.md'}")


def _stage_config(stage: str, preset: str, **overrides):
    from .train.presets import get_preset

    return getattr(get_preset(preset), stage).with_(**overrides)


def _model_arg(model: Optional[str], vision: Optional[str], llm: Optional[str], projector_type: str, output: Path) -> str:
    """--model, or --vision + --llm assembled into a fresh LLaVA under OUTPUT/base."""
    if model and (vision or llm):
        raise UserError("give either --model or --vision with --llm, not both")
    if model:
        return model
    if not (vision and llm):
        raise UserError("give --model, or --vision and --llm to assemble a fresh LLaVA")
    from .train.model_setup import assemble

    m, tok, improc = assemble(vision, llm, projector_type)
    base = output / "base"
    m.save_pretrained(base)
    tok.save_pretrained(base)
    improc.save_pretrained(base)
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
    preset: str = typer.Option("llava-1.5-7b"),
    lr: Optional[float] = typer.Option(None), global_batch: Optional[int] = typer.Option(None),
    per_device_batch: Optional[int] = typer.Option(None), epochs: Optional[float] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None), max_length: Optional[int] = typer.Option(None),
    save_steps: Optional[int] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    image_aspect: str = typer.Option("square", help="square | pad"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT/checkpoint-last"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad records (and count them) instead of stopping"),
    stop_after: int = typer.Option(0, help="Checkpoint and stop at this step (continue later with --resume)"),
):
    """Stage 1, feature alignment: only the projector learns, on image-caption pairs."""
    from .train import stages

    cfg = _stage_config("stage1", preset, lr=lr, global_batch=global_batch, per_device_batch=per_device_batch,
                        epochs=epochs, max_steps=max_steps, max_length=max_length, save_steps=save_steps, seed=seed)
    m = _model_arg(model, vision, llm, projector_type, output)
    done = stages.stage1(m, data, image_folder, output, cfg, projector_type=projector_type, pad=image_aspect,
                         resume=resume, skip_bad=skip_bad, stop_after=stop_after, log=say)
    if done:
        say(f"stage 1 done: {output} (projector: {output / 'mm_projector.safetensors'})")


@train_app.command("stage2")
def train_stage2(
    model: str = typer.Option(..., "--model", help="llava-hf style directory or hub id (base LLaVA)"),
    data: Path = typer.Option(..., "--data", help="LLaVA JSON instruction file (llava_v1_5_mix665k.json schema)"),
    image_folder: Path = typer.Option(..., "--image-folder"),
    output: Path = typer.Option(..., "--output"),
    projector: Optional[Path] = typer.Option(None, "--projector", help="Stage-1 mm_projector.safetensors"),
    preset: str = typer.Option("llava-1.5-7b"),
    lora: Optional[bool] = typer.Option(None, "--lora/--no-lora", help="LoRA on the language model"),
    lora_r: Optional[int] = typer.Option(None), lora_alpha: Optional[int] = typer.Option(None),
    projector_lr: Optional[float] = typer.Option(None),
    lr: Optional[float] = typer.Option(None), global_batch: Optional[int] = typer.Option(None),
    per_device_batch: Optional[int] = typer.Option(None), epochs: Optional[float] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None), max_length: Optional[int] = typer.Option(None),
    save_steps: Optional[int] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    image_aspect: str = typer.Option("pad", help="pad (LLaVA-1.5) | square"),
    resume: bool = typer.Option(False, "--resume"),
    skip_bad: bool = typer.Option(False, "--skip-bad"),
    stop_after: int = typer.Option(0, help="Checkpoint and stop at this step (continue later with --resume)"),
):
    """Stage 2, visual instruction tuning: projector + language model (or LoRA) learn."""
    from .train import stages

    cfg = _stage_config("stage2", preset, lr=lr, global_batch=global_batch, per_device_batch=per_device_batch,
                        epochs=epochs, max_steps=max_steps, max_length=max_length, save_steps=save_steps, seed=seed,
                        lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, projector_lr=projector_lr)
    out = stages.stage2(model, data, image_folder, output, cfg, projector=projector, pad=image_aspect,
                        resume=resume, skip_bad=skip_bad, stop_after=stop_after, log=say)
    if out:
        say(f"stage 2 done: {out}")


@train_app.command("merge-lora")
def train_merge_lora(
    base: str = typer.Option(..., "--base"),
    adapter: Path = typer.Option(..., "--adapter"),
    output: Path = typer.Option(..., "--output"),
):
    """Fold a stage-2 LoRA adapter (and its projector) into a plain Hugging Face checkpoint."""
    from .train import stages

    stages.merge_lora(base, adapter, output, log=say)


@app.command("export")
def export(
    model: str = typer.Option(..., "--model", help="llava-hf style directory or hub id"),
    out: Path = typer.Option(..., "--out", help="Bundle directory"),
    target: str = typer.Option("all", help="onnx | gguf | all"),
    llm_outtype: str = typer.Option("f32", help="GGUF weights: f32 | f16 | bf16 | q8_0"),
    set_default: bool = typer.Option(False, "--set-default", help="Make this the bundle `chat` uses by default"),
):
    """Split a LLaVA checkpoint into an ONNX vision graph and a GGUF language model."""
    from .checkpoint import open_checkpoint
    from .export.bundle import export_bundle

    ckpt = open_checkpoint(model)
    m = export_bundle(ckpt, out, target, llm_outtype, log=say)
    for v in m.variants:
        say(f"  {v.kind:6} {v.name:6} {v.file:24} {v.size / 1e6:9.2f} MB")
    if set_default:
        _set_default(out)


def _set_default(bundle: Path) -> None:
    from . import atomic
    from .runtimes.pipeline import default_bundle_file

    atomic.write_text(default_bundle_file(), str(bundle.resolve()) + "\n")
    say(f"default bundle: {bundle.resolve()}")


@app.command("info")
def info(bundle: Path = typer.Argument(..., help="Bundle directory")):
    """What a bundle holds."""
    from rich.console import Console
    from rich.table import Table

    from . import manifest

    m = manifest.read(bundle)
    t = Table(title=f"{bundle}  (template {m.template}, {m.vision.get('num_image_tokens')} image tokens)")
    for col in ("kind", "variant", "precision", "file", "MB", "sha256"):
        t.add_column(col)
    for v in m.variants:
        t.add_row(v.kind, v.name, v.precision, v.file, f"{v.size / 1e6:.2f}", v.sha256[:12])
    Console().print(t)


@app.command("chat")
def chat(
    prompt: Optional[str] = typer.Argument(None, help="Question; without one, an interactive session opens"),
    image: Optional[str] = typer.Option(None, "--image", help="Image file (any format Pillow reads)"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Default: $LLAVA_EDGE_BUNDLE or the registered default"),
    temperature: float = typer.Option(0.0, help="0 is greedy and deterministic"),
    top_p: float = typer.Option(1.0),
    max_tokens: int = typer.Option(256),
    seed: Optional[int] = typer.Option(None),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context size in tokens"),
    threads: int = typer.Option(0, help="0: all cores"),
):
    """Ask about an image: the vision graph in onnxruntime, the language model in llama.cpp."""
    from .preprocess import load_image
    from .runtimes.pipeline import EdgeLLaVA

    if temperature < 0 or not 0 < top_p <= 1 or max_tokens < 1:
        raise UserError("need --temperature >= 0, 0 < --top-p <= 1 and --max-tokens >= 1")
    if image is not None:
        load_image(image)  # fail on a bad image before loading the model
    m = EdgeLLaVA.load(bundle, n_ctx=ctx, threads=threads)
    sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    session = m.session(image)
    if prompt is not None:
        for piece in session.stream(prompt, **sampling):
            print(piece, end="", flush=True)
        print()
        return
    say("llava-edge chat: /image PATH to change the image, /reset to forget, /quit to leave")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                load_image(path)
                session.set_image(path)
            except UserError as e:
                say(f"error: {e}")
            continue
        try:
            for piece in session.stream(line, **sampling):
                print(piece, end="", flush=True)
            print()
        except UserError as e:
            say(f"error: {e}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; usage errors are click's, a :class:`UserError` is one line on stderr, exit 2."""
    try:
        app(args=argv, prog_name="llava-edge", standalone_mode=True)
    except UserError as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def run() -> None:  # console-script entry point
    sys.exit(main())


if __name__ == "__main__":
    run()
