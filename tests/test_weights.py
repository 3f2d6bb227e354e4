"""Weight loading: the bundled CTranslate2 tiny.en, corrupt CTranslate2 files, synthetic CT2 files
(dtypes, aliases) and a Hugging Face folder converted from the CT2 weights."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import save_file

from whisper_engine.weights import ModelError, WhisperWeights, default_model_path, load_weights

from .conftest import speech_file

JFK = speech_file("dev_jfk_inaugural_1961")

# ---------------------------------------------------------------------------------------------
# Helpers


def assert_model_error(exc: pytest.ExceptionInfo[ModelError], path: Path, *words: str) -> str:
    """A ModelError's message is one line, names ``path`` and contains every one of ``words``."""
    msg = str(exc.value)
    assert msg, "empty error message"
    assert "\n" not in msg and "\r" not in msg, f"message is not one line: {msg!r}"
    assert str(path) in msg, f"{path} not named in {msg!r}"
    for word in words:
        assert word.lower() in msg.lower(), f"{word!r} not in {msg!r}"
    return msg


_DTYPE_IDS = {np.dtype("<f4"): 0, np.dtype("i1"): 1, np.dtype("<i2"): 2, np.dtype("<i4"): 3, np.dtype("<f2"): 4}


def _ct2_str(s: str) -> bytes:
    raw = s.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(
    path: Path,
    variables: dict[str, np.ndarray | tuple[np.ndarray, int]],
    aliases: dict[str, str] | None = None,
    *,
    version: int = 6,
    spec: str = "WhisperSpec",
    revision: int = 3,
) -> Path:
    """Write a CTranslate2 ``model.bin``. A value is an array (dtype id from its numpy dtype) or
    ``(array, dtype_id)`` whose bytes are written as they are (e.g. uint16 bits for bfloat16, id 5)."""
    out = [struct.pack("<I", version), _ct2_str(spec), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        array, dtype_id = value if isinstance(value, tuple) else (value, _DTYPE_IDS[np.dtype(value.dtype)])
        data = np.ascontiguousarray(array).tobytes()
        out.append(_ct2_str(name))
        out.append(struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape))
        out.append(struct.pack("<BI", dtype_id, len(data)) + data)
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out.append(_ct2_str(alias) + _ct2_str(target))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(out))
    return path


@dataclass
class VarRecord:
    name: str
    start: int  # offset of the record (its name's length)
    dtype_offset: int
    data_offset: int
    nbytes: int


@dataclass
class Layout:
    spec_end: int  # offset just after the spec name
    variables: list[VarRecord]
    aliases_offset: int
    size: int


def parse_layout(buf: bytes) -> Layout:
    """Walk a model.bin's headers (independently of whisper_engine.weights) to find where things are."""
    pos = 4

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<H", buf, pos)
        s = buf[pos + 2 : pos + 2 + n - 1].decode()
        pos += 2 + n
        return s

    string()
    spec_end = pos
    pos += 4
    (n_vars,) = struct.unpack_from("<I", buf, pos)
    pos += 4
    records = []
    for _ in range(n_vars):
        start = pos
        name = string()
        rank = buf[pos]
        pos += 1 + 4 * rank
        dtype_offset = pos
        (nbytes,) = struct.unpack_from("<I", buf, pos + 1)
        pos += 5
        records.append(VarRecord(name, start, dtype_offset, pos, nbytes))
        pos += nbytes
    return Layout(spec_end, records, pos, len(buf))


