"""Tilings and DMA access patterns of the npu1 designs in ``mlir/``: the single source of truth.

Why one package: the IRON designs (``mlir/*.py``), the numpy replay that checks them
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

from .dma import DmaPattern, HostBuffer, LocalBuffer, Transfer
from .gemm import GemmTiling, choose_gemm_tiling
from .mel import MelTiling, choose_mel_tiling, mel_tiling
from .npu1 import (
    CORE_MEMORY,
    CORE_STACK,
    DTYPES,
    FIFO_DEPTH,
    KERNEL_ABI,
    KERNEL_DATA,
    MEM_TILE_MEMORY,
    N_CORE_ROWS,
    DesignError,
    core_stack,
    kernel_data,
)
from .rows import RowLayout, RowStream, RowTiling, choose_row_tiling
from .whisper import whisper_tiny_designs, whisper_tiny_gemm_shapes, whisper_tiny_row_shapes

__all__ = [
    "CORE_MEMORY",
    "CORE_STACK",
    "DTYPES",
    "FIFO_DEPTH",
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
