"""An accelerator backend with the CPU behind it: a stage that fails on the accelerator is logged,
reported in :attr:`devices`, and redone on the CPU, so no window and no text is lost.

A failed stage stays on the CPU from then on (a device that faulted once is not trusted with the
next window); ``/healthz`` and the ``ready`` message show ``cpu (fallback: ...)`` for it. A decoder
session that fails mid-window replays the tokens it was fed (beam reorders included) into a CPU
session over the same window, then carries on there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..backend import STAGES, Backend, DecoderSession

__all__ = ["FallbackBackend"]

log = logging.getLogger(__name__)


@dataclass
class _Features:
    mel: np.ndarray
    primary: object | None  # the accelerator's features, None if its encoder failed
    cpu: object | None = None


class FallbackBackend(Backend):
    def __init__(self, primary: Backend, cpu: Backend) -> None:
        super().__init__(primary.weights)
        self.primary, self.cpu = primary, cpu
        self.name = primary.name
        self.failed: dict[str, str] = {}  # stage -> why it moved to the CPU
        self.failures = 0
        self._lock = threading.Lock()

    @property
    def devices(self) -> dict[str, str]:
        devices = self.primary.devices
        for stage, why in self.failed.items():
            devices[stage] = f"{self.cpu.devices[stage]} (fallback: {why})"
        return {s: devices[s] for s in STAGES}

    def _fail(self, stage: str, error: BaseException) -> None:
        with self._lock:
            self.failures += 1
            first = stage not in self.failed
            self.failed.setdefault(stage, f"{self.primary.name} {stage} failed: {error}"[:200])
        if first:
            log.error("%s %s stage failed, running it on the CPU from now on: %s", self.primary.name, stage, error)

    def log_mel(self, audio: np.ndarray, padding: int = 0) -> np.ndarray:
        if "mel" not in self.failed:
            try:
                return self.primary.log_mel(audio, padding)
            except Exception as e:  # any device fault: redo on the CPU
                self._fail("mel", e)
        return self.cpu.log_mel(audio, padding)

    def encode(self, mel: np.ndarray) -> _Features:
        if "encoder" not in self.failed:
            try:
                return _Features(mel, self.primary.encode(mel))
            except Exception as e:
                self._fail("encoder", e)
        return _Features(mel, None, self.cpu.encode(mel))

    def _cpu_features(self, features: _Features) -> object:
        if features.cpu is None:
            features.cpu = self.cpu.encode(features.mel)
        return features.cpu

    def decoder(self, features: object, batch_size: int = 1) -> DecoderSession:
        assert isinstance(features, _Features)
        if features.primary is not None and "decoder" not in self.failed:
            try:
                return _FallbackSession(self, features, self.primary.decoder(features.primary, batch_size), batch_size)
            except Exception as e:
                self._fail("decoder", e)
        return self.cpu.decoder(self._cpu_features(features), batch_size)

    def alignment(self, features: object, tokens: np.ndarray) -> np.ndarray:
        assert isinstance(features, _Features)
        if features.primary is not None and "decoder" not in self.failed:
            try:
                return self.primary.alignment(features.primary, tokens)
            except Exception as e:
                self._fail("decoder", e)
        return self.cpu.alignment(self._cpu_features(features), tokens)


class _FallbackSession(DecoderSession):
    """Runs on the accelerator and remembers every row's tokens, to continue on the CPU."""

    def __init__(self, backend: FallbackBackend, features: _Features, session: DecoderSession, rows: int) -> None:
        self.backend, self.features, self.session = backend, features, session
        self.history = np.zeros((rows, 0), np.int64)
        self.on_cpu = False

    def step(self, tokens: np.ndarray, positions: Sequence[int] = (-1,)) -> np.ndarray:
        tokens = np.asarray(tokens, np.int64)
        if not self.on_cpu:
            try:
                logits = self.session.step(tokens, positions)
                self.history = np.concatenate([self.history, tokens], axis=1)
                return logits
            except Exception as e:
                self.backend._fail("decoder", e)
                self._move_to_cpu()
        return self.session.step(tokens, positions)

    def _move_to_cpu(self) -> None:
        b = self.backend
        session = b.cpu.decoder(b._cpu_features(self.features), len(self.history))
        if self.history.shape[1]:
            session.step(self.history, positions=())
        self.session, self.on_cpu = session, True

    def reorder(self, source: np.ndarray) -> None:
        source = np.asarray(source)
        if self.on_cpu:
            self.session.reorder(source)
            return
        self.history = self.history[source]  # what a CPU session would replay from here
        try:
            self.session.reorder(source)
        except Exception as e:
            self.backend._fail("decoder", e)
            self._move_to_cpu()
