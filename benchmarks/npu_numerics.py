"""How close the NPU kernels' numerics (the golden models) come to exact math, and to bf16.

Why the row operations are float32 with tables rather than bf16: this prints each golden row
op's worst error against float64 math beside the error of doing the same op in bf16 (inputs and
output rounded to bf16, as a bf16 vector unit would), and the NPU mel front end's distance from
the CPU one on the dev corpus.

    python benchmarks/npu_numerics.py
"""

from __future__ import annotations

import time

import numpy as np
from harness import CORPUS
from scipy.special import erf

from npu import golden
from npu.golden.mel import log_mel as npu_log_mel
from streamd.audio import load_audio
from whisper_engine.mel import log_mel as cpu_log_mel


def bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (nearest, ties to even), returned as float32."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def gelu64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| op | golden (float32, tables) worst error | bf16 worst error | measured on |")
    print("|---|---:|---:|---|")

    x = np.linspace(-10, 10, 400_001, dtype=np.float32)
    exact = gelu64(x)
    print(
        f"| GELU, absolute | {np.abs(golden.gelu(x) - exact).max():.2e} "
        f"| {np.abs(bf16(gelu64(bf16(x)).astype(np.float32)) - exact).max():.2e} | 400k points in [-10, 10] |"
    )

    scores = (rng.standard_normal((256, 1500)) * 4).astype(np.float32)
    s64 = scores.astype(np.float64)
    e = np.exp(s64 - s64.max(1, keepdims=True))
    exact = e / e.sum(1, keepdims=True)
    b = bf16(scores).astype(np.float64)
    eb = bf16(np.exp(b - b.max(1, keepdims=True)).astype(np.float32)).astype(np.float64)
    soft_bf16 = bf16((eb / eb.sum(1, keepdims=True)).astype(np.float32))
    ours = (np.abs(golden.softmax(scores) - exact).max(1) / exact.max(1)).max()
    theirs = (np.abs(soft_bf16 - exact).max(1) / exact.max(1)).max()
    print(f"| softmax, relative to the row max | {ours:.2e} | {theirs:.2e} | 256 rows of 1500 scores, sd 4 |")

    rows = (rng.standard_normal((256, 384)) * 3 + rng.standard_normal((256, 1)) * 10).astype(np.float32)
    gamma = rng.uniform(0.5, 2, 384).astype(np.float32)
    beta = rng.standard_normal(384).astype(np.float32)
    r64 = rows.astype(np.float64)
    exact = (r64 - r64.mean(1, keepdims=True)) / np.sqrt(r64.var(1, keepdims=True) + 1e-5) * gamma + beta
    rb = bf16(rows).astype(np.float64)
    ln_bf16 = bf16(
        ((rb - rb.mean(1, keepdims=True)) / np.sqrt(rb.var(1, keepdims=True) + 1e-5) * gamma + beta).astype(np.float32)
    )
    print(
        f"| layer norm, absolute | {np.abs(golden.layernorm(rows, gamma, beta) - exact).max():.2e} "
        f"| {np.abs(ln_bf16 - exact).max():.2e} | 256 rows of 384, offset rows |"
    )

    worst, total, count = 0.0, 0.0, 0
    for wav in sorted(CORPUS.glob("*.wav")):
        audio = load_audio(wav)[: 30 * 16000]
        diff = np.abs(npu_log_mel(audio) - cpu_log_mel(audio))
        worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.size
    mean = total / count
    print(f"| mel (normalised log-mel) vs the CPU front end | {worst:.2e} (mean {mean:.1e}) | - | dev corpus |")


if __name__ == "__main__":
    main()