def tiny_ct2_variables(seed: int = 0) -> dict[str, np.ndarray]:
    """A complete, tiny WhisperSpec: width 8, 2 heads, 4 mels, vocab 16, one layer per side."""
    rng = np.random.default_rng(seed)
    d, mels, vocab, a_ctx, t_ctx, ffn = 8, 4, 16, 6, 5, 16

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    v: dict[str, np.ndarray] = {
        "encoder/num_heads": np.array(2, np.int16),
        "decoder/num_heads": np.array(2, np.int16),
        "encoder/conv1/weight": r(d, mels, 3),
        "encoder/conv1/bias": r(d),
        "encoder/conv2/weight": r(d, d, 3),
        "encoder/conv2/bias": r(d),
        "encoder/position_encodings/encodings": r(a_ctx, d),
        "decoder/embeddings/weight": r(vocab, d),
        "decoder/position_encodings/encodings": r(t_ctx, d),
    }
    for side in ("encoder", "decoder"):
        v[f"{side}/layer_norm/gamma"] = r(d)
        v[f"{side}/layer_norm/beta"] = r(d)
        p = f"{side}/layer_0"
        linears = {"self_attention/linear_0": 3 * d, "self_attention/linear_1": d, "ffn/linear_0": ffn}
        if side == "decoder":
            linears |= {"attention/linear_0": d, "attention/linear_1": 2 * d, "attention/linear_2": d}
        for name, rows in linears.items():
            v[f"{p}/{name}/weight"] = r(rows, d)
            v[f"{p}/{name}/bias"] = r(rows)
        v[f"{p}/ffn/linear_1/weight"] = r(d, ffn)
        v[f"{p}/ffn/linear_1/bias"] = r(d)
        norms = ["self_attention", "ffn"] + (["attention"] if side == "decoder" else [])
        for norm in norms:
            v[f"{p}/{norm}/layer_norm/gamma"] = r(d)
            v[f"{p}/{norm}/layer_norm/beta"] = r(d)
    return v


def to_hf_tensors(w: WhisperWeights) -> dict[str, np.ndarray]:
    """Canonical weights -> Hugging Face WhisperForConditionalGeneration tensor names."""
    t = w.tensors
    hf: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str) -> None:
        hf[f"{dst}.weight"] = t[f"{src}.weight"]
        hf[f"{dst}.bias"] = t[f"{src}.bias"]

    def split(dst: str, src: str, parts: tuple[str, ...], d: int) -> None:
        weight, bias = t[f"{src}.weight"], t[f"{src}.bias"]
        assert weight.shape[0] == len(parts) * d
        for i, part in enumerate(parts):
            hf[f"{dst}.{part}_proj.weight"] = weight[i * d : (i + 1) * d]
            if part == "k":
                # HF's key projection has no bias: the CT2 converter stores zeros there.
                assert not np.any(bias[i * d : (i + 1) * d]), f"{src}: non-zero key bias cannot go to HF"
            else:
                hf[f"{dst}.{part}_proj.bias"] = bias[i * d : (i + 1) * d]

    linear("model.encoder.conv1", "encoder.conv1")
    linear("model.encoder.conv2", "encoder.conv2")
    hf["model.encoder.embed_positions.weight"] = t["encoder.positions"]
    hf["model.decoder.embed_tokens.weight"] = t["decoder.embedding"]
    hf["model.decoder.embed_positions.weight"] = t["decoder.positions"]
    for side, n_layers, d in (
        ("encoder", w.dims.n_audio_layer, w.dims.n_audio_state),
        ("decoder", w.dims.n_text_layer, w.dims.n_text_state),
    ):
        linear(f"model.{side}.layer_norm", f"{side}.ln")
        for i in range(n_layers):
            dst, src = f"model.{side}.layers.{i}", f"{side}.layers.{i}"
            linear(f"{dst}.self_attn_layer_norm", f"{src}.attn_ln")
            split(f"{dst}.self_attn", f"{src}.attn.qkv", ("q", "k", "v"), d)
            linear(f"{dst}.self_attn.out_proj", f"{src}.attn.out")
            if side == "decoder":
                linear(f"{dst}.encoder_attn_layer_norm", f"{src}.cross_ln")
                linear(f"{dst}.encoder_attn.q_proj", f"{src}.cross.q")
                split(f"{dst}.encoder_attn", f"{src}.cross.kv", ("k", "v"), d)
                linear(f"{dst}.encoder_attn.out_proj", f"{src}.cross.out")
            linear(f"{dst}.final_layer_norm", f"{src}.mlp_ln")
            linear(f"{dst}.fc1", f"{src}.mlp.fc1")
            linear(f"{dst}.fc2", f"{src}.mlp.fc2")
    return hf


