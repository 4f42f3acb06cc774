"""Why a pair drifts: which language-model tensors its quantization changed most.

Run for the pairs that miss a gate (the token-level side, which tokens and at
what margin, is measured for every pair by :mod:`llava_edge.drift.run`). Each
tensor of the variant's GGUF is dequantized with gguf-py's own dequantizers
and compared with the same tensor of the bundle's float GGUF: relative error
``||W_q - W|| / ||W||`` and the type llama.cpp gave it. A tensor whose error
stands out (a fallback type, an outlier-heavy ``ffn_down`` or ``output``) is
where to change the quantization mixture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llava_edge import manifest as bundle_manifest

FLOAT_LLM = ("f32", "bf16", "f16")  # what a quantized GGUF is compared with, most precise first
TOP_TENSORS = 8


def float_base(m: bundle_manifest.Manifest) -> bundle_manifest.Variant | None:
    """The bundle's most precise float GGUF, or None."""
    bases = m.find("llm", precisions=FLOAT_LLM)
    return min(bases, key=lambda v: FLOAT_LLM.index(v.precision)) if bases else None


def llm_tensor_errors(base: str | Path, variant: str | Path, top: int = TOP_TENSORS) -> list[dict]:
    """The ``top`` tensors of ``variant`` farthest (relative L2) from the same tensors of the float GGUF ``base``."""
    import gguf
    from gguf import quants

    ref = {t.name: t for t in gguf.GGUFReader(str(base)).tensors}
    rows = []
    for t in gguf.GGUFReader(str(variant)).tensors:
        if t.name not in ref:
            continue
        w = quants.dequantize(ref[t.name].data, ref[t.name].tensor_type).astype(np.float64)
        q = quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        if w.shape != q.shape:
            continue
        norm = np.linalg.norm(w)
        rows.append({"tensor": t.name, "type": t.tensor_type.name,
                     "rel_error": float(np.linalg.norm(q - w) / norm) if norm else 0.0,
                     "max_abs_error": float(np.abs(q - w).max())})
    return sorted(rows, key=lambda r: -r["rel_error"])[:top]


def diagnose_failures(bundle: str | Path, pairs: list[dict], verdicts: list[dict]) -> None:
    """Add ``diagnosis.llm_tensors`` to every pair (in place) that failed a gate and runs a quantized GGUF."""
    bundle = Path(bundle)
    m = bundle_manifest.read(bundle)
    base = float_base(m)
    failed = {v["pair"] for v in verdicts if not v["ok"]}
    done: dict[str, list[dict]] = {}
    for p in pairs:
        if f"{p['vision']}:{p['llm']}" not in failed or base is None or p["llm_precision"] in FLOAT_LLM:
            continue
        if p["llm"] not in done:
            done[p["llm"]] = llm_tensor_errors(bundle / base.file, bundle / p["files"]["llm"])
        p["diagnosis"] = {"llm_tensors_vs": base.name, "llm_tensors": done[p["llm"]]}
