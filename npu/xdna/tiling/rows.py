"""The row operations' tiling (GELU, layer norm, softmax, requant, quantize, dequant, mel log):
rows streamed through the cores, their layouts, waves and the search that picks one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dma import DmaPattern, HostBuffer, LocalBuffer, Transfer, check_channels, check_memory, check_waves, run_pattern
from .npu1 import (
    CORE_MEMORY,
    FIFO_DEPTH,
    FIRST_CORE_ROW,
    MEM_TILE_MEMORY,
    N_COLUMNS,
    N_CORE_ROWS,
    WAVE_BDS,
    WORD,
    DesignError,
    ceil_to,
    core_stack,
    itemsize,
    kernel_data,
)


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
        return ceil_to(self.M, self.block_rows)

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
        ib, ob, pb = itemsize(lay.in_dtype), itemsize(lay.out_dtype), itemsize(lay.par_dtype)
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
        ib, ob, pb = itemsize(lay.in_dtype), itemsize(lay.out_dtype), itemsize(lay.par_dtype)
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
        eb = itemsize(dtype)
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
        eb = itemsize(lay.par_dtype)
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
            if (s.width * itemsize(dtype)) % WORD and not s.per_tile:
                raise DesignError(f"rows of {s.buffer} are not whole 4-byte words")
        check_memory("compute tile", self.core_buffers(), CORE_MEMORY)
        check_memory("memory tile", self.mem_buffers(), MEM_TILE_MEMORY)
        check_channels(self.channels())
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
