"""``llava-edge chat``: ask about an image, once or interactively."""

from __future__ import annotations

from typing import List, Optional

import typer

from . import options as o
from ._app import app, say


@app.command("chat")
def chat(
    prompt: Optional[str] = typer.Argument(None, help="Question; without one, an interactive session opens"),
    image: Optional[List[str]] = typer.Option(None, "--image", help="Image file (any format Pillow reads); "
                                              "repeat it for several pictures (models trained with several)"),
    video: Optional[str] = typer.Option(None, "--video", help="A video file (LLaVA-OneVision): --frames of it, "
                                        "sampled uniformly, after any --image"),
    frames: int = typer.Option(8, "--frames", help="How many frames of --video (1 to 64)"),
    bundle: o.Bundle = None,
    device: o.Device = "auto",
    vision_variant: o.VisionVariant = None,
    image_tokens: o.ImageTokens = None,
    token_method: o.TokenMethod = None,
    max_tiles: o.MaxTiles = None,
    llm_variant: o.LlmVariant = None,
    explain: bool = typer.Option(False, "--explain", help="Print what was chosen (profile, variants, providers, "
                                 "offload, threads, context) and why, on stderr; without a prompt, then exit"),
    drop_oldest: bool = typer.Option(False, "--drop-oldest", help="When the conversation outgrows the context, "
                                     "forget the oldest exchanges instead of stopping with an error"),
    temperature: o.Temperature = 0.0,
    top_p: o.TopP = 1.0,
    max_tokens: o.MaxTokens = 256,
    seed: o.Seed = None,
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context size in tokens (default: the profile's)"),
    threads: o.Threads = 0,
    kv_cache: o.KvCache = "f16",
    no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache", help="Neither load nor save KV caches of "
                                         "prompt beginnings and pictures seen before ($LLAVA_EDGE_CACHE/prefix-kv, "
                                         "size limit $LLAVA_EDGE_PREFIX_CACHE_MB; docs/RUNTIME.md)"),
    conv_mode: Optional[str] = typer.Option(None, "--conv-mode", help="Prompt in another conversation mode than "
                                            "the bundle's (LLaVA's names, e.g. vicuna_v1, llava_v1)"),
    no_verify: bool = typer.Option(False, "--no-verify", help="Do not check the files loaded against the "
                                   "manifest's sha256 (a file version that verified once is not hashed again anyway)"),
):
    """Ask about an image: the vision graph in onnxruntime or TensorRT, the language model in llama.cpp."""
    from ..preprocess import load_image
    from ..runtimes.pipeline import EdgeLLaVA, Sampling, check_text, only_image

    sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    Sampling(**sampling)  # a one-line error for bad values, before anything is loaded
    if prompt is not None:
        check_text(prompt, "the question")
    from ..video import Video, check_frames

    images: list = list(image or [])
    for path in images:
        load_image(path)  # fail on a bad image before loading the model
    check_frames(frames)
    if video is not None:
        images.append(Video(video, frames))
    m = EdgeLLaVA.load(bundle, device=device, vision_variant=vision_variant, llm_variant=llm_variant, n_ctx=ctx,
                       image_tokens=image_tokens, token_method=token_method, max_tiles=max_tiles,
                       threads=threads, kv_cache=kv_cache, on_overflow="drop-oldest" if drop_oldest else "error",
                       prefix_cache=not no_prefix_cache, conv_mode=conv_mode, verify=not no_verify)
    if explain:
        say(m.explain())
        for path in images:
            say(f"{getattr(path, 'name', path)}: {m.images.describe(m.prepare_image(path, alone=only_image(images)))}")
        if prompt is None:
            return
    from ..runtimes import interactive

    session = m.session(images if len(images) > 1 else images[0] if images else None)
    if prompt is not None:
        interactive.answer(session, prompt, sampling, say)
    else:
        interactive.run(session, sampling, say)
