"""Row softmax in float32 with a table exponential (kernels/softmax.cc, mlir/softmax.py).

``exp(x - max) = 2**t`` with ``t = (x - max) * log2(e)``: ``t = n + f``, ``2**f`` from a
256-entry table times ``1 + r * ln 2`` for the remainder ``r < 1/256`` (relative error under
4e-6), scaled by ``2**n`` exactly; ``t < -126`` gives 0. Entries at or past ``n_valid`` (causal
masking) are 0. An optional per-column scale multiplies the result (the decoder folds the
self-attention values' per-token scales into the probabilities this way). Chosen over bf16
because it costs the same table and keeps float32 accuracy.
"""

from __future__ import annotations

import numpy as np

from .numerics import lane_sum
from .tables import EXP2_BITS, exp2_table

__all__ = ["exp_neg", "softmax"]

LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)
STEP = np.float32(1.0 / (1 << EXP2_BITS))


def exp_neg(d: np.ndarray) -> np.ndarray:
    """``exp(d)`` for float32 ``d <= 0``, as the kernel computes it."""
    t = np.asarray(d, np.float32) * LOG2E
    low = t < np.float32(-126)
    t = np.where(low, np.float32(0), t)
    n = np.floor(t)
    f = t - n
    idx = (f * np.float32(1 << EXP2_BITS)).astype(np.int32)
    r = f - idx.astype(np.float32) * STEP
    poly = r * LN2
    poly += np.float32(1)
    e = exp2_table()[idx] * poly
    e = np.ldexp(e, n.astype(np.int32)).astype(np.float32)
    return np.where(low, np.float32(0), e)


def softmax(x: np.ndarray, n_valid: np.ndarray | None = None, col_scale: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[M, N]`` -> float32 ``[M, N]``; row ``i`` uses only its first ``n_valid[i]`` (>= 1);
    ``(e * (1 / sum)) * col_scale[j]`` when ``col_scale`` is given."""
    x = np.asarray(x, np.float32)
    m, n = x.shape
    valid = np.ones((m, n), bool) if n_valid is None else np.arange(n)[None, :] < np.asarray(n_valid)[:, None]
    top = np.max(np.where(valid, x, np.float32(-np.inf)), axis=-1)
    e = np.where(valid, exp_neg(np.where(valid, x - top[:, None], np.float32(0))), np.float32(0))
    inv = np.float32(1) / lane_sum(e)
    y = (e * inv[:, None]).astype(np.float32)
    if col_scale is not None:
        y *= np.asarray(col_scale, np.float32)
    return y