ENCODER_BLOCKS = ("attn_ln", "attn.qkv", "attn.out", "mlp_ln", "mlp.fc1", "mlp.fc2")
DECODER_BLOCKS = (*ENCODER_BLOCKS, "cross_ln", "cross.q", "cross.kv", "cross.out")

# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def ct2(model_dir: Path) -> WhisperWeights:
    return load_weights(model_dir)


@pytest.fixture(scope="module")
def ct2_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def ct2_bytes(model_dir: Path) -> bytes:
    return (model_dir / "model.bin").read_bytes()


@pytest.fixture(scope="module")
def layout(ct2_bytes: bytes) -> Layout:
    return parse_layout(ct2_bytes)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, ct2: WhisperWeights, ct2_config: dict, model_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("hf_tiny_en")
    tensors = {k: np.ascontiguousarray(v.astype(np.float16)) for k, v in to_hf_tensors(ct2).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    d = ct2.dims
    config = {
        "model_type": "whisper",
        "d_model": d.n_audio_state,
        "encoder_layers": d.n_audio_layer,
        "decoder_layers": d.n_text_layer,
        "encoder_attention_heads": d.n_audio_head,
        "decoder_attention_heads": d.n_text_head,
        "num_mel_bins": d.n_mels,
        "vocab_size": d.n_vocab,
        "max_source_positions": d.n_audio_ctx,
        "max_target_positions": d.n_text_ctx,
    }
    (folder / "config.json").write_text(json.dumps(config))
    generation = {
        "alignment_heads": ct2_config["alignment_heads"],
        "suppress_tokens": ct2_config["suppress_ids"],
        "begin_suppress_tokens": ct2_config["suppress_ids_begin"],
    }
    (folder / "generation_config.json").write_text(json.dumps(generation))
    shutil.copy(model_dir / "tokenizer.json", folder / "tokenizer.json")
    return folder


# ---------------------------------------------------------------------------------------------
# The bundled model


def test_default_model_dims_and_metadata(ct2: WhisperWeights, ct2_config: dict) -> None:
    d = ct2.dims
    assert (d.n_audio_state, d.n_text_state) == (384, 384)
    assert (d.n_audio_head, d.n_text_head) == (6, 6)
    assert (d.n_audio_layer, d.n_text_layer) == (4, 4)
    assert d.n_mels == 80
    assert d.n_vocab == 51864
    assert (d.n_audio_ctx, d.n_text_ctx) == (1500, 448)
    assert ct2.name == "tiny.en"
    assert not ct2.multilingual
    assert ct2.alignment_heads.shape == (len(ct2_config["alignment_heads"]), 2)
    assert ct2.alignment_heads.tolist() == ct2_config["alignment_heads"]
    assert ct2.suppress_tokens == ct2_config["suppress_ids"] and len(ct2.suppress_tokens) > 0
    assert ct2.suppress_tokens_begin == ct2_config["suppress_ids_begin"] and len(ct2.suppress_tokens_begin) > 0


def test_default_model_arrays_float32_and_mapped(ct2: WhisperWeights, ct2_bytes: bytes, layout: Layout) -> None:
    bad = {k: str(v.dtype) for k, v in ct2.tensors.items() if v.dtype != np.float32}
    assert not bad, f"non-float32 tensors: {bad}"
    assert all(np.isfinite(v).all() for v in ct2.tensors.values())
    expected = {"encoder.positions", "decoder.embedding", "decoder.positions"}
    expected |= {f"encoder.{c}.{p}" for c in ("conv1", "conv2") for p in ("weight", "bias")}
    for side, blocks in (("encoder", ENCODER_BLOCKS), ("decoder", DECODER_BLOCKS)):
        expected |= {f"{side}.ln.weight", f"{side}.ln.bias"}
        expected |= {f"{side}.layers.{i}.{b}.{p}" for i in range(4) for b in blocks for p in ("weight", "bias")}
    assert expected <= set(ct2.tensors), sorted(expected - set(ct2.tensors))
    assert not any(k.startswith(("encoder.layers.4", "decoder.layers.4")) for k in ct2.tensors)
    # Spot-check the mapping against the raw float16 bytes of the file.
    records = {r.name: r for r in layout.variables}
    for ct2_name, canonical in [
        ("decoder/layer_2/attention/linear_1/weight", "decoder.layers.2.cross.kv.weight"),
        ("encoder/layer_3/self_attention/linear_0/bias", "encoder.layers.3.attn.qkv.bias"),
        ("encoder/conv1/weight", "encoder.conv1.weight"),
    ]:
        rec = records[ct2_name]
        raw = np.frombuffer(ct2_bytes, "<f2", rec.nbytes // 2, rec.data_offset).astype(np.float32)
        np.testing.assert_array_equal(ct2[canonical].reshape(-1), raw)


# ---------------------------------------------------------------------------------------------
# Broken CTranslate2 files


# version 0-3 | spec name length 4-5, bytes 6-17 | revision 18-21 | variable count 22-25 | first name 26-
@pytest.mark.parametrize("cut", [3, 5, 10, 17, 20, 24, 30])
def test_truncated_in_header(tmp_path: Path, ct2_bytes: bytes, cut: int) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes[:cut])
    with pytest.raises(ModelError) as exc:
        load_weights(tmp_path)
    assert_model_error(exc, path, "truncated")


@pytest.mark.parametrize("where", ["first_var_data", "embedding_data", "last_var_header", "last_var_data"])
def test_truncated_in_variables(tmp_path: Path, ct2_bytes: bytes, layout: Layout, where: str) -> None:
    emb = next(r for r in layout.variables if r.name == "decoder/embeddings/weight")
    last = layout.variables[-1]
    cut = {
        "first_var_data": layout.variables[0].data_offset,  # the data byte is missing
        "embedding_data": emb.data_offset + emb.nbytes // 2,
        "last_var_header": last.start + 5,
        "last_var_data": last.data_offset + last.nbytes - 1,
    }[where]
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes[:cut])
    with pytest.raises(ModelError) as exc:
        load_weights(path)
    assert_model_error(exc, path, "truncated")


