"""The GEMM design's tiling: int8 x int8 -> int32 (and int16 x int8) over the 4x4 cores, its
DMA waves, and the search that picks one per shape."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .dma import DmaPattern, HostBuffer, Transfer, check_channels, check_memory, check_waves
from .npu1 import (
    CLOCK_HZ,
    CORE_MEMORY,
    DDR_BYTES_PER_S,
    DTYPES,
    FIFO_DEPTH,
    FIRST_CORE_ROW,
    KERNEL_CALL_CYCLES,
    MACS_PER_CYCLE,
    MAX_REPEAT,
    MAX_WRAP,
    MEM_TILE_MEMORY,
    N_COLUMNS,
    N_CORE_ROWS,
    WAVE_BDS,
    WORD,
    DesignError,
    ceil_to,
    core_stack,
    first_valid,
    itemsize,
    kernel_data,
)


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
        return ceil_to(self.M, N_CORE_ROWS * self.m)

    @property
    def Kp(self) -> int:
        return ceil_to(self.K, self.k)

    @property
    def Np(self) -> int:
        return ceil_to(self.N, self.n_cols * self.n)

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
        ib, ob = itemsize(self.in_dtype), itemsize(self.out_dtype)
        return {
            "A": FIFO_DEPTH * self.m * self.k * ib,
            "B": FIFO_DEPTH * self.k * self.n * ib,
            "C": FIFO_DEPTH * self.m * self.n * ob,
            "stack": core_stack(self.kernel),
            "kernel data": kernel_data(self.kernel_object),
        }

    def mem_buffers(self) -> dict[str, int]:
        ib, ob = itemsize(self.in_dtype), itemsize(self.out_dtype)
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
        ib = itemsize(self.in_dtype)
        if (self.k * ib) % WORD or (self.n * ib) % WORD:
            raise DesignError(f"k={self.k}, n={self.n} must be whole 4-byte words of {self.in_dtype}")
        if self.rows_per_shim * self.m > MAX_WRAP or N_CORE_ROWS * self.m > MAX_WRAP:
            raise DesignError(f"m={self.m}: 4m rows exceed a BD dimension ({MAX_WRAP})")
        check_memory("compute tile", self.core_buffers(), CORE_MEMORY)
        check_memory("memory tile", self.mem_buffers(), MEM_TILE_MEMORY)
        check_channels(self.channels())
        check_waves(self.waves(), self.host_buffers())

    def estimate(self) -> dict[str, float]:
        """Planning numbers (published peak rates, not measurements): MACs, DDR bytes, seconds."""
        ib, ob = itemsize(self.in_dtype), itemsize(self.out_dtype)
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
    return first_valid(ranked, f"no npu1 tiling for GEMM {M}x{K}x{N}", "nothing fits in 64 KB")
