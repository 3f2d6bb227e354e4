#!/usr/bin/env python3
"""Layer norm over rows for npu1: ``y[M, N] = layernorm(x[M, N]) * gamma + beta``, float32.

kernels/layernorm.cc (``layernorm_f32(x, gamma, beta, y, m, n)``) on all 16 cores, ``rpt`` rows
per call. gamma and beta travel once per call as two held objects of the params fifo (the host
packs them into one buffer, gamma then beta) and stay in every core for the whole call.

    python3 mlir/layernorm.py -M 1500 -N 384 > aie.mlir

Host buffers, in order: x ``[Mp, N]``, gamma_beta ``[2N]``, y ``[Mp, N]``.
Layout, tiles and patterns: :class:`npu.xdna.tiling.RowTiling`; the core program: mlir/_rows.py.
"""

import sys

from _rows import rows_main

if __name__ == "__main__":
    sys.exit(rows_main("layernorm", __doc__, ["layernorm"]))
