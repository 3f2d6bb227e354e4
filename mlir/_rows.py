"""The row-operation template behind softmax.py, layernorm.py, gelu.py, requant.py and the
mel_log half of mel.py.

Why one template: these kernels all take ``rpt`` whole rows at a time, so their designs differ
only in what travels with the rows, and :meth:`npu.xdna.tiling.RowTiling.layout` says exactly
that: the row fifo's objects per tile, the params fifo (held constants, per-tile values, or
both), the core-local buffers, and the kernel's argument list. This module turns a layout into
fifos and a core program; the numpy replay (mlir/replay.py) interprets the same layout.

Per column: shim -> memory tile -> split to the column's 4 cores (rows), a forward broadcast to
the same 4 cores (params), and 4 cores -> join in the memory tile -> shim (results). Each core:
take the held params (if any), then per tile: copy this core's per-tile values out of the
params object, acquire its row objects and output objects, call the kernel, release.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import numpy as np
from _iron import Parts, as_list, fifo, flat, loop, main, program, worker

from npu.xdna.tiling import CORE_STACK, DTYPES, FIFO_DEPTH, N_CORE_ROWS, RowTiling, choose_row_tiling, core_stack


def row_parts(ir: SimpleNamespace, t: RowTiling) -> Parts:
    """Workers and fifos of a row tiling."""
    lay = t.layout()
    k_in, k_out = lay.k_in, lay.k_out
    has_par = lay.params != "none"
    in_l1, out_l1 = flat(lay.in_obj, lay.in_dtype), flat(lay.out_obj, lay.out_dtype)
    in_l2, out_l2 = flat(N_CORE_ROWS * lay.in_obj, lay.in_dtype), flat(N_CORE_ROWS * lay.out_obj, lay.out_dtype)
    par_l1 = flat(lay.par_obj, lay.par_dtype) if has_par else None
    locals_by_name = {b.name: b for b in lay.locals}
    par_depth = max(FIFO_DEPTH, lay.par_const) if lay.params == "const" else FIFO_DEPTH

    # The kernel's signature, one type per argument of the call (see RowLayout.call).
    arg_types: list = []
    for kind, what in lay.call:
        if kind == "in":
            arg_types.append(in_l1)
        elif kind == "out":
            arg_types.append(out_l1)
        elif kind == "par":
            arg_types.append(par_l1)
        elif kind == "local":
            b = locals_by_name[str(what)]
            arg_types.append(flat(b.elements, b.dtype))
        else:
            arg_types.append(np.int32)
    kern = ir.Kernel(lay.kernel, lay.object_file, arg_types)

    parts = Parts()
    rows_in, rows_out, params = [], [], []
    for c in range(t.n_cols):
        mem = ir.Tile(t.first_col + c, 1)
        f_in = fifo(ir, in_l2, t.fifo("in", c))
        rows_in.append(
            f_in.cons().split(
                [r * lay.in_obj for r in range(N_CORE_ROWS)],
                obj_types=[in_l1] * N_CORE_ROWS,
                names=[f"{t.prefix}in_{r}_{c}" for r in range(N_CORE_ROWS)],
                depths=[FIFO_DEPTH * k_in] * N_CORE_ROWS,
                placement=mem,
            )
        )
        f_out = fifo(ir, out_l2, t.fifo("out", c))
        rows_out.append(
            f_out.prod().join(
                [r * lay.out_obj for r in range(N_CORE_ROWS)],
                obj_types=[out_l1] * N_CORE_ROWS,
                names=[f"{t.prefix}out_{r}_{c}" for r in range(N_CORE_ROWS)],
                depths=[FIFO_DEPTH * k_out] * N_CORE_ROWS,
                placement=mem,
            )
        )
        parts.prod[t.fifo("in", c)] = f_in.prod()
        parts.cons[t.fifo("out", c)] = f_out.cons()
        if has_par:
            f_par = fifo(ir, par_l1, t.fifo("par", c))
            params.append(
                f_par.cons().forward(obj_type=par_l1, name=f"{t.prefix}par_{c}", depth=par_depth, placement=mem)
            )
            parts.prod[t.fifo("par", c)] = f_par.prod()

    for r in range(N_CORE_ROWS):
        for c in range(t.n_cols):
            bufs = []
            for b in lay.locals:
                init = None if b.fill is None else np.full(b.elements, b.fill, DTYPES[b.dtype])
                bufs.append(
                    ir.Buffer(flat(b.elements, b.dtype), initial_value=init, name=f"{t.prefix}{b.name}_{r}_{c}")
                )
            args = [rows_in[c][r].cons(), rows_out[c][r].prod()]
            if has_par:
                args.append(params[c].cons(depth=par_depth))
            args += [kern, *bufs]
            stack = core_stack(lay.kernel)
            tile = t.core_tile(r, c)
            parts.workers.append(worker(ir, _core_program(ir, t, r, has_par), args, tile, stack))
            if stack != CORE_STACK:
                parts.stacks[tile] = stack
    return parts


def _core_program(ir: SimpleNamespace, t: RowTiling, r: int, has_par: bool) -> Callable[..., None]:
    """The core function of core row r: the loop the replay's ``_build_rows`` mirrors."""
    lay = t.layout()
    rpt, n_local = t.rpt, [b.name for b in lay.locals]

    def fn(f_in: object, f_out: object, *rest: object) -> None:
        f_par = rest[0] if has_par else None
        kern, bufs = (rest[1], rest[2:]) if has_par else (rest[0], rest[1:])
        local = dict(zip(n_local, bufs, strict=True))

        def value(x: object) -> object:
            return x.op if isinstance(x, ir.Buffer) else x  # a Buffer's memref is its op's result

        held: list = []
        if lay.params == "const":
            held = as_list(f_par.acquire(lay.par_const), lay.par_const)
        if lay.const_copies:
            kc = len(lay.const_copies)
            got = as_list(f_par.acquire(kc), kc)
            for j, name in enumerate(lay.const_copies):
                dst, src = local[name], got[j]
                for i in ir.range_(t.N):
                    dst[i] = src[i]
            f_par.release(kc)
        for _ in loop(ir, t.tiles_per_core):
            if lay.tile_param_local:
                obj = f_par.acquire(1)
                dst = local[lay.tile_param_local]
                for j in range(rpt):  # static offsets: this core's rows of the column's 4 * rpt
                    dst[j] = obj[r * rpt + j]
                f_par.release(1)
            ins = as_list(f_in.acquire(lay.k_in), lay.k_in)
            outs = as_list(f_out.acquire(lay.k_out), lay.k_out)
            call: list = []
            for kind, what in lay.call:
                if kind == "in":
                    call.append(ins[int(what)])
                elif kind == "out":
                    call.append(outs[int(what)])
                elif kind == "par":
                    call.append(held[int(what)])
                elif kind == "local":
                    call.append(value(local[str(what)]))
                else:
                    call.append(int(what))
            kern(*call)
            if lay.post_copy:
                name, at = lay.post_copy
                src = local[name]
                for j in range(next(b.elements for b in lay.locals if b.name == name)):
                    outs[0][at + j] = src[j]
            f_in.release(lay.k_in)
            f_out.release(lay.k_out)
        if lay.params == "const":
            f_par.release(lay.par_const)

    return fn


