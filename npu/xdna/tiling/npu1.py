"""The npu1 (Phoenix, XDNA1) facts the tilings check against: tile counts and memories, DMA
channels and buffer-descriptor limits, the kernels' C ABI, data and stack, and the planning
numbers that rank candidate tilings."""

from __future__ import annotations

from typing import Protocol, TypeVar

import numpy as np

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


class _Checked(Protocol):
    def check(self) -> None: ...


T = TypeVar("T", bound=_Checked)


def first_valid(ranked: list[tuple[tuple[float, ...], T]], what: str, nothing: str = "nothing fits") -> T:
    """The best-ranked candidate whose ``check()`` passes (the lowest key first); none passing is
    a DesignError naming ``what`` and the last candidate's reason (``nothing`` when none came)."""
    last = nothing
    for _, t in sorted(ranked, key=lambda kt: kt[0]):
        try:
            t.check()
        except DesignError as e:
            last = str(e)
            continue
        return t
    raise DesignError(f"{what}: {last}")


def itemsize(dtype: str) -> int:
    return np.dtype(DTYPES[dtype]).itemsize


def ceil_to(x: int, q: int) -> int:
    return -(-x // q) * q
