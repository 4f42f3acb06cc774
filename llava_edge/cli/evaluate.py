"""``llava-edge drift`` and ``bench``: how far variants drift, how fast a bundle runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from . import options as o
from ._app import app, say


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
                                          "q4, tokens (reduced image tokens), all"),
    gate_limit: Optional[str] = typer.Option(None, "--gate-limit", help="Change gates' limits: GATE.LIMIT=VALUE, "
                                             "comma-separated (e.g. tokens.accuracy_drop_max=2); see docs/DRIFT.md"),
    record: bool = typer.Option(False, "--record", help="Write each pair's outcome into the bundle's manifest "
                                "(chat --explain shows it; the device profiles read it)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions"),
    max_tokens: int = typer.Option(32, "--max-tokens", help="Longest answer, in tokens"),
    kv_cache: str = typer.Option("f16", "--kv-cache", help="llama.cpp KV cache: f16 (its default, what devices "
                                 "run) | f32"),
    threads: int = typer.Option(0, "--threads", help="llama.cpp threads; 0: all cores"),
    image_tokens: Optional[int] = typer.Option(None, "--image-tokens", help="Tiled models (LLaVA-NeXT): measure "
                                               "every pair with at most this many positions a picture, against "
                                               "the full reference (one-tile models name reduced variants in "
                                               "--variants instead)"),
    pictures: Optional[str] = typer.Option(None, "--pictures", help="Pictures a prompt: each one-picture question "
                                           "is asked with each count, comma-separated, its own picture last after "
                                           "others of the set (default: 1,2,3 for models trained with several "
                                           "pictures a conversation, e.g. LLaVA-OneVision; else 1)"),
):
    """Accuracy drift of each vision/LLM variant pair against the Hugging Face model, with CI gates."""
    import tempfile

    from ..drift.run import drift_bundle

    with tempfile.TemporaryDirectory(prefix="llava-edge-drift-") as tmp:
        source = None
        if eval_file is None:  # the toy world's held-out questions, generated here
            from ..toy.data import write_eval_questions

            if limit is not None and limit < 1:
                raise UserError("--limit must be at least 1")
            eval_file, eval_format = write_eval_questions(tmp, n=limit or 50), "toy"
            source = f"toy held-out questions (seed 0, {limit or 50} generated)"
        _, failed = drift_bundle(bundle, reference, eval_file=eval_file, eval_format=eval_format,
                                 image_folder=image_folder, variants=variants, report=report, fail_on=fail_on,
                                 limit=limit, max_tokens=max_tokens, kv_cache=kv_cache, threads=threads,
                                 eval_source=source, gate_limit=gate_limit, record=record,
                                 image_tokens=image_tokens, pictures=pictures, log=say)
    if failed:
        raise typer.Exit(1)


@app.command("bench")
def bench(
    bundle: Path = typer.Argument(..., help="Bundle directory"),
    device: o.Device = "auto",
    variants: Optional[str] = typer.Option(None, "--variants", help="VISION:LLM pairs, comma-separated (a bare name: "
                                           "that variant with the default of the other kind); default: every "
                                           "portable variant once"),
    runs: int = typer.Option(5, "--runs", help="Timed runs per pair (medians are reported)"),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs first"),
    decode_tokens: int = typer.Option(32, "--decode-tokens", help="Tokens to decode per run"),
    image: Optional[Path] = typer.Option(None, "--image", help="Image to ask about (default: a rendered 640x480 "
                                         "JPEG)"),
    question: str = typer.Option("Describe the image in detail.", "--question"),
    threads: o.Threads = 0,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every run, the machine and versions here"),
):
    """Time preprocessing, vision encode, prefill, time to first token, decode and peak memory per variant."""
    from ..bench import BenchSettings, format_table, run_bench

    settings = BenchSettings(runs=runs, warmup=warmup, decode_tokens=decode_tokens, question=question,
                             threads=threads, device=device)
    report = run_bench(bundle, settings, variants, image=image, json_out=json_out, log=say)
    print(format_table(report))
    if json_out is not None:
        say(f"wrote {json_out}")
