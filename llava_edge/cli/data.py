"""``llava-edge data generate|captions`` and ``llava-edge eval judge``: the paper's LLM-in-the-loop tools."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from ._app import data_app, eval_app, say

KEY_ENV = "OPENAI_API_KEY"


def _llm(url: Optional[str], model: Optional[str], bundle: Optional[Path], parallel: int, what: str,
         timeout: float = 120.0, retries: int = 5):
    """The LLM: an OpenAI-compatible endpoint (--llm/--judge URL --model) or a bundle in this process."""
    from ..datagen.llm import Endpoint, InProcess

    if (url is None) == (bundle is None):
        raise UserError(f"give the {what} as an OpenAI-compatible URL with its model name, or as --bundle, "
                        "one of the two")
    if url is not None:
        if not model:
            raise UserError(f"the {what} URL needs its model name")
        if not 0 < timeout <= 86400 or not 0 <= retries <= 100:
            raise UserError("--request-timeout must be from 0 to 86400 s and --retries from 0 to 100")
        return Endpoint(url, model, api_key=os.environ.get(KEY_ENV), timeout_s=timeout, max_retries=retries)
    return InProcess(bundle, parallel=parallel)


def _progress(label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), transient=True)
    tasks: dict = {}

    def update(*args):
        name, done, total = (label, *args) if len(args) == 2 else args
        if name not in tasks:
            tasks[name] = bar.add_task(name, total=total)
        bar.update(tasks[name], completed=done, total=total)
    return bar, update


@data_app.command("generate")
def generate(
    out: Path = typer.Option(..., "--out", help="LLaVA JSON to write (the journal goes beside it: OUT.journal.jsonl)"),
    captions: Optional[Path] = typer.Option(None, "--captions", help="COCO captions JSON"),
    instances: Optional[Path] = typer.Option(None, "--instances", help="COCO instances JSON (boxes)"),
    input: Optional[Path] = typer.Option(None, "--input", help="Instead of COCO: JSONL of {image, captions, boxes}"),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder: pictures without a file are skipped"),
    kinds: str = typer.Option("conversation,detail,reasoning", "--kinds"),
    llm: Optional[str] = typer.Option(None, "--llm", help="OpenAI-compatible base URL (llava-edge serve, llama.cpp's "
                                      f"server, a hosted API with ${KEY_ENV})"),
    model: Optional[str] = typer.Option(None, "--model", help="The model name at --llm"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Instead of --llm: a bundle's language model, here"),
    parallel: int = typer.Option(4, "--parallel", help="Requests at once"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N pictures"),
    seed: int = typer.Option(0, "--seed"),
    temperature: float = typer.Option(0.7, "--temperature"),
    max_tokens: int = typer.Option(1024, "--max-tokens"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt files (KIND/system.txt, "
                                           "KIND/examples.json) instead of the built-in ones"),
    show_prompts: bool = typer.Option(False, "--show-prompts", help="Print the prompts of --kinds and exit"),
    request_timeout: float = typer.Option(120, "--request-timeout", help="Seconds one request may take"),
    retries: int = typer.Option(5, "--retries", help="Retries of a request that timed out or got 429/5xx, with "
                                "exponential backoff"),
):
    """Instruction data (conversation, detail, reasoning) written by a text-only LLM from captions and boxes."""
    from ..datagen import generate as gen
    from ..datagen import kinds as K
    from ..datagen import sources

    wanted = [k.strip() for k in kinds.split(",") if k.strip()]
    chosen = K.load_prompts(wanted, prompts)
    if show_prompts:
        for k, p in chosen.items():
            print(f"=== {k}: system ===\n{p.system}\n")
            for i, (ctx, resp) in enumerate(p.examples, 1):
                print(f"=== {k}: example {i}, context ===\n{ctx}\n=== {k}: example {i}, response ===\n{resp}\n")
        return
    if not 1 <= parallel <= 256:
        raise UserError(f"--parallel must be from 1 to 256, not {parallel}")
    pictures = sources.read_jsonl(input) if input else sources.read_coco(captions, instances)
    if limit is not None:
        pictures = pictures[: max(0, limit)]
    client = _llm(llm, model, bundle, parallel, "LLM", request_timeout, retries)
    bar, update = _progress("generating")
    try:
        with bar:
            summary = gen.generate(pictures, chosen, client, out, parallel=parallel, seed=seed,
                                   max_tokens=max_tokens, temperature=temperature, images=images, progress=update)
    finally:
        client.close()
    for row in summary.table():
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(row["rejected_by_reason"].items()))
        say(f"{row['kind']}: {row['requested']} requested, {row['kept']} kept, {row['rejected']} rejected"
            + (f" ({reasons})" if reasons else "") + f", {row['duplicates']} duplicates, {row['failed']} failed; "
            f"tokens {row['tokens_in']} in, {row['tokens_out']} out")
    say(f"-> {out}")
    for f in summary.failures[:5]:
        say(f"failed (retried on the next run): {f}")


@data_app.command("captions")
def captions_cmd(
    input: Path = typer.Option(..., "--in", help="COCO captions JSON, or JSON/JSONL of {image, caption}"),
    out: Path = typer.Option(..., "--out", help="LLaVA stage-1 JSON to write"),
    seed: int = typer.Option(0, "--seed", help="Which instruction each record draws"),
):
    """Image-caption pairs as LLaVA's stage-1 data (a brief-description instruction, <image>, the caption)."""
    from ..datagen.captions import write_stage1

    n = write_stage1(input, out, seed)
    say(f"{n} records -> {out}")


@eval_app.command("judge")
def judge(
    bundle: Path = typer.Option(..., "--bundle", help="The bundle to evaluate"),
    questions: Path = typer.Option(..., "--questions", help="Questions JSONL (question_id, image, text, category)"),
    references: Path = typer.Option(..., "--references", help="Reference answers JSONL (question_id, text)"),
    context: Optional[Path] = typer.Option(None, "--context", help="Context JSONL (image, caption) shown to the "
                                           "judge"),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of the questions' images"),
    judge_url: Optional[str] = typer.Option(None, "--judge", help="OpenAI-compatible base URL of the judge"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model"),
    judge_bundle: Optional[Path] = typer.Option(None, "--judge-bundle", help="Instead of --judge: a bundle's "
                                                "language model, here"),
    report: Path = typer.Option(..., "--report", help="Folder for the journals and the report"),
    parallel: int = typer.Option(4, "--parallel"),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Longest answer of the bundle"),
    request_timeout: float = typer.Option(120, "--request-timeout", help="Seconds one judge request may take"),
    retries: int = typer.Option(5, "--retries", help="Retries of a judge request (timeouts, 429/5xx)"),
):
    """LLaVA-Bench-style evaluation: the bundle answers, a text-only judge rates it against reference answers."""
    from .. import judge as J
    from ..datagen.llm import InProcess

    items = J.load_bench(questions, references, context)
    judge_llm = _llm(judge_url, judge_model, judge_bundle, parallel, "judge", request_timeout, retries)
    answerer = InProcess(bundle, parallel=parallel)
    bar, update = _progress("")
    try:
        with bar:
            summary = J.run(items, answerer, judge_llm, report, images=images, parallel=parallel,
                            max_tokens=max_tokens, progress=update)
    finally:
        answerer.close()
        judge_llm.close()
    print((report / "report.md").read_text())
    for f in summary["failed"][:5]:
        say(f"not judged (retried on the next run): {f}")
    say(json.dumps(summary["overall"]))
