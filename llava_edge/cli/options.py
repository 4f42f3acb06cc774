"""Options several commands take, defined once: device and variants, sampling, training hyperparameters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# -- which bundle, device and variants (chat, bench) ----------------------------------------------------------
Bundle = Annotated[Optional[Path], typer.Option("--bundle", help="Default: $LLAVA_EDGE_BUNDLE or the registered "
                                                                 "default")]
Device = Annotated[str, typer.Option("--device", help="Device profile: auto (detect) | cpu | laptop-gpu | jetson")]
VisionVariant = Annotated[Optional[str], typer.Option("--vision-variant", help="Vision variant by name (fp32, fp16, "
                                                      "int8, int8-static, int4, trt-fp16...); default: the profile's")]
ImageTokens = Annotated[Optional[int], typer.Option("--image-tokens", help="One-tile models (LLaVA-1.5): use a "
                                                   "reduced-token vision variant giving this many image positions "
                                                   "(made by quantize --image-tokens), never chosen unless asked "
                                                   "for. Tiled models (LLaVA-NeXT): at most this many positions a "
                                                   "picture, its features scaled bilinearly to fit")]
TokenMethod = Annotated[Optional[str], typer.Option("--token-method", help="With --image-tokens: pool | dominant "
                                                   "(default: a tuned projector, then the bundle's drift record, then pool)")]
MaxTiles = Annotated[Optional[int], typer.Option("--max-tiles", help="LLaVA-NeXT: the most grid tiles a picture "
                                                "may take (besides its whole-picture tile); a picture needing more "
                                                "is refused: bounds the vision cost on small devices")]
LlmVariant = Annotated[Optional[str], typer.Option("--llm-variant", help="Language-model variant by name (f32, f16, "
                                                   "q8_0, q4_k_m...); default: the profile's")]
Threads = Annotated[int, typer.Option("--threads", help="llama.cpp threads; 0: the profile's (one per physical "
                                                        "core)")]
KvCache = Annotated[str, typer.Option("--kv-cache", help="llama.cpp's KV cache: f16 (the default; its flash "
                                      "attention on) or f32 (flash attention off: on a CPU it decodes long contexts "
                                      "up to 2.5x faster and prefills them up to 1.4x slower; docs/RUNTIME.md)")]

# -- writing a bundle (export, quantize) -------------------------------------------------------------------------
NoWait = Annotated[bool, typer.Option("--no-wait", help="When another export or quantize is writing the bundle, stop "
                                                        "with an error instead of waiting for it")]

# -- sampling (chat) --------------------------------------------------------------------------------------------
Temperature = Annotated[float, typer.Option("--temperature", help="0 is greedy and deterministic")]
TopP = Annotated[float, typer.Option("--top-p")]
MaxTokens = Annotated[int, typer.Option("--max-tokens")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="-1 or none: random")]

# -- training hyperparameters (train stage1, stage2): each overrides the preset's ------------------------------
Preset = Annotated[str, typer.Option("--preset", help="Hyperparameters to start from: llava-1.5-7b, "
                                                      "llava-1.5-7b-lora, toy, ...")]
Lr = Annotated[Optional[float], typer.Option("--lr")]
GlobalBatch = Annotated[Optional[int], typer.Option("--global-batch")]
PerDeviceBatch = Annotated[Optional[int], typer.Option("--per-device-batch")]
Epochs = Annotated[Optional[float], typer.Option("--epochs")]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps")]
MaxLength = Annotated[Optional[int], typer.Option("--max-length")]
SaveSteps = Annotated[Optional[int], typer.Option("--save-steps")]
VideoFolder = Annotated[Optional[Path], typer.Option(
    "--video-folder", help="Where video records' files are (LLaVA-NeXT's --video_folder); default: --image-folder")]
FramesUpbound = Annotated[Optional[int], typer.Option(
    "--frames-upbound", help="A video record's most frames (LLaVA-NeXT's --frames_upbound: one a second up to this; "
    "default 32)")]
TrainSeed = Annotated[Optional[int], typer.Option("--seed")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT/checkpoint-last")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip bad records (and count them) instead of stopping")]
StopAfter = Annotated[int, typer.Option("--stop-after", help="Checkpoint and stop at this step (continue later with "
                                                             "--resume)")]