def test_truncated_inside_aliases(tmp_path: Path, ct2_bytes: bytes, layout: Layout) -> None:
    path = tmp_path / "model.bin"
    for cut in (layout.aliases_offset + 2, layout.aliases_offset + 6, layout.size - 1):
        path.write_bytes(ct2_bytes[:cut])
        with pytest.raises(ModelError) as exc:
            load_weights(path)
        assert_model_error(exc, path, "truncated")


def test_truncated_just_before_aliases(tmp_path: Path, ct2_bytes: bytes, layout: Layout) -> None:
    assert layout.aliases_offset < layout.size  # the real file has an alias table
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes[: layout.aliases_offset])
    with pytest.raises(ModelError) as exc:
        load_weights(path)
    assert_model_error(exc, path, "truncated")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"")
    with pytest.raises(ModelError) as exc:
        load_weights(tmp_path)
    assert_model_error(exc, path, "empty")


def test_wrong_version(tmp_path: Path, ct2_bytes: bytes) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<I", 5) + ct2_bytes[4:])
    with pytest.raises(ModelError) as exc:
        load_weights(path)
    msg = assert_model_error(exc, path, "version")
    assert "5" in msg


def test_wrong_spec(tmp_path: Path, ct2_bytes: bytes, layout: Layout) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes[:4] + _ct2_str("TransformerSpec") + ct2_bytes[layout.spec_end :])
    with pytest.raises(ModelError) as exc:
        load_weights(path)
    assert_model_error(exc, path, "spec", "TransformerSpec")


