"""``llava-edge``: the command line. Thin: each command calls the library.

Heavy libraries (torch, transformers) are imported inside the commands that
need them, so ``llava-edge chat`` and ``info`` start without them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError, describe_os_error

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
    preset: str = typer.Option("toy", help="Model shape: toy | llava-1.5-7b | llava-1.5-13b | tinyllava-1.1b"),
    seed: int = typer.Option(0, help="Weight initialisation seed"),
    layers: Optional[int] = typer.Option(None, "--layers", help="Shorten the language model to N decoder layers"),
    dtype: str = typer.Option("bfloat16", help="Real-size presets' stored weights: bfloat16 | float16 (toy: fp32)"),
):
    """A random-weight LlavaForConditionalGeneration checkpoint in the llava-hf layout.

    Real-size presets carry the published configuration (CLIP ViT-L/14-336, 576 image
    tokens, ...) and are written tensor by tensor, never held in memory.
    """
    from .toy.model import DTYPES, preset_shape, write_toy_model

    preset_shape(preset, layers)  # unknown preset or bad --layers: one-line error
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; choose {', '.join(DTYPES)}")
    write_toy_model(out, preset, seed, layers=layers, dtype=dtype)
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
    conv_mode: str = typer.Option("plain", "--conv-mode", help="LLaVA's --version: the conversation mode the "
                                  "records are rendered and masked with (stage 1: plain)"),
):
    """Stage 1, feature alignment: only the projector learns, on image-caption pairs."""
    from .train import stages

    cfg = _stage_config("stage1", preset, lr=lr, global_batch=global_batch, per_device_batch=per_device_batch,
                        epochs=epochs, max_steps=max_steps, max_length=max_length, save_steps=save_steps, seed=seed)
    m = _model_arg(model, vision, llm, projector_type, output)
    _check_train_mode(conv_mode)
    done = stages.stage1(m, data, image_folder, output, cfg, projector_type=projector_type, pad=image_aspect,
                         resume=resume, skip_bad=skip_bad, stop_after=stop_after, conv_mode=conv_mode, log=say)
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
    conv_mode: str = typer.Option("vicuna_v1", "--conv-mode", help="LLaVA's --version: the conversation mode the "
                                  "records are rendered and masked with (LLaVA-1.5: v1 = vicuna_v1); recorded in "
                                  "the output for export and chat"),
):
    """Stage 2, visual instruction tuning: projector + language model (or LoRA) learn."""
    from .train import stages

    cfg = _stage_config("stage2", preset, lr=lr, global_batch=global_batch, per_device_batch=per_device_batch,
                        epochs=epochs, max_steps=max_steps, max_length=max_length, save_steps=save_steps, seed=seed,
                        lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, projector_lr=projector_lr)
    _check_train_mode(conv_mode)
    out = stages.stage2(model, data, image_folder, output, cfg, projector=projector, pad=image_aspect,
                        resume=resume, skip_bad=skip_bad, stop_after=stop_after, conv_mode=conv_mode, log=say)
    if out:
        say(f"stage 2 done: {out}")


def _check_train_mode(conv_mode: str) -> None:
    from .templates import CHAT_TEMPLATE, TEMPLATES

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
    from .train import stages

    stages.merge_lora(base, adapter, output, log=say)


@app.command("export")
def export(
    model: str = typer.Option(..., "--model", help="llava-hf directory, hub id in the local cache, a `llava-edge "
                              "train` output, or an original LLaVA checkpoint (converted; see --vision)"),
    out: Path = typer.Option(..., "--out", help="Bundle directory (new, empty, or a bundle to update or finish)"),
    target: str = typer.Option("all", "--target", help="onnx | tensorrt | gguf | mmproj | all  (all = onnx + gguf "
                               "+ mmproj, plus tensorrt where TensorRT is installed)"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | fp16: fp16 adds vision.fp16.onnx and makes the "
                              "mmproj GGUF and the TensorRT engine fp16"),
    llm_outtype: str = typer.Option("f32", "--llm-outtype", help="GGUF weights: f32 | f16 | bf16 | q8_0"),
    mmproj_outtype: str = typer.Option("", "--mmproj-outtype", help="mmproj GGUF weights: f32 | f16 | bf16 "
                                       "(default: f16 with --dtype fp16, else f32)"),
    vision: Optional[str] = typer.Option(None, "--vision", help="CLIP tower (directory or hub id) for an original "
                                         "LLaVA checkpoint; default: its mm_vision_tower"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where original LLaVA checkpoints are "
                                             "converted (default: $LLAVA_EDGE_CACHE or ~/.cache/llava-edge)"),
    trt_max_batch: int = typer.Option(8, "--trt-max-batch", help="TensorRT: largest batch of images"),
    trt_opt_batch: int = typer.Option(1, "--trt-opt-batch", help="TensorRT: the batch the kernels are tuned for"),
    int8: bool = typer.Option(False, "--int8", help="TensorRT: an INT8 engine (needs a calibration cache)"),
    calibration_cache: Optional[Path] = typer.Option(None, "--calibration-cache", help="TensorRT INT8 calibration "
                                                     "cache (default: BUNDLE/tensorrt.int8.calib)"),
    trt_workspace_mib: Optional[int] = typer.Option(None, "--trt-workspace-mib", help="TensorRT builder workspace"),
    set_default: bool = typer.Option(False, "--set-default", help="Make this the bundle `chat` uses by default"),
    conv_mode: Optional[str] = typer.Option(None, "--conv-mode", help="The bundle's conversation mode (default: "
                                            "the checkpoint's; see README, 'Conversation modes')"),
    no_wait: bool = typer.Option(False, "--no-wait", help="When another export or quantize is writing the bundle, "
                                 "stop with an error instead of waiting for it"),
):
    """Split a LLaVA checkpoint into the files an edge device runs, under one manifest.json."""
    from .checkpoint import resolve_model
    from .export.bundle import ExportOptions, TensorRTOptions, check_out_dir, export_bundle, terminal_progress

    trt = TensorRTOptions(max_batch=trt_max_batch, opt_batch=trt_opt_batch, int8=int8,
                          calibration_cache=calibration_cache, workspace_mib=trt_workspace_mib)
    ExportOptions(target, dtype, llm_outtype, trt, mmproj_outtype, conv_mode).validate()
    check_out_dir(out)  # before a conversion writes anything
    ckpt = resolve_model(model, vision=vision, cache_dir=cache_dir, log=say)
    export_bundle(ckpt, out, target, dtype, llm_outtype, mmproj_outtype=mmproj_outtype, tensorrt=trt,
                  conv_mode=conv_mode, wait=not no_wait, log=say, progress=terminal_progress(say))
    if set_default:
        _set_default(out)

def _set_default(bundle: Path) -> None:
    from . import atomic
    from .runtimes.pipeline import default_bundle_file

    atomic.write_text(default_bundle_file(), str(bundle.resolve()) + "\n")
    say(f"default bundle: {bundle.resolve()}")


@app.command("info")
def info(
    bundle: Path = typer.Argument(..., help="Bundle directory"),
    verify: bool = typer.Option(False, "--verify", help="Hash every file the manifest lists and compare with its "
                                "sha256 (exit 1 naming the files that differ)"),
):
    """What a bundle holds: its manifest's fields and every variant."""
    from rich.console import Console
    from rich.table import Table

    from . import manifest

    m = manifest.read(bundle)
    console = Console()
    fields = Table(title=str(bundle), show_header=False, box=None)
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")
    for key, value in _manifest_fields(m):
        fields.add_row(key, value)
    console.print(fields)
    t = Table(title="variants")
    for col in ("variant", "kind", "precision", "size", "file", "sha256"):
        t.add_column(col, justify="right" if col == "size" else "left")
    for v in m.variants:
        t.add_row(v.name, v.kind, v.precision, manifest.human_size(v.size), v.file, v.sha256[:12])
    console.print(t)
    engines = [v for v in m.variants if v.device_specific]
    if engines:
        e = Table(title="TensorRT engines (run only with this TensorRT on this GPU)")
        for col in ("variant", "TensorRT", "GPU", "compute capability", "batch (min/opt/max)", "image size"):
            e.add_column(col)
        for v in engines:
            x = v.extra
            e.add_row(v.name, str(x.get("tensorrt_version", "?")), str(x.get("gpu", "?")),
                      str(x.get("compute_capability", "?")),
                      f"{x.get('min_batch', '?')}/{x.get('opt_batch', '?')}/{x.get('max_batch', '?')}",
                      str(x.get("image_size", "?")))
        console.print(e)
    if manifest.is_incomplete(bundle):
        say(f"note: an export into {bundle} did not finish; run it again to finish it (the table shows the last "
            "finished state)")
    if verify:
        bad = verify_bundle(bundle, m)
        if bad:
            say(f"error: {len(bad)} file(s) do not match the manifest: {'; '.join(bad)}")
            raise typer.Exit(1)
        say(f"verified: every file of {bundle} matches its sha256 in the manifest")


