"""The kernels' scalar paths, built with the system C++ compiler and called from numpy.

Why: the golden models define the numerics, and ``kernels/*.cc`` must match them bit for bit.
No AIE toolchain installs here, but every kernel's portable scalar path compiles on the host,
so this module builds them into one shared library (cached under ``build/kernels/`` by a hash
of the sources, flags and compiler) and wraps each entry point for numpy arrays; the tests
compare the two. The flags keep float arithmetic literal: ``-ffp-contract=off`` (no fused
multiply-add) and no ``-ffast-math``.

A second variant, ``"vector-model"``, compiles the AIE2 vector paths against a host model of
aie_api (``kernels/aie_api_model.h``), so their tiling, interleaves, masks and lane order are
checked too; it says nothing about the real aie_api or the hardware's float units.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import numpy as np

__all__ = [
    "CXXFLAGS",
    "VARIANTS",
    "KernelBuildError",
    "build",
    "dequant",
    "dft",
    "find_compiler",
    "gelu",
    "gemm",
    "gemm_i16",
    "layernorm",
    "library",
    "mel_log",
    "quantize_rows",
    "quantize_rows_i16",
    "requant",
    "softmax",
    "zero",
]

VARIANTS: dict[str, tuple[str, ...]] = {"scalar": (), "vector-model": ("-DSTREAMD_AIE_MODEL",)}

ROOT = Path(__file__).resolve().parents[2]
KERNEL_DIR = ROOT / "kernels"
BUILD_DIR = ROOT / "build" / "kernels"
CXXFLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-Wall", "-Wextra")
SRS_MIN_SHIFT, SRS_MAX_SHIFT = 1, 59  # the AIE2 accumulator's srs range (numerics.srs, kernels/numerics.h)
SPEC_COLS = 402  # the DFT's interleaved re, im columns: 2 * (400 // 2 + 1)
MEL_BANDS = 80

_vp = ctypes.c_void_p
_i32 = ctypes.c_int32
_SIGNATURES: dict[str, tuple] = {
    "gemm_i8_i32": (_vp, _vp, _vp, _i32, _i32, _i32),
    "gemm_i16i8_i32": (_vp, _vp, _vp, _i32, _i32, _i32),
    "zero_i32": (_vp, _i32),
    "requant_i32_i8": (_vp, _vp, _vp, _vp, _i32, _i32),
    "quantize_rows_f32_i8": (_vp, _vp, _vp, _i32, _i32),
    "quantize_rows_f32_i16": (_vp, _vp, _vp, _i32, _i32),
    "dequant_i32_f32": (_vp, _vp, _vp, _vp, _vp, _vp, _i32, _i32),
    "softmax_f32": (_vp, _vp, _i32, _i32, _vp),
    "layernorm_f32": (_vp, _vp, _vp, _vp, _i32, _i32),
    "gelu_f32": (_vp, _vp, _vp, _i32),
    "dft_i16_i32": (_vp, _vp, _vp, _i32, _i32, _i32),
    "mel_log_f32": (_vp, _vp, _i32),
}


class KernelBuildError(RuntimeError):
    """The kernels could not be built or loaded (no compiler, a compile error, no sources)."""


def find_compiler() -> str | None:
    """The C++ compiler to use: ``$CXX`` if set, else the first of c++, g++, clang++ on PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def _sources() -> list[Path]:
    files = sorted(KERNEL_DIR.glob("*.cc"))
    if not files:
        raise KernelBuildError(f"no kernel sources under {KERNEL_DIR}")
    return files


def _flags(variant: str) -> tuple[str, ...]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; one of {sorted(VARIANTS)}")
    return (*CXXFLAGS, *VARIANTS[variant])


