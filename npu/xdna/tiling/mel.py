"""The mel design's tiling: the integer DFT of each frame as a GEMM, then the mel/log row stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .dma import HostBuffer, Transfer, check_waves
from .gemm import GemmTiling
from .npu1 import N_CORE_ROWS, DesignError, first_valid
from .rows import MEL_BANDS, MEL_SPEC_COLS, RowTiling


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
    return first_valid(ranked, f"no npu1 mel tiling for {frames} frames")
