"""The drift report: ``drift.json`` (everything measured), ``drift.md`` (a table) and ``drift.png`` (a chart).

Each file is written under a temporary name and renamed when complete. The
chart needs matplotlib (the ``train`` extra); without it the report says so and
the other two files are still written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from llava_edge import atomic

JSON_FILE, MARKDOWN_FILE, CHART_FILE = "drift.json", "drift.md", "drift.png"


def _f(x, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _gate_cell(verdicts: list[dict], label: str) -> str:
    mine = [v for v in verdicts if v["pair"] == label]
    return ", ".join(f"{v['gate']} {'pass' if v['ok'] else 'FAIL'}" for v in mine) or "-"


def _prompts(ev: dict) -> str:
    """How many prompts, and with how many pictures each: "3 questions, 2 with an image" for one picture a prompt,
    "150 questions: 50 with 1 picture, 50 with 2, 50 with 3" where some show several."""
    counts = {int(n): k for n, k in (ev.get("pictures") or {}).items()}
    if max(counts, default=0) <= 1:
        return f"{ev['questions']} questions, {ev['with_image']} with an image"
    return f"{ev['questions']} questions: " + ", ".join(
        f"{k} with {n} picture{'s' if n != 1 else ''}" if i == 0 else f"{k} with {n}"
        for i, (n, k) in enumerate(sorted(counts.items())))


def _by_pictures(pairs: list[dict]) -> list[str]:
    """One row per pair and picture count, where prompts show different numbers of pictures."""
    if not any(len(p.get("by_pictures") or {}) > 1 for p in pairs):
        return []
    lines = ["", "By pictures a prompt:", "",
             "| vision | llm | pictures | prompts | KL mean | KL p99 | top-1 | answers = ref |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in pairs:
        for n, b in (p.get("by_pictures") or {}).items():
            t = b["token_drift"]
            lines.append(f"| {p['vision']} | {p['llm']} | {n} | {b['prompts']} | {_f(t.get('kl_mean'), '.2e')} "
                         f"| {_f(t.get('kl_p99'), '.2e')} | {_f(t.get('top1'), '.2%')} "
                         f"| {_f(b.get('answer_agreement'), '.1%')} |")
    return lines


def markdown(result: dict) -> str:
    """The result as Markdown: what was compared, one row per pair, the gate verdicts, the worst tokens."""
    ref, ev, rt = result["reference"], result["eval"], result["runtime"]
    verdicts = result.get("gates", [])
    lines = [
        f"# Accuracy drift: {result['bundle']}",
        "",
        f"- reference: {ref['model']}, {ref['note']}",
        f"- evaluation: {ev['source']} ({ev['format']}, {_prompts(ev)})",
        f"- runtime: {rt['vision']}, {rt['llm']}, KV cache {rt['kv_cache']}, greedy, up to {rt['max_tokens']} tokens",
    ]
    if ref.get("score"):
        lines.append(f"- reference accuracy: {ref['score']['accuracy']:.2%}")
    lines += [f"- note: {n}" for n in result.get("notes", [])]
    lines += [
        "",
        "| vision | llm | cos mean | cos min | rel err | KL mean | KL p99 | top-1 | Δp mean | Δp RMS "
        "| answers = ref | accuracy (change, points) | gates |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in result["pairs"]:
        v, t = p["vision_drift"], p["token_drift"]
        acc = p.get("accuracy")
        acc_cell = "n/a" if acc is None else f"{acc:.1%} ({0.0 - p['accuracy_drop_points']:+.1f})"
        label = f"{p['vision']}:{p['llm']}"
        lines.append(
            f"| {p['vision']} | {p['llm']} | {_f(v.get('cos_mean'), '.6f')} | {_f(v.get('cos_min'), '.6f')} "
            f"| {_f(v.get('rel_error_mean'), '.2e')} | {_f(t.get('kl_mean'), '.2e')} | {_f(t.get('kl_p99'), '.2e')} "
            f"| {_f(t.get('top1'), '.2%')} | {_f(t.get('dp_mean'), '+.2e')} | {_f(t.get('dp_rms'), '.2e')} "
            f"| {_f(p.get('answer_agreement'), '.1%')} | {acc_cell} | {_gate_cell(verdicts, label)} |"
        )
    lines += _by_pictures(result["pairs"])
    failed = [v for v in verdicts if not v["ok"]]
    if verdicts:
        lines += ["", f"Gates: {len(verdicts) - len(failed)} of {len(verdicts)} verdicts passed."]
        for v in failed:
            missed = "; ".join(f"{c['metric']} {c['value']:.4g} (limit {c['op']} {c['limit']:g})"
                               for c in v["checks"] if c["ok"] is False)
            lines.append(f"- **{v['gate']} failed on {v['pair']}**: {missed}")
    worst = [(p, w) for p in result["pairs"] for w in p.get("worst_tokens", [])[:3]]
    if worst:
        lines += ["", "Largest KL positions (3 per pair):", "",
                  "| pair | question | position | token | p ref | p variant | variant's top token | KL |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p, w in worst:
            lines.append(f"| {p['vision']}:{p['llm']} | {w['id']} | {w['position']} | `{w['token']!r}` "
                         f"| {w['p_ref']:.4f} | {w['p_variant']:.4f} | `{w['top1_variant']!r}` | {w['kl']:.3g} |")
    flips = [(p, f) for p in result["pairs"] for f in p.get("top1_flips", [])[:3]]
    if flips:
        lines += ["", "Top-1 flips (3 per pair; margin: the reference's probability of its top token minus that of "
                  "the variant's top token; a small margin is a near tie):", "",
                  "| pair | question | position | reference token | variant's token | p ref | p variant | margin |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p, f in flips:
            lines.append(f"| {p['vision']}:{p['llm']} | {f['id']} | {f['position']} | `{f['token']!r}` "
                         f"| `{f['top1_variant']!r}` | {f['p_ref']:.4f} | {f['p_variant']:.4f} "
                         f"| {f['ref_margin']:.4f} |")
    return "\n".join(lines) + "\n"


def chart(result: dict, path: str | Path) -> None:
    """One horizontal bar per pair in four panels, each a distance from the reference (0 is perfect).

    Mean KL and ``1 - min image-token cosine`` on log scales, top-1
    disagreement in percent, accuracy change in points; dashed lines mark the
    gates' limits.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .gates import GATES

    pairs = result["pairs"]
    labels = [f"{p['vision']}:{p['llm']}" for p in pairs]

    def get(p: dict, section: str, key: str):
        v = p[section].get(key) if section else p.get(key)
        return math.nan if v is None else float(v)

    panels = [
        ("mean KL divergence", [get(p, "token_drift", "kl_mean") for p in pairs], True,
         {g.name: g.kl_mean_max for g in GATES.values() if g.kl_mean_max is not None}),
        ("top-1 disagreement (%)", [100 * (1 - get(p, "token_drift", "top1")) for p in pairs], False,
         {g.name: 100 * (1 - g.top1_min) for g in GATES.values() if g.top1_min is not None}),
        ("1 - min image-token cosine", [1 - get(p, "vision_drift", "cos_min") for p in pairs], True,
         {g.name: 1 - g.vision_cos_min for g in GATES.values() if g.vision_cos_min is not None}),
        ("accuracy change (points)", [-get(p, "", "accuracy_drop_points") for p in pairs], False,
         {g.name: -g.accuracy_drop_max for g in GATES.values() if g.accuracy_drop_max is not None}),
    ]
    panels = [x for x in panels if any(not math.isnan(v) for v in x[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 0.3 * len(pairs) + 1.6), sharey=True,
                             squeeze=False)
    for ax, (title, values, log, limits) in zip(axes[0], panels):
        if log:
            values = [max(v, 1e-12) for v in values]
            ax.set_xscale("log")
        ax.barh(range(len(labels)), values, color="#4a7ab5")
        for name, x in limits.items():
            ax.axvline(x, color="#c0392b", linestyle="--", linewidth=0.8)
            ax.annotate(name, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=7, color="#c0392b",
                        rotation=90, va="top", ha="right")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    ref = result["reference"]
    fig.suptitle(f"drift of each vision:llm pair vs {ref['model']} ({ref['dtype']} on {ref['device']}), "
                 f"{result['eval']['questions']} questions", fontsize=10)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(result: dict, folder: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Write the three files into ``folder``; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / JSON_FILE, folder / MARKDOWN_FILE]
    atomic.write_json(written[0], result)
    atomic.write_text(written[1], markdown(result))
    try:
        chart(result, folder / CHART_FILE)
        written.append(folder / CHART_FILE)
    except ImportError:
        log("note: matplotlib is not installed, so no drift.png (pip install matplotlib)")
    return written
