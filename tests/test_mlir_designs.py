"""The npu1 designs in mlir/, checked on the CPU (tier 3 of DESIGN.md "The NPU, honestly").

What runs here: the tilings of every Whisper tiny.en shape fit npu1 (memory, DMA channels, buffer
descriptor fields); the numpy replay of each design's DMA patterns and core programs reproduces the
plain whole-matrix result, for ragged shapes too; a broken pattern is caught; the IRON design code
runs against a fake ``aie`` package that checks the wiring (kernel signatures, fifo endpoints,
channel counts, balanced acquires); and the build script, without a toolchain, says what is missing.
What needs the toolchain is marked ``npu`` and skips saying why.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from npu.xdna.tiling import (
    CORE_MEMORY,
    MEM_TILE_MEMORY,
    DesignError,
    DmaPattern,
    GemmTiling,
    RowTiling,
    choose_gemm_tiling,
    choose_mel_tiling,
    choose_row_tiling,
    mel_tiling,
    whisper_tiny_designs,
)

ROOT = Path(__file__).resolve().parents[1]
MLIR = ROOT / "mlir"


def _load(name: str) -> types.ModuleType:
    """A module of mlir/ (a folder of scripts, not a package). The shared helpers (``_iron``,
    ``_rows``) load under their own names, as the designs import them; the rest by file, under a
    private name."""
    if str(MLIR) not in sys.path:
        sys.path.append(str(MLIR))  # last, so its script names shadow nothing
    if name.startswith("_"):
        return importlib.import_module(name)
    key = f"streamd_mlir_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, MLIR / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


replay = _load("replay")
ReplayError = replay.ReplayError
RNG = np.random.default_rng(1234)


def _i8(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.integers(-128, 128, shape, dtype=np.int8)


# ---- stand-in kernels with the C ABI of kernels/*.cc (row-local, so tiling cannot change them) ---


def softmax_c(x, y, m, n, n_valid):
    x2, out = x[: m * n].reshape(m, n), np.zeros((m, n), np.float32)
    for i in range(m):
        v = min(n, max(0, int(n_valid[i])))
        if v:
            e = np.exp(x2[i, :v] - x2[i, :v].max())
            out[i, :v] = e / e.sum()
    y[: m * n] = out.reshape(-1)


def layernorm_c(x, gamma, beta, y, m, n):
    x2 = x[: m * n].reshape(m, n)
    d = x2 - x2.mean(axis=1, keepdims=True)
    y[: m * n] = (d / np.sqrt((d * d).mean(axis=1, keepdims=True) + 1e-5) * gamma[:n] + beta[:n]).reshape(-1)


def gelu_c(x, residual, y, count):
    g = 0.5 * x[:count] * (1 + np.tanh(0.7978845608 * (x[:count] + 0.044715 * x[:count] ** 3)))
    y[:count] = residual[:count] + g


def requant_c(acc, mult, shift, out, m, n):
    a = acc[: m * n].reshape(m, n).astype(np.int64) * mult[:n].astype(np.int64)
    out[: m * n] = np.clip(a >> shift[:n].astype(np.int64), -128, 127).astype(np.int8).reshape(-1)


def quantize_c(x, q, scale, m, n):
    x2 = x[: m * n].reshape(m, n)
    top = np.abs(x2).max(axis=1)
    safe = np.where(top == 0, 1, top)
    q[: m * n] = np.clip(np.rint(x2 * (127 / safe)[:, None]), -128, 127).astype(np.int8).reshape(-1)
    scale[:m] = np.where(top == 0, 0, safe / 127)


def dequant_c(acc, row_scale, col_scale, bias, residual, out, m, n):
    a = acc[: m * n].reshape(m, n).astype(np.float32)
    y = a * row_scale[:m, None] * col_scale[None, :n] + bias[None, :n] + residual[: m * n].reshape(m, n)
    out[: m * n] = y.reshape(-1)


def dft_c(frames, basis, out, f, k, n):
    acc = frames[: f * k].reshape(f, k).astype(np.float64) @ basis[: k * n].reshape(k, n).astype(np.float64)
    out[: f * n] = np.clip((acc.astype(np.int64) + 128) >> 8, -(2**31), 2**31 - 1).astype(np.int32).reshape(-1)


MEL_W = RNG.random((201, 80)).astype(np.float32)


def mel_log_c(spec, logmel, f):
    s = spec[: f * 402].reshape(f, 402).astype(np.float32)
    power = s[:, 0::2] ** 2 + s[:, 1::2] ** 2
    # The band sums in one fixed order for every row, as the kernel's are. Not ``power @ MEL_W``:
    # a float32 BLAS product is not row-local (OpenBLAS blocks and vectorises by the number of
    # rows, so a row rounds differently in a block of 20 than among 300: 8,875 of 24,000 values
    # moved by an ulp), and a tiled replay then differs from the whole kernel on every run.
    bands = np.zeros((f, 80), np.float32)
    for b in range(power.shape[1]):
        bands += power[:, b : b + 1] * MEL_W[b]
    logmel[: f * 80] = np.log10(np.maximum(bands, 1e-10)).reshape(-1)


def _whole(kernel, shapes_out, *args):
    """Run a stand-in kernel once over whole (unpadded) matrices: the plain result."""
    outs = [np.zeros(size, dtype) for size, dtype in shapes_out]
    call = [a if not isinstance(a, str) else outs[int(a)] for a in args]
    kernel(*call)
    return outs


# ---- tilings -----------------------------------------------------------------------------------


def test_every_whisper_tiny_tiling_fits_npu1():
    designs = whisper_tiny_designs()
    names = [n for n, _, _ in designs]
    assert len(names) == len(set(names))
    shapes = {(t.M, t.K, t.N) for _, d, t in designs if d == "gemm"}
    assert {(1500, 384, 1536), (1500, 1536, 384), (3000, 240, 384), (1500, 1152, 384), (5, 384, 51864)} <= shapes
    for name, _, t in designs:
        t.check()
        parts = [t.dft, t.log] if hasattr(t, "dft") else [t]
        for p in parts:
            assert sum(p.core_buffers().values()) <= CORE_MEMORY, name
            assert sum(p.mem_buffers().values()) <= MEM_TILE_MEMORY, name


@pytest.mark.parametrize("M", [1, 5, 16, 17, 300, 1500])
def test_gemm_tiling_pads_to_whole_tiles(M):
    t = choose_gemm_tiling(M, 384, 1152)
    t.check()
    assert t.Mp % (4 * t.m) == 0 and t.Mp - M < 4 * t.m
    assert t.Np % (4 * t.n) == 0 and t.Np - 1152 < 4 * t.n
    assert t.Kp % t.k == 0 and t.Kp - 384 < t.k
    # A, B and C, double-buffered, fit a core; the stacked tiles fit the memory tile
    assert 2 * (t.m * t.k + t.k * t.n + 4 * t.m * t.n) <= CORE_MEMORY


def test_wide_n_splits_into_bd_repeats_and_still_replays():
    # 203 column blocks: more than a BD's 64 repeats, so each row block takes 4 runs of BDs
    t = GemmTiling(5, 64, 51864, 4, 64, 64)
    t.check()
    assert t.NB > 64 and len(t.chunks()) == 4
    assert all(tr.pattern.sizes[0] <= 64 for wave in t.waves() for tr in wave)
    a, b = _i8((5, 64)), _i8((64, 51864))
    np.testing.assert_array_equal(replay.replay_gemm(t, a, b), a.astype(np.int64) @ b.astype(np.int64))


def test_pattern_limits_are_enforced():
    ok = DmaPattern(0, (1, 2, 8, 64), (0, 1024, 128, 1))
    ok.check(1, 4096, drain=True)
    bad = [
        (DmaPattern(0, (1, 1, 8, 64), (0, 0, 128, 2)), "innermost stride"),
        (DmaPattern(2, (1, 1, 8, 64), (0, 0, 128, 1)), "aligned"),
        (DmaPattern(0, (1, 1, 8, 6), (0, 0, 128, 1)), "whole words"),
        (DmaPattern(0, (1, 1, 1, 4096 + 4), (0, 0, 0, 1)), "innermost size"),
        (DmaPattern(0, (1, 1, 1024, 4), (0, 0, 4, 1)), "second-innermost"),
        (DmaPattern(0, (65, 1, 1, 4), (4, 0, 0, 1)), "repeat"),
        (DmaPattern(0, (2, 1, 1, 4), (4, 0, 0, 1)), "drain"),
        (DmaPattern(0, (1, 1, 16, 64), (0, 0, 128, 1)), "reaches element"),
    ]
    for pattern, why in bad:
        with pytest.raises(DesignError, match=why):
            pattern.check(1, 1000, drain=True)


def test_oversized_tiles_are_refused():
    with pytest.raises(DesignError, match="compute tile"):
        GemmTiling(1500, 384, 1536, 128, 256, 256).check()
    with pytest.raises(DesignError, match="compute tile"):
        RowTiling("softmax", 9000, 1500, 8).check()


# ---- replay: GEMM ------------------------------------------------------------------------------

GEMM_SHAPES = [
    (1500, 384, 384),  # encoder rows, ragged M (1500 -> 1536)
    (1500, 1536, 384),  # K = 1536 (fc2)
    (100, 240, 384),  # conv stem as im2col: K = 240 pads to a whole depth step
    (1, 384, 1152),  # one decoder row
    (5, 384, 1536),  # a decoder step of 5 rows
    (5, 384, 51864),  # the vocabulary projection of a decoder step
    (37, 100, 200),  # ragged everything
]


@pytest.mark.parametrize(("M", "K", "N"), GEMM_SHAPES)
def test_gemm_replay_equals_matmul(M, K, N):
    t = choose_gemm_tiling(M, K, N)
    a, b = _i8((M, K)), _i8((K, N))
    got = replay.replay_gemm(t, a, b)
    assert got.dtype == np.int32 and got.shape == (M, N)
    np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


@pytest.mark.parametrize("n_cols", [1, 2])
def test_gemm_replay_on_fewer_columns(n_cols):
    # rows_per_shim > 1: one memory tile splits A for several core rows
    t = GemmTiling(70, 96, 160, 8, 32, 32, n_cols=n_cols)
    t.check()
    a, b = _i8((70, 96)), _i8((96, 160))
    np.testing.assert_array_equal(replay.replay_gemm(t, a, b), a.astype(np.int64) @ b.astype(np.int64))


def _perturb(waves, pick, change):
    """Waves with the first transfer that ``pick`` selects replaced by ``change(transfer)``."""
    out, done = [], False
    for wave in waves:
        new = []
        for tr in wave:
            if not done and pick(tr):
                tr, done = change(tr), True
            new.append(tr)
        out.append(tuple(new))
    assert done
    return out


def _with_pattern(tr, **kw):
    p = tr.pattern
    fields = {"offset": p.offset, "sizes": p.sizes, "strides": p.strides, **kw}
    return dataclasses.replace(tr, pattern=DmaPattern(**fields))


def _caught(run, want):
    """True if ``run()`` raises ReplayError or returns something other than ``want``."""
    try:
        got = run()
    except ReplayError:
        return True
    return not np.array_equal(got, want)


def test_gemm_replay_catches_broken_patterns():
    M, K, N = 300, 256, 384
    t = choose_gemm_tiling(M, K, N)
    a, b = _i8((M, K)), _i8((K, N))
    want = a.astype(np.int64) @ b.astype(np.int64)
    waves = t.waves()
    np.testing.assert_array_equal(replay.replay_gemm(t, a, b, waves=waves), want)

    def is_fill(kind):
        return lambda tr: tr.fill and tr.fifo.startswith(kind)

    def sizes(tr, d, delta):
        s = list(tr.pattern.sizes)
        s[d] += delta
        return _with_pattern(tr, sizes=tuple(s))

    broken = [
        # B's row stride one column off: wrong data
        _perturb(waves, is_fill("B"), lambda tr: _with_pattern(tr, strides=(*tr.pattern.strides[:2], t.Np + 4, 1))),
        # A repeated once too few: a core row starves
        _perturb(waves, is_fill("A"), lambda tr: sizes(tr, 0, -1)),
        # A's first row one row late: wrong rows
        _perturb(waves, is_fill("A"), lambda tr: _with_pattern(tr, offset=tr.pattern.offset + t.Kp)),
        # C written one column to the right: overlaps its neighbour, leaves a gap
        _perturb(waves, lambda tr: not tr.fill, lambda tr: _with_pattern(tr, offset=tr.pattern.offset + 4)),
        # a depth step missing from B
        _perturb(waves, is_fill("B"), lambda tr: sizes(tr, 1, -1)),
    ]
    for w in broken:
        assert _caught(lambda w=w: replay.replay_gemm(t, a, b, waves=w), want)
    # and a whole missing transfer
    dropped = [tuple(tr for tr in wave if tr is not waves[0][1]) for wave in waves]
    with pytest.raises(ReplayError):
        replay.replay_gemm(t, a, b, waves=dropped)


# ---- replay: rows ------------------------------------------------------------------------------


def _rows_out(t, out, name, width):
    return out[name].reshape(t.Mp, width)[: t.M]


@pytest.mark.parametrize("masked", [False, True])
def test_softmax_replay_equals_whole_softmax(masked):
    M, N = 300, 1500
    t = choose_row_tiling("softmax", M, N, masked=masked)
    x = RNG.standard_normal((M, N)).astype(np.float32)
    nv = RNG.integers(1, N + 1, M).astype(np.int32) if masked else np.full(M, N, np.int32)
    inputs = {"x": t.pad_rows(x)}
    if masked:
        inputs["n_valid"] = t.pad_rows(nv)
    got = _rows_out(t, replay.replay_rows(t, inputs, softmax_c), "y", N)
    (want,) = _whole(softmax_c, [(M * N, np.float32)], x.reshape(-1), "0", M, N, nv)
    np.testing.assert_array_equal(got, want.reshape(M, N))


def test_layernorm_replay_equals_whole_layernorm():
    M, N = 1500, 384
    t = choose_row_tiling("layernorm", M, N)
    x = RNG.standard_normal((M, N)).astype(np.float32)
    g, b = RNG.standard_normal(N).astype(np.float32), RNG.standard_normal(N).astype(np.float32)
    got = _rows_out(
        t, replay.replay_rows(t, {"x": t.pad_rows(x), "gamma_beta": np.concatenate([g, b])}, layernorm_c), "y", N
    )
    (want,) = _whole(layernorm_c, [(M * N, np.float32)], x.reshape(-1), g, b, "0", M, N)
    np.testing.assert_array_equal(got, want.reshape(M, N))


@pytest.mark.parametrize("residual", [False, True])
def test_gelu_replay_equals_whole_gelu(residual):
    M, N = 200, 1536
    t = choose_row_tiling("gelu", M, N, residual=residual)
    x = RNG.standard_normal((M, N)).astype(np.float32)
    res = RNG.standard_normal((M, N)).astype(np.float32) if residual else np.zeros((M, N), np.float32)
    inputs = {"x": t.pad_rows(x)} | ({"residual": t.pad_rows(res)} if residual else {})
    got = _rows_out(t, replay.replay_rows(t, inputs, gelu_c), "y", N)
    (want,) = _whole(gelu_c, [(M * N, np.float32)], x.reshape(-1), res.reshape(-1), "0", M * N)
    np.testing.assert_array_equal(got, want.reshape(M, N))


def test_requant_replay_equals_whole_requant():
    M, N = 1500, 384
    t = choose_row_tiling("requant", M, N)
    acc = RNG.integers(-(10**6), 10**6, (M, N)).astype(np.int32)
    mult, shift = RNG.integers(1, 2**20, N).astype(np.int32), RNG.integers(18, 30, N).astype(np.int8)
    inputs = {"acc": t.pad_rows(acc), "mult_shift": t.pack_mult_shift(mult, shift)}
    got = _rows_out(t, replay.replay_rows(t, inputs, requant_c), "q", N)
    (want,) = _whole(requant_c, [(M * N, np.int8)], acc.reshape(-1), mult, shift, "0", M, N)
    np.testing.assert_array_equal(got, want.reshape(M, N))


@pytest.mark.parametrize("N", [384, 1536])
def test_quantize_replay_equals_whole_quantize(N):
    M = 1500
    t = choose_row_tiling("quantize", M, N)
    x = RNG.standard_normal((M, N)).astype(np.float32)
    x[7] = 0  # a zero row keeps scale 0
    q, scale = t.unpack_quantized(replay.replay_rows(t, {"x": t.pad_rows(x)}, quantize_c)["qs"])
    want_q, want_s = _whole(quantize_c, [(M * N, np.int8), (M, np.float32)], x.reshape(-1), "0", "1", M, N)
    np.testing.assert_array_equal(q, want_q.reshape(M, N))
    np.testing.assert_array_equal(scale, want_s)


@pytest.mark.parametrize("residual", [False, True])
def test_dequant_replay_equals_whole_dequant(residual):
    M, N = 1500, 384
    t = choose_row_tiling("dequant", M, N, residual=residual)
    acc = RNG.integers(-(10**6), 10**6, (M, N)).astype(np.int32)
    rs, cs, bias = (RNG.random(s).astype(np.float32) for s in (M, N, N))
    res = RNG.standard_normal((M, N)).astype(np.float32) if residual else np.zeros((M, N), np.float32)
    inputs = {"acc": t.pad_rows(acc), "col_scale_bias": np.concatenate([cs, bias]), "row_scale": t.pack_row_scale(rs)}
    if residual:
        inputs["residual"] = t.pad_rows(res)
    got = _rows_out(t, replay.replay_rows(t, inputs, dequant_c), "y", N)
    (want,) = _whole(dequant_c, [(M * N, np.float32)], acc.reshape(-1), rs, cs, bias, res.reshape(-1), "0", M, N)
    np.testing.assert_array_equal(got, want.reshape(M, N))


def test_row_replay_catches_broken_patterns():
    M, N = 300, 384
    t = choose_row_tiling("layernorm", M, N)
    x = RNG.standard_normal((M, N)).astype(np.float32)
    g, b = np.ones(N, np.float32), np.zeros(N, np.float32)
    inputs = {"x": t.pad_rows(x), "gamma_beta": np.concatenate([g, b])}
    want = replay.replay_rows(t, inputs, layernorm_c)["y"]
    waves = t.waves()
    in_fill = lambda tr: tr.fill and tr.fifo.startswith("in")  # noqa: E731
    broken = [
        _perturb(waves, in_fill, lambda tr: _with_pattern(tr, offset=tr.pattern.offset + N)),  # one row late
        _perturb(waves, in_fill, lambda tr: _with_pattern(tr, strides=(0, tr.pattern.strides[1] - N, 0, 1))),
        _perturb(waves, lambda tr: not tr.fill, lambda tr: _with_pattern(tr, offset=tr.pattern.offset + N)),
    ]  # fmt: skip
    for w in broken:
        assert _caught(lambda w=w: replay.replay_rows(t, inputs, layernorm_c, waves=w)["y"], want)


# ---- replay: mel -------------------------------------------------------------------------------


def test_mel_replay_equals_whole_front_end():
    F = 300
    t = choose_mel_tiling(F)
    t.check()
    frames = RNG.integers(-3000, 3000, (F, 400)).astype(np.int16)
    basis = RNG.integers(-32768, 32768, (400, 402)).astype(np.int16)
    got = replay.replay_mel(t, frames, basis, dft=dft_c, mel_log=mel_log_c)
    (spec,) = _whole(dft_c, [(F * 402, np.int32)], frames.reshape(-1), basis.reshape(-1), "0", F, 400, 402)
    (want,) = _whole(mel_log_c, [(F * 80, np.float32)], spec, "0", F)
    np.testing.assert_array_equal(got, want.reshape(F, 80))


def test_mel_wave_order_is_checked():
    t = mel_tiling(300, 20, 16)
    waves = t.waves()
    # mel_log of row block 0 moved into the wave that computes it: it would read the spectrum too early
    log0 = tuple(tr for tr in waves[1] if tr.fifo.startswith("log_"))
    early = [waves[0] + log0, tuple(tr for tr in waves[1] if tr not in log0), *waves[2:]]
    with pytest.raises(DesignError, match="not written yet"):
        t.check_dependencies(early)
    frames = RNG.integers(-3000, 3000, (300, 400)).astype(np.int16)
    basis = RNG.integers(-32768, 32768, (400, 402)).astype(np.int16)
    want = replay.replay_mel(t, frames, basis, dft=dft_c, mel_log=mel_log_c)
    assert _caught(lambda: replay.replay_mel(t, frames, basis, dft=dft_c, mel_log=mel_log_c, waves=early), want)


# ---- the IRON design code, on a fake aie package -----------------------------------------------


def _module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so its submodules import
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


class FakeIron:
    """Just enough of ``aie.iron`` (same names and keywords) to run the designs and check their
    wiring: kernel calls match declared signatures, every fifo has one producer and a consumer,
    DMA channels per tile stay within npu1's, and each core pass releases what it acquires."""

    def __init__(self):
        self.fifos, self.workers, self.calls, self.fills, self.drains, self.links = [], [], [], [], [], []
        self.current = None
        fake = self

        class Tile:
            def __init__(self, col, row):
                self.col, self.row = col, row

            def key(self):
                return (self.col, self.row)

        class Elem:
            def __init__(self, handle):
                self.obj_type, self.handle = handle.fifo.obj_type, handle

            def __getitem__(self, i):
                return 0

            def __setitem__(self, i, v):
                pass

        class Handle:
            def __init__(self, fifo, is_prod, depth):
                self.fifo, self.is_prod, self.depth, self.endpoint, self.held = fifo, is_prod, depth, None, 0

            def acquire(self, n):
                assert n <= self.depth, f"acquire {n} > depth {self.depth} on {self.fifo.name}"
                assert fake.current is not None and self.endpoint is fake.current
                self.held += n
                return Elem(self) if n == 1 else [Elem(self) for _ in range(n)]

            def release(self, n):
                self.held -= n
                assert self.held >= 0, f"released more than acquired on {self.fifo.name}"

            def _link(self, offsets, placement, obj_types, names, depths, split):
                size = self.fifo.obj_type.__args__[0][0]
                subs = []
                for off, ty, name, depth in zip(offsets, obj_types, names, depths, strict=True):
                    assert off + ty.__args__[0][0] <= size and ty.__args__[1] == self.fifo.obj_type.__args__[1]
                    sub = ObjectFifo(ty, name=name, depth=depth)
                    (sub.prod() if split else sub.cons()).endpoint = ("mem", placement.key())
                    subs.append(sub)
                self.endpoint = ("mem", placement.key())
                fake.links.append((placement.key(), self.fifo, subs, split))
                return subs

            def split(self, offsets, placement, depths=None, obj_types=None, names=None, **_):
                assert not self.is_prod
                return self._link(offsets, placement, obj_types, names, depths, True)

            def join(self, offsets, placement, depths=None, obj_types=None, names=None, **_):
                assert self.is_prod
                return self._link(offsets, placement, obj_types, names, depths, False)

            def forward(self, placement, obj_type=None, depth=None, name=None, **_):
                return self.split([0], placement, [depth], [obj_type], [name])[0]

        class ObjectFifo:
            def __init__(self, obj_type, depth=2, name=None, dims_to_stream=None, **_):
                self.obj_type, self.depth, self.name = obj_type, depth, name
                self._prod, self._cons = None, []
                assert name not in {f.name for f in fake.fifos}, f"duplicate fifo name {name}"
                fake.fifos.append(self)

            def prod(self, depth=None):
                self._prod = self._prod or Handle(self, True, depth or self.depth)
                return self._prod

            def cons(self, depth=None, dims_from_stream=None):
                self._cons.append(Handle(self, False, depth or self.depth))
                return self._cons[-1]

        class Kernel:
            def __init__(self, name, bin_name, arg_types=()):
                self.name, self.bin_name, self.arg_types = name, bin_name, list(arg_types)

            def __call__(self, *args):
                assert len(args) == len(self.arg_types), f"{self.name}: {len(args)} args for {len(self.arg_types)}"
                for ty, arg in zip(self.arg_types, args, strict=True):
                    if ty is np.int32:
                        assert isinstance(arg, int), f"{self.name}: {arg!r} for an int32"
                    else:
                        assert getattr(arg, "obj_type", None) == ty, f"{self.name}: buffer type differs from declared"
                fake.calls.append((fake.current, self.name))

        class Buffer:
            def __init__(self, type=None, initial_value=None, name=None, **_):
                self.obj_type, self.initial_value, self.name = type, initial_value, name
                assert initial_value is None or initial_value.size == type.__args__[0][0]

            @property
            def op(self):
                return self

            def __getitem__(self, i):
                return 0

            def __setitem__(self, i, v):
                pass

        class Worker:
            def __init__(self, core_fn, fn_args=(), placement=None, while_true=True, stack_size=None):
                self.core_fn, self.fn_args, self.tile, self.stack = core_fn, list(fn_args), placement, stack_size
                bins = {a.bin_name for a in fn_args if isinstance(a, Kernel)}
                assert len(bins) == 1, f"one kernel object per core, got {bins}"
                for a in fn_args:
                    if isinstance(a, Handle):
                        a.endpoint = self
                fake.workers.append(self)

        class Runtime:
            def __init__(self):
                self.open = 0

            def sequence(self, *types_):
                runtime = self

                class Ctx:
                    def __enter__(self):
                        runtime.types = types_
                        return tuple(range(len(types_))) if len(types_) > 1 else 0

                    def __exit__(self, *exc):
                        assert runtime.open == 0, "a task group was left open"

                return Ctx()

            def start(self, *workers):
                assert len(workers) == len(fake.workers)

            def task_group(self):
                self.open += 1
                return object()

            def finish_task_group(self, tg):
                self.open -= 1

            def fill(self, handle, buf, tap, task_group, placement, wait=False):
                assert handle.is_prod and task_group is not None
                handle.endpoint = ("shim", placement.key())
                fake.fills.append((handle.fifo, buf, tap, placement.key()))

            def drain(self, handle, buf, tap, task_group, placement, wait=False):
                assert not handle.is_prod and wait
                handle.endpoint = ("shim", placement.key())
                fake.drains.append((handle.fifo, buf, tap, placement.key()))

        class Program:
            def __init__(self, device, rt):
                self.rt = rt

            def resolve_program(self, placer):
                for w in fake.workers:  # one pass of each core's loop
                    fake.current = w
                    w.core_fn(*w.fn_args)
                    for a in w.fn_args:
                        if isinstance(a, Handle):
                            assert a.held == 0, f"a core pass keeps {a.held} objects of {a.fifo.name}"
                fake.current = None
                return "module {}"

        class TensorAccessPattern:
            def __init__(self, tensor_dims, offset, sizes, strides):
                last = offset + sum((s - 1) * t for s, t in zip(sizes, strides, strict=True))
                assert len(sizes) == 4 and last < tensor_dims[0]

        self.Tile = Tile
        device = _module("aie.iron.device", Tile=Tile, NPU1Col4=lambda: "npu1")
        iron = _module(
            "aie.iron", Buffer=Buffer, Kernel=Kernel, ObjectFifo=ObjectFifo, Program=Program, Runtime=Runtime,
            Worker=Worker, device=device,
        )  # fmt: skip
        self.modules = {
            "aie": _module("aie", iron=iron),
            "aie.iron": iron,
            "aie.iron.device": device,
            "aie.iron.controlflow": _module("aie.iron.controlflow", range_=range),
            "aie.iron.placers": _module("aie.iron.placers", SequentialPlacer=lambda: None),
            "aie.helpers": _module("aie.helpers"),
            "aie.helpers.taplib": _module("aie.helpers.taplib", TensorAccessPattern=TensorAccessPattern),
        }

    def check_wiring(self):
        """Every fifo: one producer, at least one consumer; DMA channels per tile within npu1's."""
        ins: dict = {}
        outs: dict = {}
        for f in self.fifos:
            assert f._prod is not None and f._prod.endpoint is not None, f"{f.name} has no producer"
            assert f._cons and all(c.endpoint is not None for c in f._cons), f"{f.name} has no consumer"
            src = f._prod.endpoint
            src = ("core", src.tile.key()) if hasattr(src, "tile") else src
            outs.setdefault(src, set()).add(f.name)
            for c in f._cons:
                dst = ("core", c.endpoint.tile.key()) if hasattr(c.endpoint, "tile") else c.endpoint
                ins.setdefault(dst, set()).add(f.name)
        limits = {"shim": 2, "mem": 6, "core": 2}
        for (kind, tile), names in outs.items():
            assert len(names) <= limits[kind], f"{kind} {tile} sends {len(names)} streams"
        for (kind, tile), names in ins.items():
            assert len(names) <= limits[kind], f"{kind} {tile} receives {len(names)} streams"
        tiles = [w.tile.key() for w in self.workers]
        assert len(tiles) == len(set(tiles)) and all(2 <= r <= 5 and 0 <= c <= 3 for c, r in tiles)


