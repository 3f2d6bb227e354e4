"""Tilings and DMA access patterns of the npu1 designs in ``mlir/``: the single source of truth.

Why one module: the IRON designs (``mlir/*.py``), the numpy replay that checks them
(``mlir/replay.py``), the build script and the xdna runtime must agree on every tile size, every
padded shape and every buffer-descriptor pattern. They all read them from here, and nothing here
needs the AIE toolchain (pure Python and numpy), so the CPU tests cover exactly what the
hardware would be given.

Terms. npu1 (Phoenix, XDNA1) has 4 columns; each has a shim tile (row 0, DMA to host memory), a
memory tile (row 1, 512 KB) and 4 compute tiles (rows 2-5, 64 KB data memory each). Data moves
through ObjectFifos: the host side of a fifo is fed or drained by the shim DMA, one buffer
descriptor (BD) per :class:`Transfer`, whose address pattern is a :class:`DmaPattern` (offset,
4 sizes, 4 strides, outermost first, in elements of the host buffer, exactly what IRON's
``TensorAccessPattern`` takes). A design's runtime sequence is a list of waves: the transfers of
one wave are issued together and the wave's drains are awaited before the next wave reuses the
BDs (16 per shim tile).

Hardware limits checked here (from mlir-aie's ``NpuDmaMemcpyNdOp``/``DMABDOp`` verifiers and the
npu1 target model): the shim moves 4-byte words, so the innermost stride is 1 element, the
innermost run and every other stride and the offset are whole words; the innermost size (in
words) and the next one are at most 1023; the outermost size is the BD repeat count (1..64) and
stays 1 for drains (mlir-aie lowers it to a task repeat, which would re-arm a drain); strides are
at most 2**20 words. Each tile has a fixed number of DMA channels: shim 2 in + 2 out, memory tile
6 + 6, compute tile 2 + 2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CORE_MEMORY",
    "CORE_STACK",
    "DTYPES",
    "KERNEL_ABI",
    "KERNEL_DATA",
    "MEM_TILE_MEMORY",
    "N_CORE_ROWS",
    "DesignError",
    "DmaPattern",
    "GemmTiling",
    "HostBuffer",
    "LocalBuffer",
    "MelTiling",
    "RowLayout",
    "RowStream",
    "RowTiling",
    "Transfer",
    "choose_gemm_tiling",
    "choose_mel_tiling",
    "choose_row_tiling",
    "core_stack",
    "kernel_data",
    "mel_tiling",
    "whisper_tiny_designs",
    "whisper_tiny_gemm_shapes",
    "whisper_tiny_row_shapes",
]

# ---- npu1 facts --------------------------------------------------------------------------------

N_COLUMNS = 4
N_CORE_ROWS = 4
SHIM_ROW, MEM_ROW, FIRST_CORE_ROW = 0, 1, 2
CORE_MEMORY = 64 * 1024
CORE_STACK = 1024  # aie.core's default stack (0x400), carved out of the same 64 KB
MEM_TILE_MEMORY = 512 * 1024
CHANNELS = {"shim": (2, 2), "mem": (6, 6), "core": (2, 2)}  # (to the stream, from the stream) per tile
SHIM_BDS = 16
WAVE_BDS = 12  # BDs one wave may hold on one shim tile (of 16): headroom for the lowering's own
WORD = 4
MAX_WRAP = 1023  # innermost size (in words) and the next size
MAX_REPEAT = 64  # outermost size: the BD's repeat (iteration) count
MAX_STRIDE_WORDS = 1 << 20
FIFO_DEPTH = 2  # double buffering everywhere

# Data memory a kernel object brings into every core it is linked into: its tables from
# kernels/tables.h (EXP2 1 KB, GELU 7 KB, LOG2 + mel filters 2.7 KB) plus slack for small
# globals and alignment; and the stack its deepest call needs (mel_log_f32 keeps 281 floats of
# power and band sums on the stack, more than the 1 KB default).
KERNEL_DATA = {"gemm.o": 0, "requant.o": 0, "layernorm.o": 0, "softmax.o": 1024, "gelu.o": 7176, "mel.o": 2720}
STATIC_SLACK = 512
KERNEL_STACK = {"mel_log_f32": 2048}


def kernel_data(object_file: str) -> int:
    """Bytes of static data ``object_file`` adds to a core's 64 KB."""
    return KERNEL_DATA[object_file] + STATIC_SLACK


def core_stack(kernel: str) -> int:
    """Stack bytes a core calling ``kernel`` gets (the designs set it on the core)."""
    return KERNEL_STACK.get(kernel, CORE_STACK)


# Planning numbers (DESIGN.md "The NPU, honestly"): published, not measured here. Used only to
# rank candidate tilings against each other.
CLOCK_HZ = 1.8e9
MACS_PER_CYCLE = {"int8": 256, "int16": 64}
DDR_BYTES_PER_S = 20e9
KERNEL_CALL_CYCLES = 120  # call, loop set-up, lock acquire/release around one kernel call

DTYPES = {"int8": np.int8, "int16": np.int16, "int32": np.int32, "float32": np.float32}

# The C ABI of kernels/*.cc: what each pointer argument points to ("i32": an int32 scalar). The
# designs declare each argument with the type of the buffer they hand over; after lowering
# (bare-pointer calling convention) only the address crosses, so a buffer declared int32 may be
# read as float or int8 by the C code. The replay views buffers through these types.
KERNEL_ABI: dict[str, tuple[str, ...]] = {
    "zero_i32": ("int32", "i32"),
    "gemm_i8_i32": ("int8", "int8", "int32", "i32", "i32", "i32"),
    "requant_i32_i8": ("int32", "int32", "int8", "int8", "i32", "i32"),
    "quantize_rows_f32_i8": ("float32", "int8", "float32", "i32", "i32"),
    "dequant_i32_f32": ("int32", "float32", "float32", "float32", "float32", "float32", "i32", "i32"),
    "softmax_f32": ("float32", "float32", "i32", "i32", "int32"),
    "layernorm_f32": ("float32", "float32", "float32", "float32", "i32", "i32"),
    "gelu_f32": ("float32", "float32", "float32", "i32"),
    "dft_i16_i32": ("int16", "int16", "int32", "i32", "i32", "i32"),
    "mel_log_f32": ("int32", "float32", "i32"),
}


class DesignError(ValueError):
    """A tiling breaks an npu1 limit (memory, DMA channels, BD fields) or is inconsistent."""


def _itemsize(dtype: str) -> int:
    return np.dtype(DTYPES[dtype]).itemsize


