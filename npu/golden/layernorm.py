"""Layer norm over rows in float32 (kernels/layernorm.cc, mlir/layernorm.py).

Two passes in the lane order of :func:`npu.golden.numerics.lane_sum`: the mean, then the
variance of the centred row; ``1 / sqrt(var + 1e-5)`` with IEEE sqrt and division, then
``(d * rstd) * gamma + beta``.
"""

from __future__ import annotations

import numpy as np

from .numerics import lane_sum

__all__ = ["EPS", "layernorm"]

EPS = np.float32(1e-5)


def layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n = np.float32(x.shape[-1])
    mean = lane_sum(x) / n
    d = x - mean[..., None]
    var = lane_sum(d * d) / n
    rstd = np.float32(1) / np.sqrt(var + EPS)
    y = d * rstd[..., None]
    y *= np.asarray(gamma, np.float32)
    y += np.asarray(beta, np.float32)
    return y
