"""``llava-edge serve``: the bundle over HTTP (OpenAI and Ollama APIs, a chat page at /)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from . import options as o
from ._app import app

API_KEY_ENV = "LLAVA_EDGE_API_KEY"


@app.command("serve")
def serve(
    bundle: o.Bundle = None,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs "
                             "--api-key or --insecure"),
    port: int = typer.Option(8080, "--port"),
    parallel: int = typer.Option(4, "--parallel", help="Requests answered at once, as sequences of one llama.cpp "
                                 "context (each with --ctx positions)"),
    queue: int = typer.Option(64, "--queue", help="Requests that may wait for a sequence; beyond, 503 with "
                              "Retry-After"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help=f"Bearer key clients must send (default: "
                                          f"${API_KEY_ENV})"),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without an API key"),
    cors: Optional[list[str]] = typer.Option(None, "--cors", help="Allow browser pages from this origin "
                                             "(repeatable); off by default"),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", help="Accept image file paths, only inside this "
                                             "directory"),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image URLs "
                                             "(size- and time-limited); refused by default"),
    frames: int = typer.Option(8, "--frames", help="Frames sampled from each video_url (LLaVA-OneVision; 1 to 64)"),
    max_body_mb: float = typer.Option(32, "--max-body-mb", help="Largest request body"),
    timeout: float = typer.Option(300, "--timeout", help="Seconds a request may take, queueing included"),
    grace: float = typer.Option(30, "--grace", help="Seconds in-flight answers get to finish on SIGTERM"),
    header_timeout: float = typer.Option(10, "--header-timeout", help="Seconds a request's head (line and "
                                         "headers) may take to arrive; the connection is closed after"),
    body_timeout: float = typer.Option(60, "--body-timeout", help="Seconds a request's body may take to arrive "
                                       "after its head; 408 after"),
    keep_alive: float = typer.Option(5, "--keep-alive", help="Seconds an idle keep-alive connection is kept"),
    max_connections: int = typer.Option(512, "--max-connections", help="Connections (and requests) at once; "
                                        "beyond, 503"),
    allow_host: Optional[list[str]] = typer.Option(None, "--allow-host", help="A Host name a loopback server "
                                                   "also answers (behind a reverse proxy; repeatable)"),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The name clients use (default: the "
                                             "bundle directory's name)"),
    device: o.Device = "auto",
    vision_variant: o.VisionVariant = None,
    image_tokens: o.ImageTokens = None,
    token_method: o.TokenMethod = None,
    max_tiles: o.MaxTiles = None,
    llm_variant: o.LlmVariant = None,
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context per conversation in tokens (default: the "
                                      "profile's)"),
    threads: o.Threads = 0,
    kv_cache: o.KvCache = "f16",
    temperature: o.Temperature = 0.0,
    top_p: o.TopP = 1.0,
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Default answer length limit when a "
                                             "request gives none (default: the context's room)"),
    seed: o.Seed = None,
    conv_mode: Optional[str] = typer.Option(None, "--conv-mode", help="Prompt in another conversation mode than "
                                            "the bundle's"),
    no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache", help="Neither load nor save KV caches on disk"),
    no_verify: bool = typer.Option(False, "--no-verify", help="Do not check the loaded files' sha256"),
    quiet: bool = typer.Option(False, "--quiet", help="No access log lines"),
):
    """Serve the model over HTTP: OpenAI (/v1/chat/completions) and Ollama (/api/chat) APIs, a chat page at /."""
    from ..errors import UserError
    from ..runtimes.pipeline import EdgeLLaVA, Sampling, resolve_bundle
    from ..runtimes.serve import ServeOptions, check_bind
    from ..runtimes.serve import serve as run_server
    from ..runtimes.serve.conversation import ImagePolicy
    from ..video import check_frames

    key = api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(host, key, insecure)
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, not {port}")
    if not 1 <= parallel <= 64:
        raise UserError(f"--parallel must be from 1 to 64, not {parallel}")
    if not 0 <= queue <= 100_000:
        raise UserError(f"--queue must be from 0 to 100000, not {queue}")
    for name, v in (("--timeout", timeout), ("--grace", grace), ("--max-body-mb", max_body_mb),
                    ("--header-timeout", header_timeout), ("--body-timeout", body_timeout),
                    ("--keep-alive", keep_alive)):
        if not 0 < v < 1e7:
            raise UserError(f"{name} must be a positive number, not {v}")
    if not 1 <= max_connections <= 1_000_000:
        raise UserError(f"--max-connections must be from 1 to 1000000, not {max_connections}")
    if image_dir is not None and not image_dir.is_dir():
        raise UserError(f"--image-dir {image_dir} is not a directory")
    Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens or 1, seed=seed)  # one-line errors
    path = resolve_bundle(bundle)
    options = ServeOptions(
        model_name=model_name or path.resolve().name, api_key=key, parallel=parallel, queue=queue,
        timeout_s=timeout, max_body_bytes=int(max_body_mb * (1 << 20)), cors=tuple(cors or ()),
        images=ImagePolicy(image_dir=image_dir, allow_remote=allow_remote_images, frames=check_frames(frames)),
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
        header_timeout_s=header_timeout, body_timeout_s=body_timeout, keep_alive_s=keep_alive,
        max_connections=max_connections, allow_hosts=tuple(allow_host or ()))

    def load():
        return EdgeLLaVA.load(path, device=device, vision_variant=vision_variant, llm_variant=llm_variant, n_ctx=ctx,
                              image_tokens=image_tokens, token_method=token_method, max_tiles=max_tiles,
                              threads=threads, kv_cache=kv_cache, prefix_cache=not no_prefix_cache, conv_mode=conv_mode,
                              verify=not no_verify, parallel=parallel)

    run_server(options, load, host=host, port=port, grace_s=grace, log_requests=not quiet)
