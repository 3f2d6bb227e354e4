"""Whisper quantised for the NPU, run through the golden kernels: the reference the ``xdna``
backend reproduces exactly.

Precision, layer by layer (what the NPU kernels support; measurements in BENCHMARKS.md):

- int16 x int8 -> int32: the linear layers whose inner size is at most 511, where an int32
  accumulator cannot overflow: the conv stem (one GEMM per tap), QKV, attention outputs, the first
  MLP layer, cross-attention, and the vocabulary projection (the tied embedding). Weights int8 per
  output channel, activations int16 per token. Against int8 activations, with the decoder
  teacher-forced on dev speech (``benchmarks/quant_agreement.py``): mean KL to the float32 model
  0.0041 instead of 0.0065, top-1 agreement 98.7% instead of 97.5%. The NPU runs int16 x int8 at
  half its int8 rate.
- int8 x int8 -> int32: the second MLP layer (inner size 1536: int16 inputs could overflow int32);
  attention scores ``Q K^T`` (queries and keys per token and head); attention-weighted values
  ``P V`` (probabilities per row; encoder and cross-attention values per channel, the decoder's
  self-attention values per token with their scales folded into the probabilities).
- float32 (table-based, see :mod:`npu.golden`): layer norm, softmax, GELU, the residual stream,
  the dequantising epilogues, and the mel stage after its int16 DFT.

Weights are quantised once at load from the float model; nothing is calibrated on data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from whisper_engine.weights import WhisperWeights

from . import golden as g

__all__ = [
    "INT16_INPUTS",
    "QLinear",
    "QuantDecoder",
    "QuantDecoderState",
    "QuantEncoder",
    "QuantModel",
    "quantize_weight",
]


# Linear layers whose activations are quantised to int16 (inner size <= 511); the rest use int8.
INT16_INPUTS = frozenset({"conv", "qkv", "out", "fc1", "cross_q", "cross_kv", "cross_out", "vocab"})


def _bits(kind: str) -> int:
    return 16 if kind in INT16_INPUTS else 8


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[N, K]`` -> (int8 ``[N, K]``, float32 scales ``[N]``), symmetric per output channel.
    The result is read-only: the golden GEMM keeps its float copy for speed."""
    q, scale = g.quantize_rows(np.asarray(w, np.float32))
    q.flags.writeable = False
    return q, scale


@dataclass
class QLinear:
    """An int8 linear layer: ``y = residual + dequant(gemm(quantize_rows(x), W^T)) + b``."""

    weight: np.ndarray  # int8 [N, K]
    scale: np.ndarray  # float32 [N]
    bias: np.ndarray | None  # float32 [N]
    activation_bits: int = 8  # 8, or 16 where int8 activations cost accuracy

    @classmethod
    def from_float(cls, w: np.ndarray, b: np.ndarray | None, activation_bits: int = 8) -> QLinear:
        q, s = quantize_weight(w)
        return cls(q, s, None if b is None else np.asarray(b, np.float32), activation_bits)

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        lead = x.shape[:-1]
        quantize = g.quantize_rows if self.activation_bits == 8 else g.quantize_rows_i16
        xq, xs = quantize(x.reshape(-1, x.shape[-1]))
        res = None if residual is None else residual.reshape(-1, residual.shape[-1])
        y = g.dequant(g.gemm_bt(xq, self.weight), xs, self.scale, self.bias, res)
        return y.reshape(*lead, -1)


