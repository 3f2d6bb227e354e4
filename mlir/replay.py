"""Numpy replay of the npu1 designs' data movement, to prove their tilings on the CPU.

Why: nothing here can compile or run the designs, so the part most likely to be wrong, the DMA
access patterns and the way objects flow through memory tiles to the cores and back, is executed
here exactly as the designs describe it, from the same :mod:`npu.xdna.tiling` objects the IRON
code reads. Each shim transfer gathers (or scatters) its host buffer through its buffer
descriptor's offset/sizes/strides; the stream is cut into the fifo's objects; memory tiles split,
broadcast and join them as the designs link them; every core runs its program (the same loop,
acquire order and kernel calls as the IRON core function) as a generator that blocks on an empty
fifo; and drains write results back. Waves run in order: a wave's fills read host memory before
its drains write it, as on the device where they run concurrently.

It catches: patterns that read the wrong elements (wrong results), objects that do not divide a
transfer, cores that starve or leave data unread, drains that would wait forever, output elements
written twice or never. It does not model fifo depths (back-pressure) or timing.

Kernels are callables with the C ABI of ``kernels/*.cc``: flat numpy views of the buffers, typed
as the C function reads them, plus int sizes; they write their outputs in place.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from npu.xdna.tiling import (  # noqa: E402
    DTYPES,
    KERNEL_ABI,
    N_CORE_ROWS,
    GemmTiling,
    MelTiling,
    RowTiling,
    Transfer,
)

__all__ = ["ReplayError", "gemm_kernels", "replay_gemm", "replay_mel", "replay_rows"]

Kernel = Callable[..., None]
Proc = Generator[None, None, None]


class ReplayError(AssertionError):
    """The design's data movement is inconsistent (it would hang, drop or corrupt data)."""


# ---- reference kernels (C ABI) -----------------------------------------------------------------


def _zero_i32(c: np.ndarray, count: int) -> None:
    c[:count] = 0


def _gemm_i8_i32(a: np.ndarray, b: np.ndarray, c: np.ndarray, m: int, k: int, n: int) -> None:
    # float BLAS on int8 values is exact while every partial sum stays below 2**24 (float32,
    # k <= 1024) or 2**53 (float64); the int32 add wraps like the hardware accumulator.
    ft = np.float32 if k <= 1024 else np.float64
    prod = a[: m * k].reshape(m, k).astype(ft) @ b[: k * n].reshape(k, n).astype(ft)
    with np.errstate(over="ignore"):
        c[: m * n] += prod.reshape(-1).astype(np.int64).astype(np.int32)


def gemm_kernels() -> dict[str, Kernel]:
    """Plain numpy versions of ``zero_i32`` and ``gemm_i8_i32``."""
    return {"zero_i32": _zero_i32, "gemm_i8_i32": _gemm_i8_i32}


# ---- the machine -------------------------------------------------------------------------------


