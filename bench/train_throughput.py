"""Training throughput of llava-edge's own loop at real model size, on LLaVA-shaped samples.

Builds a random-weight model of a real preset (``llava_edge.toy.model``: LLaVA-1.5-7B is
CLIP ViT-L/14-336 + a 4096-wide, 32-layer Llama, 576 image tokens) directly on the device
in the dtype ``train/loop.py``'s bf16 policy loads it in (no 14 GB checkpoint on disk), writes
synthetic LLaVA records (an image at the tower's resolution + text of a chosen length),
and runs ``train.loop.train`` for a few optimizer steps with the preset's recipe (bf16,
tf32, gradient checkpointing, LoRA r=128 for stage 2). Samples/s are timed from the loop's
own per-step log, skipping warm-up steps, and compared with LLaVA's published wall clock:

- stage 1 of LLaVA-1.5-7B: 558K samples in ~3.5 h on 8xA100 -> 5.5 samples/s per GPU;
- stage 2 of LLaVA-1.5-7B: 665K samples in ~10 h on 8xA100 -> 2.3 samples/s per GPU
  (full fine-tuning; LLaVA's LoRA run uses the same data and hardware).

    python bench/train_throughput.py --preset llava-1.5-7b --runs s1,s2lora --out result.json
    python bench/train_throughput.py --preset toy --runs s1,s2lora --steps 3 --batch-s1 2 --batch-s2 2  # CPU smoke

Each run is guarded: a failure (out of memory, say) is recorded in the JSON and the next
run goes on. The JSON is rewritten after every run, so a time-boxed caller keeps what finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

LLAVA_REFERENCE = {  # samples/s per GPU from LLaVA-1.5's reported wall clock on 8xA100
    "s1": 558_000 / (3.5 * 3600) / 8,
    "s2": 665_000 / (10 * 3600) / 8,
}
WORDS = ("the red circle is at the top left and a small blue square sits near the bottom right corner "
         "while two green triangles are in the middle of the picture").split()


def _text(tok, n_tokens: int, offset: int = 0) -> str:
    """Toy-world words, about ``n_tokens`` tokens long for ``tok``."""
    words, i = [], offset
    while len(tok.encode(" ".join(words), add_special_tokens=False)) < n_tokens:
        words.append(WORDS[i % len(WORDS)])
        i += 1
    return " ".join(words)


def write_records(folder: Path, tok, stage: str, n: int, image_size: int, text_tokens: int) -> Path:
    """``n`` LLaVA records over 8 random-noise images; stage 1 captions, stage 2 one QA turn."""
    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(
            folder / "images" / f"{i}.png")
    records = []
    for i in range(n):
        if stage == "s1":
            turns = [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                     {"from": "gpt", "value": _text(tok, text_tokens, i)}]
        else:
            q = max(4, text_tokens // 4)
            turns = [{"from": "human", "value": "<image>\n" + _text(tok, q, i) + "?"},
                     {"from": "gpt", "value": _text(tok, text_tokens - q, i + 3)}]
        records.append({"id": str(i), "image": f"images/{i % 8}.png", "conversations": turns})
    path = folder / f"{stage}.json"
    path.write_text(json.dumps(records))
    return path


def _stage_config(stage: str, batch: int, steps: int, grad_ckpt: bool | None, workers: int):
    from llava_edge.train.presets import get_preset

    cfg = get_preset("llava-1.5-7b").stage1 if stage == "s1" else get_preset("llava-1.5-7b-lora").stage2
    if stage == "s2":
        cfg = cfg.with_(lora=False, lr=2e-5)
    return cfg.with_(global_batch=batch, per_device_batch=batch, max_steps=steps, warmup_ratio=0.0,
                     gradient_checkpointing=grad_ckpt, dataloader_workers=workers)


def build_model(config, cfg, device: str):
    """The model straight on ``device``, in the dtype the bf16 policy loads checkpoints in."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from llava_edge.train.loop import load_dtype

    dtype = getattr(torch, load_dtype(cfg))
    torch.manual_seed(0)
    with torch.device(device):
        return LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")


