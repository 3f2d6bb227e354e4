"""Every kernel's host scalar path (kernels/*.cc via npu.golden.host) matches its golden model
bit for bit, and so do the AIE2 vector paths built against the host model of aie_api.

Why: the golden models define the numerics the NPU path must reproduce; the C++ kernels are
only right if they compute the very same bits, edge cases included (rounding ties, saturation,
underflow, masked entries, table boundaries). Floats are compared by their raw bits.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from npu.golden import host

if host.find_compiler() is None:
    pytest.skip(
        "no C++ compiler (g++, clang++ or $CXX): the kernels' scalar paths cannot be built", allow_module_level=True
    )

gold_gemm = importlib.import_module("npu.golden.gemm")
gold_requant = importlib.import_module("npu.golden.requant")
gold_softmax = importlib.import_module("npu.golden.softmax")
gold_layernorm = importlib.import_module("npu.golden.layernorm")
gold_gelu = importlib.import_module("npu.golden.gelu")
gold_mel = importlib.import_module("npu.golden.mel")
gold_tables = importlib.import_module("npu.golden.tables")


@pytest.fixture(scope="module", params=sorted(host.VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    """Each test runs on the scalar paths and on the vector paths built against the aie_api model.
    Building here (once per variant) makes a compile error fail loudly in the first test."""
    host.library(request.param)
    return request.param


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def same_bits(got: np.ndarray, want: np.ndarray) -> None:
    """Exact equality; floats by their raw bits (so -0.0 != 0.0 and NaN payloads count)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if got.dtype == np.float32:
        g, w = got.view(np.uint32), want.view(np.uint32)
    else:
        g, w = got, want
    if not np.array_equal(g, w):
        bad = np.argwhere(g != w)
        first = tuple(bad[0])
        raise AssertionError(
            f"{len(bad)} of {g.size} differ; first at {first}: got {got[first]!r}, want {want[first]!r}"
        )


def test_tables_header_is_current() -> None:
    assert (host.KERNEL_DIR / "tables.h").read_text() == gold_tables.header()


# ---- GEMM ------------------------------------------------------------------------------------