class _Fifo:
    """An unbounded queue of objects (flat numpy arrays)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.q: deque[np.ndarray] = deque()

    def push(self, obj: np.ndarray) -> None:
        self.q.append(obj)


def _pop(fifo: _Fifo) -> Generator[None, None, np.ndarray]:
    while not fifo.q:
        yield
    return fifo.q.popleft()


class _Machine:
    """Fifos, processes (cores and memory-tile joins) and the host buffers, run wave by wave."""

    def __init__(self, host: dict[str, np.ndarray]) -> None:
        self.host = host
        self.written = {name: np.zeros(buf.size, np.int32) for name, buf in host.items()}
        self.drained: set[str] = set()
        self.inputs: dict[str, tuple[int, Callable[[np.ndarray], None]]] = {}
        self.outputs: dict[str, _Fifo] = {}
        self.fifos: list[_Fifo] = []
        self.procs: list[tuple[str, Proc]] = []

    def fifo(self, name: str) -> _Fifo:
        f = _Fifo(name)
        self.fifos.append(f)
        return f

    def on_fill(self, fifo: str, obj_elems: int, deliver: Callable[[np.ndarray], None]) -> None:
        self.inputs[fifo] = (obj_elems, deliver)

    def spawn(self, name: str, proc: Proc) -> None:
        self.procs.append((name, proc))

    def _run(self) -> None:
        """Step every process until none can move."""
        alive = self.procs
        while True:
            before = sum(len(f.q) for f in self.fifos) + sum(len(f.q) for f in self.outputs.values())
            still = []
            for name, proc in alive:
                try:
                    next(proc)
                    still.append((name, proc))
                except StopIteration:
                    pass
            after = sum(len(f.q) for f in self.fifos) + sum(len(f.q) for f in self.outputs.values())
            moved = len(still) != len(alive) or before != after
            alive = still
            if not moved:
                break
        self.procs = alive

    def _fill(self, tr: Transfer) -> None:
        if tr.fifo not in self.inputs:
            raise ReplayError(f"fill into {tr.fifo!r}, which the design does not feed from the host")
        buf = self.host[tr.buffer]
        idx = tr.pattern.indices()
        if idx.size and (idx.min() < 0 or idx.max() >= buf.size):
            raise ReplayError(f"fill of {tr.fifo} reads outside {tr.buffer} ({buf.size} elements)")
        data = buf[idx]
        obj, deliver = self.inputs[tr.fifo]
        if data.size % obj:
            raise ReplayError(
                f"fill of {data.size} elements into {tr.fifo} is not a whole number of {obj}-element objects"
            )
        for i in range(0, data.size, obj):
            deliver(data[i : i + obj].copy())

    def _drain(self, tr: Transfer) -> None:
        out = self.outputs.get(tr.fifo)
        if out is None:
            raise ReplayError(f"drain from {tr.fifo!r}, which the design does not send to the host")
        need = tr.pattern.elements
        parts = []
        while need > 0:
            if not out.q:
                raise ReplayError(f"drain of {tr.fifo} waits forever: {need} elements never come")
            obj = out.q.popleft()
            if obj.size > need:
                raise ReplayError(f"drain of {tr.fifo} ends inside an object")
            parts.append(obj)
            need -= obj.size
        data = np.concatenate(parts)
        buf = self.host[tr.buffer]
        idx = tr.pattern.indices()
        if idx.size and (idx.min() < 0 or idx.max() >= buf.size):
            raise ReplayError(f"drain of {tr.fifo} writes outside {tr.buffer} ({buf.size} elements)")
        written = self.written[tr.buffer]
        written += np.bincount(idx, minlength=buf.size).astype(np.int32)
        if (written[idx] > 1).any():
            raise ReplayError(f"drain of {tr.fifo} writes some element of {tr.buffer} twice")
        buf[idx] = data.astype(buf.dtype, copy=False)
        self.drained.add(tr.buffer)

    def run(self, waves: Iterable[Sequence[Transfer]]) -> None:
        for wave in waves:
            for tr in wave:
                if tr.fill:
                    self._fill(tr)
            self._run()
            for tr in wave:
                if not tr.fill:
                    self._drain(tr)
        self._run()
        if self.procs:
            raise ReplayError(f"{self.procs[0][0]} never finishes (starved for data)")
        for f in [*self.fifos, *self.outputs.values()]:
            if f.q:
                raise ReplayError(f"{len(f.q)} objects left unread in {f.name}")
        for name in self.drained:
            if not (self.written[name] == 1).all():
                raise ReplayError(f"{int((self.written[name] == 0).sum())} elements of {name} never written")


def _abi_views(kernel: str, args: Sequence[np.ndarray | int]) -> list[np.ndarray | int]:
    """View each buffer as the type the C function reads through its pointer."""
    abi = KERNEL_ABI[kernel]
    if len(abi) != len(args):
        raise ReplayError(f"{kernel} takes {len(abi)} arguments, the design passes {len(args)}")
    out: list[np.ndarray | int] = []
    for want, arg in zip(abi, args, strict=True):
        if want == "i32":
            if not isinstance(arg, int):
                raise ReplayError(f"{kernel}: a buffer where an int32 scalar is expected")
            out.append(arg)
        else:
            if not isinstance(arg, np.ndarray):
                raise ReplayError(f"{kernel}: a scalar where a {want} pointer is expected")
            out.append(arg.view(DTYPES[want]))
    return out


def _call(kernels: dict[str, Kernel], name: str, args: Sequence[np.ndarray | int]) -> None:
    if name not in kernels:
        raise ReplayError(f"no replay kernel for {name}")
    kernels[name](*_abi_views(name, args))


# ---- GEMM --------------------------------------------------------------------------------------


def _build_gemm(mach: _Machine, t: GemmTiling, kernels: dict[str, Kernel]) -> None:
    m, k, n, rps = t.m, t.k, t.n, t.rows_per_shim
    in_t, out_t = DTYPES[t.in_dtype], DTYPES[t.out_dtype]
    a_core = {(r, c): mach.fifo(f"{t.prefix}A core({r},{c})") for r in range(N_CORE_ROWS) for c in range(t.n_cols)}
    b_core = {(r, c): mach.fifo(f"{t.prefix}B core({r},{c})") for r in range(N_CORE_ROWS) for c in range(t.n_cols)}
    c_core = {(r, c): mach.fifo(f"{t.prefix}C core({r},{c})") for r in range(N_CORE_ROWS) for c in range(t.n_cols)}

    for i in range(t.n_cols):

        def split_a(obj: np.ndarray, i: int = i) -> None:
            # memory tile i: split into rps (m x k) tiles, each broadcast along its core row
            for j in range(rps):
                sub = obj[j * m * k : (j + 1) * m * k].astype(in_t, copy=False)
                for cc in range(t.n_cols):
                    a_core[(i * rps + j, cc)].push(sub)

        def fwd_b(obj: np.ndarray, c: int = i) -> None:
            for r in range(N_CORE_ROWS):
                b_core[(r, c)].push(obj.astype(in_t, copy=False))

        mach.on_fill(t.fifo("A", i), rps * m * k, split_a)
        mach.on_fill(t.fifo("B", i), k * n, fwd_b)
        mach.outputs[t.fifo("C", i)] = _Fifo(t.fifo("C", i))

    def core(r: int, c: int) -> Proc:
        for _ in range(t.tiles_per_core):
            acc = np.empty(m * n, out_t)
            if t.accumulate:
                _call(kernels, "zero_i32", [acc, m * n])
                for _ in range(t.KT):
                    a = yield from _pop(a_core[(r, c)])
                    b = yield from _pop(b_core[(r, c)])
                    _call(kernels, "gemm_i8_i32", [a, b, acc, m, k, n])
            else:
                a = yield from _pop(a_core[(r, c)])
                b = yield from _pop(b_core[(r, c)])
                _call(kernels, "dft_i16_i32", [a, b, acc, m, k, n])
            c_core[(r, c)].push(acc)

    def join(c: int) -> Proc:
        # memory tile c: one C tile from each core row, stacked 4m x n, then to the shim
        for _ in range(t.tiles_per_core):
            parts = []
            for r in range(N_CORE_ROWS):
                part = yield from _pop(c_core[(r, c)])
                parts.append(part)
            mach.outputs[t.fifo("C", c)].push(np.concatenate(parts))

    for r in range(N_CORE_ROWS):
        for c in range(t.n_cols):
            mach.spawn(f"{t.prefix}core({r},{c})", core(r, c))
    for c in range(t.n_cols):
        mach.spawn(f"{t.prefix}C join {c}", join(c))


def replay_gemm(
    t: GemmTiling,
    a: np.ndarray,
    b: np.ndarray,
    *,
    kernels: dict[str, Kernel] | None = None,
    waves: Sequence[Sequence[Transfer]] | None = None,
) -> np.ndarray:
    """``a [M, K] . b [K, N]`` as the design computes it (int32 ``[M, N]``). ``waves`` replaces
    the tiling's own schedule (to test that a broken one is caught)."""
    a_name, b_name, c_name = t.names
    host = {
        a_name: t.pad_a(a).reshape(-1),
        b_name: t.pad_b(b).reshape(-1),
        c_name: np.zeros(t.Mp * t.Np, DTYPES[t.out_dtype]),
    }
    mach = _Machine(host)
    _build_gemm(mach, t, {**gemm_kernels(), **(kernels or {})})
    mach.run(t.waves() if waves is None else waves)
    return t.unpad_c(host[c_name])


