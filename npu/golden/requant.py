"""Quantise, dequantise and requantise (kernels/requant.cc, mlir/requant.py).

- :func:`quantize_rows`: float32 rows -> int8 with one scale per row (per-token activations);
  :func:`quantize_rows_i16` the same to int16 (the vocabulary projection's input).
- :func:`dequant`: an int32 GEMM result back to float32, times the row scale and the column
  (output channel) scale, plus bias, plus the residual: the epilogue of every linear layer.
- :func:`requant`: int32 -> int8 in integers only, per output channel: ``acc * mult >> shift``
  rounded half to even and saturated (the accumulator's shift-round-saturate).
"""

from __future__ import annotations

import math

import numpy as np

from .numerics import rne, saturate, srs

__all__ = ["dequant", "quantize_multiplier", "quantize_rows", "quantize_rows_i16", "requant"]


def _quantize_rows(x: np.ndarray, dtype: type[np.integer]) -> tuple[np.ndarray, np.ndarray]:
    top = np.float32(np.iinfo(dtype).max)
    x = np.asarray(x, dtype=np.float32)
    absmax = np.max(np.abs(x), axis=-1)
    zero = absmax == 0
    safe = np.where(zero, np.float32(1), absmax)
    inv = top / safe
    q = saturate(rne(x * inv[..., None]), dtype)
    scale = np.where(zero, np.float32(0), safe / top).astype(np.float32)
    return q, scale


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[M, N]`` -> (int8 ``[M, N]``, float32 scales ``[M]``), symmetric per row:
    ``scale = absmax / 127``, ``q = saturate(rne(x * (127 / absmax)))``; a zero row has scale 0."""
    return _quantize_rows(x, np.int8)


def quantize_rows_i16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`quantize_rows`, to int16 with ``scale = absmax / 32767``."""
    return _quantize_rows(x, np.int16)


def dequant(
    acc: np.ndarray,
    row_scale: np.ndarray,
    col_scale: np.ndarray,
    bias: np.ndarray | None = None,
    residual: np.ndarray | None = None,
) -> np.ndarray:
    """``residual + ((float(acc) * row_scale[i]) * col_scale[j] + bias[j])`` in float32, in
    exactly that order."""
    y = acc.astype(np.float32)
    y *= np.asarray(row_scale, np.float32)[..., None]
    y *= np.asarray(col_scale, np.float32)
    if bias is not None:
        y += np.asarray(bias, np.float32)
    if residual is not None:
        y = np.asarray(residual, np.float32) + y
    return y


def quantize_multiplier(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real scales (2**-29 <= s < 2**30 - 1/4) as int32 multipliers in [2**30, 2**31) and shifts
    (1..59, the range of the AIE2 accumulator's shift) with ``mult / 2**shift == s`` to 31 bits;
    a zero scale gives multiplier 0."""
    scale = np.asarray(scale, np.float64).ravel()
    mult = np.zeros(scale.shape, np.int32)
    shift = np.ones(scale.shape, np.int8)
    for i, s in enumerate(scale):
        if s == 0:
            continue
        fraction, exponent = math.frexp(float(s))  # s = fraction * 2**exponent, fraction in [0.5, 1)
        m = round(fraction * (1 << 31))
        if m == 1 << 31:
            m //= 2
            exponent += 1
        sh = 31 - exponent
        if not 1 <= sh <= 59:
            raise ValueError(f"scale {s} is out of the multiplier's range")
        mult[i], shift[i] = m, sh
    return mult, shift


def requant(acc: np.ndarray, mult: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """int32 ``[M, N]`` -> int8: ``saturate(srs(int64(acc) * mult[j], shift[j]))``."""
    product = acc.astype(np.int64) * np.asarray(mult, np.int64)
    return srs(product, np.asarray(shift, np.int64), np.int8)
