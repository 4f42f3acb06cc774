"""The training loop, readable top to bottom, on Hugging Face accelerate.

accelerate supplies the distributed engine (DDP, FSDP, DeepSpeed ZeRO-2/3,
chosen by ``accelerate launch --config_file train/configs/...`` or plain
``torchrun``), mixed precision, gradient accumulation and checkpoint state.
This file adds only what LLaVA's recipe needs on top: a global batch that stays
the same for any number of processes, the modality-grouped order of
``sampler.py``, exact resumption, and a loss log (CSV + PNG).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from llava_edge.errors import UserError

from .data import LlavaDataset, collate
from .presets import StageConfig
from .sampler import EpochSampler

STATE_DIR = "checkpoint-last"


# --- bf16 policy -----------------------------------------------------------------------------
# LLaVA loads the model with torch_dtype=bf16 under --bf16 and lets DeepSpeed keep fp32 master
# copies of what trains. llava-edge decides per engine (only on a GPU; on CPU all is fp32):
#
# - single GPU, DDP, FSDP2 ("plain"): frozen weights stay bf16 (half the memory, no per-step
#   casts), trainable parameters are upcast to fp32 and the forward runs in bf16 (autocast;
#   under FSDP2 its MixedPrecisionPolicy casts the fp32 shards to bf16 for compute). AdamW on
#   bf16 weights would lose updates (8-bit mantissa: a 2e-5 step vanishes on a 1e-2 weight),
#   and plain DDP has no master copy of its own; upcasting after a bf16 load starts from the
#   same values as LLaVA's fp32 master. peft already keeps LoRA adapters fp32 on a bf16 base.
#   FSDP2 shards parameter by parameter, so bf16 and fp32 parameters may sit in one unit
#   (seen working with train/configs/fsdp.yaml on an H200, docs/BENCHMARKS.md).
# - FSDP1: its flat parameters need one dtype per unit: load fp32 and let its mixed-precision
#   policy compute in bf16 (the sharded fp32 copy is divided by the number of GPUs).
# - DeepSpeed ZeRO-2/3: load bf16 as LLaVA does; DeepSpeed's bf16 mode casts the module to bf16
#   itself and its ZeRO optimizer holds (partitioned) fp32 master weights of the trainable ones.

def precision_engine() -> str:
    """'cpu', 'deepspeed', 'fsdp1' or 'plain' (one GPU, DDP, FSDP2), from the launcher's environment."""
    import os

    import torch
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if not torch.cuda.is_available():
        return "cpu"
    if PartialState().distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    # PartialState reports FSDP as MULTI_GPU (only the Accelerator upgrades it): read what the launcher set
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION", "1") == "1":
        return "fsdp1"
    return "plain"


def load_dtype(cfg: StageConfig) -> str:
    """The dtype to load the checkpoint in for this stage config and launcher (policy above)."""
    if not cfg.bf16 or precision_engine() in ("cpu", "fsdp1"):
        return "float32"
    return "bfloat16"


def upcast_trainable(model, cfg: StageConfig) -> int:
    """fp32 for every parameter that trains, on a bf16-loaded model outside DeepSpeed; returns how many."""
    import torch

    if load_dtype(cfg) != "bfloat16" or precision_engine() == "deepspeed":
        return 0
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def _accumulation(cfg: StageConfig, world: int) -> int:
    micro = cfg.per_device_batch * world
    if cfg.global_batch % micro:
        raise UserError(
            f"global batch {cfg.global_batch} is not a multiple of per-device batch {cfg.per_device_batch} "
            f"x {world} processes"
        )
    return cfg.global_batch // micro