def _emit_with_fake(monkeypatch, design: str, tiling) -> FakeIron:
    fake = FakeIron()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    if design == "gemm":
        mod = _load("gemm")
    elif design == "mel":
        mod = _load("mel")
    else:
        mod = _load("_rows")
    assert mod.emit(_load("_iron").load_iron(), tiling) == "module {}"
    fake.check_wiring()
    return fake


FAKE_DESIGNS = [
    ("gemm", GemmTiling(300, 256, 384, 32, 64, 96)),
    ("gemm", choose_gemm_tiling(5, 64, 51864)),
    ("softmax", choose_row_tiling("softmax", 300, 1500, masked=True)),
    ("softmax", choose_row_tiling("softmax", 300, 1500)),
    ("layernorm", choose_row_tiling("layernorm", 1500, 384)),
    ("gelu", choose_row_tiling("gelu", 300, 1536, residual=True)),
    ("requant", choose_row_tiling("requant", 1500, 384)),
    ("requant", choose_row_tiling("quantize", 1500, 384)),
    ("requant", choose_row_tiling("dequant", 300, 384, residual=True)),
    ("requant", choose_row_tiling("dequant", 300, 1152)),
    ("mel", mel_tiling(300, 20, 16)),
]


@pytest.mark.parametrize(("design", "tiling"), FAKE_DESIGNS, ids=[f"{d}-{i}" for i, (d, _) in enumerate(FAKE_DESIGNS)])
def test_iron_design_code_on_a_fake_aie(monkeypatch, design, tiling):
    fake = _emit_with_fake(monkeypatch, design, tiling)
    fills = {f.name for f, *_ in fake.fills}
    drains = {f.name for f, *_ in fake.drains}
    transfers = [tr for wave in tiling.waves() for tr in wave]
    assert fills == {tr.fifo for tr in transfers if tr.fill}
    assert drains == {tr.fifo for tr in transfers if not tr.fill}
    assert len(fake.fills) + len(fake.drains) == len(transfers)
    parts = [tiling.dft, tiling.log] if design == "mel" else [tiling]
    assert len(fake.workers) == sum(4 * p.n_cols for p in parts)
    # every core calls its kernel once per tile (and depth step): the loop the replay runs
    per_core: dict = {}
    for w, name in fake.calls:
        per_core.setdefault(w, []).append(name)
    for p in parts:
        lay = p.layout() if hasattr(p, "layout") else None
        kernel = lay.kernel if lay else p.kernel
        want = p.tiles_per_core * (p.KT if lay is None and p.accumulate else 1)
        cores = [
            w
            for w in fake.workers
            if (w.tile.col, w.tile.row) in {p.core_tile(r, c) for r in range(4) for c in range(p.n_cols)}
        ]
        for w in cores:
            assert per_core[w].count(kernel) == want
    if design == "mel":
        stacks = {w.stack for w in fake.workers if w.tile.col >= 2}
        assert stacks == {2048}  # mel_log keeps its band sums on the stack