def _ceil_to(x: int, q: int) -> int:
    return -(-x // q) * q


# ---- DMA patterns ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DmaPattern:
    """One shim buffer descriptor's walk over a flat host buffer: element ``i`` of the stream is
    ``offset + sum(index_d * strides[d])`` with the index running over ``sizes`` (outermost
    first, C order). Units are elements of the host buffer's dtype."""

    offset: int
    sizes: tuple[int, int, int, int]
    strides: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if len(self.sizes) != 4 or len(self.strides) != 4:
            raise DesignError(f"a BD has 4 dimensions, got sizes {self.sizes} strides {self.strides}")
        # A dimension of size 1 has no stride: normalise so equal walks compare equal.
        strides = tuple(0 if s == 1 else t for s, t in zip(self.sizes, self.strides, strict=True))
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        object.__setattr__(self, "strides", tuple(int(t) for t in strides))
        object.__setattr__(self, "offset", int(self.offset))

    @property
    def elements(self) -> int:
        return math.prod(self.sizes)

    def last_index(self) -> int:
        return self.offset + sum((s - 1) * t for s, t in zip(self.sizes, self.strides, strict=True))

    def indices(self) -> np.ndarray:
        """The flat buffer index of every element of the stream, in stream order (int64)."""
        idx = np.full(self.sizes, self.offset, dtype=np.int64)
        for d, (s, t) in enumerate(zip(self.sizes, self.strides, strict=True)):
            shape = [1, 1, 1, 1]
            shape[d] = s
            idx += (np.arange(s, dtype=np.int64) * t).reshape(shape)
        return idx.reshape(-1)

    def check(self, elem_bytes: int, buffer_elements: int, *, drain: bool) -> None:
        """Raise :class:`DesignError` unless a shim BD can walk this pattern over a buffer of
        ``buffer_elements`` elements of ``elem_bytes`` bytes."""
        s, t = self.sizes, self.strides
        where = f"pattern offset={self.offset} sizes={list(s)} strides={list(t)}"
        if min(s) < 1 or min(t) < 0 or self.offset < 0:
            raise DesignError(f"{where}: sizes must be >= 1, strides and offset >= 0")
        if s[3] > 1 and t[3] != 1:
            raise DesignError(f"{where}: the innermost stride must be 1 (the DMA moves whole words)")
        if (self.offset * elem_bytes) % WORD:
            raise DesignError(f"{where}: offset is not 4-byte aligned")
        if (s[3] * elem_bytes) % WORD:
            raise DesignError(f"{where}: the innermost run of {s[3] * elem_bytes} bytes is not whole words")
        for d in range(3):
            if s[d] > 1 and (t[d] * elem_bytes) % WORD:
                raise DesignError(f"{where}: stride {d} is not whole words")
            if t[d] * elem_bytes // WORD > MAX_STRIDE_WORDS:
                raise DesignError(f"{where}: stride {d} exceeds 2**20 words")
        if s[3] * elem_bytes // WORD > MAX_WRAP:
            raise DesignError(f"{where}: innermost size exceeds {MAX_WRAP} words")
        if s[2] > MAX_WRAP:
            raise DesignError(f"{where}: the second-innermost size exceeds {MAX_WRAP}")
        if s[0] > MAX_REPEAT:
            raise DesignError(f"{where}: repeat count exceeds {MAX_REPEAT}")
        if drain and s[0] != 1:
            raise DesignError(f"{where}: a drain's outermost size must be 1 (it lowers to a task repeat)")
        if self.last_index() >= buffer_elements:
            raise DesignError(f"{where}: reaches element {self.last_index()} of a {buffer_elements}-element buffer")

    def as_dict(self) -> dict:
        return {"offset": self.offset, "sizes": list(self.sizes), "strides": list(self.strides)}


def run_pattern(offset: int, n_blocks: int, block_stride: int, run: int, elem_bytes: int) -> DmaPattern:
    """``n_blocks`` contiguous runs of ``run`` elements, ``block_stride`` apart, as one BD: the
    run is folded into (a, b) with b a whole number of words, b <= 1023 words and a <= 1023."""
    best = None
    for b in range(min(run, MAX_WRAP * WORD // elem_bytes), 0, -1):
        if run % b or (b * elem_bytes) % WORD:
            continue
        if run // b <= MAX_WRAP:
            best = b
            break
    if best is None:
        raise DesignError(f"a contiguous run of {run} x {elem_bytes}-byte elements does not fold into one BD")
    return DmaPattern(offset, (1, n_blocks, run // best, best), (0, block_stride, best, 1))


@dataclass(frozen=True)
class Transfer:
    """One shim DMA task of the runtime sequence: ``fill`` moves host -> array (the fifo's
    producer is the shim), otherwise array -> host. ``column`` is the shim tile's column."""

    fifo: str
    buffer: str
    column: int
    fill: bool
    pattern: DmaPattern


@dataclass(frozen=True)
class HostBuffer:
    """One runtime-sequence argument (one XRT buffer object), in the order the design takes them."""

    name: str
    dtype: str
    elements: int

    @property
    def nbytes(self) -> int:
        return self.elements * _itemsize(self.dtype)


@dataclass(frozen=True)
class LocalBuffer:
    """A compute-tile buffer of a row design: scratch, or a constant that stands in for a null
    pointer of the kernel ABI (IRON cannot pass a null memref; a zero buffer is equivalent)."""

    name: str
    dtype: str
    elements: int
    fill: float | int | None = None  # initial value; None: scratch

    @property
    def nbytes(self) -> int:
        return self.elements * _itemsize(self.dtype)


def check_waves(waves: Sequence[Sequence[Transfer]], buffers: Sequence[HostBuffer]) -> None:
    """Every pattern fits its buffer and the BD rules; no wave holds more than ``WAVE_BDS`` BDs
    on one shim tile; every wave ends with at least one drain to await."""
    by_name = {b.name: b for b in buffers}
    for w, wave in enumerate(waves):
        per_shim: dict[int, int] = {}
        for tr in wave:
            buf = by_name.get(tr.buffer)
            if buf is None:
                raise DesignError(f"wave {w}: transfer to unknown buffer {tr.buffer!r}")
            tr.pattern.check(_itemsize(buf.dtype), buf.elements, drain=not tr.fill)
            per_shim[tr.column] = per_shim.get(tr.column, 0) + 1
        if per_shim and max(per_shim.values()) > WAVE_BDS:
            raise DesignError(f"wave {w} holds {max(per_shim.values())} BDs on one shim tile (limit {WAVE_BDS})")
        if not any(not tr.fill for tr in wave):
            raise DesignError(f"wave {w} has no drain to await")


def _check_channels(usage: dict[str, tuple[int, int]]) -> None:
    for tile, (out, inn) in usage.items():
        kind = tile.split(":")[0]
        lim_out, lim_in = CHANNELS[kind]
        if out > lim_out or inn > lim_in:
            raise DesignError(f"{tile} needs {out} outgoing + {inn} incoming DMA channels (has {lim_out} + {lim_in})")


def _check_memory(where: str, used: dict[str, int], limit: int) -> None:
    total = sum(used.values())
    if total > limit:
        parts = ", ".join(f"{k} {v}" for k, v in used.items())
        raise DesignError(f"{where} needs {total} bytes ({parts}), has {limit}")


# ---- GEMM --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmTiling:
    """Whole-array GEMM ``C[M, N] = A[M, K] . B[K, N]`` over ``n_cols`` columns x 4 core rows.

    Core (r, c) computes ``m x n`` tiles of C. A row block is ``4m`` rows: core row r takes rows
    ``r*m .. r*m+m`` of it, fed by shim column ``r // rows_per_shim``, split in that column's
    memory tile and broadcast across the row's cores. A column block is ``n_cols * n`` columns:
    core column c takes columns ``c*n .. c*n+n`` of it, fed by shim column c and broadcast down
    the column. Each core loops over ``MB * NB`` output tiles (row block major) and, for each,
    over ``KT`` depth steps: ``zero_i32`` then ``gemm_i8_i32`` (``c += a . b``) per step. With
    ``accumulate=False`` (the mel DFT) there is one depth step and one call that writes C.
    C tiles go back through the memory tile, stacked 4 rows high (``4m x n``).

    The host pads A to ``[Mp, Kp]`` and B to ``[Kp, Np]`` with zeros (:meth:`pad_a`,
    :meth:`pad_b`); C comes back ``[Mp, Np]`` (:meth:`unpad_c`).
    """

    M: int
    K: int
    N: int
    m: int
    k: int
    n: int
    n_cols: int = N_COLUMNS
    first_col: int = 0
    in_dtype: str = "int8"
    out_dtype: str = "int32"
    accumulate: bool = True
    prefix: str = ""
    names: tuple[str, str, str] = ("A", "B", "C")

    # -- shape --
    @property
    def n_rows(self) -> int:
        return N_CORE_ROWS

    @property
    def rows_per_shim(self) -> int:
        return N_CORE_ROWS // self.n_cols

    @property
    def Mp(self) -> int:
        return _ceil_to(self.M, N_CORE_ROWS * self.m)

    @property
    def Kp(self) -> int:
        return _ceil_to(self.K, self.k)

    @property
    def Np(self) -> int:
        return _ceil_to(self.N, self.n_cols * self.n)

    @property
    def MB(self) -> int:
        return self.Mp // (N_CORE_ROWS * self.m)

    @property
    def NB(self) -> int:
        return self.Np // (self.n_cols * self.n)

    @property
    def KT(self) -> int:
        return self.Kp // self.k

    @property
    def tiles_per_core(self) -> int:
        return self.MB * self.NB

    @property
    def kernel(self) -> str:
        return "gemm_i8_i32" if self.accumulate else "dft_i16_i32"

    @property
    def kernel_object(self) -> str:
        return "gemm.o" if self.accumulate else "mel.o"

    def fifo(self, kind: str, col: int) -> str:
        """Name of the host-side fifo ``kind`` ("A", "B" or "C") of local column ``col``."""
        return f"{self.prefix}{kind}{col}"

    def core_tile(self, r: int, c: int) -> tuple[int, int]:
        """(column, row) of the compute tile of core row r, core column c."""
        return (self.first_col + c, FIRST_CORE_ROW + r)

    # -- memory --
    def core_buffers(self) -> dict[str, int]:
        ib, ob = _itemsize(self.in_dtype), _itemsize(self.out_dtype)
        return {
            "A": FIFO_DEPTH * self.m * self.k * ib,
            "B": FIFO_DEPTH * self.k * self.n * ib,
            "C": FIFO_DEPTH * self.m * self.n * ob,
            "stack": core_stack(self.kernel),
            "kernel data": kernel_data(self.kernel_object),
        }

    def mem_buffers(self) -> dict[str, int]:
        ib, ob = _itemsize(self.in_dtype), _itemsize(self.out_dtype)
        return {
            "A": FIFO_DEPTH * self.rows_per_shim * self.m * self.k * ib,
            "B": FIFO_DEPTH * self.k * self.n * ib,
            "C": FIFO_DEPTH * N_CORE_ROWS * self.m * self.n * ob,
        }

    def channels(self) -> dict[str, tuple[int, int]]:
        use = {}
        for c in range(self.n_cols):
            col = self.first_col + c
            use[f"shim:{col}"] = (2, 1)  # A and B out, C in
            use[f"mem:{col}"] = (self.rows_per_shim + 2, 2 + N_CORE_ROWS)  # A split, B, C out | A, B, 4 C in
        use["core"] = (1, 2)
        return use

    # -- DMA patterns --
    def a_pattern(self, i: int, rb: int, cb0: int, ncb: int) -> DmaPattern:
        """Shim column i, row block rb: the A rows of core rows ``i*rps ..``, all depth steps,
        repeated for ``ncb`` column blocks (stride 0: the same rows again)."""
        rows = self.rows_per_shim * self.m
        off = (rb * N_CORE_ROWS * self.m + i * rows) * self.Kp
        return DmaPattern(off, (ncb, self.KT, rows, self.k), (0, self.k, self.Kp, 1))

    def b_pattern(self, c: int, cb0: int, ncb: int) -> DmaPattern:
        """Shim column c: the ``k x n`` tiles of B for column blocks ``cb0 ..``, depth innermost."""
        off = (cb0 * self.n_cols + c) * self.n
        return DmaPattern(off, (ncb, self.KT, self.k, self.n), (self.n_cols * self.n, self.k * self.Np, self.Np, 1))

    def c_pattern(self, c: int, rb: int, cb0: int = 0, ncb: int | None = None) -> DmaPattern:
        """Shim column c, row block rb: the ``4m x n`` stacks of column blocks ``cb0 ..``."""
        ncb = self.NB - cb0 if ncb is None else ncb
        off = rb * N_CORE_ROWS * self.m * self.Np + (cb0 * self.n_cols + c) * self.n
        return DmaPattern(off, (1, ncb, N_CORE_ROWS * self.m, self.n), (0, self.n_cols * self.n, self.Np, 1))

    def chunks(self) -> list[tuple[int, int]]:
        """Column blocks in runs of at most 64 (a BD's repeat count): (first, count)."""
        return [(cb0, min(MAX_REPEAT, self.NB - cb0)) for cb0 in range(0, self.NB, MAX_REPEAT)]

    def unit_transfers(self, rb: int, cb0: int, ncb: int) -> list[Transfer]:
        """The 3 BDs per shim column (C drain, A fill, B fill) of column blocks ``cb0 ..`` of
        row block rb, in the order the cores consume them."""
        a, b, cname = self.names
        out: list[Transfer] = []
        for c in range(self.n_cols):
            col = self.first_col + c
            out.append(Transfer(self.fifo("C", c), cname, col, False, self.c_pattern(c, rb, cb0, ncb)))
            out.append(Transfer(self.fifo("A", c), a, col, True, self.a_pattern(c, rb, cb0, ncb)))
            out.append(Transfer(self.fifo("B", c), b, col, True, self.b_pattern(c, cb0, ncb)))
        return out

    def row_block_transfers(self, rb: int) -> list[Transfer]:
        return [tr for cb0, ncb in self.chunks() for tr in self.unit_transfers(rb, cb0, ncb)]

    def waves(self) -> list[tuple[Transfer, ...]]:
        """Units (row block, run of column blocks) in order, ``WAVE_BDS // 3`` per wave."""
        units = [(rb, cb0, ncb) for rb in range(self.MB) for cb0, ncb in self.chunks()]
        step = WAVE_BDS // 3
        return [
            tuple(tr for rb, cb0, ncb in units[u : u + step] for tr in self.unit_transfers(rb, cb0, ncb))
            for u in range(0, len(units), step)
        ]

    # -- host side --
    def host_buffers(self) -> list[HostBuffer]:
        a, b, c = self.names
        return [
            HostBuffer(a, self.in_dtype, self.Mp * self.Kp),
            HostBuffer(b, self.in_dtype, self.Kp * self.Np),
            HostBuffer(c, self.out_dtype, self.Mp * self.Np),
        ]

    def pad_a(self, a: np.ndarray) -> np.ndarray:
        out = np.zeros((self.Mp, self.Kp), DTYPES[self.in_dtype])
        out[: self.M, : self.K] = a
        return out

    def pad_b(self, b: np.ndarray) -> np.ndarray:
        out = np.zeros((self.Kp, self.Np), DTYPES[self.in_dtype])
        out[: self.K, : self.N] = b
        return out

    def unpad_c(self, c: np.ndarray) -> np.ndarray:
        return np.asarray(c).reshape(self.Mp, self.Np)[: self.M, : self.N]

    # -- checks and numbers --
    def check(self) -> None:
        """Raise :class:`DesignError` unless the tiling fits npu1 and its BD rules."""
        if self.n_cols not in (1, 2, 4) or self.first_col + self.n_cols > N_COLUMNS or self.first_col < 0:
            raise DesignError(f"{self.n_cols} columns from column {self.first_col} do not fit npu1's {N_COLUMNS}")
        if min(self.M, self.K, self.N, self.m, self.k, self.n) < 1:
            raise DesignError("sizes must be positive")
        if not self.accumulate and self.KT != 1:
            raise DesignError("a non-accumulating GEMM (the DFT) takes its whole depth in one step: k must cover K")
        ib = _itemsize(self.in_dtype)
        if (self.k * ib) % WORD or (self.n * ib) % WORD:
            raise DesignError(f"k={self.k}, n={self.n} must be whole 4-byte words of {self.in_dtype}")
        if self.rows_per_shim * self.m > MAX_WRAP or N_CORE_ROWS * self.m > MAX_WRAP:
            raise DesignError(f"m={self.m}: 4m rows exceed a BD dimension ({MAX_WRAP})")
        _check_memory("compute tile", self.core_buffers(), CORE_MEMORY)
        _check_memory("memory tile", self.mem_buffers(), MEM_TILE_MEMORY)
        _check_channels(self.channels())
        check_waves(self.waves(), self.host_buffers())

    def estimate(self) -> dict[str, float]:
        """Planning numbers (published peak rates, not measurements): MACs, DDR bytes, seconds."""
        ib, ob = _itemsize(self.in_dtype), _itemsize(self.out_dtype)
        ideal = self.m * self.k * self.n / MACS_PER_CYCLE[self.in_dtype]
        cycles = self.tiles_per_core * (self.KT * (ideal + KERNEL_CALL_CYCLES) + KERNEL_CALL_CYCLES)
        ddr = self.Mp * self.Kp * ib * self.NB + self.Kp * self.Np * ib * self.MB + self.Mp * self.Np * ob
        compute_s, ddr_s = cycles / CLOCK_HZ, ddr / DDR_BYTES_PER_S
        return {
            "macs": float(self.M * self.K * self.N),
            "padded_macs": float(self.Mp * self.Kp * self.Np),
            "ddr_bytes": float(ddr),
            "compute_s": compute_s,
            "ddr_s": ddr_s,
            "time_s": max(compute_s, ddr_s),
        }

    def to_dict(self) -> dict:
        return {
            "kind": "gemm",
            "M": self.M,
            "K": self.K,
            "N": self.N,
            "m": self.m,
            "k": self.k,
            "n": self.n,
            "Mp": self.Mp,
            "Kp": self.Kp,
            "Np": self.Np,
            "n_cols": self.n_cols,
            "first_col": self.first_col,
            "in_dtype": self.in_dtype,
            "out_dtype": self.out_dtype,
            "kernel": self.kernel,
            "tiles_per_core": self.tiles_per_core,
            "depth_steps": self.KT,
            "core_bytes": sum(self.core_buffers().values()),
            "mem_tile_bytes": sum(self.mem_buffers().values()),
            "waves": len(self.waves()),
            "buffers": [{"name": b.name, "dtype": b.dtype, "elements": b.elements} for b in self.host_buffers()],
        }


M_CHOICES = (4, 8, 16, 24, 32, 48, 64, 96, 128)
N_CHOICES = (32, 64, 96, 128, 160, 192, 224, 256)
K_CHOICES = tuple(range(32, 257, 32))


def choose_gemm_tiling(
    M: int,
    K: int,
    N: int,
    *,
    n_cols: int = N_COLUMNS,
    first_col: int = 0,
    in_dtype: str = "int8",
    accumulate: bool = True,
    prefix: str = "",
    names: tuple[str, str, str] = ("A", "B", "C"),
    m_choices: Iterable[int] = M_CHOICES,
    n_choices: Iterable[int] = N_CHOICES,
) -> GemmTiling:
    """The valid tiling with the lowest planned time (ties: fewer padded MACs, larger tiles).

    Candidates keep the kernel on its vector path: m a multiple of 4, k and n multiples of 32
    (int8; the DFT's depth is all of K). ``accumulate=False`` fixes ``k = K``."""
    k_choices = (K,) if not accumulate else K_CHOICES
    ranked: list[tuple[tuple[float, ...], GemmTiling]] = []
    for m in m_choices:
        for n in n_choices:
            for k in k_choices:
                t = GemmTiling(M, K, N, m, k, n, n_cols, first_col, in_dtype, "int32", accumulate, prefix, names)
                if sum(t.core_buffers().values()) > CORE_MEMORY or t.Kp - K >= k:
                    continue  # does not fit, or a whole depth step of padding
                est = t.estimate()
                ranked.append(((round(est["time_s"], 9), est["padded_macs"], -(m * k * n), m, n, k), t))
    ranked.sort(key=lambda kt: kt[0])
    last = "nothing fits in 64 KB"
    for _, t in ranked:
        try:
            t.check()
        except DesignError as e:
            last = str(e)
            continue
        return t
    raise DesignError(f"no npu1 tiling for GEMM {M}x{K}x{N}: {last}")


# ---- row operations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RowStream:
    """Per-tile data read from (or written to) one host buffer: ``units`` of ``width`` elements,
    ``stride`` apart. A unit is a row, or with ``per_tile`` a whole tile object (a packed output)."""

    buffer: str
    width: int
    stride: int
    per_tile: bool = False


Arg = tuple[str, object]  # ("in" | "out" | "par", index), ("local", name) or ("int", value)


@dataclass(frozen=True)
class RowLayout:
    """What one row operation moves and holds, derived from its kernel's ABI (see RowTiling).

    ``call`` is the kernel's argument list, read by the IRON design and by the replay alike:
    ``("in", i)`` the i-th object acquired from the row fifo this tile, ``("out", i)`` likewise
    for the result fifo, ``("par", i)`` the i-th held params object, ``("local", name)`` a core
    buffer, ``("int", v)`` an int32 constant. Around the call: ``const_copies`` names the locals
    the first params objects are copied into once per call; ``tile_param_local`` receives this
    core's ``rpt`` values (offset ``r * rpt``) of each per-tile params object; ``post_copy``
    (local, word offset) copies a local into the first output object after the call.
    """

    kernel: str
    object_file: str
    in_dtype: str
    in_obj: int
    ins: tuple[RowStream, ...]
    out_dtype: str
    out_obj: int
    outs: tuple[RowStream, ...]
    params: str  # "none" | "const" | "tile" | "dequant"
    par_dtype: str = "int32"
    par_obj: int = 0
    par_const: int = 0  # objects sent once per call (held, or copied to locals for "dequant")
    locals: tuple[LocalBuffer, ...] = ()
    args: tuple[HostBuffer, ...] = ()
    call: tuple[Arg, ...] = ()
    const_copies: tuple[str, ...] = ()
    tile_param_local: str | None = None
    post_copy: tuple[str, int] | None = None

    @property
    def k_in(self) -> int:
        return len(self.ins)

    @property
    def k_out(self) -> int:
        return len(self.outs)


ROW_OPS = ("gelu", "layernorm", "softmax", "requant", "quantize", "dequant", "mel_log")
MEL_SPEC_COLS = 402  # interleaved re, im of 201 bins
MEL_BANDS = 80


@dataclass(frozen=True)
class RowTiling:
    """A row operation spread over ``n_cols`` columns x 4 cores, ``rpt`` rows per tile.

    A block is ``n_cols * 4 * rpt`` consecutive rows: column c takes ``4 * rpt`` of them (shim ->
    its memory tile -> split to its 4 cores, ``rpt`` rows each) and gets the results back the same
    way (join). Each core runs ``tiles_per_core`` tiles, one per block. Rows are padded to ``Mp``
    (a whole number of blocks); padded rows are computed and dropped.

    Kernel arguments that are not per-row data travel on one more fifo per column ("params"),
    broadcast to the column's cores: ``const`` objects arrive once per call and are held
    (layer-norm gamma/beta, requant multiplier/shift); ``tile`` objects arrive per tile and hold
    the column's ``4 * rpt`` per-row values, of which each core copies its ``rpt`` (softmax
    ``n_valid``); ``dequant`` sends col_scale and bias once (copied into locals) and then one
    row-scale object per tile. A compute tile has only 2 incoming DMA channels, hence one fifo
    for rows and one for parameters.
    """

    op: str
    M: int
    N: int
    rpt: int
    n_cols: int = N_COLUMNS
    first_col: int = 0
    residual: bool = False  # gelu, dequant: add a residual stream
    masked: bool = False  # softmax: per-row n_valid
    prefix: str = ""

    @property
    def block_rows(self) -> int:
        return self.n_cols * N_CORE_ROWS * self.rpt

    @property
    def Mp(self) -> int:
        return _ceil_to(self.M, self.block_rows)

    @property
    def NBLK(self) -> int:
        return self.Mp // self.block_rows

    @property
    def tiles_per_core(self) -> int:
        return self.NBLK

    @property
    def n_tiles(self) -> int:
        return self.Mp // self.rpt

    def fifo(self, kind: str, col: int) -> str:
        """Name of the host-side fifo ``kind`` ("in", "out" or "par") of local column ``col``."""
        return f"{self.prefix}{kind}{col}"

    def core_tile(self, r: int, c: int) -> tuple[int, int]:
        return (self.first_col + c, FIRST_CORE_ROW + r)

    def layout(self) -> RowLayout:
        """The fifos, local buffers, host buffers and kernel call of this op (its ABI, made movable)."""
        op, N, rpt, Mp = self.op, self.N, self.rpt, self.Mp
        row = rpt * N

        def rows(name: str, width: int = N, stride: int | None = None) -> RowStream:
            return RowStream(name, width, width if stride is None else stride)

        def buf(name: str, dtype: str, elements: int) -> HostBuffer:
            return HostBuffer(name, dtype, elements)

        def n(v: int) -> Arg:
            return ("int", v)

        zero = LocalBuffer("zero", "float32", row, 0.0)  # stands in for a null residual
        if op == "gelu":
            res: Arg = ("in", 1) if self.residual else ("local", "zero")
            return RowLayout(
                "gelu_f32", "gelu.o", "float32", row, (rows("x"),) + ((rows("residual"),) if self.residual else ()),
                "float32", row, (rows("y"),), "none",
                locals=() if self.residual else (zero,),
                args=(buf("x", "float32", Mp * N),)
                + ((buf("residual", "float32", Mp * N),) if self.residual else ())
                + (buf("y", "float32", Mp * N),),
                call=(("in", 0), res, ("out", 0), n(row)),
            )  # fmt: skip
        if op == "layernorm":
            return RowLayout(
                "layernorm_f32", "layernorm.o", "float32", row, (rows("x"),), "float32", row, (rows("y"),),
                "const", "float32", N, 2,
                args=(buf("x", "float32", Mp * N), buf("gamma_beta", "float32", 2 * N), buf("y", "float32", Mp * N)),
                call=(("in", 0), ("par", 0), ("par", 1), ("out", 0), n(rpt), n(N)),
            )  # fmt: skip
        if op == "softmax":
            call = (("in", 0), ("out", 0), n(rpt), n(N), ("local", "n_valid"))
            if self.masked:
                return RowLayout(
                    "softmax_f32", "softmax.o", "float32", row, (rows("x"),), "float32", row, (rows("y"),),
                    "tile", "int32", N_CORE_ROWS * rpt, 0, (LocalBuffer("n_valid", "int32", rpt),),
                    (buf("x", "float32", Mp * N), buf("n_valid", "int32", Mp), buf("y", "float32", Mp * N)),
                    call, tile_param_local="n_valid",
                )  # fmt: skip
            return RowLayout(
                "softmax_f32", "softmax.o", "float32", row, (rows("x"),), "float32", row, (rows("y"),), "none",
                locals=(LocalBuffer("n_valid", "int32", rpt, N),),  # every column valid
                args=(buf("x", "float32", Mp * N), buf("y", "float32", Mp * N)), call=call,
            )  # fmt: skip
        if op == "requant":
            return RowLayout(
                "requant_i32_i8", "requant.o", "int32", row, (rows("acc"),), "int8", row, (rows("q"),),
                "const", "int32", N, 2,
                args=(buf("acc", "int32", Mp * N), buf("mult_shift", "int32", 2 * N), buf("q", "int8", Mp * N)),
                call=(("in", 0), ("par", 0), ("par", 1), ("out", 0), n(rpt), n(N)),
            )  # fmt: skip
        if op == "quantize":
            obj = row // 4 + rpt  # int32 words: the rpt x N int8 rows, then the rpt float scales
            return RowLayout(
                "quantize_rows_f32_i8", "requant.o", "float32", row, (rows("x"),), "int32", obj,
                (RowStream("qs", obj, obj, per_tile=True),), "none",
                locals=(LocalBuffer("scale", "int32", rpt),),
                args=(buf("x", "float32", Mp * N), buf("qs", "int32", self.n_tiles * obj)),
                call=(("in", 0), ("out", 0), ("local", "scale"), n(rpt), n(N)),
                post_copy=("scale", row // 4),
            )  # fmt: skip
        if op == "dequant":
            res = ("in", 1) if self.residual else ("local", "zero")
            return RowLayout(
                "dequant_i32_f32", "requant.o", "int32", row,
                (rows("acc"),) + ((rows("residual"),) if self.residual else ()),
                "float32", row, (rows("y"),), "dequant", "float32", N, 2,
                (LocalBuffer("col_scale", "float32", N), LocalBuffer("bias", "float32", N),
                 LocalBuffer("row_scale", "float32", rpt)) + (() if self.residual else (zero,)),
                (buf("acc", "int32", Mp * N),)
                + ((buf("residual", "float32", Mp * N),) if self.residual else ())
                + (buf("col_scale_bias", "float32", 2 * N), buf("row_scale", "float32", Mp + N),
                   buf("y", "float32", Mp * N)),
                (("in", 0), ("local", "row_scale"), ("local", "col_scale"), ("local", "bias"), res, ("out", 0),
                 n(rpt), n(N)),
                const_copies=("col_scale", "bias"), tile_param_local="row_scale",
            )  # fmt: skip
        if op == "mel_log":
            return RowLayout(
                "mel_log_f32", "mel.o", "int32", rpt * MEL_SPEC_COLS, (rows("spec", MEL_SPEC_COLS, N),),
                "float32", rpt * MEL_BANDS, (rows("logmel", MEL_BANDS),), "none",
                args=(buf("spec", "int32", Mp * N), buf("logmel", "float32", Mp * MEL_BANDS)),
                call=(("in", 0), ("out", 0), n(rpt)),
            )  # fmt: skip
        raise DesignError(f"unknown row op {op!r} (one of {', '.join(ROW_OPS)})")

    # -- memory --
    def core_buffers(self) -> dict[str, int]:
        lay = self.layout()
        ib, ob, pb = _itemsize(lay.in_dtype), _itemsize(lay.out_dtype), _itemsize(lay.par_dtype)
        used = {
            "in": FIFO_DEPTH * lay.k_in * lay.in_obj * ib,
            "out": FIFO_DEPTH * lay.k_out * lay.out_obj * ob,
        }
        if lay.params != "none":
            used["params"] = max(FIFO_DEPTH, lay.par_const) * lay.par_obj * pb
        for loc in lay.locals:
            used[loc.name] = loc.nbytes
        used["stack"] = core_stack(lay.kernel)
        used["kernel data"] = kernel_data(lay.object_file)
        return used

    def mem_buffers(self) -> dict[str, int]:
        lay = self.layout()
        ib, ob, pb = _itemsize(lay.in_dtype), _itemsize(lay.out_dtype), _itemsize(lay.par_dtype)
        used = {
            "in": max(FIFO_DEPTH, FIFO_DEPTH * lay.k_in) * N_CORE_ROWS * lay.in_obj * ib,
            "out": FIFO_DEPTH * lay.k_out * N_CORE_ROWS * lay.out_obj * ob,
        }
        if lay.params != "none":
            used["params"] = FIFO_DEPTH * lay.par_obj * pb
        return used

    def channels(self) -> dict[str, tuple[int, int]]:
        par = 0 if self.layout().params == "none" else 1
        use = {}
        for c in range(self.n_cols):
            col = self.first_col + c
            use[f"shim:{col}"] = (1 + par, 1)
            use[f"mem:{col}"] = (N_CORE_ROWS + par + 1, 1 + par + N_CORE_ROWS)
        use["core"] = (1, 1 + par)
        return use

    # -- DMA patterns --
    def first_row(self, c: int, b: int) -> int:
        """First row of local column c's ``4 * rpt`` rows in block b."""
        return (b * self.n_cols + c) * N_CORE_ROWS * self.rpt

    def stream_pattern(self, s: RowStream, dtype: str, c: int, b0: int, nb: int) -> DmaPattern:
        """Column c's part of stream s for blocks ``b0 .. b0+nb``: one BD."""
        eb = _itemsize(dtype)
        if s.per_tile:
            t0 = self.first_row(c, b0) // self.rpt
            return run_pattern(t0 * s.width, nb, self.n_cols * N_CORE_ROWS * s.width, N_CORE_ROWS * s.width, eb)
        r0, rows = self.first_row(c, b0), N_CORE_ROWS * self.rpt
        block = self.block_rows * s.stride
        if s.stride == s.width:
            return run_pattern(r0 * s.width, nb, block, rows * s.width, eb)
        return DmaPattern(r0 * s.stride, (1, nb, rows, s.width), (0, block, s.stride, 1))

    def params_patterns(self, c: int, b0: int, nb: int, first: bool) -> list[tuple[str, DmaPattern]]:
        """(buffer, pattern) of column c's params fifo for blocks ``b0 .. b0+nb``, in order."""
        lay = self.layout()
        eb = _itemsize(lay.par_dtype)
        out: list[tuple[str, DmaPattern]] = []
        if lay.params == "const" and first:
            out.append((lay.args[1].name, run_pattern(0, 1, 0, lay.par_const * lay.par_obj, eb)))
        elif lay.params == "tile":
            out.append(("n_valid", run_pattern(self.first_row(c, b0), nb, self.block_rows, lay.par_obj, eb)))
        elif lay.params == "dequant":
            if first:
                out.append(("col_scale_bias", run_pattern(0, 1, 0, 2 * self.N, eb)))
            # one N-float object per tile whose first 4*rpt values are this column's row scales
            out.append(("row_scale", run_pattern(self.first_row(c, b0), nb, self.block_rows, self.N, eb)))
        return out

    def blocks_per_wave(self) -> int:
        lay = self.layout()
        if lay.k_in == 1:
            return self.NBLK  # one BD per stream covers every block
        return max(1, (WAVE_BDS - 3) // lay.k_in)  # several inputs interleave per block: a BD each

    def waves(self) -> list[tuple[Transfer, ...]]:
        lay = self.layout()
        step = self.blocks_per_wave()
        waves = []
        for b0 in range(0, self.NBLK, step):
            nb = min(step, self.NBLK - b0)
            wave: list[Transfer] = []
            for c in range(self.n_cols):
                col = self.first_col + c
                for buf, pat in self.params_patterns(c, b0, nb, b0 == 0):
                    wave.append(Transfer(self.fifo("par", c), buf, col, True, pat))
                if lay.k_in == 1:
                    s = lay.ins[0]
                    wave.append(Transfer(self.fifo("in", c), s.buffer, col, True,
                                         self.stream_pattern(s, lay.in_dtype, c, b0, nb)))  # fmt: skip
                else:
                    for b in range(b0, b0 + nb):
                        for s in lay.ins:
                            dtype = next(a.dtype for a in lay.args if a.name == s.buffer)
                            wave.append(Transfer(self.fifo("in", c), s.buffer, col, True,
                                                 self.stream_pattern(s, dtype, c, b, 1)))  # fmt: skip
                for s in lay.outs:
                    wave.append(Transfer(self.fifo("out", c), s.buffer, col, False,
                                         self.stream_pattern(s, lay.out_dtype, c, b0, nb)))  # fmt: skip
            waves.append(tuple(wave))
        return waves

    # -- host side --
    def host_buffers(self) -> list[HostBuffer]:
        return list(self.layout().args)

    def check(self) -> None:
        if self.op not in ROW_OPS:
            raise DesignError(f"unknown row op {self.op!r}")
        if self.n_cols not in (1, 2, 4) or self.first_col < 0 or self.first_col + self.n_cols > N_COLUMNS:
            raise DesignError(f"{self.n_cols} columns from column {self.first_col} do not fit npu1")
        if min(self.M, self.N, self.rpt) < 1:
            raise DesignError("sizes must be positive")
        if self.residual and self.op not in ("gelu", "dequant"):
            raise DesignError(f"{self.op} has no residual input")
        if self.masked and self.op != "softmax":
            raise DesignError(f"{self.op} has no mask")
        lay = self.layout()
        if self.op == "quantize" and (self.rpt * self.N) % WORD:
            raise DesignError("quantize packs int8 rows into words: rpt * N must be a multiple of 4")
        if self.op == "dequant" and N_CORE_ROWS * self.rpt > self.N:
            raise DesignError("dequant carries a column's 4*rpt row scales in an N-float object: N >= 4*rpt")
        if self.op == "mel_log" and self.N < MEL_SPEC_COLS:
            raise DesignError(f"mel_log reads {MEL_SPEC_COLS} columns per row: N (the row stride) >= {MEL_SPEC_COLS}")
        for s in lay.ins + lay.outs:
            dtype = next(a.dtype for a in lay.args if a.name == s.buffer)
            if (s.width * _itemsize(dtype)) % WORD and not s.per_tile:
                raise DesignError(f"rows of {s.buffer} are not whole 4-byte words")
        _check_memory("compute tile", self.core_buffers(), CORE_MEMORY)
        _check_memory("memory tile", self.mem_buffers(), MEM_TILE_MEMORY)
        _check_channels(self.channels())
        check_waves(self.waves(), self.host_buffers())

    # -- host-side packing the runtime needs --
    def pad_rows(self, x: np.ndarray) -> np.ndarray:
        """``[M, ...]`` -> ``[Mp, ...]`` with zero rows (softmax/layer norm of a zero row is finite)."""
        x = np.asarray(x)
        out = np.zeros((self.Mp, *x.shape[1:]), x.dtype)
        out[: self.M] = x
        return out

    def pack_mult_shift(self, mult: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """requant params: int32 ``[2N]``: the multipliers, then the int8 shifts packed into N words."""
        out = np.zeros(2 * self.N, np.int32)
        out[: self.N] = mult
        out[self.N :].view(np.int8)[: self.N] = shift
        return out

    def pack_row_scale(self, row_scale: np.ndarray) -> np.ndarray:
        """dequant row scales, padded to ``Mp + N`` (each tile object reads N values past its rows)."""
        out = np.zeros(self.Mp + self.N, np.float32)
        out[: self.M] = row_scale
        return out

    def unpack_quantized(self, qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """quantize output -> (int8 ``[M, N]``, float32 scales ``[M]``)."""
        tiles = np.asarray(qs, np.int32).reshape(self.n_tiles, -1)
        q = tiles[:, : self.rpt * self.N // 4].copy().view(np.int8).reshape(self.Mp, self.N)
        scale = tiles[:, self.rpt * self.N // 4 :].copy().view(np.float32).reshape(self.Mp)
        return q[: self.M], scale[: self.M]

    def to_dict(self) -> dict:
        lay = self.layout()
        return {
            "kind": "rows",
            "op": self.op,
            "M": self.M,
            "N": self.N,
            "rows_per_tile": self.rpt,
            "Mp": self.Mp,
            "n_cols": self.n_cols,
            "first_col": self.first_col,
            "residual": self.residual,
            "masked": self.masked,
            "kernel": lay.kernel,
            "tiles_per_core": self.tiles_per_core,
            "core_bytes": sum(self.core_buffers().values()),
            "mem_tile_bytes": sum(self.mem_buffers().values()),
            "waves": len(self.waves()),
            "buffers": [{"name": b.name, "dtype": b.dtype, "elements": b.elements} for b in self.host_buffers()],
        }


def choose_row_tiling(
    op: str,
    M: int,
    N: int,
    *,
    n_cols: int = N_COLUMNS,
    first_col: int = 0,
    residual: bool = False,
    masked: bool = False,
    max_rpt: int = 64,
    prefix: str = "",
) -> RowTiling:
    """The rows-per-tile that fits 64 KB and minimises padded rows plus one row's worth of
    overhead per tile (``Mp * (1 + 1/rpt)``); ties go to more rows per tile."""
    best: tuple[tuple[float, int], RowTiling] | None = None
    last = "nothing fits"
    for rpt in range(1, max_rpt + 1):
        t = RowTiling(op, M, N, rpt, n_cols, first_col, residual, masked, prefix)
        try:
            t.check()
        except DesignError as e:
            last = str(e)
            continue
        key = (t.Mp * (1 + 1 / rpt), -rpt)
        if best is None or key < best[0]:
            best = (key, t)
    if best is None:
        raise DesignError(f"no npu1 tiling for {op} over {M} x {N}: {last}")
    return best[1]


# ---- mel ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MelTiling:
    """Whisper's front end on npu1: the DFT as an int16 GEMM on columns 0-1, mel_log on 2-3.

    ``frames [F, 400] . basis [400, 402] -> spec [F, 402]`` runs as a 2-column
    :class:`GemmTiling` with the full depth in one ``dft_i16_i32`` call per tile (the kernel
    rounds once, at the end, so the depth cannot be split); the basis streams through the memory
    tiles as ``400 x n`` tiles with every row block. Its C tiles land in a host scratch buffer
    ``spec [Fp, Np]``. ``mel_log_f32`` needs whole 402-column rows, which no single core holds,
    so the 8 cores of columns 2-3 read them back from ``spec`` (row stride Np) one row block
    behind: wave g runs the DFT of row block g and mel_log of row block g-1, and the spec rows a
    wave reads were drained (and awaited) in an earlier wave. A compute tile has 2 incoming DMA
    channels, so one core cannot take frames, basis and spectrum rows at once; hence the split.
    """

    dft: GemmTiling
    log: RowTiling

    @property
    def F(self) -> int:
        return self.dft.M

    def waves(self) -> list[tuple[Transfer, ...]]:
        dft_waves = [self.dft.row_block_transfers(rb) for rb in range(self.dft.MB)]
        log_blocks = [self.log_block_transfers(b) for b in range(self.log.NBLK)]  # one per DFT row block
        waves = []
        for g in range(self.dft.MB + 1):
            wave: list[Transfer] = []
            if g < self.dft.MB:
                wave += dft_waves[g]
            if g >= 1:
                wave += log_blocks[g - 1]
            waves.append(tuple(wave))
        return waves

    def log_block_transfers(self, b: int) -> list[Transfer]:
        lay = self.log.layout()
        out = []
        for c in range(self.log.n_cols):
            col = self.log.first_col + c
            out.append(Transfer(self.log.fifo("in", c), "spec", col, True,
                                self.log.stream_pattern(lay.ins[0], "int32", c, b, 1)))  # fmt: skip
            out.append(Transfer(self.log.fifo("out", c), "logmel", col, False,
                                self.log.stream_pattern(lay.outs[0], "float32", c, b, 1)))  # fmt: skip
        return out

    def host_buffers(self) -> list[HostBuffer]:
        d = self.dft
        return [
            HostBuffer("frames", "int16", d.Mp * d.Kp),
            HostBuffer("basis", "int16", d.Kp * d.Np),
            HostBuffer("spec", "int32", d.Mp * d.Np),
            HostBuffer("logmel", "float32", d.Mp * MEL_BANDS),
        ]

    def check(self) -> None:
        d, lg = self.dft, self.log
        d.check()
        lg.check()
        if d.first_col + d.n_cols > lg.first_col:
            raise DesignError("the DFT's and mel_log's columns overlap")
        if lg.block_rows != N_CORE_ROWS * d.m or lg.Mp != d.Mp or d.Np != lg.N:
            raise DesignError("mel_log blocks must be the DFT's row blocks (rpt = m / 2 over 2 columns)")
        waves = self.waves()
        check_waves(waves, self.host_buffers())
        self.check_dependencies(waves)

    def check_dependencies(self, waves: Sequence[Sequence[Transfer]]) -> None:
        """Every spec element a wave's mel_log reads was drained by the DFT in an earlier wave."""
        written = np.zeros(self.dft.Mp * self.dft.Np, bool)
        for w, wave in enumerate(waves):
            for tr in wave:
                if tr.buffer == "spec" and tr.fill and not written[tr.pattern.indices()].all():
                    raise DesignError(f"wave {w} reads spectrum rows the DFT has not written yet")
            for tr in wave:
                if tr.buffer == "spec" and not tr.fill:
                    written[tr.pattern.indices()] = True

    def to_dict(self) -> dict:
        return {
            "kind": "mel",
            "frames": self.F,
            "dft": self.dft.to_dict(),
            "log": self.log.to_dict(),
            "waves": len(self.waves()),
            "buffers": [{"name": b.name, "dtype": b.dtype, "elements": b.elements} for b in self.host_buffers()],
        }


def mel_tiling(frames: int, m: int, n: int) -> MelTiling:
    dft = GemmTiling(frames, 400, MEL_SPEC_COLS, m, 400, n, n_cols=2, first_col=0, in_dtype="int16",
                     accumulate=False, prefix="dft_", names=("frames", "basis", "spec"))  # fmt: skip
    log = RowTiling("mel_log", dft.Mp, dft.Np, m // 2, n_cols=2, first_col=2, prefix="log_")
    return MelTiling(dft, log)


def choose_mel_tiling(frames: int) -> MelTiling:
    """The valid (m, n) with the lowest planned DFT time; m even so mel_log gets m/2 rows per tile."""
    ranked: list[tuple[tuple[float, ...], MelTiling]] = []
    for m in (4, 8, 12, 16, 20, 24, 28, 32):
        for n in (16, 32, 48, 64):
            t = mel_tiling(frames, m, n)
            est = t.dft.estimate()
            ranked.append(((round(est["time_s"], 9), est["padded_macs"], -m * n, m, n), t))
    ranked.sort(key=lambda kt: kt[0])
    last = "nothing fits"
    for _, t in ranked:
        try:
            t.check()
        except DesignError as e:
            last = str(e)
            continue
        return t
    raise DesignError(f"no npu1 mel tiling for {frames} frames: {last}")


# ---- Whisper tiny.en ---------------------------------------------------------------------------

D_MODEL, D_FF, N_HEADS, N_VOCAB, N_AUDIO_CTX = 384, 1536, 6, 51864, 1500


def whisper_tiny_gemm_shapes(frames: int = N_AUDIO_CTX, decode_rows: int = 5) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N) of every weight GEMM of tiny.en: the encoder over ``frames`` positions
    (the conv stem as im2col GEMMs: conv1 runs at 2x the rate), the decoder for a step of
    ``decode_rows`` rows, and the vocabulary projection."""
    f = frames
    r = decode_rows
    return [
        ("enc_conv1", 2 * f, 80 * 3, D_MODEL),
        ("enc_conv2", f, D_MODEL * 3, D_MODEL),
        ("enc_qkv", f, D_MODEL, 3 * D_MODEL),
        ("enc_attn_out", f, D_MODEL, D_MODEL),
        ("enc_fc1", f, D_MODEL, D_FF),
        ("enc_fc2", f, D_FF, D_MODEL),
        ("cross_kv", f, D_MODEL, 2 * D_MODEL),
        ("dec_qkv", r, D_MODEL, 3 * D_MODEL),
        ("dec_proj", r, D_MODEL, D_MODEL),
        ("dec_fc1", r, D_MODEL, D_FF),
        ("dec_fc2", r, D_FF, D_MODEL),
        ("dec_vocab", r, D_MODEL, N_VOCAB),
    ]


def whisper_tiny_row_shapes(frames: int = N_AUDIO_CTX) -> list[tuple[str, str, int, int, dict]]:
    """(name, op, M, N, options) of the encoder's row operations."""
    f = frames
    return [
        ("enc_layernorm", "layernorm", f, D_MODEL, {}),
        ("enc_softmax", "softmax", N_HEADS * f, f, {"masked": True}),
        ("enc_gelu", "gelu", f, D_FF, {}),
        ("enc_quantize_d", "quantize", f, D_MODEL, {}),
        ("enc_quantize_ff", "quantize", f, D_FF, {}),
        ("enc_dequant_d", "dequant", f, D_MODEL, {"residual": True}),
        ("enc_dequant_qkv", "dequant", f, 3 * D_MODEL, {}),
        ("enc_dequant_ff", "dequant", f, D_FF, {}),
        ("enc_requant_d", "requant", f, D_MODEL, {}),
    ]


def whisper_tiny_designs(frames: int = N_AUDIO_CTX, decode_rows: int = 5, mel_frames: int = 2 * N_AUDIO_CTX) -> list:
    """(name, design file stem, tiling) of every artifact the xdna backend can use."""
    out: list = []
    seen: set = set()
    for _name, M, K, N in whisper_tiny_gemm_shapes(frames, decode_rows):
        if (M, K, N) in seen:
            continue
        seen.add((M, K, N))
        out.append((f"gemm_{M}x{K}x{N}", "gemm", choose_gemm_tiling(M, K, N)))
    for _name, op, M, N, opts in whisper_tiny_row_shapes(frames):
        design = {"requant": "requant", "quantize": "requant", "dequant": "requant"}.get(op, op)
        suffix = "".join(f"_{k}" for k, v in sorted(opts.items()) if v)
        out.append((f"{op}_{M}x{N}{suffix}", design, choose_row_tiling(op, M, N, **opts)))
    out.append((f"mel_{mel_frames}", "mel", choose_mel_tiling(mel_frames)))
    return out
