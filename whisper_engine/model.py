"""Whisper's transformer in numpy float32: the reference graph every backend reproduces.

The encoder takes a log-mel window of any even length up to 30 s; positional embeddings are
sliced to the window, so short speech is not padded to 30 s. The decoder keeps a key/value cache:
self-attention keys and values are appended per token into preallocated arrays, cross-attention
keys and values are computed once per window. Attention scale ``1/sqrt(d_head)`` is folded into
the query projections once at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from .weights import WhisperWeights

__all__ = ["Decoder", "DecoderState", "Encoder", "attention_blocked", "gelu", "gelu_tanh", "layer_norm", "softmax"]


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    var = np.mean(np.square(centred), -1, keepdims=True)
    return centred / np.sqrt(var + eps) * weight + bias


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as Whisper and CTranslate2's Whisper use."""
    y = erf(x * np.float32(1 / np.sqrt(2)))
    y += 1
    y *= x
    y *= np.float32(0.5)
    return y


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU by its tanh approximation, computed in place over ``x``.

    Used for the encoder's large activations: numpy's vectorised tanh is about 8x faster than
    scipy's erf, and the two differ by at most 5e-4 per activation (measured: encoder output
    within 1e-3 relative of the exact graph; see tests/test_oracle.py).
    """
    y = np.square(x)
    y *= np.float32(0.044715)
    y += 1
    y *= x
    y *= np.float32(np.sqrt(2 / np.pi))
    np.tanh(y, out=y)
    y += 1
    x *= np.float32(0.5)
    y *= x
    return y


def attention_blocked(qkv: np.ndarray, n_head: int, block: int = 256) -> np.ndarray:
    """Self-attention over ``qkv`` ``[T, 3d]`` (queries pre-scaled), head by head and in blocks of
    queries so each score block stays in cache; softmax normalisation is applied to the
    ``[block, dh]`` output instead of the ``[block, T]`` scores. Returns ``[T, d]``."""
    t, d3 = qkv.shape
    d = d3 // 3
    dh = d // n_head
    out = np.empty((t, d), np.float32)
    for h in range(n_head):
        q = qkv[:, h * dh : (h + 1) * dh]
        k_t = np.ascontiguousarray(qkv[:, d + h * dh : d + (h + 1) * dh].T)
        v = np.ascontiguousarray(qkv[:, 2 * d + h * dh : 2 * d + (h + 1) * dh])
        for i in range(0, t, block):
            scores = q[i : i + block] @ k_t
            scores -= scores.max(-1, keepdims=True)
            np.exp(scores, out=scores)
            o = scores @ v
            o /= scores.sum(-1, keepdims=True)
            out[i : i + block, h * dh : (h + 1) * dh] = o
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax in place over ``axis`` (the input is overwritten and returned)."""
    x -= x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    y = x @ w.T
    if b is not None:
        y += b
    return y