def verify_bundle(bundle: Path, m) -> list[str]:
    """Every file the manifest records a sha256 for, hashed afresh: what differs, each as 'NAME: why'."""
    from . import integrity, manifest

    recorded = {v.file: v.sha256 for v in m.variants}
    recorded.update(m.tokenizer.get("sha256") or {})
    bad = []
    for name, sha in recorded.items():
        try:
            path = manifest.bundle_file(bundle, name)
            if not path.is_file():
                bad.append(f"{name}: missing")
                continue
            integrity.verify(path, sha, name, remember=False)
        except UserError as e:
            bad.append(f"{name}: {'damaged or replaced' if 'sha256' in str(e) else e}")
    return bad


def _manifest_fields(m) -> list[tuple[str, str]]:
    """The manifest's sections as (name, text) rows for `info`."""
    s, im, vi, llm, tok = m.source, m.image, m.vision, m.llm, m.tokenizer
    rows = [
        ("schema", f"{m.schema_version} ({m.created_by})"),
        ("source", str(s.get("model", "?"))),
        ("fingerprint", str(s.get("fingerprint", "?"))),
    ]
    if s.get("converted"):
        rows.append(("converted copy", str(s["converted"])))
    rows += [
        ("conversation mode", m.conv_mode),
        ("image", f"{vi.get('image_size', im.get('crop'))} px; resize {im.get('resize')}, crop {im.get('crop')}, "
                  f"pad mode {im.get('pad')}"),
        ("mean / std", f"{_floats(im.get('mean'))} / {_floats(im.get('std'))}"),
        ("vision", f"feature layer {vi.get('feature_layer')} ({vi.get('select_strategy')}), "
                   f"{vi.get('num_image_tokens')} image tokens x {vi.get('embed_dim')}, opset {vi.get('opset')}"),
    ]
    for name, p in (vi.get("parity") or {}).items():
        rows.append((f"parity {name}", f"vs Hugging Face on {p.get('images', '?')} images: min cosine "
                                       f"{p.get('min_cosine', float('nan')):.8f}, max abs {p.get('max_abs', '?')}"))
    if llm:
        dims = ", ".join(f"{k} {llm[k]}" for k in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_vocab",
                                                   "n_ctx_train") if k in llm)
        ids = ", ".join(f"{k} {llm[k]}" for k in ("bos_id", "eos_id", "image_token_id") if k in llm)
        rows.append(("language model", f"{llm.get('arch', '?')}: {dims}"))
        rows.append(("token ids", ids))
    rows.append(("tokenizer", f"{tok.get('file')}: {tok.get('kind')}, "
                              f"{'legacy' if tok.get('legacy') else 'non-legacy'} word starts, "
                              f"adds BOS: {'yes' if tok.get('add_bos') else 'no'}"))
    return rows


