#!/usr/bin/env python3
"""GELU for npu1: ``y = gelu(x)`` (plus ``residual`` with ``--residual``), float32, elementwise.

kernels/gelu.cc (``gelu_f32(x, residual, y, count)``) on all 16 cores, over ``rpt`` rows of N at
a time. With ``--residual`` each tile acquires two row objects (x, then the residual) from the
same fifo; without, the kernel gets a core-local zero buffer for its residual pointer (IRON
cannot pass a null pointer; adding zeros changes nothing).

    python3 mlir/gelu.py -M 1500 -N 1536 > aie.mlir

Host buffers, in order: x ``[Mp, N]``, [residual ``[Mp, N]``], y ``[Mp, N]``.
Layout, tiles and patterns: :class:`npu.xdna.tiling.RowTiling`; the core program: mlir/_rows.py.
"""

import sys

from _rows import rows_main

if __name__ == "__main__":
    sys.exit(rows_main("gelu", __doc__, ["gelu"], ["residual"]))
