#!/usr/bin/env python3
"""Whole-array int8 GEMM for npu1: ``C[M, N] (int32) = A[M, K] (int8) . B[K, N] (int8)``.

kernels/gemm.cc on all 16 cores (4 columns x 4 rows). Core (r, c) owns ``m x n`` tiles of C and
walks them row block by row block; for each it calls ``zero_i32`` once and ``gemm_i8_i32`` once
per ``k``-deep step (``c += a . b``). A reaches a core row through one memory tile and is
broadcast along the row; B reaches a core column through its memory tile and is broadcast down
the column; the 4 C tiles of a column are stacked in its memory tile and go back to the host.
Every size, offset and access pattern comes from :class:`npu.xdna.tiling.GemmTiling`, which the
numpy replay (mlir/replay.py) executes on the CPU; this file only wires them into IRON.

    python3 mlir/gemm.py -M 1500 -K 384 -N 1536 > aie.mlir     # tiles chosen by tiling.py
    python3 mlir/gemm.py -M 1500 -K 384 -N 1536 --tiling-json  # no toolchain needed

The host passes A ``[Mp, Kp]``, B ``[Kp, Np]`` (zero padded) and C ``[Mp, Np]``, in that order.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import numpy as np
from _iron import Parts, fifo, flat, loop, main, program, worker

from npu.xdna.tiling import FIFO_DEPTH, N_CORE_ROWS, GemmTiling, choose_gemm_tiling


def gemm_parts(ir: SimpleNamespace, t: GemmTiling) -> Parts:
    """Workers and fifos of a GEMM tiling (also the DFT half of mel.py, ``accumulate=False``)."""
    m, k, n, rps = t.m, t.k, t.n, t.rows_per_shim
    a_l1, b_l1, c_l1 = flat(m * k, t.in_dtype), flat(k * n, t.in_dtype), flat(m * n, t.out_dtype)
    a_l2, c_l2 = flat(rps * m * k, t.in_dtype), flat(N_CORE_ROWS * m * n, t.out_dtype)
    i32 = np.int32
    mm = ir.Kernel(t.kernel, t.kernel_object, [a_l1, b_l1, c_l1, i32, i32, i32])
    zero = ir.Kernel("zero_i32", t.kernel_object, [c_l1, i32]) if t.accumulate else None

    parts = Parts()
    a_rows: list = [None] * N_CORE_ROWS  # memory tile -> core row fifos (broadcast along the row)
    b_cols: list = []  # memory tile -> core column fifos (broadcast down the column)
    c_tiles: list = []  # per column: core row r -> memory tile join inputs
    for i in range(t.n_cols):
        mem = ir.Tile(t.first_col + i, 1)
        a3 = fifo(ir, a_l2, t.fifo("A", i))
        subs = a3.cons().split(
            [j * m * k for j in range(rps)],
            obj_types=[a_l1] * rps,
            names=[f"{t.prefix}a_row{i * rps + j}" for j in range(rps)],
            depths=[FIFO_DEPTH] * rps,
            placement=mem,
        )
        for j, sub in enumerate(subs):
            a_rows[i * rps + j] = sub
        b3 = fifo(ir, b_l1, t.fifo("B", i))
        b_cols.append(b3.cons().forward(obj_type=b_l1, name=f"{t.prefix}b_col{i}", depth=FIFO_DEPTH, placement=mem))
        c3 = fifo(ir, c_l2, t.fifo("C", i))
        c_tiles.append(
            c3.prod().join(
                [r * m * n for r in range(N_CORE_ROWS)],
                obj_types=[c_l1] * N_CORE_ROWS,
                names=[f"{t.prefix}c_{r}_{i}" for r in range(N_CORE_ROWS)],
                depths=[FIFO_DEPTH] * N_CORE_ROWS,
                placement=mem,
            )
        )
        parts.prod[t.fifo("A", i)] = a3.prod()
        parts.prod[t.fifo("B", i)] = b3.prod()
        parts.cons[t.fifo("C", i)] = c3.cons()

    def accumulate_fn(fa: object, fb: object, fc: object, zero_k: object, mm_k: object) -> None:
        for _ in loop(ir, t.tiles_per_core):
            ec = fc.acquire(1)
            zero_k(ec, m * n)
            for _ in loop(ir, t.KT):
                ea = fa.acquire(1)
                eb = fb.acquire(1)
                mm_k(ea, eb, ec, m, k, n)
                fa.release(1)
                fb.release(1)
            fc.release(1)

    def single_fn(fa: object, fb: object, fc: object, mm_k: object) -> None:
        for _ in loop(ir, t.tiles_per_core):
            ec = fc.acquire(1)
            ea = fa.acquire(1)
            eb = fb.acquire(1)
            mm_k(ea, eb, ec, m, k, n)
            fa.release(1)
            fb.release(1)
            fc.release(1)

    for r in range(N_CORE_ROWS):
        for c in range(t.n_cols):
            fifos = [a_rows[r].cons(), b_cols[c].cons(), c_tiles[c][r].prod()]
            if t.accumulate:
                w = worker(ir, accumulate_fn, [*fifos, zero, mm], t.core_tile(r, c))
            else:
                w = worker(ir, single_fn, [*fifos, mm], t.core_tile(r, c))
            parts.workers.append(w)
    return parts


def emit(ir: SimpleNamespace, t: GemmTiling) -> object:
    return program(ir, [gemm_parts(ir, t)], t.host_buffers(), t.waves())


def _tiling(args: argparse.Namespace) -> GemmTiling:
    if args.m and args.k and args.n:
        return GemmTiling(args.M, args.K, args.N, args.m, args.k, args.n)
    return choose_gemm_tiling(args.M, args.K, args.N)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-M", type=int, required=True, help="rows of A and C")
    ap.add_argument("-K", type=int, required=True, help="columns of A, rows of B")
    ap.add_argument("-N", type=int, required=True, help="columns of B and C")
    ap.add_argument("-m", type=int, help="rows of a core's C tile (with -k and -n; default: chosen)")
    ap.add_argument("-k", type=int, help="depth of one kernel call")
    ap.add_argument("-n", type=int, help="columns of a core's C tile")
    sys.exit(main("gemm", ap, _tiling, emit))
