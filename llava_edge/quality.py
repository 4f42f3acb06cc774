"""Named quality limits, and the one per-token cosine every comparison of image embeddings uses.

The limits are on the worst image token's cosine similarity to a reference's, the measure the vision
side is judged by everywhere (export's parity check, quantize's report, the device profiles' choice,
drift's gates in ``llava_edge/drift/gates.py``).
"""

from __future__ import annotations

import numpy as np

# export: the fp32 ONNX graph against Hugging Face. Measured ~1e-7 apart; anything below this is a broken export.
FP32_GRAPH_MIN_COSINE = 0.9999
# quantize reports a vision variant below this as degraded, and no device profile picks it unasked.
VISION_VARIANT_MIN_COSINE = 0.99


def token_cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-30) -> np.ndarray:
    """Cosine of matching rows of ``a`` and ``b`` (..., dim) in the arrays' own precision; 1 where both are zero."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    dot = (a * b).sum(-1)
    return np.where((na == 0) & (nb == 0), 1.0, dot / np.maximum(na * nb, eps))
