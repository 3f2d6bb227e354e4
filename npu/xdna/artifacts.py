"""What the xdna backend loads: xclbins, their kernels, and an instruction stream per call shape.

``mlir/build.py`` writes an artifacts folder with ``manifest.json``::

    {"format": 1, "device": "npu1", "toolchain": {...}, "instructions": "files",
     "xclbins": {"encoder": {"path": "encoder.xclbin", "kernels": {"gemm": "GEMM", ...}}, ...},
     "insts": {"encoder/gemm/<call key>": "insts/....bin", ...}}

One xclbin per pipeline stage (``mel``, ``encoder``, ``decoder``) holds every kernel that stage
calls, so one hardware context serves the stage and a stage's calls can share a runlist.

Every call is described by :class:`Call`: the op, its sizes, and for each operand an access
pattern (element offset, batch, row and column strides) into the buffer object passed for it, the
way the designs' DMA descriptors address DDR. On hardware the instruction stream for a call is
the one ``mlir/build.py`` compiled for that key. An artifacts folder marked
``"instructions": "synthetic"`` (the fake device of the tests) instead gets the call encoded as a
short header that only the fake understands: the seam where the real streams plug in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ABI",
    "OPS",
    "OUTPUTS",
    "STAGES",
    "SYNTHETIC_MAGIC",
    "Artifacts",
    "ArtifactsError",
    "Call",
    "Operand",
    "decode_synthetic",
    "default_artifacts_dir",
    "encode_synthetic",
]

STAGES = ("mel", "encoder", "decoder")

# op -> operand names, in kernel-argument order (after opcode, instruction BO and its length).
OPS: dict[str, tuple[str, ...]] = {
    "gemm": ("a", "b", "c"),
    "gemm_i16": ("a", "b", "c"),
    "quantize": ("x", "q", "scale"),
    "quantize_i16": ("x", "q", "scale"),
    "dequant": ("acc", "row_scale", "col_scale", "bias", "residual", "out"),
    "requant": ("acc", "mult", "shift", "out"),
    "softmax": ("x", "n_valid", "col_scale", "y"),
    "layernorm": ("x", "gamma", "beta", "y"),
    "gelu": ("x", "residual", "y"),
    "dft": ("frames", "basis", "out"),
    "mel_log": ("spec", "out"),
}
OP_CODES = {name: i + 1 for i, name in enumerate(OPS)}

# The kernels' ABI per op, in the order of OPS: each operand's numpy dtype and shape, from the
# call's sizes: "mk" [m, k], "kn" [k, n], "mn" [m, n], or a vector "m" / "n" (times ``batch``).
ABI: dict[str, tuple[tuple[str, str], ...]] = {
    "gemm": (("i1", "mk"), ("i1", "kn"), ("i4", "mn")),
    "gemm_i16": (("i2", "mk"), ("i1", "kn"), ("i4", "mn")),
    "quantize": (("f4", "mn"), ("i1", "mn"), ("f4", "m")),
    "quantize_i16": (("f4", "mn"), ("i2", "mn"), ("f4", "m")),
    "dequant": (("i4", "mn"), ("f4", "m"), ("f4", "n"), ("f4", "n"), ("f4", "mn"), ("f4", "mn")),
    "requant": (("i4", "mn"), ("i4", "n"), ("i1", "n"), ("i1", "mn")),
    "softmax": (("f4", "mn"), ("i4", "m"), ("f4", "n"), ("f4", "mn")),
    "layernorm": (("f4", "mn"), ("f4", "n"), ("f4", "n"), ("f4", "mn")),
    "gelu": (("f4", "mn"), ("f4", "mn"), ("f4", "mn")),
    "dft": (("i2", "mk"), ("i2", "kn"), ("i4", "mn")),
    "mel_log": (("i4", "mk"), ("f4", "mn")),
}
OUTPUTS = {"gemm": {2}, "gemm_i16": {2}, "quantize": {1, 2}, "quantize_i16": {1, 2}, "dequant": {5}, "requant": {3}}
OUTPUTS.update({"softmax": {3}, "layernorm": {3}, "gelu": {2}, "dft": {2}, "mel_log": {1}})
SYNTHETIC_MAGIC = 0x4D525453  # "STRM"
SYNTHETIC_VERSION = 1


class ArtifactsError(RuntimeError):
    """The artifacts folder is missing, incomplete, or lacks an instruction stream for a call."""


@dataclass(frozen=True)
class Operand:
    """An operand's access pattern in elements: ``offset + b*batch + i*row + j*col``. A zero
    pattern with ``present=False`` marks an optional operand that is not passed."""

    offset: int = 0
    batch: int = 0
    row: int = 0
    col: int = 1
    present: bool = True

    def words(self) -> tuple[int, ...]:
        return (self.offset, self.batch, self.row, self.col) if self.present else (0, 0, 0, 0)


ABSENT = Operand(present=False)


@dataclass(frozen=True)
class Call:
    """One kernel call: ``batch`` independent problems of ``m`` rows, inner size ``k`` (GEMMs)
    and ``n`` columns, with one :class:`Operand` per name in ``OPS[op]``."""

    op: str
    batch: int
    m: int
    k: int
    n: int
    operands: tuple[Operand, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}")
        if len(self.operands) != len(OPS[self.op]):
            raise ValueError(f"{self.op} takes {len(OPS[self.op])} operands, got {len(self.operands)}")

    @property
    def flags(self) -> int:
        return sum(1 << i for i, o in enumerate(self.operands) if o.present)

    def operand_bytes(self) -> list[int]:
        """Bytes each present operand covers (what its DMA moves), in operand order."""
        dims = {"m": self.m, "k": self.k, "n": self.n}
        out = []
        for (dtype, kind), o in zip(ABI[self.op], self.operands, strict=True):
            count = self.batch
            for d in kind:
                count *= dims[d]
            out.append(count * np.dtype(dtype).itemsize if o.present else 0)
        return out

    def key(self) -> str:
        """The instruction-stream key: the shape and every access pattern."""
        words = [self.batch, self.m, self.k, self.n, self.flags]
        for o in self.operands:
            words.extend(o.words())
        return f"{self.op}/" + "_".join(str(w) for w in words)


def encode_synthetic(call: Call) -> np.ndarray:
    """The fake device's instruction stream for ``call`` (uint32 words)."""
    words = [SYNTHETIC_MAGIC, SYNTHETIC_VERSION, OP_CODES[call.op], call.batch, call.m, call.k, call.n, call.flags]
    for o in call.operands:
        words.extend(o.words())
    return np.array(words, dtype=np.int64).astype(np.uint32)