# ---- rows --------------------------------------------------------------------------------------


def _build_rows(mach: _Machine, t: RowTiling, kernels: dict[str, Kernel]) -> None:
    lay = t.layout()
    rpt = t.rpt
    in_t, out_t, par_t = DTYPES[lay.in_dtype], DTYPES[lay.out_dtype], DTYPES[lay.par_dtype]
    cores = [(r, c) for r in range(N_CORE_ROWS) for c in range(t.n_cols)]
    in_core = {rc: mach.fifo(f"{t.prefix}in core{rc}") for rc in cores}
    par_core = {rc: mach.fifo(f"{t.prefix}par core{rc}") for rc in cores}
    out_core = {rc: mach.fifo(f"{t.prefix}out core{rc}") for rc in cores}

    for c in range(t.n_cols):

        def split_in(obj: np.ndarray, c: int = c) -> None:
            for r in range(N_CORE_ROWS):
                in_core[(r, c)].push(obj[r * lay.in_obj : (r + 1) * lay.in_obj].view(in_t).copy())

        def bcast_par(obj: np.ndarray, c: int = c) -> None:
            for r in range(N_CORE_ROWS):
                par_core[(r, c)].push(obj.view(par_t).copy())

        mach.on_fill(t.fifo("in", c), N_CORE_ROWS * lay.in_obj, split_in)
        if lay.params != "none":
            mach.on_fill(t.fifo("par", c), lay.par_obj, bcast_par)
        mach.outputs[t.fifo("out", c)] = _Fifo(t.fifo("out", c))

    def core(r: int, c: int) -> Proc:
        local = {b.name: np.full(b.elements, 0 if b.fill is None else b.fill, DTYPES[b.dtype]) for b in lay.locals}
        held: list[np.ndarray] = []
        if lay.params == "const":
            for _ in range(lay.par_const):
                obj = yield from _pop(par_core[(r, c)])
                held.append(obj)
        for name in lay.const_copies:  # dequant: col_scale, bias copied out, objects released
            obj = yield from _pop(par_core[(r, c)])
            local[name][:] = obj[: local[name].size]
        for _ in range(t.tiles_per_core):
            if lay.tile_param_local:
                obj = yield from _pop(par_core[(r, c)])
                local[lay.tile_param_local][:] = obj[r * rpt : (r + 1) * rpt]
            ins = []
            for _ in range(lay.k_in):
                obj = yield from _pop(in_core[(r, c)])
                ins.append(obj)
            outs = [np.zeros(lay.out_obj, out_t) for _ in range(lay.k_out)]
            args: list[np.ndarray | int] = []
            for kind, what in lay.call:
                if kind == "in":
                    args.append(ins[what])
                elif kind == "out":
                    args.append(outs[what])
                elif kind == "par":
                    args.append(held[what])
                elif kind == "local":
                    args.append(local[what])
                else:
                    args.append(int(what))
            _call(kernels, lay.kernel, args)
            if lay.post_copy:
                name, at = lay.post_copy
                outs[0][at : at + local[name].size] = local[name]
            for o in outs:
                out_core[(r, c)].push(o)

    def join(c: int) -> Proc:
        for _ in range(t.tiles_per_core * lay.k_out):
            parts = []
            for r in range(N_CORE_ROWS):
                part = yield from _pop(out_core[(r, c)])
                parts.append(part)
            mach.outputs[t.fifo("out", c)].push(np.concatenate(parts))

    for r, c in cores:
        mach.spawn(f"{t.prefix}core({r},{c})", core(r, c))
    for c in range(t.n_cols):
        mach.spawn(f"{t.prefix}out join {c}", join(c))


