#!/usr/bin/env python3
"""Quantisation stages for npu1, one design per function of kernels/requant.cc (``--op``).

- ``requant``: ``requant_i32_i8(acc, mult, shift, q, m, n)``, int32 -> int8 per output channel.
  The multipliers and shifts travel once per call as two held params objects (host buffer
  mult_shift int32 ``[2N]``: the multipliers, then the int8 shifts packed into N words).
- ``quantize``: ``quantize_rows_f32_i8(x, q, scale, m, n)``, float32 rows -> int8 + one scale per
  row. A core has one outgoing fifo, so each tile's object carries both: the rpt x N int8 rows,
  then the rpt float scales, copied in from a local buffer after the call. The host buffer qs is
  tile after tile; ``RowTiling.unpack_quantized`` splits it.
- ``dequant``: ``dequant_i32_f32(acc, row_scale, col_scale, bias, residual, y, m, n)``, the
  epilogue of a linear layer. col_scale and bias arrive once (host buffer col_scale_bias
  ``[2N]``) and are copied into core buffers; then one params object per tile holds the column's
  4 x rpt row scales (host buffer row_scale ``[Mp + N]``, see ``RowTiling.pack_row_scale``), of
  which each core copies its rpt. ``--residual`` adds a second row object per tile; without, a
  core-local zero buffer stands in for the null residual.

    python3 mlir/requant.py --op dequant -M 1500 -N 384 --residual > aie.mlir

Layout, tiles and patterns: :class:`npu.xdna.tiling.RowTiling`; the core program: mlir/_rows.py.
"""

import sys

from _rows import rows_main

if __name__ == "__main__":
    sys.exit(rows_main("requant", __doc__, ["requant", "quantize", "dequant"], ["residual"]))
