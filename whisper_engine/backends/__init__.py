"""Backends by name: ``cpu`` (numpy float32) and ``cuda`` (torch; needs the ``[cuda]`` extra) live
here; ``xdna``, ``xdna-all`` and ``golden`` are the NPU runtime's (:mod:`npu.backends`). ``auto``
takes ``xdna`` only when the NPU device, pyxrt and the built artifacts are all present, and says
why not otherwise."""

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
    from npu.backends import xdna_unavailable as why_not

    return why_not()


def _xdna(weights: WhisperWeights, decoder_on: str) -> Backend:
    from npu.backends import xdna_backend

    try:
        return xdna_backend(weights, decoder_on)
    except (OSError, RuntimeError) as e:
        raise BackendUnavailable(f"xdna backend unavailable: {e}") from None


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
        from npu.backends.golden import GoldenBackend

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