def _split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """``[..., T, d]`` -> ``[..., H, T, d/H]``."""
    *lead, t, d = x.shape
    return x.reshape(*lead, t, n_head, d // n_head).swapaxes(-2, -3)


def _merge_heads(x: np.ndarray) -> np.ndarray:
    *lead, h, t, dh = x.shape
    return x.swapaxes(-2, -3).reshape(*lead, t, h * dh)


def _scaled_qkv(w: WhisperWeights, prefix: str, d: int, n_head: int) -> tuple[np.ndarray, np.ndarray]:
    """Fused QKV weights with the attention scale folded into the Q rows."""
    weight = w[f"{prefix}.weight"].copy()
    bias = w[f"{prefix}.bias"].copy()
    scale = np.float32((d // n_head) ** -0.5)
    weight[:d] *= scale
    bias[:d] *= scale
    return weight, bias


def _conv1d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """1-D convolution, kernel 3, padding 1, as one GEMM: ``x`` is ``[T, C_in]``, returns
    ``[T // stride, C_out]``; ``weight`` is ``[C_out, C_in * 3]`` with taps innermost-last."""
    t = x.shape[0]
    padded = np.pad(x, ((1, 1), (0, 0)))
    n_out = (t + 2 - 3) // stride + 1
    cols = np.concatenate([padded[k : k + stride * (n_out - 1) + 1 : stride] for k in range(3)], axis=1)
    return _linear(cols, weight, bias)


class Encoder:
    """Audio encoder: two convolutions, sinusoidal positions, pre-norm transformer blocks."""

    def __init__(self, w: WhisperWeights) -> None:
        d = w.dims
        self.dims = d
        # [C_out, C_in, 3] -> [C_out, 3 * C_in], matching the tap-major columns of _conv1d.
        self.conv1 = (
            w["encoder.conv1.weight"].transpose(0, 2, 1).reshape(d.n_audio_state, -1).copy(),
            w["encoder.conv1.bias"],
        )
        self.conv2 = (
            w["encoder.conv2.weight"].transpose(0, 2, 1).reshape(d.n_audio_state, -1).copy(),
            w["encoder.conv2.bias"],
        )
        self.positions = w["encoder.positions"]
        self.layers = []
        for i in range(d.n_audio_layer):
            p = f"encoder.layers.{i}"
            self.layers.append(
                {
                    "attn_ln": (w[f"{p}.attn_ln.weight"], w[f"{p}.attn_ln.bias"]),
                    "qkv": _scaled_qkv(w, f"{p}.attn.qkv", d.n_audio_state, d.n_audio_head),
                    "out": (w[f"{p}.attn.out.weight"], w[f"{p}.attn.out.bias"]),
                    "mlp_ln": (w[f"{p}.mlp_ln.weight"], w[f"{p}.mlp_ln.bias"]),
                    "fc1": (w[f"{p}.mlp.fc1.weight"], w[f"{p}.mlp.fc1.bias"]),
                    "fc2": (w[f"{p}.mlp.fc2.weight"], w[f"{p}.mlp.fc2.bias"]),
                }
            )
        self.ln_post = (w["encoder.ln.weight"], w["encoder.ln.bias"])

    def __call__(self, mel: np.ndarray) -> np.ndarray:
        """``mel`` ``[n_mels, n_frames]`` (even, at most 3000) -> features ``[n_frames // 2, d]``."""
        n_frames = mel.shape[-1]
        if mel.shape[0] != self.dims.n_mels or n_frames % 2 or not 0 < n_frames <= 2 * self.dims.n_audio_ctx:
            raise ValueError(
                f"mel must be [{self.dims.n_mels}, even frames <= {2 * self.dims.n_audio_ctx}], got {mel.shape}"
            )
        x = gelu_tanh(_conv1d(np.ascontiguousarray(mel.T, dtype=np.float32), *self.conv1, stride=1))
        x = gelu_tanh(_conv1d(x, *self.conv2, stride=2))
        x += self.positions[: x.shape[0]]
        for layer in self.layers:
            qkv = _linear(layer_norm(x, *layer["attn_ln"]), *layer["qkv"])
            x += _linear(attention_blocked(qkv, self.dims.n_audio_head), *layer["out"])
            hidden = gelu_tanh(_linear(layer_norm(x, *layer["mlp_ln"]), *layer["fc1"]))
            x += _linear(hidden, *layer["fc2"])
        return layer_norm(x, *self.ln_post)


@dataclass
class DecoderState:
    """One window's decoding state: cross-attention K/V and the growing self-attention cache."""

    cross_k: list[np.ndarray]  # per layer [1 or B, H, dh, T_audio] (transposed)
    cross_v: list[np.ndarray]
    self_k: list[np.ndarray]  # per layer [B, H, n_text_ctx, dh]
    self_v: list[np.ndarray]
    length: int = 0

    @property
    def batch_size(self) -> int:
        return self.self_k[0].shape[0]

    def reorder(self, source: np.ndarray) -> None:
        """Beam search: row ``i`` of the cache becomes a copy of row ``source[i]``."""
        source = np.asarray(source)
        if np.array_equal(source, np.arange(len(source))):
            return
        for cache in (self.self_k, self.self_v):
            for i, c in enumerate(cache):
                cache[i] = c[source]
        for cache in (self.cross_k, self.cross_v):
            for i, c in enumerate(cache):
                if c.shape[0] > 1:
                    cache[i] = c[source]


class Decoder:
    """Text decoder with a key/value cache (see :class:`DecoderState`)."""

    def __init__(self, w: WhisperWeights) -> None:
        d = w.dims
        self.dims = d
        # Used transposed, [d, n_vocab]: the vocabulary projection is a memory-bound GEMV and
        # reads a contiguous [d, V] matrix about twice as fast as a transposed view of [V, d].
        # The loaders store the embedding column-major, so this is a view, not an 80 MB copy.
        self.embedding_t = np.ascontiguousarray(w["decoder.embedding"].T)
        self.positions = w["decoder.positions"]
        self.layers = []
        for i in range(d.n_text_layer):
            p = f"decoder.layers.{i}"
            q_w = w[f"{p}.cross.q.weight"] * np.float32((d.n_text_state // d.n_text_head) ** -0.5)
            q_b = w[f"{p}.cross.q.bias"] * np.float32((d.n_text_state // d.n_text_head) ** -0.5)
            self.layers.append(
                {
                    "attn_ln": (w[f"{p}.attn_ln.weight"], w[f"{p}.attn_ln.bias"]),
                    "qkv": _scaled_qkv(w, f"{p}.attn.qkv", d.n_text_state, d.n_text_head),
                    "out": (w[f"{p}.attn.out.weight"], w[f"{p}.attn.out.bias"]),
                    "cross_ln": (w[f"{p}.cross_ln.weight"], w[f"{p}.cross_ln.bias"]),
                    "cross_q": (q_w, q_b),
                    "cross_kv": (w[f"{p}.cross.kv.weight"], w[f"{p}.cross.kv.bias"]),
                    "cross_out": (w[f"{p}.cross.out.weight"], w[f"{p}.cross.out.bias"]),
                    "mlp_ln": (w[f"{p}.mlp_ln.weight"], w[f"{p}.mlp_ln.bias"]),
                    "fc1": (w[f"{p}.mlp.fc1.weight"], w[f"{p}.mlp.fc1.bias"]),
                    "fc2": (w[f"{p}.mlp.fc2.weight"], w[f"{p}.mlp.fc2.bias"]),
                }
            )
        self.ln = (w["decoder.ln.weight"], w["decoder.ln.bias"])

    def cross_kv(self, features: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Cross-attention keys (transposed, ``[.., H, dh, T]``) and values (``[.., H, T, dh]``)
        of every layer for ``features`` ``[T, d]`` or ``[B, T, d]``: computed once per window."""
        d = self.dims
        feats = features[None] if features.ndim == 2 else features
        keys, values = [], []
        for layer in self.layers:
            kv = _linear(feats, *layer["cross_kv"])
            keys.append(np.ascontiguousarray(_split_heads(kv[..., : d.n_text_state], d.n_text_head).swapaxes(-1, -2)))
            values.append(np.ascontiguousarray(_split_heads(kv[..., d.n_text_state :], d.n_text_head)))
        return keys, values

    def start(
        self,
        features: np.ndarray,
        batch_size: int = 1,
        cross: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
    ) -> DecoderState:
        """A fresh state for ``features`` ``[T_audio, d]`` (shared by every row of the batch)
        or ``[B, T_audio, d]`` (one window per row); ``cross`` reuses :meth:`cross_kv`."""
        d = self.dims
        cross_k, cross_v = cross if cross is not None else self.cross_kv(features)
        if features.ndim == 3:
            batch_size = features.shape[0]
        dh = d.n_text_state // d.n_text_head
        shape = (batch_size, d.n_text_head, d.n_text_ctx, dh)
        return DecoderState(
            cross_k=list(cross_k),
            cross_v=list(cross_v),
            self_k=[np.zeros(shape, np.float32) for _ in self.layers],
            self_v=[np.zeros(shape, np.float32) for _ in self.layers],
        )

    def forward(
        self, state: DecoderState, tokens: np.ndarray, cross_qk_heads: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run ``tokens`` ``[B, n]`` through the decoder, appending to the cache.

        Returns the final-normed hidden states ``[B, n, d]`` and, for each ``(layer, head)`` in
        ``cross_qk_heads``, the raw cross-attention scores ``[B, n, T_audio]`` (word timing).
        """
        d, h = self.dims.n_text_state, self.dims.n_text_head
        _b, n = tokens.shape
        start, end = state.length, state.length + n
        if end > self.dims.n_text_ctx:
            raise ValueError(f"decoder context full: {end} > {self.dims.n_text_ctx} tokens")
        x = self.embedding_t[:, tokens].transpose(1, 2, 0) + self.positions[start:end]
        causal = None
        if n > 1:
            causal = np.triu(np.full((n, end), -np.inf, np.float32), k=start + 1)
        captured: list[np.ndarray] = []
        for li, layer in enumerate(self.layers):
            qkv = _linear(layer_norm(x, *layer["attn_ln"]), *layer["qkv"])
            q = _split_heads(qkv[..., :d], h)
            state.self_k[li][:, :, start:end] = _split_heads(qkv[..., d : 2 * d], h)
            state.self_v[li][:, :, start:end] = _split_heads(qkv[..., 2 * d :], h)
            scores = q @ state.self_k[li][:, :, :end].swapaxes(-1, -2)
            if causal is not None:
                scores += causal
            x = x + _linear(_merge_heads(softmax(scores) @ state.self_v[li][:, :, :end]), *layer["out"])

            q = _split_heads(_linear(layer_norm(x, *layer["cross_ln"]), *layer["cross_q"]), h)
            scores = q @ state.cross_k[li]
            if cross_qk_heads is not None:
                for layer_i, head in cross_qk_heads:
                    if layer_i == li:
                        captured.append(scores[:, head].copy())
            x = x + _linear(_merge_heads(softmax(scores) @ state.cross_v[li]), *layer["cross_out"])

            hidden = gelu(_linear(layer_norm(x, *layer["mlp_ln"]), *layer["fc1"]))
            x = x + _linear(hidden, *layer["fc2"])
        state.length = end
        return layer_norm(x, *self.ln), captured

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Vocabulary logits of hidden states ``[..., d]`` (the output projection is tied to the
        token embedding)."""
        return hidden @ self.embedding_t
