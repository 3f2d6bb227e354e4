"""A performance model of the xdna backend on npu1 (Phoenix), from published figures.

Nothing here was measured on an NPU. The model prices the exact sequence of kernel calls the
backend makes (recorded by :attr:`npu.xdna.runtime.Runtime.trace`), three ways at once:

- GEMMs by their multiply-accumulates at a sustained int8 rate (``GEMM_TOPS``: published whole-
  array int8 GEMMs reach 1 to 4.6 TOPS against a 14.7 TOPS peak of 16 tiles x 256 MACs x 1.8 GHz;
  int16 x int8 runs at half the int8 rate, 128 MACs per cycle per tile);
- every other op by the bytes its operands move through DDR (``DDR_GBPS``, an assumption: Phoenix's
  LPDDR5 gives the whole chip 60-120 GB/s; the NPU's shim DMAs see a share of it);
- each call's dispatch, ``DISPATCH_S`` amortised in a runlist (36 us published; 45-160 us alone).

A call costs the larger of its compute and its traffic, plus its dispatch. ``benchmarks/npu_model.py``
prints the predictions next to the CPU's measured times, and the placement they imply.
"""

from __future__ import annotations

from dataclasses import dataclass

from .artifacts import Call

__all__ = ["DDR_GBPS", "DISPATCH_S", "GEMM_TOPS", "PEAK_TOPS", "Prediction", "predict"]

PEAK_TOPS = 4 * 4 * 256 * 2 * 1.8e9 / 1e12  # 14.7: 16 compute tiles, 256 int8 MACs per cycle each
GEMM_TOPS = {"low": 1.0, "mid": 2.0, "high": 4.6}  # sustained int8 GEMM, published range
DDR_GBPS = 20.0  # assumed DDR bandwidth the NPU's DMAs sustain
DISPATCH_S = 36e-6  # per kernel call inside a runlist (amortised, published)
GEMM_OPS = {"gemm": 1.0, "gemm_i16": 0.5, "dft": 0.5}  # rate relative to int8 (int16 operands: half)


@dataclass
class Prediction:
    calls: int = 0
    macs: float = 0.0  # multiply-accumulates in GEMMs
    gemm_s: float = 0.0  # time of GEMM calls (compute- or traffic-bound, whichever is slower)
    row_s: float = 0.0  # time of the other calls (traffic-bound)
    dispatch_s: float = 0.0
    traffic_bytes: float = 0.0

    @property
    def total_s(self) -> float:
        return self.gemm_s + self.row_s + self.dispatch_s


def predict(calls: list[Call], tops: float = GEMM_TOPS["mid"], ddr_gbps: float = DDR_GBPS) -> Prediction:
    p = Prediction()
    for call in calls:
        traffic = sum(call.operand_bytes())
        p.calls += 1
        p.traffic_bytes += traffic
        p.dispatch_s += DISPATCH_S
        memory_s = traffic / (ddr_gbps * 1e9)
        if call.op in GEMM_OPS:
            macs = call.batch * call.m * call.k * call.n
            p.macs += macs
            p.gemm_s += max(2 * macs / (tops * GEMM_OPS[call.op] * 1e12), memory_s)
        else:
            p.row_s += memory_s
    return p
