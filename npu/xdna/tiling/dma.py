"""DMA access patterns and the checks every design's transfers pass: a :class:`DmaPattern` per
buffer descriptor, :class:`Transfer` waves on host and local buffers, channel and memory budgets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .npu1 import CHANNELS, MAX_REPEAT, MAX_STRIDE_WORDS, MAX_WRAP, WAVE_BDS, WORD, DesignError, itemsize


@dataclass(frozen=True)
class DmaPattern:
    """One shim buffer descriptor's walk over a flat host buffer: element ``i`` of the stream is
    ``offset + sum(index_d * strides[d])`` with the index running over ``sizes`` (outermost
    first, C order). Units are elements of the host buffer's dtype."""

    offset: int
    sizes: tuple[int, int, int, int]
    strides: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if len(self.sizes) != 4 or len(self.strides) != 4:
            raise DesignError(f"a BD has 4 dimensions, got sizes {self.sizes} strides {self.strides}")
        # A dimension of size 1 has no stride: normalise so equal walks compare equal.
        strides = tuple(0 if s == 1 else t for s, t in zip(self.sizes, self.strides, strict=True))
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        object.__setattr__(self, "strides", tuple(int(t) for t in strides))
        object.__setattr__(self, "offset", int(self.offset))

    @property
    def elements(self) -> int:
        return math.prod(self.sizes)

    def last_index(self) -> int:
        return self.offset + sum((s - 1) * t for s, t in zip(self.sizes, self.strides, strict=True))

    def indices(self) -> np.ndarray:
        """The flat buffer index of every element of the stream, in stream order (int64)."""
        idx = np.full(self.sizes, self.offset, dtype=np.int64)
        for d, (s, t) in enumerate(zip(self.sizes, self.strides, strict=True)):
            shape = [1, 1, 1, 1]
            shape[d] = s
            idx += (np.arange(s, dtype=np.int64) * t).reshape(shape)
        return idx.reshape(-1)

    def check(self, elem_bytes: int, buffer_elements: int, *, drain: bool) -> None:
        """Raise :class:`DesignError` unless a shim BD can walk this pattern over a buffer of
        ``buffer_elements`` elements of ``elem_bytes`` bytes."""
        s, t = self.sizes, self.strides
        where = f"pattern offset={self.offset} sizes={list(s)} strides={list(t)}"
        if min(s) < 1 or min(t) < 0 or self.offset < 0:
            raise DesignError(f"{where}: sizes must be >= 1, strides and offset >= 0")
        if s[3] > 1 and t[3] != 1:
            raise DesignError(f"{where}: the innermost stride must be 1 (the DMA moves whole words)")
        if (self.offset * elem_bytes) % WORD:
            raise DesignError(f"{where}: offset is not 4-byte aligned")
        if (s[3] * elem_bytes) % WORD:
            raise DesignError(f"{where}: the innermost run of {s[3] * elem_bytes} bytes is not whole words")
        for d in range(3):
            if s[d] > 1 and (t[d] * elem_bytes) % WORD:
                raise DesignError(f"{where}: stride {d} is not whole words")
            if t[d] * elem_bytes // WORD > MAX_STRIDE_WORDS:
                raise DesignError(f"{where}: stride {d} exceeds 2**20 words")
        if s[3] * elem_bytes // WORD > MAX_WRAP:
            raise DesignError(f"{where}: innermost size exceeds {MAX_WRAP} words")
        if s[2] > MAX_WRAP:
            raise DesignError(f"{where}: the second-innermost size exceeds {MAX_WRAP}")
        if s[0] > MAX_REPEAT:
            raise DesignError(f"{where}: repeat count exceeds {MAX_REPEAT}")
        if drain and s[0] != 1:
            raise DesignError(f"{where}: a drain's outermost size must be 1 (it lowers to a task repeat)")
        if self.last_index() >= buffer_elements:
            raise DesignError(f"{where}: reaches element {self.last_index()} of a {buffer_elements}-element buffer")


def run_pattern(offset: int, n_blocks: int, block_stride: int, run: int, elem_bytes: int) -> DmaPattern:
    """``n_blocks`` contiguous runs of ``run`` elements, ``block_stride`` apart, as one BD: the
    run is folded into (a, b) with b a whole number of words, b <= 1023 words and a <= 1023."""
    best = None
    for b in range(min(run, MAX_WRAP * WORD // elem_bytes), 0, -1):
        if run % b or (b * elem_bytes) % WORD:
            continue
        if run // b <= MAX_WRAP:
            best = b
            break
    if best is None:
        raise DesignError(f"a contiguous run of {run} x {elem_bytes}-byte elements does not fold into one BD")
    return DmaPattern(offset, (1, n_blocks, run // best, best), (0, block_stride, best, 1))


@dataclass(frozen=True)
class Transfer:
    """One shim DMA task of the runtime sequence: ``fill`` moves host -> array (the fifo's
    producer is the shim), otherwise array -> host. ``column`` is the shim tile's column."""

    fifo: str
    buffer: str
    column: int
    fill: bool
    pattern: DmaPattern


@dataclass(frozen=True)
class HostBuffer:
    """One runtime-sequence argument (one XRT buffer object), in the order the design takes them."""

    name: str
    dtype: str
    elements: int

    @property
    def nbytes(self) -> int:
        return self.elements * itemsize(self.dtype)


@dataclass(frozen=True)
class LocalBuffer:
    """A compute-tile buffer of a row design: scratch, or a constant that stands in for a null
    pointer of the kernel ABI (IRON cannot pass a null memref; a zero buffer is equivalent)."""

    name: str
    dtype: str
    elements: int
    fill: float | int | None = None  # initial value; None: scratch

    @property
    def nbytes(self) -> int:
        return self.elements * itemsize(self.dtype)


def check_waves(waves: Sequence[Sequence[Transfer]], buffers: Sequence[HostBuffer]) -> None:
    """Every pattern fits its buffer and the BD rules; no wave holds more than ``WAVE_BDS`` BDs
    on one shim tile; every wave ends with at least one drain to await."""
    by_name = {b.name: b for b in buffers}
    for w, wave in enumerate(waves):
        per_shim: dict[int, int] = {}
        for tr in wave:
            buf = by_name.get(tr.buffer)
            if buf is None:
                raise DesignError(f"wave {w}: transfer to unknown buffer {tr.buffer!r}")
            tr.pattern.check(itemsize(buf.dtype), buf.elements, drain=not tr.fill)
            per_shim[tr.column] = per_shim.get(tr.column, 0) + 1
        if per_shim and max(per_shim.values()) > WAVE_BDS:
            raise DesignError(f"wave {w} holds {max(per_shim.values())} BDs on one shim tile (limit {WAVE_BDS})")
        if not any(not tr.fill for tr in wave):
            raise DesignError(f"wave {w} has no drain to await")


def check_channels(usage: dict[str, tuple[int, int]]) -> None:
    for tile, (out, inn) in usage.items():
        kind = tile.split(":")[0]
        lim_out, lim_in = CHANNELS[kind]
        if out > lim_out or inn > lim_in:
            raise DesignError(f"{tile} needs {out} outgoing + {inn} incoming DMA channels (has {lim_out} + {lim_in})")


def check_memory(where: str, used: dict[str, int], limit: int) -> None:
    total = sum(used.values())
    if total > limit:
        parts = ", ".join(f"{k} {v}" for k, v in used.items())
        raise DesignError(f"{where} needs {total} bytes ({parts}), has {limit}")
