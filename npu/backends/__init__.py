"""Backends: ``cpu`` (numpy); ``xdna`` and ``cuda`` join through the same interface."""

from __future__ import annotations

from ..backend import Backend
from ..weights import WhisperWeights

__all__ = ["BACKENDS", "create_backend"]

BACKENDS = ("auto", "cpu")


def create_backend(weights: WhisperWeights, name: str = "auto") -> Backend:
    if name in ("auto", "cpu"):
        from .cpu import CpuBackend

        return CpuBackend(weights)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
