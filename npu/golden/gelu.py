"""Exact (erf) GELU from a table (kernels/gelu.cc, mlir/gelu.py).

Chosen over an int8 lookup table, whose input would first be requantised to 8 bits, and over
bf16 arithmetic, whose outputs carry 8 significant bits: this keeps float32-level accuracy
(worst error about 1e-5 over the table's range) for one small table (7 KB). For
``2**-4 <= |x| < 8`` the value is read at the bf16 grid point below ``x`` (``x``'s top 16 bits)
and linearly interpolated with ``x``'s low 16 bits; below, a two-term series
``x * (0.5 + x / sqrt(2 pi))``; above, ``x`` or 0.
"""

from __future__ import annotations

import numpy as np

from .tables import GELU_BINADES, GELU_MIN_EXP, GELU_STEPS, gelu_table

__all__ = ["gelu"]

INV_SQRT_2PI = np.float32(0.3989422804014327)
FRACTION = np.float32(1.0 / 65536)


def gelu(x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """GELU of float32 ``x``, plus ``residual`` when given (``residual + gelu(x)``)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    negative = (bits >> 31).astype(np.int64)
    exponent = ((bits >> 23) & 0xFF).astype(np.int64) - 127
    mantissa7 = ((bits >> 16) & 0x7F).astype(np.int64)
    low = (bits & 0xFFFF).astype(np.float32) * FRACTION
    small = exponent < GELU_MIN_EXP
    large = exponent >= GELU_MIN_EXP + GELU_BINADES
    index = np.clip((exponent - GELU_MIN_EXP) * GELU_STEPS + mantissa7, 0, GELU_BINADES * GELU_STEPS - 1)
    table = gelu_table()
    here = table[negative, index]
    step = table[negative, index + 1] - here
    y = here + step * low
    series = x * (np.float32(0.5) + x * INV_SQRT_2PI)
    y = np.where(small, series, y)
    y = np.where(large, np.where(negative == 1, np.float32(0), x), y).astype(np.float32)
    if residual is not None:
        y = np.asarray(residual, np.float32) + y
    return y