def int8_extremes(r: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random int8 with a heavy share of -128, 127, -1, 0, 1."""
    x = r.integers(-128, 128, shape).astype(np.int8)
    edge = r.random(shape) < 0.4
    x[edge] = r.choice(np.array([-128, 127, -1, 0, 1], np.int8), int(edge.sum()))
    return x


@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(1, 1, 1), (3, 5, 7), (4, 32, 32), (5, 33, 37), (8, 64, 96), (17, 100, 31), (64, 384, 65), (2, 1500, 3)],
)
def test_gemm_ragged(m: int, k: int, n: int, variant: str) -> None:
    r = rng(m * 1000 + k + n)
    a, b = int8_extremes(r, (m, k)), int8_extremes(r, (k, n))
    same_bits(host.gemm(a, b, variant=variant), gold_gemm.gemm(a, b))


def test_gemm_extreme_sums(variant: str) -> None:
    # The largest |sum| the golden model allows without overflow: -128 * -128 * (2**17 - 1) < 2**31.
    k = gold_gemm.MAX_K
    assert k == (1 << 17) - 1
    a = np.full((1, k), -128, np.int8)
    b = np.stack([np.full(k, -128, np.int8), np.full(k, 127, np.int8)], axis=1)
    got = host.gemm(a, b, variant=variant)
    same_bits(got, gold_gemm.gemm(a, b))
    assert got[0, 0] == 16384 * k and got[0, 1] == -128 * 127 * k


def test_gemm_accumulates_into_c(variant: str) -> None:
    r = rng(1)
    a, b = int8_extremes(r, (9, 70)), int8_extremes(r, (70, 33))
    c0 = r.integers(-(1 << 24), 1 << 24, (9, 33)).astype(np.int32)
    same_bits(host.gemm(a, b, c0, variant=variant), (c0.astype(np.int64) + gold_gemm.gemm(a, b)).astype(np.int32))
    # Split depth, accumulated across two calls, as the tiled designs do.
    partial = host.gemm(a[:, :37], b[:37], variant=variant)
    same_bits(host.gemm(a[:, 37:], b[37:], partial, variant=variant), gold_gemm.gemm(a, b))


def test_gemm_c_wraps_like_acc32(variant: str) -> None:
    # c + a . b past int32 wraps mod 2**32 (the acc32 accumulator), on both GEMMs and in both the
    # vector blocks (rows 0-3, columns 0-31) and the scalar edges.
    r = rng(11)
    c0 = np.full((5, 33), 2**31 - 1000, np.int32)
    c0[1::2] = -(2**31) + 1000
    for gemm, golden, a in [
        (host.gemm, gold_gemm.gemm, np.full((5, 64), 127, np.int8)),
        (host.gemm_i16, gold_gemm.gemm_i16, np.full((5, 64), 32767, np.int16)),
    ]:
        a[1::2] *= -1
        b = r.integers(1, 128, (64, 33)).astype(np.int8)
        want = ((c0.astype(np.int64) + golden(a, b) + 2**31) % 2**32 - 2**31).astype(np.int32)
        got = gemm(a, b, c0, variant=variant)
        same_bits(got, want)
        assert np.all(got[0] < 0) and np.all(got[1] > 0)  # wrapped


def test_zero_i32(variant: str) -> None:
    c = rng(2).integers(-(1 << 31), 1 << 31, 37).astype(np.int32)
    host.zero(c[:35], variant=variant)
    assert np.all(c[:35] == 0) and np.all(c[35:] != 0)


# ---- int16 x int8 GEMM (vocabulary projection) ------------------------------------------


def int16_extremes(r: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random int16 with a heavy share of -32768, 32767, -1, 0, 1."""
    x = r.integers(-32768, 32768, shape).astype(np.int16)
    edge = r.random(shape) < 0.4
    x[edge] = r.choice(np.array([-32768, 32767, -1, 0, 1], np.int16), int(edge.sum()))
    return x


@pytest.mark.parametrize(
    ("m", "k", "n"),
    [
        (1, 1, 1),
        (3, 5, 7),
        (4, 16, 32),  # exactly one vector block
        (5, 17, 33),  # one block plus a tail in every dimension
        (8, 64, 96),
        (17, 100, 31),
        (12, 511, 65),  # the deepest the golden model allows: 31 depth blocks plus 15
        (4, 496, 64),
    ],
)
def test_gemm_i16_ragged(m: int, k: int, n: int, variant: str) -> None:
    r = rng(m * 1000 + k + n + 7)
    a, b = int16_extremes(r, (m, k)), int8_extremes(r, (k, n))
    same_bits(host.gemm_i16(a, b, variant=variant), gold_gemm.gemm_i16(a, b))


def test_gemm_i16_extreme_sums(variant: str) -> None:
    # K = 511 (MAX_K_I16) is the deepest where -32768 * -128 * K stays below 2**31.
    k = gold_gemm.MAX_K_I16
    assert k == 511 and 32768 * 128 * k < 2**31 <= 32768 * 128 * (k + 1)
    r = rng(12)
    a = np.empty((6, k), np.int16)
    a[0], a[1], a[4] = -32768, 32767, -32768
    a[2] = np.resize(np.array([-32768, 32767], np.int16), k)
    a[3] = r.choice(np.array([-32768, 32767], np.int16), k)
    a[5] = 32767
    b = r.choice(np.array([-128, 127], np.int8), (k, 40))
    b[:, 0], b[:, 1], b[:, 32] = -128, 127, -128
    got = host.gemm_i16(a, b, variant=variant)
    same_bits(got, gold_gemm.gemm_i16(a, b))
    assert got[0, 0] == 32768 * 128 * k and got[0, 1] == -32768 * 127 * k and got[1, 0] == -32767 * 128 * k
    assert got[4, 32] == got[0, 0] and got[5, 1] == 32767 * 127 * k  # the scalar edges too


def test_gemm_i16_zero_rows_and_accumulates_into_c(variant: str) -> None:
    r = rng(13)
    a, b = int16_extremes(r, (9, 70)), int8_extremes(r, (70, 33))
    a[2] = 0
    a[:, 40] = 0
    b[5] = 0
    c0 = r.integers(-(1 << 24), 1 << 24, (9, 33)).astype(np.int32)
    got = host.gemm_i16(a, b, c0, variant=variant)
    same_bits(got, (c0.astype(np.int64) + gold_gemm.gemm_i16(a, b)).astype(np.int32))
    same_bits(got[2], c0[2])  # a zero row adds nothing
    # Split depth, accumulated across two calls, as the tiled designs do.
    partial = host.gemm_i16(a[:, :37], b[:37], variant=variant)
    same_bits(host.gemm_i16(a[:, 37:], b[37:], partial, variant=variant), gold_gemm.gemm_i16(a, b))


# ---- requantisation ---------------------------------------------------------------------


def every_shift(r: np.random.Generator) -> np.ndarray:
    """Shifts 1..59 (the srs range), shuffled, plus a few: 65 columns, so the 16-wide vector blocks
    see mixed shifts (the extremes included) and a scalar tail remains."""
    return np.concatenate([r.permutation(np.arange(1, 60)), [59, 3, 1, 58, 31, 2]]).astype(np.int8)


def test_requant_every_shift_random(variant: str) -> None:
    r = rng(3)
    shift = every_shift(r)
    mult = r.integers(-(1 << 31), 1 << 31, shift.size).astype(np.int32)
    acc = r.integers(-(1 << 31), 1 << 31, (40, shift.size)).astype(np.int32)
    acc[:, ::3] = r.integers(-300, 300, acc[:, ::3].shape)  # small values: results off the rails
    same_bits(host.requant(acc, mult, shift, variant=variant), gold_requant.requant(acc, mult, shift))


def exact_halves(r: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """acc, mult, shift (every shift 1..59) with acc * mult == h * 2**(shift - 1) for odd h: every
    output is a tie, h up to +-255 where int32 operands allow (a result of 128 saturates). Every
    other column with shift > 31 uses mult = -2**31 (acc negated to match)."""
    shift = every_shift(r)
    mult = np.empty(shift.size, np.int32)
    acc = np.empty((rows, shift.size), np.int32)
    h = np.empty((rows, shift.size), np.int64)
    for j, s in enumerate(shift.tolist()):
        e = s - 1
        sign = 1
        if e >= 31 and j % 2:
            mult[j], ea, sign = -(1 << 31), e - 31, -1
        else:
            mult[j] = 1 << min(e, 30)
            ea = e - min(e, 30)
        hmax = min(255, (1 << (31 - ea)) - 1)
        h[:, j] = r.integers(-(hmax + 1) // 2, (hmax + 1) // 2, rows) * 2 + 1
        acc[:, j] = sign * h[:, j] << ea
    assert np.all(acc.astype(np.int64) * mult * 2 == h << shift.astype(np.int64))
    return acc, mult, shift


def test_requant_ties_round_half_even(variant: str) -> None:
    acc, mult, shift = exact_halves(rng(4), 24)
    got = host.requant(acc, mult, shift, variant=variant)
    same_bits(got, gold_requant.requant(acc, mult, shift))
    assert np.all((got % 2 == 0) | (got == 127)), "ties go to the even neighbour (128 saturates to 127)"


def test_requant_saturates_both_sides(variant: str) -> None:
    big = np.array([[2**31 - 1, -(2**31), 255, -257, 256, -256, 254, -258]], np.int32)
    mult = np.full(8, 1 << 30, np.int32)
    shift = np.full(8, 31, np.int8)  # acc * 2**30 >> 31 = acc / 2, rounded half to even
    got = host.requant(big, mult, shift, variant=variant)
    same_bits(got, gold_requant.requant(big, mult, shift))
    assert got.tolist() == [[127, -128, 127, -128, 127, -128, 127, -128]]


def test_requant_quantize_multiplier_scales(variant: str) -> None:
    # Real scales through the golden quantize_multiplier, over its whole range: shifts 1..59.
    r = rng(14)
    scales = np.concatenate([2.0 ** r.uniform(-29, 30, 60), [2.0**-29, 2.0**-28, 1.0, 2.0**29, 2.0**30 - 1]])
    mult, shift = gold_requant.quantize_multiplier(scales)
    assert shift.min() == 1 and shift.max() == 59
    acc = r.integers(-(1 << 31), 1 << 31, (20, scales.size)).astype(np.int32)
    acc[:10] = r.integers(-1000, 1000, (10, scales.size))
    same_bits(host.requant(acc, mult, shift, variant=variant), gold_requant.requant(acc, mult, shift))


@pytest.mark.parametrize("bad", [0, 60, 62, -1])
def test_requant_rejects_bad_shift(bad: int, variant: str) -> None:
    # The golden srs refuses shifts outside 1..59, and so does the wrapper.
    shift = np.array([bad, 5], np.int8)
    acc, mult = np.zeros((1, 2), np.int32), np.ones(2, np.int32)
    with pytest.raises(ValueError, match=r"1\.\.59"):
        gold_requant.requant(acc, mult, shift)
    with pytest.raises(ValueError, match=r"1\.\.59"):
        host.requant(acc, mult, shift, variant=variant)


# ---- quantize / dequant -----------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 15, 16, 17, 384])
def test_quantize_rows_random(n: int, variant: str) -> None:
    r = rng(n)
    x = (r.standard_normal((7, n)) * r.choice([1e-3, 1.0, 1e3], (7, 1))).astype(np.float32)
    x[2] = 0.0  # a zero row: scale 0
    x[3, :] = -0.0
    q, scale = host.quantize_rows(x, variant=variant)
    gq, gscale = gold_requant.quantize_rows(x)
    same_bits(q, gq)
    same_bits(scale, gscale)
    assert scale[2] == 0 and np.all(q[2] == 0)


def test_quantize_rows_ties(variant: str) -> None:
    # absmax 127 gives inv = 1 exactly, absmax 254 gives inv = 0.5: these entries land on .5.
    # 40 columns, so the vector paths' 16-wide blocks and the scalar tail both see ties.
    ties = np.array([2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5, 3.5, -2.5, 4.5], np.float32)
    x = np.zeros((2, 40), np.float32)
    x[0] = np.concatenate([[127], np.tile(ties, 4)[:38], [-127]])
    x[1] = np.concatenate([[-254], 2 * np.tile(ties, 4)[:38], [9]])
    q, scale = host.quantize_rows(x, variant=variant)
    gq, gscale = gold_requant.quantize_rows(x)
    same_bits(q, gq)
    same_bits(scale, gscale)
    assert q[0, :11].tolist() == [127, 2, -4, 0, 0, 2, 126, -126, 4, -2, 4]
    assert np.array_equal(q[1, 1:39], q[0, 1:39])  # the same ties at half the scale


@pytest.mark.parametrize("n", [1, 15, 16, 17, 384])
def test_quantize_rows_i16_random(n: int, variant: str) -> None:
    r = rng(n + 50)
    x = (r.standard_normal((8, n)) * r.choice([1e-30, 1e-3, 1.0, 1e3, 1e30], (8, 1))).astype(np.float32)
    x[2] = 0.0  # a zero row: scale 0
    x[3, :] = -0.0
    x[4, ::2] = np.float32(1e-45)  # subnormals beside a tiny absmax (inv = 32767 / 1e-30 is finite) round to 0
    x[4, 0] = np.float32(-1e-30)
    q, scale = host.quantize_rows_i16(x, variant=variant)
    gq, gscale = gold_requant.quantize_rows_i16(x)
    same_bits(q, gq)
    same_bits(scale, gscale)
    assert scale[2] == 0 and scale[3] == 0 and np.all(q[2:4] == 0)
    assert np.all(np.abs(q[[0, 1, 4, 5, 6, 7]]).max(axis=1) == 32767)  # absmax maps to +-32767


def test_quantize_rows_i16_ties_and_shape(variant: str) -> None:
    # absmax 32767 gives inv = 1 exactly, absmax 65534 gives inv = 0.5: these entries land on .5.
    # 40 columns, so the vector paths' 16-wide blocks and the scalar tail both see ties.
    ties = np.array([2.5, -3.5, 0.5, -0.5, 1.5, 32766.5, -32766.5, 3.5, -2.5, 4.5], np.float32)
    x = np.zeros((2, 40), np.float32)
    x[0] = np.concatenate([[32767], np.tile(ties, 4)[:38], [-32767]])
    x[1] = np.concatenate([[-65534], 2 * np.tile(ties, 4)[:38], [9]])
    q, scale = host.quantize_rows_i16(x, variant=variant)
    gq, gscale = gold_requant.quantize_rows_i16(x)
    same_bits(q, gq)
    same_bits(scale, gscale)
    assert q[0, :11].tolist() == [32767, 2, -4, 0, 0, 2, 32766, -32766, 4, -2, 4]
    assert np.array_equal(q[1, 1:39], q[0, 1:39])  # the same ties at half the scale
    # Leading axes are rows, as for quantize_rows.
    x3 = np.stack([x, -x, x[::-1]])
    q3, scale3 = host.quantize_rows_i16(x3, variant=variant)
    gq3, gscale3 = gold_requant.quantize_rows_i16(x3)
    same_bits(q3, gq3)
    same_bits(scale3, gscale3)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("n", [1, 17, 384])
def test_dequant(bias: bool, residual: bool, n: int, variant: str) -> None:
    r = rng(n + 2 * bias + residual)
    m = 5
    acc = r.integers(-(1 << 31), 1 << 31, (m, n)).astype(np.int32)
    acc[0] = r.integers(-1000, 1000, n)
    row_scale = (r.random(m) * 1e-3).astype(np.float32)
    col_scale = (r.random(n) * 1e-2).astype(np.float32)
    b = r.standard_normal(n).astype(np.float32) if bias else None
    res = r.standard_normal((m, n)).astype(np.float32) if residual else None
    same_bits(
        host.dequant(acc, row_scale, col_scale, b, res, variant=variant),
        gold_requant.dequant(acc, row_scale, col_scale, b, res),
    )


# ---- softmax ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 16, 17, 33, 64, 1500])
def test_softmax_random(n: int, variant: str) -> None:
    r = rng(n)
    x = (r.standard_normal((6, n)) * np.array([[0.1], [1], [5], [30], [100], [1000]])).astype(np.float32)
    same_bits(host.softmax(x, variant=variant), gold_softmax.softmax(x))


def test_softmax_large_negatives_and_underflow(variant: str) -> None:
    n = 40
    x = np.zeros((5, n), np.float32)
    x[0, 1:] = -1e30  # -inf-like masking values
    x[1, 1:] = np.float32(-3.4e38)
    x[2, ::2] = -np.inf
    x[3, 1:] = -np.linspace(87.0, 200.0, n - 1)  # all but one underflow (t < -126) or nearly
    x[4] = -np.linspace(0.0, 95.0, n)
    got = host.softmax(x, variant=variant)
    with np.errstate(over="ignore"):
        want = gold_softmax.softmax(x)
    same_bits(got, want)
    assert got[0, 0] == 1 and got[1, 0] == 1 and np.all(got[:2, 1:] == 0)


def test_softmax_exp_table_and_threshold(variant: str) -> None:
    # One 0 sets the max; the rest sweep d over the whole table and the t = -126 threshold.
    edge = np.float32(-126) / gold_softmax.LOG2E
    around = [np.nextafter(edge, np.float32(0)), edge, np.nextafter(edge, np.float32(-1))]
    d = np.concatenate([-np.linspace(0, 90, 4095, dtype=np.float32), np.array(around * 5, np.float32)])
    x = np.concatenate([[np.float32(0)], d]).astype(np.float32)[None, :]
    same_bits(host.softmax(x, variant=variant), gold_softmax.softmax(x))
    # Each exp on its own: a two-entry row [0, d] is [1, e] / (1 + e).
    pairs = np.stack([np.zeros_like(d), d], axis=1)
    same_bits(host.softmax(pairs, variant=variant), gold_softmax.softmax(pairs))


def test_softmax_n_valid_masks(variant: str) -> None:
    r = rng(5)
    m, n = 12, 50
    x = (r.standard_normal((m, n)) * 4).astype(np.float32)
    n_valid = np.array([1, 2, 15, 16, 17, 31, 32, 33, 49, 50, 60, 7], np.int32)
    x[11, 7:] = 1e30  # huge masked entries must not leak into the max or the sum
    got = host.softmax(x, n_valid, variant=variant)
    same_bits(got, gold_softmax.softmax(x, n_valid))
    for i, v in enumerate(n_valid):
        assert np.all(got[i, v:] == 0)


def test_softmax_no_valid_entry_is_nan_like_golden(variant: str) -> None:
    x = np.ones((2, 8), np.float32)
    n_valid = np.array([0, 3], np.int32)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = gold_softmax.softmax(x, n_valid)
    got = host.softmax(x, n_valid, variant=variant)
    assert np.all(np.isnan(got[0])) and np.all(np.isnan(want[0]))
    same_bits(got[1], want[1])


# ---- layer norm -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 16, 17, 384, 1536])
def test_layernorm_random(n: int, variant: str) -> None:
    r = rng(n)
    x = (r.standard_normal((5, n)) * np.array([[1e-3], [0.5], [1], [10], [300]])).astype(np.float32)
    gamma = r.standard_normal(n).astype(np.float32)
    beta = r.standard_normal(n).astype(np.float32)
    same_bits(host.layernorm(x, gamma, beta, variant=variant), gold_layernorm.layernorm(x, gamma, beta))


def test_layernorm_constant_rows_and_offsets(variant: str) -> None:
    r = rng(6)
    n = 384
    x = np.empty((6, n), np.float32)
    x[0] = 3.7
    x[1] = 0.0
    x[2] = -1e4
    x[3] = 1e4 + r.standard_normal(n) * 1e-2
    x[4] = 1e6 + r.standard_normal(n)
    x[5] = -3e7 + r.standard_normal(n) * 100
    gamma = r.standard_normal(n).astype(np.float32)
    beta = r.standard_normal(n).astype(np.float32)
    got = host.layernorm(x, gamma, beta, variant=variant)
    same_bits(got, gold_layernorm.layernorm(x, gamma, beta))
    same_bits(got[1], beta)  # a zero row normalises to beta exactly


# ---- GELU -------------------------------------------------------------------------------


def gelu_inputs() -> np.ndarray:
    """Every float32 region: random bit patterns, the bf16 grid, binade edges, +-8, tiny, huge."""
    r = rng(7)
    parts = [r.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32).view(np.float32)]
    grid = []
    for sign in (1.0, -1.0):
        for e in range(-4, 4):
            grid.append(sign * np.float32(2.0**e) * (1 + np.arange(128, dtype=np.float32) / 128))
    grid = np.concatenate(grid).astype(np.float32)
    parts.append(grid)  # exact table points (low 16 bits zero)
    bits = grid.view(np.uint32)
    parts += [(bits + 1).view(np.float32), (bits - 1).view(np.float32), (bits | 0xFFFF).view(np.float32)]
    edges = np.array([2.0**e for e in range(-6, 5)] + [8.0, 0.0625], np.float32)
    for x in (edges, -edges):
        parts += [x, np.nextafter(x, np.float32(0)), np.nextafter(x, np.float32(np.inf) * np.sign(x))]
    parts.append(
        np.array(
            [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1e-38, -1e-38, 3.4e38, -3.4e38, 1e-3, -1e-3],
            np.float32,
        )
    )
    parts.append(np.linspace(-10, 10, 20001, dtype=np.float32))
    return np.concatenate(parts).astype(np.float32)


def test_gelu_every_region(variant: str) -> None:
    x = gelu_inputs()
    with np.errstate(invalid="ignore", over="ignore"):
        want = gold_gelu.gelu(x)
    same_bits(host.gelu(x, variant=variant), want)


def test_gelu_residual_and_shape(variant: str) -> None:
    r = rng(8)
    x = (r.standard_normal((3, 7, 33)) * 3).astype(np.float32)
    res = r.standard_normal((3, 7, 33)).astype(np.float32)
    same_bits(host.gelu(x, res, variant=variant), gold_gelu.gelu(x, res))


# ---- mel ----------------------------------------------------------------------------------


def check_mel(audio: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray]:
    frames = gold_mel.frames_i16(audio)
    spec = host.dft(frames, variant=variant)
    same_bits(spec, gold_mel.dft(frames))
    logmel = host.mel_log(spec, variant=variant)
    same_bits(logmel, gold_mel.mel_log(spec))
    return spec, logmel


def test_mel_real_speech(jfk: Path, variant: str) -> None:
    audio, rate = sf.read(str(jfk), dtype="float32")
    assert rate == 16000
    spec, logmel = check_mel(audio, variant)
    assert spec.shape == (len(audio) // 160, 402) and logmel.shape == (len(audio) // 160, 80)


def test_mel_silence(variant: str) -> None:
    spec, logmel = check_mel(np.zeros(4000, np.float32), variant)
    assert np.all(spec == 0)
    assert np.all(logmel == logmel[0, 0]) and abs(float(logmel[0, 0]) + 10) < 1e-4


def test_mel_full_scale_square_wave(variant: str) -> None:
    t = np.arange(8000) / 16000
    square = np.where(np.sin(2 * np.pi * 440 * t) >= 0, 1.0, -1.0).astype(np.float32)
    frames = gold_mel.frames_i16(square)
    assert frames.max() == 32767 and frames.min() == -32768  # saturated at +1.0
    check_mel(square, variant)


def test_dft_saturates_and_rounds_ties(variant: str) -> None:
    # A deeper sum than the mel front end's 400 taps overflows int32 after the shift by 8.
    k = 1024
    frames = np.full((2, k), -32768, np.int16)
    frames[1] = 32767
    basis = np.stack([np.full(k, -32768, np.int16), np.full(k, 32767, np.int16)], axis=1)
    got = host.dft(frames, basis, variant=variant)
    same_bits(got, gold_mel.dft(frames, basis))
    assert got.tolist() == [[2**31 - 1, -(2**31)], [-(2**31), 2**31 - 1]]
    # k = 1: every product is an odd multiple of 128, i.e. exactly half of the 2**8 step.
    r = rng(9)
    frames = (r.integers(-100, 100, (8, 1)) * 2 + 1).astype(np.int16)
    basis = ((r.integers(-100, 100, (1, 16)) * 2 + 1) * 128).astype(np.int16)
    same_bits(host.dft(frames, basis, variant=variant), gold_mel.dft(frames, basis))


def test_mel_log_extreme_spectra(variant: str) -> None:
    r = rng(10)
    spec = r.integers(-(1 << 31), 1 << 31, (9, 402), dtype=np.int64).astype(np.int32)
    spec[1] = r.integers(-3, 4, 402)  # quiet: below the 1e-10 floor after the 2**-44 weights
    spec[2] = np.iinfo(np.int32).min
    same_bits(host.mel_log(spec, variant=variant), gold_mel.mel_log(spec))


# ---- the host build ---------------------------------------------------------------------


def test_build_is_cached() -> None:
    first = host.build()
    stamp = first.stat().st_mtime_ns
    assert host.build() == first and first.stat().st_mtime_ns == stamp


def test_missing_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(host.KernelBuildError, match="no C\\+\\+ compiler"):
        host.build()
