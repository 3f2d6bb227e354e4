"""int8 x int8 -> int32 GEMM, and int16 x int8 -> int32 for the vocabulary projection
(kernels/gemm.cc, mlir/gemm.py).

Every product and sum is an exact integer: with |a|, |b| <= 128 a row of K < 2**17 terms
cannot overflow int32, nor with |a| <= 2**15 one of K < 2**9. Computed through float BLAS,
which is exact for these integers: float32 while every partial sum stays below 2**24 (int8 and
K <= 1024), float64 otherwise; much faster than numpy's integer matmul.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_K", "MAX_K_I16", "gemm", "gemm_bt", "gemm_i16"]

MAX_K = (1 << 17) - 1  # int8 x int8: 2**17 * 128 * 128 would reach 2**31
MAX_K_I16 = (1 << 9) - 1  # int16 x int8
EXACT_F32_K = 1024  # 1024 * 128 * 128 = 2**24: every partial sum is exact in float32

# Read-only operands (the quantised weights) are converted to float once and kept.
_converted: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _as_float(x: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
    if x.flags.writeable:
        return x.astype(dtype)
    key = id(x)
    hit = _converted.get(key)
    if hit is None or hit[0] is not x or hit[1].dtype != dtype:
        hit = (x, x.astype(dtype))
        _converted[key] = hit
    return hit[1]


def _product(a: np.ndarray, b: np.ndarray, transposed: bool) -> np.ndarray:
    """``a`` (int8, or int16) times int8 ``b`` (``[K, N]``, or ``[N, K]`` when ``transposed``),
    exactly: checked against the int32 bound for ``a``'s type, computed in the narrowest exact
    float."""
    if a.dtype not in (np.int8, np.int16) or b.dtype != np.int8:
        raise TypeError(f"GEMM takes int8 or int16 x int8 operands, got {a.dtype} and {b.dtype}")
    wide = a.dtype == np.int16
    k = a.shape[-1]
    if k != b.shape[-1 if transposed else 0] or k > (MAX_K_I16 if wide else MAX_K):
        raise ValueError(f"bad GEMM shapes {a.shape} x {b.shape}{'^T' if transposed else ''}")
    dtype = np.float64 if wide or k > EXACT_F32_K else np.float32
    fb = _as_float(b, dtype)
    return (_as_float(a, dtype) @ (fb.T if transposed else fb)).astype(np.int32)


def gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a`` int8 ``[M, K]`` times ``b`` int8 ``[K, N]`` -> int32 ``[M, N]``."""
    if a.dtype != np.int8:
        raise TypeError(f"gemm takes int8 operands, got {a.dtype}")
    return _product(a, b, transposed=False)


def gemm_bt(a: np.ndarray, bt: np.ndarray) -> np.ndarray:
    """``a`` int8 or int16 ``[M, K]`` times the transpose of int8 ``bt`` ``[N, K]`` (weights
    stored out x in)."""
    return _product(a, bt, transposed=True)


def gemm_i16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a`` int16 ``[M, K]`` (K < 512) times ``b`` int8 ``[K, N]`` -> int32 ``[M, N]``."""
    if a.dtype != np.int16:
        raise TypeError(f"gemm_i16 takes int16 x int8 operands, got {a.dtype}")
    return _product(a, b, transposed=False)
