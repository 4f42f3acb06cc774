"""The LLaVA paper's ablations, on the toy: stage 2 without stage 1, and each
instruction category alone against the mix.

Every variant starts from the same pretrained base (``toy build``'s DIR/base),
trains stage 2 for the same number of optimizer steps, and is scored on the same
held-out questions. Results go to DIR/ablation.json and DIR/ablation.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from .. import atomic
from .data import CATEGORIES, FILES


def run(build_dir: str | Path, log=print, variants: list[str] | None = None) -> dict:
    from ..train import stages
    from ..train.presets import get_preset
    from .build import BuildSize
    from .evaluate import evaluate_hf

    d = Path(build_dir)
    data = d / "data"
    for need in (d / "base" / "config.json", d / "stage1" / "mm_projector.safetensors", data / FILES["stage2"]):
        if not need.is_file():
            from ..errors import UserError

            raise UserError(f"{need} is missing: run `llava-edge toy build --out {d}` first")
    records = json.loads((data / FILES["stage2"]).read_text())
    cfg = get_preset("toy").stage2
    steps = max(1, math.ceil(len(records) / cfg.global_batch * BuildSize().stage2_epochs))
    cfg = replace(cfg, max_steps=steps)
    plan = {"mix": (None, True), "no-stage1": (None, False)}
    plan.update({f"only-{c}": (c, True) for c in CATEGORIES})
    results = {}
    for name, (category, with_stage1) in plan.items():
        if variants and name not in variants:
            continue
        out = d / "ablation" / name
        subset = records if category is None else [r for r in records if r.get("category") == category]
        data_file = data / f"ablation_{name}.json"  # beside the images, so paths stay relative
        atomic.write_json(data_file, subset)
        log(f"ablation {name}: {len(subset)} records, {steps} steps")
        if not (out / "model.safetensors").is_file():
            stages.stage2(str(d / "base"), data_file, data, out, cfg,
                          projector=d / "stage1" / "mm_projector.safetensors" if with_stage1 else None,
                          pad="pad", log=lambda _: None)
        r = evaluate_hf(out, data / FILES["eval"])
        results[name] = {"accuracy": r["accuracy"], "per_category": r["per_category"], "records": len(subset)}
        log(f"  held-out accuracy {r['accuracy']:.1%}")
    atomic.write_json(d / "ablation.json", {"steps": steps, "results": results})
    cats = sorted({c for r in results.values() for c in r["per_category"]})
    lines = ["| variant | records | accuracy | " + " | ".join(cats) + " |", "|---" * (3 + len(cats)) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['records']} | {r['accuracy']:.1%} | "
                     + " | ".join(f"{r['per_category'].get(c, 0):.0%}" for c in cats) + " |")
    atomic.write_text(d / "ablation.md", "\n".join(lines) + "\n")
    return results
