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
- ``q4``: a 4-bit GGUF (q4_k_m, q4_k_s, q4_0, q4_1, iq4_nl, iq4_xs) with
  fp32/fp16/int8/int4 vision: mean KL <= 0.05, accuracy drop <= 5 points
  (``q4_k_m``, its name before the other 4-bit types were covered, still names it).

"Unchanged" accuracy means the variant's accuracy equals the reference's.
Accuracy limits apply only where the evaluation set has gold answers.

A reduced-token vision variant (``quantize --image-tokens``) feeds the language
model fewer positions than the reference: its answers are expected to move, so
the precision gates above do not cover it. The ``tokens`` gate does: task
accuracy drop <= 5 points (VisionZip's training-free LLaVA-1.5 results at 64 of
576 tokens stay within a few points on most benchmarks). Its limits, and every
other gate's, can be set with ``--gate-limit tokens.accuracy_drop_max=2`` (and
``answer_agreement_min``, ``kl_mean_max``, ``top1_min``, ``vision_cos_min``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    answer_agreement_min: float | None = None  # share of greedy answers equal to the reference's
    reduced: bool = False  # covers reduced-token vision variants (and only those)

    def covers(self, pair: dict) -> bool:
        return (pair["llm_precision"] in self.llm and pair["vision_precision"] in self.vision
                and bool(pair.get("token_reduction")) == self.reduced)

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
        if self.answer_agreement_min is not None:
            add("answer_agreement", pair.get("answer_agreement"), ">=", self.answer_agreement_min)
        drop = pair.get("accuracy_drop_points")
        if self.accuracy_unchanged:
            add("accuracy_change_points", None if drop is None else abs(drop), "<=", 0.0)
        elif self.accuracy_drop_max is not None:
            add("accuracy_drop_points", drop, "<=", self.accuracy_drop_max)
        return out


FOUR_BIT = ("q4_k_m", "q4_k_s", "q4_0", "q4_1", "iq4_nl", "iq4_xs")
ALIASES = {"q4_k_m": "q4"}

GATES: dict[str, Gate] = {g.name: g for g in (
    Gate("f16", llm=("f32", "f16"), vision=("fp32", "fp16"), top1_min=0.995, kl_mean_max=0.001,
         vision_cos_min=0.999, accuracy_unchanged=True),
    Gate("q8_0", llm=("q8_0",), vision=("fp32", "fp16", "int8"), top1_min=0.97, kl_mean_max=0.01,
         accuracy_drop_max=2.0),
    Gate("q4", llm=FOUR_BIT, vision=("fp32", "fp16", "int8", "int4"), kl_mean_max=0.05, accuracy_drop_max=5.0),
    Gate("tokens", llm=("f32", "bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
                        "q4_1", "q4_0", "iq4_nl", "iq4_xs"),
         vision=("fp32", "fp16", "int8", "int4"), accuracy_drop_max=5.0, reduced=True),
)}
LIMITS = ("top1_min", "kl_mean_max", "vision_cos_min", "accuracy_drop_max", "answer_agreement_min")


def with_limits(text: str | None, gates: dict[str, Gate] | None = None) -> dict[str, Gate]:
    """``"tokens.accuracy_drop_max=2, q8_0.kl_mean_max=0.02"`` -> the gates with those limits (``none`` drops one)."""
    gates = dict(GATES if gates is None else gates)
    for item in (x.strip() for x in (text or "").split(",")):
        if not item:
            continue
        name, _, rest = item.partition(".")
        name = ALIASES.get(name, name)
        metric, eq, value = rest.partition("=")
        if not eq or name not in gates or metric not in LIMITS:
            raise UserError(f"--gate-limit {item!r} is not GATE.LIMIT=VALUE with a gate of {', '.join(gates)} and a "
                            f"limit of {', '.join(LIMITS)}")
        if value.strip().lower() == "none":
            number = None
        else:
            try:
                number = float(value)
            except ValueError:
                raise UserError(f"--gate-limit {item!r}: {value!r} is not a number (or none)") from None
            if number != number:
                raise UserError(f"--gate-limit {item!r}: not a number")
        gates[name] = replace(gates[name], **{metric: number})
    return gates


def parse_fail_on(text: str | None, pairs: list[tuple[str, str, bool]]) -> list[str]:
    """``"f16,q8_0"`` or ``"all"`` -> the gate names to fail on, for the (vision, llm precision, reduced) ``pairs``.

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
    for name in (ALIASES.get(w, w) for w in words):
        if name not in GATES:
            raise UserError(f"unknown gate {name!r} in --fail-on; known: {', '.join(GATES)}, all")
        g = GATES[name]
        if not _covers_any(g, pairs):
            raise UserError(f"gate {name} covers none of the variant pairs measured (it needs a language model "
                            f"{'/'.join(g.llm)} with {'a reduced-token ' if g.reduced else ''}vision "
                            f"{'/'.join(g.vision)}); add such a pair or drop the gate")
        if name not in names:
            names.append(name)
    return names


def _covers_any(g: Gate, pairs: list[tuple]) -> bool:
    return any(g.covers({"vision_precision": p[0], "llm_precision": p[1],
                         "token_reduction": p[2] if len(p) > 2 else None}) for p in pairs)


def evaluate(pairs: list[dict], gates: dict[str, Gate] | None = None) -> list[dict]:
    """Every gate's verdict on every pair it covers: ``{gate, pair, ok, checks}``.

    ``ok`` is False when a measured limit is missed; limits not measured (no
    gold answers) do not decide.
    """
    out = []
    for g in (GATES if gates is None else gates).values():
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