def train(model, param_groups: list[dict], dataset: LlavaDataset, cfg: StageConfig, output: Path, pad_id: int,
          resume: bool = False, progress: bool = True, stop_after: int = 0, log=print, checkpoint: bool = True):
    """Run the stage; returns (accelerator, prepared model). Only the main process writes files.

    The model comes back as ``accelerator.prepare`` made it (DDP/FSDP/DeepSpeed engine):
    gather its weights with ``accelerator.get_state_dict(model)`` (under ZeRO-3 that needs
    the engine, not the unwrapped module) and ``accelerator.unwrap_model(model)`` for the rest.
    ``stop_after`` > 0 saves a checkpoint at that step and stops, for jobs with a time
    limit: ``--resume`` continues exactly where it stopped. ``checkpoint=False`` saves no
    state at all (benchmarks).
    """
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import get_cosine_schedule_with_warmup

    # without a GPU, torchrun's processes meet over gloo only when accelerate is told it runs on CPU
    cpu = not torch.cuda.is_available()
    accum = _accumulation(cfg, PartialState(cpu=cpu).num_processes)  # the world size fixes the accumulation
    mixed = "bf16" if cfg.bf16 and torch.cuda.is_available() else "no"  # autocast (plain/DDP), FSDP or DeepSpeed bf16
    if cfg.bf16 and mixed == "no":
        log("bf16 asked for but no GPU: training in fp32")
    # The schedule counts global optimizer steps; accelerate's default would step it once per process.
    acc = Accelerator(gradient_accumulation_steps=accum, mixed_precision=mixed, cpu=cpu,
                      step_scheduler_with_optimizer=False)
    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed)
    output.mkdir(parents=True, exist_ok=True)

    sampler = EpochSampler(dataset.lengths(), cfg.global_batch, cfg.seed, cfg.group_by_modality)
    loader = DataLoader(dataset, batch_size=cfg.per_device_batch, sampler=sampler,
                        collate_fn=lambda b: collate(b, pad_id, dataset.family), num_workers=cfg.dataloader_workers,
                        drop_last=False)
    steps_per_epoch = math.ceil(len(dataset) / cfg.global_batch)
    total = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    if cfg.gradient_checkpointing:
        # transformers 5.24's name for it (gradient_checkpointing_enable is its deprecated alias)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    optimizer = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total), total)
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)

    step, epoch, done_in_epoch = 0, 0, 0
    state = output / STATE_DIR
    if resume:
        if not (state / "progress.json").is_file():
            raise UserError(f"--resume: no checkpoint in {state}")
        acc.load_state(str(state))
        p = json.loads((state / "progress.json").read_text())
        step, epoch, done_in_epoch = p["step"], p["epoch"], p["micro_batches_in_epoch"]
        log(f"resuming at step {step} (epoch {epoch}, {done_in_epoch} micro-batches in)")

    log_file = output / "loss.csv"
    if acc.is_main_process and not (resume and log_file.is_file()):
        with open(log_file, "w", newline="") as f:
            csv.writer(f).writerow(["step", "epoch", "loss", "lr", "samples", "seconds"])
    bar = _progress(total, step, progress and acc.is_local_main_process, log)
    t0, window = time.time(), []
    model.train()
    while step < total:
        sampler.set_epoch(epoch)
        batches = acc.skip_first_batches(loader, done_in_epoch) if done_in_epoch else loader
        for batch in batches:
            with acc.accumulate(model):
                out = model(**batch)
                loss = out.loss
                if not bool((batch["labels"] != -100).any()):
                    # every label ignored (records LLaVA's label rule zeroes): the mean over no tokens is NaN and
                    # its gradient would poison the weights; a zero loss tied to the graph keeps the step (and
                    # every rank's backward) with zero gradients
                    loss = out.logits.sum() * 0
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step() if acc.sync_gradients else None
                optimizer.zero_grad()
            done_in_epoch += 1
            window.append(loss.detach())
            if not acc.sync_gradients:
                continue
            step += 1
            mean = acc.reduce(torch.stack(window).mean(), reduction="mean").item()
            window = []
            if acc.is_main_process:
                with open(log_file, "a", newline="") as f:
                    csv.writer(f).writerow([step, epoch, f"{mean:.6f}", f"{scheduler.get_last_lr()[0]:.3e}",
                                            step * cfg.global_batch, f"{time.time() - t0:.3f}"])
            bar.update(1, loss=mean)
            if checkpoint and (step % cfg.save_steps == 0 or step == total or step == stop_after):
                _save_state(acc, state, step, epoch, done_in_epoch)
            if step >= total or step == stop_after:
                break
        else:
            epoch, done_in_epoch = epoch + 1, 0
            continue
        break
    bar.close()
    if stop_after and step == stop_after < total:
        log(f"stopped at step {step} of {total}; continue with --resume")
        return acc, None
    acc.wait_for_everyone()
    if acc.is_main_process:
        plot_loss(log_file, output / "loss.png")
        (output / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return acc, model


def _save_state(acc, state: Path, step: int, epoch: int, done_in_epoch: int) -> None:
    acc.save_state(str(state))
    if acc.is_main_process:
        (state / "progress.json").write_text(
            json.dumps({"step": step, "epoch": epoch, "micro_batches_in_epoch": done_in_epoch})
        )


class _progress:
    """A tqdm bar on a terminal; in a log file, one line every tenth of the run instead."""

    def __init__(self, total: int, start: int, enabled: bool, log=print):
        import sys

        self.bar, self.total, self.step, self.log = None, total, start, log
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(self, n: int, loss: float) -> None:
        self.step += n
        if self.bar:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif self.enabled and (self.step % max(1, self.total // 10) == 0 or self.step == self.total):
            self.log(f"step {self.step}/{self.total}: loss {loss:.4f}")

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def plot_loss(csv_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(csv_file)))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(csv_file.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
