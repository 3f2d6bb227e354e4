"""Predicted xdna times on npu1 (Phoenix) against measured CPU times: the NPU performance model.

The xdna backend runs on the fake pyxrt (tests/fake_pyxrt) only to record the exact kernel calls
it makes for a window and a decoder step; :mod:`npu.xdna.perf` prices them from published
figures. The CPU column is measured here with the numpy backend. Nothing ran on an NPU.

    python benchmarks/npu_model.py [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from npu.backends.xdna import XdnaBackend
from npu.xdna import perf
from npu.xdna.artifacts import Artifacts
from whisper_engine.backends.cpu import CpuBackend
from whisper_engine.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
SOT = [50257, 50362]


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _cpu_step(session, cached: int) -> None:
    """One CPU decoder step after ``cached`` tokens (the cache is rewound so it can be repeated)."""
    session.state.length = cached
    session.step(np.array([[440]]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="BLAS threads for the CPU measurements")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "tests" / "fake_pyxrt"))
    import pyxrt  # the fake: it records, the model prices

    weights = load_weights()
    cpu = CpuBackend(weights)
    tmp = tempfile.TemporaryDirectory()  # the fake loads its xclbins lazily: keep them to the end
    pyxrt.make_artifacts(tmp.name)
    xdna = XdnaBackend(weights, Artifacts.load(tmp.name), pyxrt)
    rt = xdna.rt
    rng = np.random.default_rng(0)
    rows = []

    def record(fn) -> list:
        rt.trace = []
        fn()
        calls, rt.trace = [c for _, c in rt.trace], None
        return calls

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: numpy float32, {args.threads} BLAS threads")
    print(f"# model: GEMM {perf.GEMM_TOPS} TOPS int8 (int16 x int8 at half), DDR {perf.DDR_GBPS} GB/s,")
    print(f"#        {perf.DISPATCH_S * 1e6:.0f} us per call in a runlist (peak {perf.PEAK_TOPS:.1f} TOPS)")
    with threadpool_limits(args.threads):
        for seconds in (5, 10, 30):
            frames = seconds * 100
            mel = rng.standard_normal((80, frames)).astype(np.float32) * 0.3
            calls = record(lambda mel=mel: xdna.encode(mel))
            cpu_s = _timed(lambda mel=mel: cpu.encode(mel))
            rows.append((f"encoder, {seconds} s window", calls, cpu_s))
        features_x = xdna.encode(mel)
        features_c = cpu.encode(mel)
        for cached in (3, 100):
            session = xdna.decoder(features_x)
            session.step(np.array([SOT + [440] * (cached - 2)]))
            calls = record(lambda session=session: session.step(np.array([[440]])))
            cpu_session = cpu.decoder(features_c)
            cpu_session.step(np.array([SOT + [440] * (cached - 2)]))
            cpu_s = _timed(lambda s=cpu_session, n=cached: _cpu_step(s, n))
            rows.append((f"decoder step, 30 s window, {cached + 1} tokens cached", calls, cpu_s))

    print()
    print("| work | calls | GMAC | DDR MB | GEMM ms | other ops ms | dispatch ms | NPU ms (1/2/4.6 TOPS) | CPU ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, calls, cpu_s in rows:
        mid = perf.predict(calls)
        totals = " / ".join(f"{perf.predict(calls, tops).total_s * 1e3:.1f}" for tops in perf.GEMM_TOPS.values())
        print(
            f"| {name} | {mid.calls} | {mid.macs / 1e9:.2f} | {mid.traffic_bytes / 1e6:.0f} | {mid.gemm_s * 1e3:.1f} "
            f"| {mid.row_s * 1e3:.1f} | {mid.dispatch_s * 1e3:.1f} | {totals} | {cpu_s * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