def run_one(name: str, skeleton: Path, config, tok, work: Path, args) -> dict:
    import torch
    from accelerate.state import AcceleratorState

    from llava_edge.checkpoint import DEFAULT_RECIPE, Checkpoint
    from llava_edge.templates import get_template
    from llava_edge.train import model_setup
    from llava_edge.train.data import LlavaDataset, load_records
    from llava_edge.train.loop import train, upcast_trainable

    stage, _, variant = name.partition(":")
    lora = stage == "s2lora"
    base = "s1" if stage == "s1" else "s2"
    batch = args.batch_s1 if base == "s1" else args.batch_s2
    text_tokens = args.text_tokens_s1 if base == "s1" else args.text_tokens_s2
    cfg = _stage_config(base, batch, args.steps, False if variant == "nockpt" else None, args.workers)
    if lora:
        cfg = cfg.with_(lora=True, lr=2e-4, projector_lr=2e-5)
    ckpt = Checkpoint(skeleton, json.loads((skeleton / "config.json").read_text()), dict(DEFAULT_RECIPE))
    data = write_records(work / name.replace(":", "_"), tok, base, batch * args.steps,
                         ckpt.vision_config["image_size"], text_tokens)
    records, _ = load_records(data, data.parent)
    ds = LlavaDataset(records, get_template("plain" if base == "s1" else "vicuna_v1"), tok,
                      config.image_token_index, ckpt.num_image_tokens(), ckpt.image_spec(), cfg.max_length)
    seq = sum(abs(n) for n in ds.lengths()) / len(ds)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.time()
    m = build_model(config, cfg, dev)
    build_s = time.time() - t_build
    if base == "s1":
        groups = model_setup.setup_stage1(m)
        for g in groups:
            g["lr"] = cfg.lr
    else:
        m, groups = model_setup.setup_stage2(
            m, cfg.lr, dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout) if lora else None,
            cfg.projector_lr)
    upcast_trainable(m, cfg)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    total = sum(p.numel() for p in m.parameters())
    out = work / f"out_{name.replace(':', '_')}"
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator per run
    acc, model = train(m, groups, ds, cfg, out, tok.pad_id, progress=False, log=lambda _: None,
                       checkpoint=False)
    import csv

    rows = list(csv.DictReader(open(out / "loss.csv")))
    secs = [float(r["seconds"]) for r in rows]
    w = min(args.warmup, len(secs) - 1)
    timed_steps = len(secs) - w
    elapsed = secs[-1] - (secs[w - 1] if w else 0.0)
    sps = timed_steps * cfg.global_batch / elapsed
    # measured and derived numbers are recorded unrounded, so that one can be recomputed from the others at
    # any speed (a ratio rounded to 2 decimals is off by up to 4% near 0.12x); rounding is for display only
    result = dict(
        run=name, stage=base, lora=lora, gradient_checkpointing=cfg.gradient_checkpointing, bf16=cfg.bf16,
        tf32=cfg.tf32, per_device_batch=cfg.per_device_batch, global_batch=cfg.global_batch,
        steps=len(secs), timed_steps=timed_steps, seconds_timed=elapsed,
        mean_tokens_per_sample=seq, samples_per_s=sps,
        tokens_per_s=sps * seq, build_seconds=build_s,
        params_total=total, params_trainable=trainable,
        losses=[float(r["loss"]) for r in rows], step_seconds=secs,
        llava_reference_samples_per_s=LLAVA_REFERENCE[base],
        ratio_to_llava=sps / LLAVA_REFERENCE[base],
    )
    if dev == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del acc, model, m, groups
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return result


def _display(value):
    """A float to 4 significant digits for the printed summary line (the JSON keeps full precision)."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def environment() -> dict:
    import torch
    import transformers

    env = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__)
    for mod in ("accelerate", "peft", "deepspeed"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as absent
            env[mod] = None
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        env["device"] = "cpu"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llava-1.5-7b", help="model shape (llava_edge.toy.model.SHAPES)")
    ap.add_argument("--layers", type=int, default=None, help="shorten the language model")
    ap.add_argument("--runs", default="s1,s2lora", help="comma list of s1, s2, s2lora, each optionally :nockpt")
    ap.add_argument("--batch-s1", type=int, default=32, help="per-GPU batch, stage 1 (LLaVA: 32)")
    ap.add_argument("--batch-s2", type=int, default=16, help="per-GPU batch, stage 2 (LLaVA: 16)")
    ap.add_argument("--text-tokens-s1", type=int, default=32, help="caption tokens per sample (BLIP captions: ~30)")
    ap.add_argument("--text-tokens-s2", type=int, default=256, help="conversation tokens per sample")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    ap.add_argument("--workers", type=int, default=4, help="data loader workers")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (rewritten after every run)")
    args = ap.parse_args(argv)

    import torch

    from llava_edge.toy.model import write_skeleton

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    report = {"environment": environment(), "preset": args.preset, "layers": args.layers, "runs": []}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        skeleton = work / "model"
        config = write_skeleton(skeleton, args.preset, args.layers)
        from llava_edge.tokenizer import Tokenizer

        tok = Tokenizer(skeleton)
        for name in [r.strip() for r in args.runs.split(",") if r.strip()]:
            t0 = time.time()
            try:
                res = run_one(name, skeleton, config, tok, work, args)
            except Exception as e:  # noqa: BLE001 - one run's failure must not stop the others
                res = {"run": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       "traceback": traceback.format_exc()[-3000:]}
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            res["wall_seconds"] = round(time.time() - t0, 1)
            report["runs"].append(res)
            short = {k: _display(v) for k, v in res.items() if k not in ("losses", "step_seconds", "traceback")}
            print(json.dumps(short), flush=True)
            if args.out:
                tmp = args.out.with_name(args.out.name + ".tmp")
                tmp.write_text(json.dumps(report, indent=2))
                tmp.replace(args.out)
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