def test_spec_name_not_nul_terminated(tmp_path: Path, ct2_bytes: bytes) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes[:4] + struct.pack("<H", 11) + b"WhisperSpec" + ct2_bytes[4 + 2 + 12 :])
    with pytest.raises(ModelError) as exc:
        load_weights(path)
    assert_model_error(exc, path, "spec name", "NUL")


@pytest.mark.parametrize("index", [0, 4, -1])
def test_corrupt_dtype(tmp_path: Path, ct2_bytes: bytes, layout: Layout, index: int) -> None:
    rec = layout.variables[index]
    buf = bytearray(ct2_bytes)
    buf[rec.dtype_offset] = 9
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(buf))
    with pytest.raises(ModelError) as exc:
        load_weights(path)
    assert_model_error(exc, path, "dtype", rec.name, "9")


def test_dtype_size_mismatch(tmp_path: Path, ct2_bytes: bytes, layout: Layout) -> None:
    # decoder/embeddings/weight is float16: calling it float32 makes its byte count wrong.
    rec = next(r for r in layout.variables if r.name == "decoder/embeddings/weight")
    buf = bytearray(ct2_bytes)
    assert buf[rec.dtype_offset] == 4
    buf[rec.dtype_offset] = 0
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(buf))
    with pytest.raises(ModelError) as exc:
        load_weights(path)
    assert_model_error(exc, path, "corrupt", rec.name, str(rec.nbytes))


def test_nonexistent_path(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelError) as exc:
        load_weights(path)
    assert_model_error(exc, path, "no such file")


def test_folder_without_model(tmp_path: Path, model_dir: Path) -> None:
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError) as exc:
        load_weights(tmp_path)
    assert_model_error(exc, tmp_path, "model.bin", "model.safetensors")


def test_unreadable_config_json(tmp_path: Path) -> None:
    write_ct2(tmp_path / "model.bin", tiny_ct2_variables())
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError) as exc:
        load_weights(tmp_path)
    assert_model_error(exc, tmp_path / "config.json", "JSON")


# ---------------------------------------------------------------------------------------------
# Synthetic CTranslate2 files


def test_synthetic_float32_model(tmp_path: Path) -> None:
    v = tiny_ct2_variables()
    folder = tmp_path / "mini"
    write_ct2(folder / "model.bin", v)
    w = load_weights(folder)
    d = w.dims
    assert (d.n_mels, d.n_audio_ctx, d.n_audio_state, d.n_audio_head, d.n_audio_layer) == (4, 6, 8, 2, 1)
    assert (d.n_vocab, d.n_text_ctx, d.n_text_state, d.n_text_head, d.n_text_layer) == (16, 5, 8, 2, 1)
    assert w.name == "mini"  # no known size: the folder's name
    # No config.json: openai/whisper's default heads, the upper half of the decoder.
    assert w.alignment_heads.tolist() == [[0, 0], [0, 1]]
    assert w.suppress_tokens == [] and w.suppress_tokens_begin == []
    np.testing.assert_array_equal(w["encoder.conv2.weight"], v["encoder/conv2/weight"])
    np.testing.assert_array_equal(w["decoder.layers.0.cross.kv.weight"], v["decoder/layer_0/attention/linear_1/weight"])
    np.testing.assert_array_equal(w["decoder.layers.0.cross.out.bias"], v["decoder/layer_0/attention/linear_2/bias"])
    np.testing.assert_array_equal(w["encoder.layers.0.mlp.fc2.weight"], v["encoder/layer_0/ffn/linear_1/weight"])
    np.testing.assert_array_equal(w["decoder.layers.0.mlp_ln.bias"], v["decoder/layer_0/ffn/layer_norm/beta"])
    np.testing.assert_array_equal(w["decoder.ln.weight"], v["decoder/layer_norm/gamma"])
    assert all(t.dtype == np.float32 for t in w.tensors.values())


