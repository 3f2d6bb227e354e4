#!/usr/bin/env python3
"""Row softmax for npu1: ``y[M, N] = softmax(x[M, N])`` over each row, float32.

kernels/softmax.cc (``softmax_f32(x, y, m, n, n_valid)``) on all 16 cores, ``rpt`` rows per
call. With ``--masked`` row i uses only its first ``n_valid[i]`` columns (attention over a
window shorter than its padded length, or causal masking): the host passes ``n_valid`` int32
``[Mp]``; each column's 4 x rpt values ride a per-tile params object and every core copies its
own rpt into a local buffer. Unmasked, that local buffer is a constant N (every column valid),
since IRON cannot pass the kernel a null pointer.

    python3 mlir/softmax.py -M 9000 -N 1500 --masked > aie.mlir

Host buffers, in order: x ``[Mp, N]`` (zero rows pad to Mp), [n_valid ``[Mp]``], y ``[Mp, N]``.
Layout, tiles and patterns: :class:`npu.xdna.tiling.RowTiling`; the core program: mlir/_rows.py.
"""

import sys

from _rows import rows_main

if __name__ == "__main__":
    sys.exit(rows_main("softmax", __doc__, ["softmax"], ["masked"]))