def _scores(q: np.ndarray, kq: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Raw attention scores of float queries over keys quantised per row (``kq``, ``ks``)."""
    qq, qs = g.quantize_rows(q)
    return g.dequant(g.gemm_bt(qq, kq), qs, ks)


def attend(q: np.ndarray, kq: np.ndarray, ks: np.ndarray, vq_t: np.ndarray, vs: np.ndarray, n_valid=None):
    """One head: ``q`` float32 ``[n, dh]``; keys int8 per row ``kq [T, dh]``, ``ks [T]``; values per
    channel ``vq_t [dh, T]``, ``vs [dh]``. Returns (output ``[n, dh]``, raw scores ``[n, T]``)."""
    scores = _scores(q, kq, ks)
    p = g.softmax(scores, n_valid)
    pq, ps = g.quantize_rows(p)
    return g.dequant(g.gemm_bt(pq, vq_t), ps, vs), scores


def attend_token_values(q, kq, ks, vq, vs, n_valid=None):
    """One head over a cache whose values are quantised per token (``vq [T, dh]``, ``vs [T]``):
    the value scales are folded into the probabilities before those are quantised."""
    p = g.softmax(_scores(q, kq, ks), n_valid, col_scale=vs)
    pq, ps = g.quantize_rows(p)
    return g.dequant(g.gemm(pq, vq), ps, np.ones(vq.shape[1], np.float32))


def _ln(w: WhisperWeights, name: str) -> tuple[np.ndarray, np.ndarray]:
    return w[f"{name}.weight"], w[f"{name}.bias"]


def _linear(w: WhisperWeights, name: str, kind: str, scale: np.float32 | None = None) -> QLinear:
    weight, bias = w[f"{name}.weight"], w[f"{name}.bias"]
    if scale is not None:
        weight, bias = weight * scale, bias * scale
    return QLinear.from_float(weight, bias, _bits(kind))


def _self_attention_and_mlp(w: WhisperWeights, p: str, d_model: int, scale: np.float32) -> dict:
    """A layer's self-attention (the query rows of the fused QKV pre-scaled) and MLP weights."""
    qkv_w, qkv_b = w[f"{p}.attn.qkv.weight"].copy(), w[f"{p}.attn.qkv.bias"].copy()
    qkv_w[:d_model] *= scale
    qkv_b[:d_model] *= scale
    return {
        "attn_ln": _ln(w, f"{p}.attn_ln"),
        "qkv": QLinear.from_float(qkv_w, qkv_b, _bits("qkv")),
        "out": _linear(w, f"{p}.attn.out", "out"),
        "mlp_ln": _ln(w, f"{p}.mlp_ln"),
        "fc1": _linear(w, f"{p}.mlp.fc1", "fc1"),
        "fc2": _linear(w, f"{p}.mlp.fc2", "fc2"),
    }


class QuantEncoder:
    def __init__(self, w: WhisperWeights) -> None:
        d = w.dims
        self.dims = d
        self.n_head = d.n_audio_head
        scale = np.float32((d.n_audio_state // d.n_audio_head) ** -0.5)

        def conv(name: str) -> list[QLinear]:
            weight, bias = w[f"{name}.weight"], w[f"{name}.bias"]  # [C_out, C_in, 3]
            return [
                QLinear.from_float(weight[:, :, tap], bias if tap == 0 else None, _bits("conv")) for tap in range(3)
            ]

        self.conv1, self.conv2 = conv("encoder.conv1"), conv("encoder.conv2")
        self.positions = w["encoder.positions"]
        self.layers = [
            _self_attention_and_mlp(w, f"encoder.layers.{i}", d.n_audio_state, scale) for i in range(d.n_audio_layer)
        ]
        self.ln_post = _ln(w, "encoder.ln")

    @staticmethod
    def conv(taps: list[QLinear], x: np.ndarray, stride: int) -> np.ndarray:
        """Kernel-3, padding-1 convolution of ``x`` ``[T, C]`` as three GEMMs, one per tap, over
        the same rows quantised once (per frame); the taps' dequantised results add up in float:
        ``((tap0 + bias) + tap1) + tap2``. Returns ``[T // stride, C_out]``."""
        quantize = g.quantize_rows if taps[0].activation_bits == 8 else g.quantize_rows_i16
        xq, xs = quantize(np.pad(x, ((1, 1), (0, 0))))
        n_out = (x.shape[0] - 1) // stride + 1
        y = None
        for tap, linear in enumerate(taps):
            rows = slice(tap, tap + stride * (n_out - 1) + 1, stride)
            y = g.dequant(g.gemm_bt(xq[rows], linear.weight), xs[rows], linear.scale, linear.bias, y)
        return y

    def __call__(self, mel: np.ndarray) -> np.ndarray:
        n_frames = mel.shape[-1]
        if mel.shape[0] != self.dims.n_mels or n_frames % 2 or not 0 < n_frames <= 2 * self.dims.n_audio_ctx:
            raise ValueError(f"mel must be [{self.dims.n_mels}, even frames <= 3000], got {mel.shape}")
        x = g.gelu(self.conv(self.conv1, np.ascontiguousarray(mel.T, np.float32), 1))
        x = g.gelu(self.conv(self.conv2, x, 2), self.positions[: n_frames // 2])
        d, h = x.shape[1], self.n_head
        dh = d // h
        for layer in self.layers:
            qkv = layer["qkv"](g.layernorm(x, *layer["attn_ln"]))
            heads = []
            for i in range(h):
                q = qkv[:, i * dh : (i + 1) * dh]
                kq, ks = g.quantize_rows(qkv[:, d + i * dh : d + (i + 1) * dh])
                vq_t, vs = g.quantize_rows(np.ascontiguousarray(qkv[:, 2 * d + i * dh : 2 * d + (i + 1) * dh].T))
                heads.append(attend(q, kq, ks, vq_t, vs)[0])
            x = layer["out"](np.concatenate(heads, axis=1), residual=x)
            hidden = g.gelu(layer["fc1"](g.layernorm(x, *layer["mlp_ln"])))
            x = layer["fc2"](hidden, residual=x)
        return g.layernorm(x, *self.ln_post)


@dataclass
class QuantDecoderState:
    """Cross-attention K/V (per window) and the self-attention cache, all int8 with scales."""

    cross: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # per layer: kq [H,T,dh], ks, vq_t, vs
    self_k: list[np.ndarray]  # per layer int8 [B, H, ctx, dh]
    self_ks: list[np.ndarray]  # per layer float32 [B, H, ctx]
    self_v: list[np.ndarray]
    self_vs: list[np.ndarray]
    length: int = 0

    def reorder(self, source: np.ndarray) -> None:
        source = np.asarray(source)
        if np.array_equal(source, np.arange(len(source))):
            return
        for cache in (self.self_k, self.self_ks, self.self_v, self.self_vs):
            for i, c in enumerate(cache):
                cache[i] = c[source]


class QuantDecoder:
    def __init__(self, w: WhisperWeights) -> None:
        d = w.dims
        self.dims = d
        self.n_head = d.n_text_head
        scale = np.float32((d.n_text_state // d.n_text_head) ** -0.5)
        # Tied: the token embedding is also the vocabulary projection, which takes int16 inputs.
        self.embedding = QLinear.from_float(w["decoder.embedding"], None, _bits("vocab"))
        self.positions = w["decoder.positions"]
        self.layers = []
        for i in range(d.n_text_layer):
            p = f"decoder.layers.{i}"
            layer = _self_attention_and_mlp(w, p, d.n_text_state, scale)
            layer["cross_ln"] = _ln(w, f"{p}.cross_ln")
            layer["cross_q"] = _linear(w, f"{p}.cross.q", "cross_q", scale)
            layer["cross_kv"] = _linear(w, f"{p}.cross.kv", "cross_kv")
            layer["cross_out"] = _linear(w, f"{p}.cross.out", "cross_out")
            self.layers.append(layer)
        self.ln = _ln(w, "decoder.ln")

    def cross_kv(self, features: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per layer: keys int8 per token and head ``[H, T, dh]`` with scales ``[H, T]``, values
        int8 per channel ``[H, dh, T]`` with scales ``[H, dh]``; once per window."""
        d, h = self.dims.n_text_state, self.n_head
        dh = d // h
        out = []
        for layer in self.layers:
            kv = layer["cross_kv"](features)
            k = kv[:, :d].reshape(-1, h, dh).transpose(1, 0, 2)
            v_t = kv[:, d:].reshape(-1, h, dh).transpose(1, 2, 0)
            kq, ks = zip(*(g.quantize_rows(np.ascontiguousarray(k[i])) for i in range(h)), strict=True)
            vq, vs = zip(*(g.quantize_rows(np.ascontiguousarray(v_t[i])) for i in range(h)), strict=True)
            out.append((np.stack(kq), np.stack(ks), np.stack(vq), np.stack(vs)))
        return out

    def start(self, cross, batch_size: int = 1) -> QuantDecoderState:
        d = self.dims
        dh = d.n_text_state // d.n_text_head
        shape = (batch_size, d.n_text_head, d.n_text_ctx, dh)
        n = len(self.layers)
        return QuantDecoderState(
            cross=cross,
            self_k=[np.zeros(shape, np.int8) for _ in range(n)],
            self_ks=[np.zeros(shape[:3], np.float32) for _ in range(n)],
            self_v=[np.zeros(shape, np.int8) for _ in range(n)],
            self_vs=[np.zeros(shape[:3], np.float32) for _ in range(n)],
        )

    def embed(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """Token rows of the int8 embedding, dequantised, plus positions: ``[B, n, d]``."""
        e = self.embedding
        x = e.weight[tokens].astype(np.float32) * e.scale[tokens][..., None]
        return x + self.positions[start : start + tokens.shape[1]]

    def forward(self, state: QuantDecoderState, tokens: np.ndarray, cross_qk_heads=None):
        """Like :meth:`whisper_engine.model.Decoder.forward`: ``[B, n]`` tokens -> (final-normed hidden
        ``[B, n, d]``, captured raw cross-attention scores)."""
        d, h = self.dims.n_text_state, self.n_head
        dh = d // h
        batch, n = tokens.shape
        start, end = state.length, state.length + n
        if end > self.dims.n_text_ctx:
            raise ValueError(f"decoder context full: {end} > {self.dims.n_text_ctx} tokens")
        x = self.embed(tokens, start)
        causal = np.arange(start + 1, end + 1, dtype=np.int32)
        captured: list[np.ndarray] = []
        wanted = [] if cross_qk_heads is None else [tuple(x) for x in np.asarray(cross_qk_heads)]
        for li, layer in enumerate(self.layers):
            qkv = layer["qkv"](g.layernorm(x.reshape(-1, d), *layer["attn_ln"])).reshape(batch, n, 3 * d)
            heads = np.empty((batch, n, d), np.float32)
            for b in range(batch):
                for i in range(h):
                    k, v = qkv[b, :, d + i * dh : d + (i + 1) * dh], qkv[b, :, 2 * d + i * dh : 2 * d + (i + 1) * dh]
                    state.self_k[li][b, i, start:end], state.self_ks[li][b, i, start:end] = g.quantize_rows(k)
                    state.self_v[li][b, i, start:end], state.self_vs[li][b, i, start:end] = g.quantize_rows(v)
                    heads[b, :, i * dh : (i + 1) * dh] = attend_token_values(
                        qkv[b, :, i * dh : (i + 1) * dh],
                        state.self_k[li][b, i, :end],
                        state.self_ks[li][b, i, :end],
                        state.self_v[li][b, i, :end],
                        state.self_vs[li][b, i, :end],
                        causal,
                    )
            x = layer["out"](heads, residual=x)
            q = layer["cross_q"](g.layernorm(x.reshape(-1, d), *layer["cross_ln"])).reshape(batch, n, d)
            kq, ks, vq_t, vs = state.cross[li]
            scores_by_head = {}
            for b in range(batch):
                for i in range(h):
                    o, scores = attend(q[b, :, i * dh : (i + 1) * dh], kq[i], ks[i], vq_t[i], vs[i])
                    heads[b, :, i * dh : (i + 1) * dh] = o
                    if (li, i) in wanted:
                        scores_by_head.setdefault(i, []).append(scores)
            for layer_i, head in wanted:
                if layer_i == li:
                    captured.append(np.stack(scores_by_head[head]))
            x = layer["cross_out"](heads, residual=x)
            hidden = g.gelu(layer["fc1"](g.layernorm(x.reshape(-1, d), *layer["mlp_ln"])))
            x = layer["fc2"](hidden, residual=x.reshape(-1, d)).reshape(batch, n, d)
        state.length = end
        return g.layernorm(x.reshape(-1, d), *self.ln).reshape(batch, n, d), captured

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return self.embedding(hidden)


class QuantModel:
    """The quantised encoder and decoder of one set of weights."""

    def __init__(self, w: WhisperWeights) -> None:
        self.encoder = QuantEncoder(w)
        self.decoder = QuantDecoder(w)