def replay_rows(
    t: RowTiling,
    inputs: dict[str, np.ndarray],
    kernel: Kernel,
    *,
    waves: Sequence[Sequence[Transfer]] | None = None,
) -> dict[str, np.ndarray]:
    """Run the row design over host buffers ``inputs`` (by name, already padded and packed as
    :meth:`RowTiling.host_buffers` says); returns the output buffers (flat)."""
    lay = t.layout()
    host: dict[str, np.ndarray] = {}
    for buf in t.host_buffers():
        data = inputs.get(buf.name)
        if data is None:
            host[buf.name] = np.zeros(buf.elements, DTYPES[buf.dtype])
        else:
            data = np.ascontiguousarray(data).reshape(-1)
            if data.size != buf.elements or data.dtype != DTYPES[buf.dtype]:
                raise ReplayError(f"{buf.name}: want {buf.elements} x {buf.dtype}, got {data.size} x {data.dtype}")
            host[buf.name] = data.copy()
    mach = _Machine(host)
    _build_rows(mach, t, {lay.kernel: kernel})
    mach.run(t.waves() if waves is None else waves)
    return {s.buffer: host[s.buffer] for s in lay.outs}


# ---- mel ---------------------------------------------------------------------------------------


def replay_mel(
    t: MelTiling,
    frames: np.ndarray,
    basis: np.ndarray,
    *,
    dft: Kernel,
    mel_log: Kernel,
    waves: Sequence[Sequence[Transfer]] | None = None,
) -> np.ndarray:
    """``frames [F, 400]`` int16 through the DFT on columns 0-1 and mel_log on 2-3, in the
    design's interleaved waves; returns float32 ``[F, 80]``."""
    d = t.dft
    host = {
        "frames": d.pad_a(frames).reshape(-1),
        "basis": d.pad_b(basis).reshape(-1),
        "spec": np.zeros(d.Mp * d.Np, np.int32),
        "logmel": np.zeros(d.Mp * 80, np.float32),
    }
    mach = _Machine(host)
    _build_gemm(mach, d, {"dft_i16_i32": dft})
    _build_rows(mach, t.log, {"mel_log_f32": mel_log})
    mach.run(t.waves() if waves is None else waves)
    return host["logmel"].reshape(d.Mp, 80)[: d.M]