def emit(ir: SimpleNamespace, t: RowTiling) -> object:
    return program(ir, [row_parts(ir, t)], t.host_buffers(), t.waves())


def rows_main(
    name: str, doc: str, ops: Sequence[str], flags: Sequence[str] = (), argv: Sequence[str] | None = None
) -> int:
    """The command line of a row design: ``-M rows -N row length [--rpt R] [flags]``."""
    ap = argparse.ArgumentParser(prog=name, description=doc.split("\n\n")[0])
    if len(ops) > 1:
        ap.add_argument("--op", choices=ops, required=True, help="which kernel function")
    ap.add_argument("-M", type=int, required=True, help="rows")
    ap.add_argument("-N", type=int, required=True, help="row length")
    ap.add_argument("--rpt", type=int, help="rows per tile (default: chosen to fit 64 KB)")
    for flag in flags:
        ap.add_argument(f"--{flag}", action="store_true", help=f"the {flag} variant")

    def make(args: argparse.Namespace) -> RowTiling:
        op = getattr(args, "op", None) or ops[0]
        opts = {f: getattr(args, f) for f in flags}
        if args.rpt:
            return RowTiling(op, args.M, args.N, args.rpt, **opts)
        return choose_row_tiling(op, args.M, args.N, **opts)

    return main(name, ap, make, emit, argv)
