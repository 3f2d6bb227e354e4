"""Golden models of the NPU kernels: numpy with the hardware's numerics, bit for bit.

One module per kernel in ``kernels/`` and design in ``mlir/`` (gemm, requant, softmax,
layernorm, gelu, mel). Each function defines exactly what its kernel computes: integer products
accumulate exactly in int32/int64, rescaling is shift-round-saturate with round-half-to-even,
and float work is float32 in a fixed order (reductions over 16 lanes, then a fixed tree;
transcendentals from tables in :mod:`npu.golden.tables`), so the kernels' scalar paths, compiled
on the host, match them bit for bit, and the quantised model (:mod:`npu.quant`) built from them
is the reference the ``xdna`` backend must reproduce exactly.
"""

from .gelu import gelu
from .gemm import gemm, gemm_bt, gemm_i16
from .layernorm import layernorm
from .mel import dft, dft_basis, frames_i16, mel_log
from .requant import dequant, quantize_multiplier, quantize_rows, quantize_rows_i16, requant
from .softmax import softmax

__all__ = [
    "dequant",
    "dft",
    "dft_basis",
    "frames_i16",
    "gelu",
    "gemm",
    "gemm_bt",
    "gemm_i16",
    "layernorm",
    "mel_log",
    "quantize_multiplier",
    "quantize_rows",
    "quantize_rows_i16",
    "requant",
    "softmax",
]
