"""The vision graph fused for onnxruntime (``quantize``'s default for int8 and int4) against the standard one.

    python bench/vision_fusion.py --bundle B --tiles 5 --rounds 5 --threads 2 [--types fp32,int8,int4] [--out FILE]

For each type, two graphs are made from the bundle's fp32 vision graph by
``quantize``'s own functions, into a temporary folder (the bundle is not
touched): from the standard graph (``--no-optimize``) and from the fused one
(``optimize_tower``: MultiHeadAttention, SkipLayerNorm, GELU). ``fp32`` compares
the fp32 graph with its fused copy. Each graph is loaded by the runtime's
``VisionEncoder`` (CPU, ``--threads`` threads) and encodes one batch of
``--tiles`` tiles (synthetic scenes preprocessed as the runtime does), timed
interleaved (``side_by_side.interleaved``, one warm-up each), medians reported.
Beside each time: the fused graph's worst and mean token cosine against the
standard graph of its type and against fp32, and its op counts.

Results: a JSON (``--out``; default ``bench/results/<date>-cpu-<model>-vision-fusion.json``) and the same table
in markdown beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import side_by_side as sbs  # noqa: E402 - interleaved timing, token cosines

from llava_edge import manifest  # noqa: E402
from llava_edge.bench import CpuShare, machine_info, versions  # noqa: E402

TYPES = ("fp32", "int8", "int4")
COUNTED_OPS = ("MultiHeadAttention", "Softmax", "SkipLayerNormalization", "FastGelu", "QuickGelu", "MatMulInteger",
               "DynamicQuantizeMatMul", "MatMulNBits", "MatMul")


def tiles(bundle: Path, count: int) -> np.ndarray:
    """``count`` synthetic scenes preprocessed to one tile each by the runtime's preprocessing."""
    from llava_edge.preprocess import ImageSpec
    from llava_edge.quantize.vision import calibration_pixels

    return calibration_pixels(ImageSpec.from_dict(manifest.read(bundle).image), None, count, seed=7)[0]


def make_graphs(fp32: Path, types: list[str], block_size: int, tmp: Path) -> dict[str, dict]:
    """type -> {"standard": path, "fused": path, "fused_ops": {...}} made by quantize's functions."""
    import onnx

    from llava_edge.export.vision_fp16 import save_onnx
    from llava_edge.quantize import vision as vq

    standard = onnx.load(str(fp32))
    fused, stats = vq.optimize_tower(onnx.ModelProto.FromString(standard.SerializeToString()))
    graphs: dict[str, dict] = {}
    for t in types:
        paths = {}
        if t not in TYPES:
            raise SystemExit(f"--types: unknown type {t!r}; valid: {', '.join(TYPES)}")
        for form, model in (("standard", standard), ("fused", fused)):
            if t == "fp32" and form == "standard":
                paths[form] = fp32  # the bundle's own graph
                continue
            path = paths[form] = tmp / f"{t}.{form}.onnx"
            if t == "fp32":
                save_onnx(model, path)
            else:  # the quantizers name nodes in place: each gets its own copy
                copy = onnx.ModelProto.FromString(model.SerializeToString())
                if t == "int8":
                    vq.quantize_int8_dynamic(copy, path)
                else:
                    vq.quantize_int4(copy, path, block_size)
        ops = Counter(n.op_type for n in onnx.load(str(paths["fused"]), load_external_data=False).graph.node)
        graphs[t] = {**paths, "fused_ops": {k: ops[k] for k in COUNTED_OPS if ops[k]}}
    graphs["_fusion"] = {"stats": stats}
    return graphs


def cosines(a: np.ndarray, b: np.ndarray) -> dict:
    c = sbs.token_cosines(a, b)
    return {"min": float(c.min()), "mean": float(c.mean())}