# ---- command lines without a toolchain ---------------------------------------------------------


def _have_aie() -> bool:
    return importlib.util.find_spec("aie") is not None


def _toolchain_missing() -> str | None:
    missing = []
    if not (shutil.which("aiecc.py") or shutil.which("aiecc")):
        missing.append("aiecc.py")
    peano = os.environ.get("PEANO_INSTALL_DIR")
    if not peano or not (Path(peano) / "bin" / "clang++").exists():
        missing.append("Peano (PEANO_INSTALL_DIR)")
    if not _have_aie():
        missing.append("the aie package")
    if not shutil.which("xclbinutil"):
        missing.append("xclbinutil (XRT)")
    return ", ".join(missing) or None


def _run(args, env=None, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_design_scripts_print_tiling_and_name_the_missing_package():
    out = _run([str(MLIR / "gemm.py"), "-M", "1500", "-K", "384", "-N", "1536", "--tiling-json"])
    assert out.returncode == 0, out.stderr
    tiling = json.loads(out.stdout)
    assert tiling["Mp"] == 1536 and tiling["kernel"] == "gemm_i8_i32"
    out = _run([str(MLIR / "requant.py"), "--op", "requant", "-M", "8", "-N", "384", "--residual"])
    assert out.returncode == 1 and "no residual" in out.stderr
    if not _have_aie():
        out = _run([str(MLIR / "softmax.py"), "-M", "300", "-N", "1500", "--masked"])
        assert out.returncode == 3 and "`aie`" in out.stderr and "pip install mlir_aie" in out.stderr
        assert "Traceback" not in out.stderr


def test_build_without_toolchain_says_what_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PEANO_INSTALL_DIR"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + "/usr/bin" + os.pathsep + "/bin"
    env["PEANO_INSTALL_DIR"] = str(tmp_path / "no-peano")
    out = _run([str(MLIR / "build.py"), "--only", "gemm_1500x384x384", "--out", str(tmp_path / "out")], env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "PEANO_INSTALL_DIR" in out.stderr and "llvm-aie" in out.stderr
    if not shutil.which("aiecc.py", path=env["PATH"]):
        assert "aiecc.py" in out.stderr
    if not _have_aie():
        assert "missing aie" in out.stderr and "pip install mlir_aie==" in out.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_build_dry_run_prints_the_commands(tmp_path):
    out = _run(
        [str(MLIR / "build.py"), "--dry-run", "--only", "gemm_5x384x51864", "--only", "mel", "--out", str(tmp_path)]
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("--target=aie2-none-unknown-elf" in ln and "kernels/gemm.cc" in ln for ln in lines)
    assert any("mlir/mel.py --frames 3000" in ln for ln in lines)
    assert sum("aiecc" in ln and "--aie-generate-xclbin" in ln and "--peano" in ln for ln in lines) == 2
    assert not list(tmp_path.iterdir())  # nothing run


@pytest.mark.npu
def test_build_one_gemm_with_the_toolchain(tmp_path):
    missing = _toolchain_missing()
    if missing:
        pytest.skip(f"needs the AIE toolchain; missing: {missing}")
    # "--only -" matches none of the Whisper designs: only the extra GEMM is built
    out = _run([str(MLIR / "build.py"), "--only", "-", "--gemm", "256x256x256", "--out", str(tmp_path)], timeout=1800)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (entry,) = manifest["designs"]
    assert entry["tiling"]["M"] == 256 and manifest["toolchain"]["found"]["mlir_aie"]
    assert (tmp_path / entry["xclbin"]).stat().st_size > 0 and (tmp_path / entry["insts"]).stat().st_size > 0


def test_replay_kernels_follow_the_c_abi():
    # every kernel the designs call has an ABI entry, and the stand-ins above take those arguments
    from npu.xdna.tiling import KERNEL_ABI

    stand_ins = {
        "softmax_f32": softmax_c,
        "layernorm_f32": layernorm_c,
        "gelu_f32": gelu_c,
        "requant_i32_i8": requant_c,
        "quantize_rows_f32_i8": quantize_c,
        "dequant_i32_f32": dequant_c,
        "dft_i16_i32": dft_c,
        "mel_log_f32": mel_log_c,
    }
    for name, fn in stand_ins.items():
        assert len(inspect.signature(fn).parameters) == len(KERNEL_ABI[name]), name
