#!/usr/bin/env python3
"""Whisper's mel front end for npu1: int16 frames -> float32 log10 mel, kernels/mel.cc.

``dft_i16_i32(frames, basis, spec, f, 400, n)`` is an int16 GEMM ``frames [F, 400] . basis
[400, 402]`` whose depth must stay whole (the kernel rounds once, at the end), so it runs as the
2-column, one-step case of the whole-array GEMM (mlir/gemm.py) on columns 0-1, the basis
streaming through the memory tiles with every row block. ``mel_log_f32(spec, logmel, f)`` needs
complete 402-column spectrum rows, which no core holds (a core gets n columns), so the cores of
columns 2-3 read them back from the host scratch buffer ``spec`` one row block behind the DFT:
wave g runs the DFT of row block g and mel_log of row block g-1 (a compute tile has 2 incoming
DMA channels, too few to take frames, basis and spectrum rows at once).

    python3 mlir/mel.py --frames 3000 > aie.mlir

Host buffers, in order: frames int16 ``[Fp, 400]``, basis int16 ``[400, Np]`` (zero columns past
402), spec int32 ``[Fp, Np]`` (scratch), logmel float32 ``[Fp, 80]``.
Tiles, patterns and the wave schedule: :class:`npu.xdna.tiling.MelTiling`.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

from _iron import main, program
from _rows import row_parts
from gemm import gemm_parts

from npu.xdna.tiling import MelTiling, choose_mel_tiling, mel_tiling


def emit(ir: SimpleNamespace, t: MelTiling) -> object:
    return program(ir, [gemm_parts(ir, t.dft), row_parts(ir, t.log)], t.host_buffers(), t.waves())


def _tiling(args: argparse.Namespace) -> MelTiling:
    if args.m and args.n:
        return mel_tiling(args.frames, args.m, args.n)
    return choose_mel_tiling(args.frames)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, required=True, help="frames per call (3000 for a 30 s window)")
    ap.add_argument("-m", type=int, help="frames per DFT core tile (even; with -n; default: chosen)")
    ap.add_argument("-n", type=int, help="spectrum columns per DFT core tile")
    sys.exit(main("mel", ap, _tiling, emit))
