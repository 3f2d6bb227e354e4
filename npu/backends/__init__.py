"""The NPU's backends: ``xdna`` (the quantised mel and encoder on an AMD XDNA NPU through pyxrt,
the decoder on the CPU: the placement :mod:`npu.xdna.perf` predicts to be fastest, with the CPU
behind every NPU stage), ``xdna-all`` (the decoder on the NPU too, its KV cache in device buffers)
and ``golden`` (the quantised graph emulated on the CPU, bit for bit)."""

from __future__ import annotations

from whisper_engine.backend import Backend
from whisper_engine.weights import WhisperWeights

__all__ = ["xdna_backend", "xdna_unavailable"]


def xdna_unavailable() -> str | None:
    """Why the xdna backend cannot run here, or ``None`` when device, pyxrt and artifacts exist."""
    from ..xdna.artifacts import Artifacts, ArtifactsError
    from ..xdna.runtime import ACCEL_DEVICE, device_present

    if not device_present():
        return f"no NPU device node {ACCEL_DEVICE}"
    try:
        import pyxrt  # noqa: F401
    except ImportError:
        return "pyxrt (XRT's Python bindings) is not importable"
    try:
        Artifacts.load()
    except ArtifactsError as e:
        return str(e)
    return None


def xdna_backend(weights: WhisperWeights, decoder_on: str) -> Backend:
    """The xdna backend with the CPU behind every stage; raises ``RuntimeError`` (or ``OSError``)
    with the first missing piece (device node, pyxrt or artifacts) when it cannot start."""
    from whisper_engine.backends.cpu import CpuBackend
    from whisper_engine.backends.fallback import FallbackBackend

    from ..xdna.runtime import XdnaError
    from .xdna import XdnaBackend

    try:
        cpu = CpuBackend(weights)  # behind every NPU stage, and the decoder of the xdna placement
        return FallbackBackend(XdnaBackend(weights, decoder_on=decoder_on, cpu=cpu), cpu)
    except (XdnaError, OSError, RuntimeError) as e:
        why = str(e)
        also = xdna_unavailable()
        if also and also not in why:
            why += f"; also: {also}"
        raise RuntimeError(why) from None