def _fingerprint(compiler: str, flags: tuple[str, ...]) -> str:
    """Hash of everything the library depends on, so an edit or a new compiler rebuilds it."""
    digest = hashlib.sha256()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest.update(f"{compiler}\n{version}\n{' '.join(flags)}\n".encode())
    for path in sorted([*_sources(), *KERNEL_DIR.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build(variant: str = "scalar", force: bool = False) -> Path:
    """Compile ``kernels/*.cc`` into ``build/kernels/libstreamd_kernels-<variant>-<hash>.so`` (or reuse it)."""
    flags = _flags(variant)
    compiler = find_compiler()
    if compiler is None:
        raise KernelBuildError("no C++ compiler found: install g++ or clang++, or set CXX")
    stem = f"libstreamd_kernels-{variant}"
    target = BUILD_DIR / f"{stem}-{_fingerprint(compiler, flags)}.so"
    if target.exists() and not force:
        return target
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=BUILD_DIR)
    os.close(fd)
    cmd = [compiler, *flags, "-I", str(KERNEL_DIR), *map(str, _sources()), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise KernelBuildError(f"compiling the kernels failed:\n{' '.join(cmd)}\n{result.stderr}")
    os.replace(tmp, target)  # atomic: a concurrent build of the same sources is harmless
    for stale in BUILD_DIR.glob(f"{stem}-*.so"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


@cache
def library(variant: str = "scalar") -> ctypes.CDLL:
    """The built library of ``variant``, loaded once, with every entry point's argument types declared."""
    lib = ctypes.CDLL(str(build(variant)))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    return lib


def _ptr(x: np.ndarray | None) -> int | None:
    return None if x is None else x.ctypes.data


def _c(x: np.ndarray, dtype: type[np.generic], name: str) -> np.ndarray:
    """``x`` as a C-contiguous array of ``dtype``; refuses a lossy dtype change."""
    x = np.asarray(x)
    if x.dtype != dtype:
        if not np.can_cast(x.dtype, dtype, casting="safe"):
            raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {x.dtype}")
        x = x.astype(dtype)
    return np.ascontiguousarray(x)


def _vector(x: np.ndarray | None, dtype: type[np.generic], size: int, name: str) -> np.ndarray | None:
    if x is None:
        return None
    x = _c(x, dtype, name).reshape(-1)
    if x.size != size:
        raise ValueError(f"{name} has {x.size} entries, expected {size}")
    return x


def _matrix(x: np.ndarray, dtype: type[np.generic], name: str) -> np.ndarray:
    x = _c(x, dtype, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {x.shape}")
    return x


def _gemm(entry: str, a: np.ndarray, b: np.ndarray, c: np.ndarray | None, variant: str) -> np.ndarray:
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"bad GEMM shapes {a.shape} x {b.shape}")
    out = np.zeros((m, n), np.int32) if c is None else np.array(_matrix(c, np.int32, "c"), order="C", copy=True)
    if out.shape != (m, n):
        raise ValueError(f"c has shape {out.shape}, expected {(m, n)}")
    getattr(library(variant), entry)(_ptr(a), _ptr(b), _ptr(out), m, k, n)
    return out


def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None, *, variant: str = "scalar") -> np.ndarray:
    """``c + a @ b`` for int8 ``a [M, K]``, ``b [K, N]`` and optional int32 ``c [M, N]`` (not modified).
    The int32 sums wrap; the golden model (``gemm.gemm``) takes K <= ``gemm.MAX_K``, where ``a @ b`` cannot."""
    return _gemm("gemm_i8_i32", _matrix(a, np.int8, "a"), _matrix(b, np.int8, "b"), c, variant)


def gemm_i16(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None, *, variant: str = "scalar") -> np.ndarray:
    """``c + a @ b`` for int16 ``a [M, K]``, int8 ``b [K, N]`` and optional int32 ``c [M, N]`` (not modified).
    The int32 sums wrap; the golden model (``gemm.gemm_i16``) takes K <= ``gemm.MAX_K_I16``, where ``a @ b`` cannot."""
    return _gemm("gemm_i16i8_i32", _matrix(a, np.int16, "a"), _matrix(b, np.int8, "b"), c, variant)


def zero(c: np.ndarray, *, variant: str = "scalar") -> None:
    """Zero a C-contiguous int32 array in place (the kernel that clears accumulators)."""
    if c.dtype != np.int32 or not c.flags.c_contiguous or not c.flags.writeable:
        raise TypeError("zero takes a writeable C-contiguous int32 array")
    library(variant).zero_i32(_ptr(c), c.size)


def requant(acc: np.ndarray, mult: np.ndarray, shift: np.ndarray, *, variant: str = "scalar") -> np.ndarray:
    """int32 ``[M, N]`` -> int8 with per-column int32 ``mult`` and int8 ``shift`` (1..59, as ``numerics.srs``)."""
    acc = _matrix(acc, np.int32, "acc")
    m, n = acc.shape
    mult = _vector(mult, np.int32, n, "mult")
    shift = _vector(shift, np.int8, n, "shift")
    if np.any(shift < SRS_MIN_SHIFT) or np.any(shift > SRS_MAX_SHIFT):
        raise ValueError(f"shift must be in {SRS_MIN_SHIFT}..{SRS_MAX_SHIFT}")
    out = np.empty((m, n), np.int8)
    library(variant).requant_i32_i8(_ptr(acc), _ptr(mult), _ptr(shift), _ptr(out), m, n)
    return out


def _quantize_rows(entry: str, dtype: type[np.integer], x: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray]:
    x = _c(x, np.float32, "x")
    rows = x.reshape(-1, x.shape[-1])
    m, n = rows.shape
    q = np.empty((m, n), dtype)
    scale = np.empty(m, np.float32)
    getattr(library(variant), entry)(_ptr(rows), _ptr(q), _ptr(scale), m, n)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def quantize_rows(x: np.ndarray, *, variant: str = "scalar") -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[..., N]`` -> (int8 ``[..., N]``, float32 scales ``[...]``), one scale per row."""
    return _quantize_rows("quantize_rows_f32_i8", np.int8, x, variant)


def quantize_rows_i16(x: np.ndarray, *, variant: str = "scalar") -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[..., N]`` -> (int16 ``[..., N]``, float32 scales ``[...]``), one scale per row."""
    return _quantize_rows("quantize_rows_f32_i16", np.int16, x, variant)


def dequant(
    acc: np.ndarray,
    row_scale: np.ndarray,
    col_scale: np.ndarray,
    bias: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    *,
    variant: str = "scalar",
) -> np.ndarray:
    """int32 ``[M, N]`` -> float32 ``residual + ((acc * row_scale[i]) * col_scale[j] + bias[j])``."""
    acc = _matrix(acc, np.int32, "acc")
    m, n = acc.shape
    row_scale = _vector(row_scale, np.float32, m, "row_scale")
    col_scale = _vector(col_scale, np.float32, n, "col_scale")
    bias = _vector(bias, np.float32, n, "bias")
    residual = _vector(residual, np.float32, m * n, "residual")
    out = np.empty((m, n), np.float32)
    library(variant).dequant_i32_f32(
        _ptr(acc), _ptr(row_scale), _ptr(col_scale), _ptr(bias), _ptr(residual), _ptr(out), m, n
    )
    return out


def softmax(x: np.ndarray, n_valid: np.ndarray | None = None, *, variant: str = "scalar") -> np.ndarray:
    """Row softmax of float32 ``[M, N]``; row ``i`` uses only its first ``n_valid[i]`` entries."""
    x = _matrix(x, np.float32, "x")
    m, n = x.shape
    n_valid = _vector(n_valid, np.int32, m, "n_valid")
    y = np.empty((m, n), np.float32)
    library(variant).softmax_f32(_ptr(x), _ptr(y), m, n, _ptr(n_valid))
    return y


def layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, *, variant: str = "scalar") -> np.ndarray:
    """Layer norm over the last axis of float32 ``x [..., N]``."""
    x = _c(x, np.float32, "x")
    rows = x.reshape(-1, x.shape[-1])
    m, n = rows.shape
    gamma = _vector(gamma, np.float32, n, "gamma")
    beta = _vector(beta, np.float32, n, "beta")
    y = np.empty((m, n), np.float32)
    library(variant).layernorm_f32(_ptr(rows), _ptr(gamma), _ptr(beta), _ptr(y), m, n)
    return y.reshape(x.shape)


def gelu(x: np.ndarray, residual: np.ndarray | None = None, *, variant: str = "scalar") -> np.ndarray:
    """GELU of float32 ``x`` (any shape), plus ``residual`` of the same size when given."""
    x = _c(x, np.float32, "x")
    residual = _vector(residual, np.float32, x.size, "residual")
    y = np.empty(x.shape, np.float32)
    library(variant).gelu_f32(_ptr(x), _ptr(residual), _ptr(y), x.size)
    return y


def dft(frames: np.ndarray, basis: np.ndarray | None = None, *, variant: str = "scalar") -> np.ndarray:
    """int16 frames ``[F, K]`` x int16 basis ``[K, N]`` (default: the 400 x 402 DFT basis) -> int32 ``[F, N]``."""
    if basis is None:
        from .mel import dft_basis

        basis = dft_basis()
    frames, basis = _matrix(frames, np.int16, "frames"), _matrix(basis, np.int16, "basis")
    (f, k), (k2, n) = frames.shape, basis.shape
    if k != k2:
        raise ValueError(f"bad DFT shapes {frames.shape} x {basis.shape}")
    out = np.empty((f, n), np.int32)
    library(variant).dft_i16_i32(_ptr(frames), _ptr(basis), _ptr(out), f, k, n)
    return out


def mel_log(spec: np.ndarray, *, variant: str = "scalar") -> np.ndarray:
    """int32 interleaved DFT ``[F, 402]`` -> float32 log10 mel ``[F, 80]``."""
    spec = _matrix(spec, np.int32, "spec")
    if spec.shape[1] != SPEC_COLS:
        raise ValueError(f"spec must have {SPEC_COLS} columns, got {spec.shape[1]}")
    f = spec.shape[0]
    out = np.empty((f, MEL_BANDS), np.float32)
    library(variant).mel_log_f32(_ptr(spec), _ptr(out), f)
    return out