def test_synthetic_bfloat16_and_float16(tmp_path: Path) -> None:
    v: dict[str, np.ndarray | tuple[np.ndarray, int]] = dict(tiny_ct2_variables())
    emb = v["decoder/embeddings/weight"]
    assert isinstance(emb, np.ndarray)
    emb = emb.copy()
    emb[0, :4] = [1.0, -2.5, 3.0e38, -1.0e-30]  # exact, and extremes rounded by truncation
    bits = (emb.view(np.uint32) >> 16).astype(np.uint16)
    v["decoder/embeddings/weight"] = (bits, 5)
    conv = v["encoder/conv1/weight"]
    assert isinstance(conv, np.ndarray)
    v["encoder/conv1/weight"] = conv.astype(np.float16)
    write_ct2(tmp_path / "model.bin", v)
    w = load_weights(tmp_path)
    expected = (bits.astype(np.uint32) << 16).view(np.float32)
    assert w["decoder.embedding"].dtype == np.float32
    np.testing.assert_array_equal(w["decoder.embedding"], expected)
    assert w["decoder.embedding"][0, :2].tolist() == [1.0, -2.5]
    np.testing.assert_allclose(w["decoder.embedding"], emb, rtol=2**-7)  # bf16 keeps 8 mantissa bits
    assert w["encoder.conv1.weight"].dtype == np.float32
    np.testing.assert_array_equal(w["encoder.conv1.weight"], conv.astype(np.float16).astype(np.float32))


def test_synthetic_alias_resolution(tmp_path: Path) -> None:
    v = tiny_ct2_variables()
    emb = v.pop("decoder/embeddings/weight")
    v["decoder/projection/weight"] = emb
    write_ct2(tmp_path / "model.bin", v, aliases={"decoder/embeddings/weight": "decoder/projection/weight"})
    w = load_weights(tmp_path)
    np.testing.assert_array_equal(w["decoder.embedding"], emb)
    assert w.dims.n_vocab == 16


def test_synthetic_alias_to_missing_variable(tmp_path: Path) -> None:
    path = write_ct2(tmp_path / "model.bin", tiny_ct2_variables(), aliases={"decoder/projection/weight": "nope/x"})
    with pytest.raises(ModelError) as exc:
        load_weights(path)
    assert_model_error(exc, path, "alias", "nope/x")


def test_synthetic_missing_variable(tmp_path: Path) -> None:
    v = tiny_ct2_variables()
    del v["encoder/layer_0/ffn/linear_1/bias"]
    path = write_ct2(tmp_path / "model.bin", v)
    with pytest.raises(ModelError) as exc:
        load_weights(path)
    assert_model_error(exc, path, "encoder/layer_0/ffn/linear_1/bias", "missing")


def test_synthetic_wrong_shape(tmp_path: Path) -> None:
    v = tiny_ct2_variables()
    v["decoder/layer_0/attention/linear_1/weight"] = v["decoder/layer_0/attention/linear_1/weight"][:8]
    write_ct2(tmp_path / "model.bin", v)
    with pytest.raises(ModelError) as exc:
        load_weights(tmp_path)
    assert_model_error(exc, tmp_path, "decoder.layers.0.cross.kv.weight", "shape")


