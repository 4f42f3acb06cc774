"""Accuracy-drift gates: the limits a variant pair must stay within, and ``--fail-on`` for CI.

The limits are taken from llama.cpp's published
KL-divergence tables (Q8_0 of a Llama at a mean KL of the order of 1e-3,
Q4_K_M of a few 1e-2) and from VLM quantization studies (8-bit within a point
or two of the fp16 model's task accuracy, 4-bit within a few points). A gate covers the pairs whose language model has one of its
precisions and whose vision graph is at least as precise as its weakest
vision precision (a more precise vision graph is no excuse for missing it):

- ``f16``: f32/f16 GGUF with fp32/fp16 vision: top-1 >= 99.5 %, mean KL <= 0.001,
  worst image-token cosine >= 0.999, task accuracy unchanged;
- ``q8_0``: q8_0 with fp32/fp16/int8 (dynamic or static) vision: top-1 >= 97 %,
  mean KL <= 0.01, accuracy drop <= 2 points;
- ``q4_k_m``: q4_k_m with fp32/fp16/int8/int4 vision: mean KL <= 0.05,
  accuracy drop <= 5 points.

"Unchanged" accuracy means the variant's accuracy equals the reference's.
Accuracy limits apply only where the evaluation set has gold answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_edge.errors import UserError


@dataclass(frozen=True)
class Gate:
    name: str
    llm: tuple[str, ...]  # language-model precisions covered
    vision: tuple[str, ...]  # vision precisions covered
    top1_min: float | None = None
    kl_mean_max: float | None = None
    vision_cos_min: float | None = None  # the worst image token's cosine
    accuracy_drop_max: float | None = None  # points (percent of questions)
    accuracy_unchanged: bool = False

    def covers(self, pair: dict) -> bool:
        return pair["llm_precision"] in self.llm and pair["vision_precision"] in self.vision

    def check(self, pair: dict) -> list[dict]:
        """One entry per limit: metric, value, limit, ok (None when the metric was not measured)."""
        t, v = pair.get("token_drift", {}), pair.get("vision_drift", {})
        out = []

        def add(metric: str, value, op: str, limit: float) -> None:
            ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
            out.append({"metric": metric, "value": value, "op": op, "limit": limit, "ok": ok})

        if self.top1_min is not None:
            add("top1", t.get("top1"), ">=", self.top1_min)
        if self.kl_mean_max is not None:
            add("kl_mean", t.get("kl_mean"), "<=", self.kl_mean_max)
        if self.vision_cos_min is not None:
            add("vision_cos_min", v.get("cos_min"), ">=", self.vision_cos_min)
        drop = pair.get("accuracy_drop_points")
        if self.accuracy_unchanged:
            add("accuracy_change_points", None if drop is None else abs(drop), "<=", 0.0)
        elif self.accuracy_drop_max is not None:
            add("accuracy_drop_points", drop, "<=", self.accuracy_drop_max)
        return out


GATES: dict[str, Gate] = {g.name: g for g in (
    Gate("f16", llm=("f32", "f16"), vision=("fp32", "fp16"), top1_min=0.995, kl_mean_max=0.001,
         vision_cos_min=0.999, accuracy_unchanged=True),
    Gate("q8_0", llm=("q8_0",), vision=("fp32", "fp16", "int8"), top1_min=0.97, kl_mean_max=0.01,
         accuracy_drop_max=2.0),
    Gate("q4_k_m", llm=("q4_k_m",), vision=("fp32", "fp16", "int8", "int4"), kl_mean_max=0.05,
         accuracy_drop_max=5.0),
)}


def parse_fail_on(text: str | None, pairs: list[tuple[str, str]]) -> list[str]:
    """``"f16,q8_0"`` or ``"all"`` -> the gate names to fail on, for the (vision, llm) precision ``pairs`` measured.

    ``all`` means every gate that covers a measured pair. A gate named
    explicitly must cover one (else the CI check would pass vacuously): a
    one-line error says which pair it needs. Unknown names list the known ones.
    """
    if text is None:
        return []
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if "all" in words:
        return [n for n, g in GATES.items() if _covers_any(g, pairs)]
    names: list[str] = []
    for name in words:
        if name not in GATES:
            raise UserError(f"unknown gate {name!r} in --fail-on; known: {', '.join(GATES)}, all")
        g = GATES[name]
        if not _covers_any(g, pairs):
            raise UserError(f"gate {name} covers none of the variant pairs measured (it needs a language model "
                            f"{'/'.join(g.llm)} with vision {'/'.join(g.vision)}); add such a pair or drop the gate")
        if name not in names:
            names.append(name)
    return names


def _covers_any(g: Gate, pairs: list[tuple[str, str]]) -> bool:
    return any(g.covers({"vision_precision": v, "llm_precision": l}) for v, l in pairs)


def evaluate(pairs: list[dict]) -> list[dict]:
    """Every gate's verdict on every pair it covers: ``{gate, pair, ok, checks}``.

    ``ok`` is False when a measured limit is missed; limits not measured (no
    gold answers) do not decide.
    """
    out = []
    for g in GATES.values():
        for p in pairs:
            if g.covers(p):
                checks = g.check(p)
                ok = all(c["ok"] is not False for c in checks)
                out.append({"gate": g.name, "pair": f"{p['vision']}:{p['llm']}", "ok": ok, "checks": checks})
    return out


def failures(verdicts: list[dict], names: list[str]) -> list[dict]:
    """The verdicts of the gates in ``names`` that failed."""
    return [v for v in verdicts if v["gate"] in names and not v["ok"]]


def describe(verdict: dict) -> str:
    """``q8_0 on int8:q8_0: kl_mean 0.012 > 0.01`` for each missed limit."""
    missed = [f"{c['metric']} {c['value']:.4g} (limit {c['op']} {c['limit']:g})" for c in verdict["checks"]
              if c["ok"] is False]
    return f"gate {verdict['gate']} on {verdict['pair']}: " + ("; ".join(missed) or "passed")
