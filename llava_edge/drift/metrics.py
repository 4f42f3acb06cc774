"""Drift metrics: how far a variant's outputs are from the reference's.

Language model, per teacher-forced position (the reference's answer fed to
both models, so each position compares two next-token distributions over the
same context), as llama.cpp's ``llama-perplexity --kl-divergence`` reports them:

- KL divergence ``KL(P_ref || P_variant) = sum_v p_ref(v) (log p_ref(v) - log p_variant(v))``
  (mean with its standard error, median, 99th percentile, maximum),
- "same top p": whether both models' most likely token is the same,
- ``delta p``: the change of the probability of the reference token
  (here the reference's own greedy token, since the text is its answer):
  ``p_variant(t) - p_ref(t)``, mean, RMS and percentiles.

Vision, per image token: cosine similarity of the variant's embedding with the
reference's, and per image the relative error ``||E - E_ref|| / ||E_ref||``.

All in float64: KL of near-identical distributions is a small difference of
large numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities of ``logits`` (..., vocab), in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _kl(lp_ref: np.ndarray, lp: np.ndarray) -> np.ndarray:
    kl = (np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1)
    return np.maximum(kl, 0.0)  # exact arithmetic never goes below 0; rounding can, by ~1e-16


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """``KL(softmax(ref) || softmax(variant))`` per row; rows are positions, columns the vocabulary."""
    return _kl(log_softmax(ref_logits), log_softmax(logits))


@dataclass
class TokenDrift:
    """Per-position drift of one sequence (or several concatenated)."""

    kl: np.ndarray  # (positions,) float64
    same_top1: np.ndarray  # (positions,) bool
    p_ref: np.ndarray  # probability of the target token under the reference
    p_variant: np.ndarray  # ... and under the variant

    @property
    def delta_p(self) -> np.ndarray:
        return self.p_variant - self.p_ref

    @classmethod
    def concat(cls, parts: list["TokenDrift"]) -> "TokenDrift":
        if not parts:
            return cls(np.zeros(0), np.zeros(0, bool), np.zeros(0), np.zeros(0))
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("kl", "same_top1", "p_ref", "p_variant")))


def token_drift(ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray | list[int]) -> TokenDrift:
    """Drift at each position of ``logits`` (positions, vocab) against ``ref_logits``.

    ``targets``: the reference token at each position (the one fed next).
    """
    ref_logits, logits = np.asarray(ref_logits), np.asarray(logits)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: reference {ref_logits.shape}, variant {logits.shape}")
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (len(logits),):
        raise ValueError(f"{len(targets)} targets for {len(logits)} positions")
    lp_ref, lp = log_softmax(ref_logits), log_softmax(logits)
    rows = np.arange(len(targets))
    return TokenDrift(
        kl=_kl(lp_ref, lp),
        same_top1=ref_logits.argmax(-1) == logits.argmax(-1),
        p_ref=np.exp(lp_ref[rows, targets]),
        p_variant=np.exp(lp[rows, targets]),
    )


def _stderr(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def summarize_tokens(d: TokenDrift) -> dict:
    """llama.cpp's KL-divergence and token-probability statistics of ``d`` (probabilities as fractions, not %)."""
    n = len(d.kl)
    if n == 0:
        return {"positions": 0}
    dp = d.delta_p
    same = d.same_top1.astype(np.float64)
    return {
        "positions": n,
        "kl_mean": float(d.kl.mean()),
        "kl_mean_stderr": _stderr(d.kl),
        "kl_median": float(np.median(d.kl)),
        "kl_p99": float(np.percentile(d.kl, 99)),
        "kl_max": float(d.kl.max()),
        "top1": float(same.mean()),
        "top1_stderr": float(np.sqrt(same.mean() * (1 - same.mean()) / (n - 1))) if n > 1 else 0.0,
        "dp_mean": float(dp.mean()),
        "dp_mean_stderr": _stderr(dp),
        "dp_rms": float(np.sqrt((dp ** 2).mean())),
        "dp_p1": float(np.percentile(dp, 1)),
        "dp_p99": float(np.percentile(dp, 99)),
        "dp_min": float(dp.min()),
        "dp_max": float(dp.max()),
    }


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of ``a`` and ``b`` (..., dim), in float64; 1 where both rows are zero."""
    from llava_edge.quality import token_cosine

    return token_cosine(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), eps=1e-300)


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """``||got - ref|| / ||ref||`` (Frobenius), in float64."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-300))


def summarize_vision(cosines: list[np.ndarray], rel_errors: list[float]) -> dict:
    """Image-token cosine (mean, min over every token of every image) and relative error (mean, max over images)."""
    if not cosines:
        return {"images": 0}
    cos = np.concatenate([np.ravel(c) for c in cosines])
    return {
        "images": len(cosines),
        "tokens": int(len(cos)),
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "rel_error_mean": float(np.mean(rel_errors)),
        "rel_error_max": float(np.max(rel_errors)),
    }