def decode_synthetic(words: np.ndarray) -> Call:
    """Inverse of :func:`encode_synthetic`; raises :class:`ValueError` on anything else."""
    w = np.asarray(words, dtype=np.uint32).astype(np.int64)
    if len(w) < 8 or w[0] != SYNTHETIC_MAGIC or w[1] != SYNTHETIC_VERSION:
        raise ValueError("not a synthetic instruction stream")
    op = {v: k for k, v in OP_CODES.items()}.get(int(w[2]))
    if op is None:
        raise ValueError(f"unknown op code {w[2]}")
    n_ops = len(OPS[op])
    if len(w) != 8 + 4 * n_ops:
        raise ValueError(f"{op}: expected {8 + 4 * n_ops} words, got {len(w)}")
    w = np.where(w >= 1 << 31, w - (1 << 32), w)  # offsets and strides are signed
    flags = int(w[7])
    operands = tuple(
        Operand(*(int(v) for v in w[8 + 4 * i : 12 + 4 * i]), present=bool(flags >> i & 1)) for i in range(n_ops)
    )
    return Call(op, int(w[3]), int(w[4]), int(w[5]), int(w[6]), operands)


def default_artifacts_dir() -> Path:
    """``$STREAMD_XDNA_ARTIFACTS``, else ``/usr/lib/streamd/xdna`` (where a package would put them)."""
    return Path(os.environ.get("STREAMD_XDNA_ARTIFACTS", "/usr/lib/streamd/xdna"))


@dataclass
class Artifacts:
    """A loaded ``manifest.json``."""

    root: Path
    manifest: dict

    @classmethod
    def load(cls, root: str | Path | None = None) -> Artifacts:
        root = Path(root) if root is not None else default_artifacts_dir()
        path = root / "manifest.json"
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactsError(f"no NPU artifacts at {root} (build them with mlir/build.py)") from None
        except (OSError, ValueError) as e:
            raise ArtifactsError(f"cannot read {path}: {e}") from None
        if manifest.get("format") != 1 and "designs" in manifest:
            raise ArtifactsError(
                f"{path} lists one xclbin per design and shape (mlir/build.py); the xdna runtime needs them "
                "combined into one xclbin per stage with an instruction stream per call (mlir/README.md, "
                "'From designs to the runtime')"
            )
        if manifest.get("format") != 1:
            raise ArtifactsError(f"{path}: unsupported manifest format {manifest.get('format')!r}")
        missing = [s for s in STAGES if s not in manifest.get("xclbins", {})]
        if missing:
            raise ArtifactsError(f"{path}: no xclbin for stage(s) {', '.join(missing)}")
        for stage, entry in manifest["xclbins"].items():
            if not (root / entry["path"]).is_file():
                raise ArtifactsError(f"{path}: {stage} xclbin {entry['path']} is missing")
        return cls(root, manifest)

    @property
    def synthetic(self) -> bool:
        return self.manifest.get("instructions") == "synthetic"

    def xclbin_path(self, stage: str) -> Path:
        return self.root / self.manifest["xclbins"][stage]["path"]

    def kernel_name(self, stage: str, op: str) -> str:
        try:
            return self.manifest["xclbins"][stage]["kernels"][op]
        except KeyError:
            raise ArtifactsError(f"the {stage} xclbin has no {op} kernel") from None

    def instructions(self, stage: str, call: Call) -> np.ndarray:
        """The instruction stream for ``call`` in ``stage``'s xclbin."""
        if self.synthetic:
            return encode_synthetic(call)
        key = f"{stage}/{call.key()}"
        rel = self.manifest.get("insts", {}).get(key)
        if rel is None:
            raise ArtifactsError(f"no instruction stream built for {key} (add the shape to mlir/build.py)")
        return np.fromfile(self.root / rel, dtype=np.uint32)
