"""Backends: ``cpu`` (numpy float32); ``xdna`` (the quantised encoder and mel on an AMD XDNA NPU
through pyxrt, the decoder on the CPU: the placement :mod:`npu.xdna.perf` predicts to be fastest,
with the CPU behind every NPU stage); ``xdna-all`` (the decoder on the NPU too, its KV cache in
device buffers); ``golden`` (the quantised graph emulated on the CPU); ``cuda`` (torch; needs
the ``[cuda]`` extra). ``auto`` takes ``xdna`` only when the NPU device, pyxrt and the built
artifacts are all present, and says why not otherwise."""

from __future__ import annotations

import logging

from ..backend import Backend
from ..weights import WhisperWeights

__all__ = ["BACKENDS", "BackendUnavailable", "create_backend", "xdna_unavailable"]

BACKENDS = ("auto", "cpu", "xdna", "xdna-all", "golden", "cuda")

log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here; the message says why."""


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


def _xdna(weights: WhisperWeights, decoder_on: str) -> Backend:
    from ..xdna.runtime import XdnaError
    from .cpu import CpuBackend
    from .fallback import FallbackBackend
    from .xdna import XdnaBackend

    try:
        cpu = CpuBackend(weights)  # behind every NPU stage, and the decoder of the xdna placement
        return FallbackBackend(XdnaBackend(weights, decoder_on=decoder_on, cpu=cpu), cpu)
    except (XdnaError, OSError, RuntimeError) as e:
        why = str(e)
        also = xdna_unavailable()  # the first missing piece: device node, pyxrt or artifacts
        if also and also not in why:
            why += f"; also: {also}"
        raise BackendUnavailable(f"xdna backend unavailable: {why}") from None


def create_backend(weights: WhisperWeights, name: str = "auto", device: str | None = None) -> Backend:
    """The backend ``name``; ``device`` picks the torch device of ``cuda`` (default ``cuda``)."""
    if name == "auto":
        why_not = xdna_unavailable()
        if why_not is None:
            return _xdna(weights, "cpu")
        log.info("backend auto: cpu (xdna not used: %s)", why_not)
        name = "cpu"
    if name == "cpu":
        from .cpu import CpuBackend

        return CpuBackend(weights)
    if name in ("xdna", "xdna-all"):
        return _xdna(weights, "cpu" if name == "xdna" else "npu")
    if name == "golden":
        from .golden import GoldenBackend

        return GoldenBackend(weights)
    if name == "cuda":
        try:
            from .cuda import CudaBackend
        except ImportError as e:
            raise BackendUnavailable(f"cuda backend needs torch (pip install 'streamd[cuda]'): {e}") from None
        try:
            return CudaBackend(weights, device=device or "cuda")
        except RuntimeError as e:  # no CUDA here, or a bad device string
            raise BackendUnavailable(f"cuda backend unavailable: {e}") from None
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