def _floats(xs) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in xs or ()) + ")"

@app.command("chat")
def chat(
    prompt: Optional[str] = typer.Argument(None, help="Question; without one, an interactive session opens"),
    image: Optional[str] = typer.Option(None, "--image", help="Image file (any format Pillow reads)"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Default: $LLAVA_EDGE_BUNDLE or the registered default"),
    device: str = typer.Option("auto", "--device", help="Device profile: auto (detect) | cpu | laptop-gpu | jetson"),
    vision_variant: Optional[str] = typer.Option(None, "--vision-variant", help="Vision variant by name (fp32, fp16, "
                                                 "int8, int8-static, int4, trt-fp16...); default: the profile's"),
    llm_variant: Optional[str] = typer.Option(None, "--llm-variant", help="Language-model variant by name (f32, "
                                              "f16, q8_0, q4_k_m...); default: the profile's"),
    explain: bool = typer.Option(False, "--explain", help="Print what was chosen (profile, variants, providers, "
                                 "offload, threads, context) and why, on stderr; without a prompt, then exit"),
    drop_oldest: bool = typer.Option(False, "--drop-oldest", help="When the conversation outgrows the context, "
                                     "forget the oldest exchanges instead of stopping with an error"),
    temperature: float = typer.Option(0.0, help="0 is greedy and deterministic"),
    top_p: float = typer.Option(1.0),
    max_tokens: int = typer.Option(256),
    seed: Optional[int] = typer.Option(None),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context size in tokens (default: the profile's)"),
    threads: int = typer.Option(0, help="0: the profile's (one per physical core)"),
    no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache", help="Neither load nor save KV caches of "
                                         "prompt beginnings and pictures seen before ($LLAVA_EDGE_CACHE/prefix-kv, "
                                         "size limit $LLAVA_EDGE_PREFIX_CACHE_MB; docs/RUNTIME.md)"),
    conv_mode: Optional[str] = typer.Option(None, "--conv-mode", help="Prompt in another conversation mode than "
                                            "the bundle's (LLaVA's names, e.g. vicuna_v1, llava_v1)"),
    no_verify: bool = typer.Option(False, "--no-verify", help="Do not check the files loaded against the "
                                   "manifest's sha256 (a file version that verified once is not hashed again anyway)"),
):
    """Ask about an image: the vision graph in onnxruntime or TensorRT, the language model in llama.cpp."""
    from .preprocess import load_image
    from .runtimes.pipeline import EdgeLLaVA, Sampling, check_text

    sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    Sampling(**sampling)  # a one-line error for bad values, before anything is loaded
    if prompt is not None:
        check_text(prompt, "the question")
    if image is not None:
        load_image(image)  # fail on a bad image before loading the model
    m = EdgeLLaVA.load(bundle, device=device, vision_variant=vision_variant, llm_variant=llm_variant, n_ctx=ctx,
                       threads=threads, on_overflow="drop-oldest" if drop_oldest else "error",
                       prefix_cache=not no_prefix_cache, conv_mode=conv_mode, verify=not no_verify)
    if explain:
        say(m.explain())
        if prompt is None:
            return
    session = m.session(image)

    def answer(question: str) -> None:
        for piece in session.stream(question, **sampling):
            print(piece, end="", flush=True)
        print()
        if session.dropped_turns:
            say(f"(forgot the {session.dropped_turns} oldest exchange(s) to fit the context)")
        if session.last_stop == "context":
            say(f"(answer cut: the context of {m.llm.n_ctx} tokens is full; /reset, --drop-oldest or a larger --ctx)")

    if prompt is not None:
        answer(prompt)
        return
    commands = "/image PATH to change the image, /reset to forget, /quit to leave"
    say(f"llava-edge chat: {commands}")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        except UnicodeDecodeError:  # a line that is not UTF-8: said, and the session goes on
            say("error: that line is not valid UTF-8 text; check the terminal's encoding")
            continue
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            continue
        if line == "/image" or line.startswith("/image "):
            path = line[len("/image"):].strip()
            try:
                load_image(path)
                session.set_image(path)
            except UserError as e:
                say(f"error: {e}")
            continue
        if line.startswith("/") and not line.startswith("//"):
            say(f"unknown command {line.split()[0]!r}: {commands} (start a question with // to ask one "
                "that begins with /)")
            continue
        if line.startswith("//"):
            line = line[1:]
        try:
            answer(line)
        except UserError as e:
            say(f"error: {e}")


@app.command("quantize")
def quantize(
    bundle: Path = typer.Argument(..., help="Bundle directory (from `llava-edge export`)"),
    llm: Optional[str] = typer.Option(None, "--llm", help="GGUF types, comma-separated: q8_0, q6_k, q5_k_m, q5_k_s, "
                                      "q5_1, q5_0, q4_k_m, q4_k_s, q4_1, q4_0, q3_k_l, q3_k_m, q3_k_s, q2_k"),
    vision: Optional[str] = typer.Option(None, "--vision", help="Vision ONNX types, comma-separated: fp16, int8 "
                                         "(dynamic), int8-static (QDQ, calibrated), int4 (weight-only)"),
    calib_images: Optional[Path] = typer.Option(None, "--calib-images", help="Folder of calibration images for "
                                                "int8-static and TensorRT (needed for a real model; toy models default to synthetic scenes)"),
    calib_count: int = typer.Option(32, "--calib-count", help="Calibration images to use (the first N by name)"),
    threads: int = typer.Option(0, "--threads", help="llama.cpp quantizer threads; 0: all cores"),
    block_size: int = typer.Option(32, "--block-size", help="int4 block size: 16 | 32 | 64 | 128 | 256"),
    optimize: bool = typer.Option(False, "--optimize", help="Fuse the CLIP graph (onnxruntime's transformer "
                                  "optimizer) before int8/int4; the result runs in onnxruntime only"),
    trt_calib_cache: bool = typer.Option(False, "--trt-calib-cache", help="Also write TensorRT's INT8 calibration "
                                         "cache for `export --target tensorrt --int8` (needs TensorRT)"),
    no_wait: bool = typer.Option(False, "--no-wait", help="When another export or quantize is writing the bundle, "
                                 "stop with an error instead of waiting for it"),
):
    """Add quantized variants (llama.cpp GGUF types, int8/int4/fp16 ONNX) to a bundle; finished ones are kept."""
    from .quantize.command import quantize_bundle

    outcomes = quantize_bundle(bundle, llm, vision, calib_images=calib_images, calib_count=calib_count,
                               threads=threads, block_size=block_size, optimize=optimize,
                               trt_calib_cache=trt_calib_cache, wait=not no_wait, log=say)
    for o in outcomes:
        state = "new" if o.made else "up to date"
        say(f"  {o.kind:8} {o.name:16} {o.file:28} {o.size / 1e6:8.2f} MB  {state}"
            f"{'  ' + o.note if o.note and o.made else ''}")


@app.command("drift")
def drift(
    bundle: Path = typer.Argument(..., help="Bundle directory (from `llava-edge export` and `quantize`)"),
    reference: str = typer.Option(..., "--reference", help="The Hugging Face model the bundle was made from "
                                  "(fp16 on a GPU, fp32 on a CPU)"),
    eval_file: Optional[Path] = typer.Option(None, "--eval", help="Questions: toy/LLaVA conversation JSON, ScienceQA "
                                             "llava_test_CQM-A.json or POPE llava_pope_test.jsonl (default: 50 "
                                             "generated toy questions)"),
    eval_format: str = typer.Option("auto", "--format", help="auto | toy | scienceqa | pope"),
    image_folder: Optional[Path] = typer.Option(None, "--image-folder", help="Images (default: the --eval file's "
                                                "folder)"),
    variants: Optional[str] = typer.Option(None, "--variants", help="VISION:LLM pairs, comma-separated, * for all "
                                           "of a kind (default: every combination)"),
    report: Optional[Path] = typer.Option(None, "--report", help="Folder for drift.json, drift.md and drift.png "
                                          "(default: print the table)"),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="Exit 1 when one of these gates fails: f16, q8_0, "
                                          "q4_k_m, all"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions"),
    max_tokens: int = typer.Option(32, "--max-tokens", help="Longest answer, in tokens"),
    kv_cache: str = typer.Option("f16", "--kv-cache", help="llama.cpp KV cache: f16 (its default, what devices "
                                 "run) | f32"),
    threads: int = typer.Option(0, "--threads", help="llama.cpp threads; 0: all cores"),
):
    """Accuracy drift of each vision/LLM variant pair against the Hugging Face model, with CI gates."""
    import tempfile

    from .drift.run import drift_bundle

    with tempfile.TemporaryDirectory(prefix="llava-edge-drift-") as tmp:
        source = None
        if eval_file is None:  # the toy world's held-out questions, generated here
            from .toy.data import write_eval_questions

            if limit is not None and limit < 1:
                raise UserError("--limit must be at least 1")
            eval_file, eval_format = write_eval_questions(tmp, n=limit or 50), "toy"
            source = f"toy held-out questions (seed 0, {limit or 50} generated)"
        _, failed = drift_bundle(bundle, reference, eval_file=eval_file, eval_format=eval_format,
                                 image_folder=image_folder, variants=variants, report=report, fail_on=fail_on,
                                 limit=limit, max_tokens=max_tokens, kv_cache=kv_cache, threads=threads,
                                 eval_source=source, log=say)
    if failed:
        raise typer.Exit(1)


@app.command("bench")
def bench(
    bundle: Path = typer.Argument(..., help="Bundle directory"),
    device: str = typer.Option("auto", "--device", help="Device profile, as for `chat`"),
    variants: Optional[str] = typer.Option(None, "--variants", help="VISION:LLM pairs, comma-separated (a bare name: "
                                           "that variant with the default of the other kind); default: every "
                                           "portable variant once"),
    runs: int = typer.Option(5, "--runs", help="Timed runs per pair (medians are reported)"),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs first"),
    decode_tokens: int = typer.Option(32, "--decode-tokens", help="Tokens to decode per run"),
    image: Optional[Path] = typer.Option(None, "--image", help="Image to ask about (default: a rendered 640x480 "
                                         "JPEG)"),
    question: str = typer.Option("Describe the image in detail.", "--question"),
    threads: int = typer.Option(0, "--threads", help="0: the profile's"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every run, the machine and versions here"),
):
    """Time preprocessing, vision encode, prefill, time to first token, decode and peak memory per variant."""
    from .bench import BenchSettings, format_table, run_bench

    settings = BenchSettings(runs=runs, warmup=warmup, decode_tokens=decode_tokens, question=question,
                             threads=threads, device=device)
    report = run_bench(bundle, settings, variants, image=image, json_out=json_out, log=say)
    print(format_table(report))
    if json_out is not None:
        say(f"wrote {json_out}")


# optional packages -> the extra that installs them (a command that needs one says so in one line)
EXTRA_OF = {"torch": "export", "transformers": "export", "onnx": "export",
            "onnxscript": "export", "peft": "train", "accelerate": "train", "tensorrt": "tensorrt", "cuda": "tensorrt"}


def missing_package_message(e: ModuleNotFoundError) -> str | None:
    """The one-line error for an optional package this command needs, or None for anything else."""
    top = (e.name or "").split(".")[0]
    if top == "onnxruntime":
        from .runtimes.vision import ORT_MISSING

        return ORT_MISSING
    if top in EXTRA_OF:
        return f"this command needs {top}, which is not installed: pip install 'llava-edge[{EXTRA_OF[top]}]'"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; usage errors are click's, a :class:`UserError` is one line on stderr, exit 2."""
    try:
        app(args=argv, prog_name="llava-edge", standalone_mode=True)
    except UserError as e:
        say(f"error: {e}")
        return 2
    except ModuleNotFoundError as e:
        msg = missing_package_message(e)
        if msg is None:
            raise
        say(f"error: {msg}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except OSError as e:  # what the system refused (full disk, read-only, permissions), named with its path
        say(f"error: {describe_os_error(e)}")
        return 2
    except MemoryError:
        say("error: out of memory (a smaller variant, --ctx or image may fit)")
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def run() -> None:  # console-script entry point
    sys.exit(main())


if __name__ == "__main__":
    run()