def test_synthetic_int8_quantized_not_loaded_raw(tmp_path: Path) -> None:
    v: dict[str, np.ndarray] = tiny_ct2_variables()
    name = "encoder/layer_0/ffn/linear_0"
    weight = v[f"{name}/weight"]
    scale = (127.0 / np.abs(weight).max(axis=1)).astype(np.float32)
    v[f"{name}/weight"] = np.round(weight * scale[:, None]).astype(np.int8)
    v[f"{name}/weight_scale"] = scale
    path = write_ct2(tmp_path / "model.bin", v)
    try:
        w = load_weights(path)
    except ModelError as e:
        pytest.fail(f"an int8 CTranslate2 model should load dequantised: {e}")
    got = w["encoder.layers.0.mlp.fc1.weight"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, v[f"{name}/weight"] / scale[:, None], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Hugging Face folders


def test_hf_round_trip_weights(hf_dir: Path, ct2: WhisperWeights) -> None:
    hf = load_weights(hf_dir)
    assert hf.dims == ct2.dims
    assert hf.name == "tiny.en"
    assert hf.path == hf_dir
    assert hf.alignment_heads.tolist() == ct2.alignment_heads.tolist()
    assert hf.suppress_tokens == ct2.suppress_tokens
    assert hf.suppress_tokens_begin == ct2.suppress_tokens_begin
    assert sorted(hf.tensors) == sorted(ct2.tensors)
    for name, expected in ct2.tensors.items():
        got = hf.tensors[name]
        assert got.dtype == np.float32, name
        assert got.shape == expected.shape, name
        # float16 in the CT2 file, float16 in the safetensors: exactly equal after widening.
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_hf_file_path_same_as_folder(hf_dir: Path, ct2: WhisperWeights) -> None:
    hf = load_weights(hf_dir / "model.safetensors")
    assert hf.dims == ct2.dims
    np.testing.assert_array_equal(hf["decoder.layers.3.attn.qkv.weight"], ct2["decoder.layers.3.attn.qkv.weight"])


def test_hf_transcribes_like_ct2(hf_dir: Path, model_dir: Path) -> None:
    from whisper_engine.engine import Engine
    from whisper_engine.transcribe import TranscribeOptions, transcribe

    audio, rate = sf.read(str(JFK), dtype="float32")
    assert rate == 16000 and audio.ndim == 1
    options = TranscribeOptions(word_timestamps=False)  # word alignment would cost ~10 s on CPU
    ref = transcribe(Engine.load(model_dir), audio, options)
    got = transcribe(Engine.load(hf_dir), audio, options)
    assert "ask not what your country can do for you" in ref.text
    assert got.text == ref.text
    assert [(s.start, s.end, s.tokens) for s in got.segments] == [(s.start, s.end, s.tokens) for s in ref.segments]


def test_hf_without_config(tmp_path: Path, hf_dir: Path) -> None:
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ModelError) as exc:
        load_weights(tmp_path)
    assert_model_error(exc, tmp_path / "config.json", "config.json", "missing")


def test_hf_wrong_model_type(tmp_path: Path, hf_dir: Path) -> None:
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text()) | {"model_type": "wav2vec2"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as exc:
        load_weights(tmp_path)
    assert_model_error(exc, tmp_path / "config.json", "model_type", "wav2vec2")


@pytest.mark.parametrize("kind", ["garbage", "tiny", "huge_header", "bad_json", "truncated"])
def test_hf_corrupt_safetensors(tmp_path: Path, hf_dir: Path, kind: str) -> None:
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    path = tmp_path / "model.safetensors"
    rng = np.random.default_rng(7)
    if kind == "garbage":
        data = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    elif kind == "tiny":
        data = b"\x01\x02\x03"
    elif kind == "huge_header":
        data = struct.pack("<Q", 1 << 40) + b"{}"
    elif kind == "bad_json":
        data = struct.pack("<Q", 12) + b"{not json!!}" + bytes(64)
    else:
        data = (hf_dir / "model.safetensors").read_bytes()
        data = data[: len(data) // 2]
    path.write_bytes(data)
    with pytest.raises(ModelError) as exc:
        load_weights(tmp_path)
    assert_model_error(exc, path, "safetensors")


def test_hf_missing_tensor(tmp_path: Path, ct2: WhisperWeights, hf_dir: Path) -> None:
    tensors = to_hf_tensors(ct2)
    del tensors["model.decoder.layers.1.encoder_attn.v_proj.weight"]
    save_file(
        {k: np.ascontiguousarray(v.astype(np.float16)) for k, v in tensors.items()}, str(tmp_path / "model.safetensors")
    )
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError) as exc:
        load_weights(tmp_path)
    assert_model_error(exc, tmp_path / "model.safetensors", "decoder.layers.1.encoder_attn.v_proj.weight", "missing")
