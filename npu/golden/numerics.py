"""The arithmetic the kernels share: fixed-order float32 reductions and shift-round-saturate.

Why fixed order: float addition is not associative, so "the sum of a row" is only one number
once its order is fixed. The kernels accumulate a row in ``LANES`` partial sums (element ``i``
goes to lane ``i % LANES``, in order), then add the lanes pairwise as a tree (lane ``l`` +=
lane ``l + w`` for w = 8, 4, 2, 1), which is how a 16-lane vector unit reduces; the C scalar
path loops in the same order, and nothing may be fused (kernels build with -ffp-contract=off).
"""

from __future__ import annotations

import numpy as np

__all__ = ["LANES", "lane_sum", "rne", "saturate", "srs"]

LANES = 16


def lane_sum(x: np.ndarray) -> np.ndarray:
    """Sum the last axis of float32 ``x`` in the kernels' order; returns ``x.shape[:-1]``."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    acc = np.zeros((*x.shape[:-1], LANES), np.float32)
    full = n // LANES * LANES
    for start in range(0, full, LANES):
        acc += x[..., start : start + LANES]
    if full < n:
        acc[..., : n - full] += x[..., full:]
    width = LANES // 2
    while width:
        acc[..., :width] += acc[..., width : 2 * width]
        width //= 2
    return acc[..., 0]


def rne(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest integer, ties to even (C's ``rintf`` in the default mode)."""
    return np.rint(np.asarray(x, dtype=np.float32))


def saturate(x: np.ndarray, dtype: type[np.integer]) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(x, info.min, info.max).astype(dtype)


def srs(x: np.ndarray, shift: np.ndarray | int, dtype: type[np.integer]) -> np.ndarray:
    """Shift right by ``shift`` (1..59) rounding half to even, then saturate to ``dtype``: the
    AIE2 accumulator's ``srs`` with ``rounding_mode::conv_even`` (whose shifts stop at 59).
    ``x`` is int64."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if np.any(shift < 1) or np.any(shift > 59):
        raise ValueError("shift must be in 1..59")
    q = x >> shift
    r = x - (q << shift)
    half = np.int64(1) << (shift - 1)
    q = q + ((r > half) | ((r == half) & (q & 1 == 1)))
    return saturate(q, dtype)
