"""``llava-edge export``, ``quantize`` and ``info``: making and reading bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import options as o
from ._app import app, say


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
    trt_max_batch: Optional[int] = typer.Option(None, "--trt-max-batch", help="TensorRT: largest batch of tiles "
                                                "(default: 8, or every tile of the model's largest picture)"),
    trt_opt_batch: int = typer.Option(1, "--trt-opt-batch", help="TensorRT: the batch the kernels are tuned for"),
    int8: bool = typer.Option(False, "--int8", help="TensorRT: an INT8 engine (needs a calibration cache)"),
    calibration_cache: Optional[Path] = typer.Option(None, "--calibration-cache", help="TensorRT INT8 calibration "
                                                     "cache (default: BUNDLE/tensorrt.int8.calib)"),
    trt_workspace_mib: Optional[int] = typer.Option(None, "--trt-workspace-mib", help="TensorRT builder workspace"),
    set_default: bool = typer.Option(False, "--set-default", help="Make this the bundle `chat` uses by default"),
    conv_mode: Optional[str] = typer.Option(None, "--conv-mode", help="The bundle's conversation mode (default: "
                                            "the checkpoint's; see README, 'Conversation modes')"),
    no_wait: o.NoWait = False,
    max_tiles: o.MaxTiles = None,
):
    """Split a LLaVA checkpoint into the files an edge device runs, under one manifest.json."""
    from ..checkpoint import resolve_model
    from ..export.bundle import ExportOptions, TensorRTOptions, check_out_dir, export_bundle, terminal_progress

    trt = TensorRTOptions(max_batch=trt_max_batch, opt_batch=trt_opt_batch, int8=int8,
                          calibration_cache=calibration_cache, workspace_mib=trt_workspace_mib)
    ExportOptions(target, dtype, llm_outtype, trt, mmproj_outtype, conv_mode, max_tiles=max_tiles).validate()
    check_out_dir(out)  # before a conversion writes anything
    ckpt = resolve_model(model, vision=vision, cache_dir=cache_dir, log=say)
    export_bundle(ckpt, out, target, dtype, llm_outtype, mmproj_outtype=mmproj_outtype, tensorrt=trt,
                  conv_mode=conv_mode, wait=not no_wait, max_tiles=max_tiles, log=say,
                  progress=terminal_progress(say))
    if set_default:
        _set_default(out)

def _set_default(bundle: Path) -> None:
    from .. import atomic
    from ..runtimes.pipeline import default_bundle_file

    atomic.write_text(default_bundle_file(), str(bundle.resolve()) + "\n")
    say(f"default bundle: {bundle.resolve()}")


@app.command("quantize")
def quantize(
    bundle: Path = typer.Argument(..., help="Bundle directory (from `llava-edge export`)"),
    llm: Optional[str] = typer.Option(None, "--llm", help="GGUF types, comma-separated: q8_0, q6_k, q5_k_m, q5_k_s, "
                                      "q5_1, q5_0, q4_k_m, q4_k_s, q4_1, q4_0, iq4_nl, iq4_xs, q3_k_l, q3_k_m, "
                                      "q3_k_s, q2_k"),
    vision: Optional[str] = typer.Option(None, "--vision", help="Vision ONNX types, comma-separated: fp16, int8 "
                                         "(dynamic), int8-static (QDQ, calibrated), int4 (weight-only)"),
    calib_images: Optional[Path] = typer.Option(None, "--calib-images", help="Folder of calibration images for "
                                                "int8-static and TensorRT (needed for a real model; toy models "
                                                "default to synthetic scenes)"),
    calib_count: int = typer.Option(32, "--calib-count", help="Calibration images to use (the first N by name)"),
    threads: int = typer.Option(0, "--threads", help="llama.cpp quantizer threads; 0: all cores"),
    block_size: int = typer.Option(32, "--block-size", help="int4 block size: 16 | 32 | 64 | 128 | 256"),
    optimize: Optional[bool] = typer.Option(None, "--optimize/--no-optimize", help="Fuse the vision graph for "
                                            "onnxruntime (attention, LayerNorms, GELUs) before quantizing; default: "
                                            "int8 and int4 fused, fp16 and int8-static (TensorRT's forms) not"),
    trt_calib_cache: bool = typer.Option(False, "--trt-calib-cache", help="Also write TensorRT's INT8 calibration "
                                         "cache for `export --target tensorrt --int8` (needs TensorRT)"),
    image_tokens: Optional[str] = typer.Option(None, "--image-tokens", help="Reduced-token vision variants: token "
                                               "counts, comma-separated (e.g. 144,64); --vision types (default "
                                               "fp32) are made for each, named TYPE-METHODK (int8-pool144)"),
    token_method: str = typer.Option("pool", "--token-method", help="How tokens are reduced, comma-separated: pool "
                                     "(average the patch grid) | dominant (class-token attention + merged context)"),
    projector: Optional[Path] = typer.Option(None, "--projector", help="A projector fine-tuned for the reduced "
                                             "tokens (train stage2 --image-tokens K --tune projector): variants "
                                             "named ...-tuned"),
    no_wait: o.NoWait = False,
):
    """Add quantized variants (llama.cpp GGUF types, int8/int4/fp16 ONNX) to a bundle; finished ones are kept."""
    from ..quantize.command import quantize_bundle

    outcomes = quantize_bundle(bundle, llm, vision, calib_images=calib_images, calib_count=calib_count,
                               threads=threads, block_size=block_size, optimize=optimize,
                               trt_calib_cache=trt_calib_cache, image_tokens=image_tokens,
                               token_method=token_method, projector=projector, wait=not no_wait, log=say)
    for out in outcomes:
        state = "new" if out.made else "up to date"
        say(f"  {out.kind:8} {out.name:16} {out.file:28} {out.size / 1e6:8.2f} MB  {state}"
            f"{'  ' + out.note if out.note and out.made else ''}")


@app.command("info")
def info(
    bundle: Path = typer.Argument(..., help="Bundle directory"),
    verify: bool = typer.Option(False, "--verify", help="Hash every file the manifest lists and compare with its "
                                "sha256 (exit 1 naming the files that differ)"),
):
    """What a bundle holds: its manifest's fields and every variant."""
    from .. import bundle_info, manifest

    m = manifest.read(bundle)
    bundle_info.print_info(bundle, m)
    if manifest.is_incomplete(bundle):
        say(f"note: an export into {bundle} did not finish; run it again to finish it (the table shows the last "
            "finished state)")
    if verify:
        bad = bundle_info.verify_files(bundle, m)
        if bad:
            say(f"error: {len(bad)} file(s) do not match the manifest: {'; '.join(bad)}")
            raise typer.Exit(1)
        say(f"verified: every file of {bundle} matches its sha256 in the manifest")