def run(bundle: Path, types: list[str], n_tiles: int, rounds: int, threads: int, block_size: int) -> dict:
    from llava_edge.runtimes.vision import VisionEncoder

    m = manifest.read(bundle)
    fp32 = manifest.bundle_file(bundle, m.variant("vision", "fp32").file)
    pixels = tiles(bundle, n_tiles)
    with tempfile.TemporaryDirectory(dir=bundle.parent) as tmp:
        graphs = make_graphs(fp32, types, block_size, Path(tmp))
        fusion = graphs.pop("_fusion")
        encoders = {f"{t} {form}": VisionEncoder(g[form], providers=["CPUExecutionProvider"], threads=threads)
                    for t, g in graphs.items() for form in ("standard", "fused")}
        outputs = {name: e.encode(pixels) for name, e in encoders.items()}
        ref = VisionEncoder(fp32, providers=["CPUExecutionProvider"], threads=threads).encode(pixels)
        with CpuShare() as busy:
            times = sbs.interleaved({n: sbs.timed(lambda e=e: e.encode(pixels)) for n, e in encoders.items()}, rounds)
        results = {}
        for t, g in graphs.items():
            std, fus = sbs.median(times[f"{t} standard"]), sbs.median(times[f"{t} fused"])
            results[t] = {
                "standard_s": std, "fused_s": fus, "speedup": std / fus,
                "per_round_s": {"standard": times[f"{t} standard"], "fused": times[f"{t} fused"]},
                "fused_vs_standard": cosines(outputs[f"{t} fused"], outputs[f"{t} standard"]),
                "fused_vs_fp32": cosines(outputs[f"{t} fused"], ref),
                "standard_vs_fp32": None if t == "fp32" else cosines(outputs[f"{t} standard"], ref),
                "fused_ops": g["fused_ops"],
            }
            results[t]["fused_max_abs_diff_of_largest"] = float(
                np.abs(outputs[f"{t} fused"] - outputs[f"{t} standard"]).max() / np.abs(outputs[f"{t} standard"]).max())
    return {"date": date.today().isoformat(), "bundle": str(bundle), "family": m.family,
            "tiles": n_tiles, "tile_shape": list(pixels.shape[1:]), "rounds": rounds, "threads": threads,
            "fusion": fusion, "results": results, "other_cpu_share": busy.share,
            "machine": machine_info(), "versions": versions()}


def markdown(report: dict) -> str:
    share = report["other_cpu_share"]
    lines = [f"{report['tiles']} tiles of {report['tile_shape']}, {report['threads']} threads, {report['rounds']} "
             f"rounds (medians); other processes {'?' if share is None else f'{share:.0%}'} of the CPU",
             "",
             "| type | standard s | fused s | fused speed-up | fused vs standard: min / mean cosine | "
             "fused vs fp32 (standard vs fp32): min cosine | fused graph's ops |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for t, r in report["results"].items():
        vs_fp32 = f"{r['fused_vs_fp32']['min']:.5f}" + (f" ({r['standard_vs_fp32']['min']:.5f})"
                                                        if r["standard_vs_fp32"] else "")
        lines.append(f"| {t} | {r['standard_s']:.3f} | {r['fused_s']:.3f} | **{r['speedup']:.2f}x** | "
                     f"{r['fused_vs_standard']['min']:.5f} / {r['fused_vs_standard']['mean']:.6f} | {vs_fp32} | "
                     + ", ".join(f"{k} {v}" for k, v in r["fused_ops"].items()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--types", default="fp32,int8")
    p.add_argument("--tiles", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--name", default=None, help="model name for the default result file")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if not manifest.is_bundle(a.bundle):
        raise SystemExit(f"{a.bundle} is not a bundle (no manifest.json)")
    types = [t for t in a.types.split(",") if t]
    report = run(a.bundle, types, a.tiles, a.rounds, a.threads, a.block_size)
    name = a.name or a.bundle.name
    out = a.out or Path(__file__).resolve().parent / "results" / f"{report['date']}-cpu-{name}-vision-fusion.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
