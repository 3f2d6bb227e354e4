"""The CUDA backend: the reference graph of :mod:`whisper_engine.model` in torch, built for many streams.

Same graph as the numpy engine (query scale folded into the Q projections, unpadded windows of
any even length, tanh GELU in the encoder and exact GELU in the decoder), run with fp16 weights on
a GPU or float32 on torch's CPU device (which is how CI checks it against numpy). The mel front end
runs on the same device; attention is ``scaled_dot_product_attention``.

Besides the one-window :class:`~whisper_engine.backend.Backend` interface, batched entry points serve
hundreds of live streams from one GPU:

- :meth:`CudaBackend.encode_batch` encodes windows of different lengths together, padded to
  frame buckets with a key-padding mask, so every window's features equal its unbatched ones;
- :meth:`CudaBackend.decode_greedy_batch` decodes many windows greedily at once
  (:mod:`~whisper_engine.backends.cuda_greedy`): one launch per step for every stream, on a
  self-attention KV cache and cross-attention K/V preallocated on the device, argmax on the
  device, so only the chosen tokens cross to the host at the end. On CUDA each fixed-shape step
  is captured once as a CUDA graph per (batch, audio, text) bucket and replayed; elsewhere the
  same step function runs eagerly;
- :meth:`CudaBackend.alignment_batch` runs the word-timing pass of many windows in one launch, and
  :meth:`CudaBackend.alignment_matrix_batch` also reduces its scores to DTW costs there.

It is a :class:`~whisper_engine.backend.BatchedBackend`: the engine (``Engine.continue_windows``)
and the daemon's scheduler send it many streams' windows at once, and it computes their mels.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..backend import STAGES, BatchedBackend, DecoderSession, GreedyResult
from ..decoding import GreedyRules
from ..mel import HOP_LENGTH, N_FFT, mel_filters
from ..tokenizer import WhisperTokenizer
from ..weights import WhisperWeights
from .cuda_greedy import GreedyDecoder

__all__ = ["CudaBackend", "TorchFeatures", "device_label"]

Tensor = torch.Tensor


def device_label(device: torch.device) -> str:
    """What ``devices`` reports: the device that really holds the tensors, GPU model included."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"{device.type} (torch)"


@dataclass
class TorchFeatures:
    """One window's encoder output on the device, and its cross-attention K/V once computed
    (shared by fallbacks, beams and the word-alignment pass)."""

    x: Tensor  # [T_audio, d]
    cross: tuple[list[Tensor], list[Tensor]] | None = None  # per layer [1, H, T_audio, dh]


class _Session(DecoderSession):
    """Per-window decoder state: a preallocated self-attention cache ``[B, H, n_text_ctx, dh]`` per
    layer on the device; the window's cross K/V are shared by every row."""

    def __init__(self, backend: CudaBackend, features: TorchFeatures, batch_size: int) -> None:
        d = backend.dims
        self.backend = backend
        self.cross_k, self.cross_v = backend._cross(features)
        shape = (batch_size, d.n_text_head, d.n_text_ctx, d.n_text_state // d.n_text_head)
        self.self_k = [torch.zeros(shape, device=backend.device, dtype=backend.dtype) for _ in range(d.n_text_layer)]
        self.self_v = [torch.zeros(shape, device=backend.device, dtype=backend.dtype) for _ in range(d.n_text_layer)]
        self.length = 0

    def forward(self, tokens: np.ndarray, capture: np.ndarray | None = None) -> tuple[Tensor, list[Tensor]]:
        be = self.backend
        tokens_t = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=be.device)
        b, n = tokens_t.shape
        start, end = self.length, self.length + n
        if end > be.dims.n_text_ctx:
            raise ValueError(f"decoder context full: {end} > {be.dims.n_text_ctx} tokens")
        x = be.embedding[tokens_t] + be.text_positions[start:end]
        mask = None
        if n > 1:  # causal over the new tokens, everything cached before them visible
            q_pos = torch.arange(start, end, device=be.device)[:, None]
            mask = torch.arange(end, device=be.device)[None, :] <= q_pos

        def write(li: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            self.self_k[li][:, :, start:end] = k
            self.self_v[li][:, :, start:end] = v
            return self.self_k[li][:, :, :end], self.self_v[li][:, :, :end]

        cross_k = [c.expand(b, -1, -1, -1) for c in self.cross_k]
        cross_v = [c.expand(b, -1, -1, -1) for c in self.cross_v]
        hidden, captured = be.decoder_layers(x, write, mask, cross_k, cross_v, None, capture=capture)
        self.length = end
        return hidden, captured

    @torch.inference_mode()
    def step(self, tokens: np.ndarray, positions: Sequence[int] = (-1,)) -> np.ndarray:
        hidden, _ = self.forward(tokens)
        return self.backend.logits(hidden[:, list(positions)]).cpu().numpy()

    @torch.inference_mode()
    def reorder(self, source: np.ndarray) -> None:
        source = np.asarray(source)
        if np.array_equal(source, np.arange(len(source))):
            return
        index = torch.as_tensor(source, dtype=torch.int64, device=self.backend.device)
        self.self_k = [c.index_select(0, index) for c in self.self_k]
        self.self_v = [c.index_select(0, index) for c in self.self_v]


class CudaBackend(BatchedBackend):
    """Whisper in torch on one device: fp16 on CUDA, float32 elsewhere (CI checks it on CPU)."""

    name = "cuda"
    #: A batch's window mels are one STFT launch on the device (the host computes no mel frames).
    mel_from_audio = True
    #: Batch sizes the greedy decoder's state and CUDA graphs are built for.
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    #: Cross-attention lengths (encoder positions; 50 per second) a decoder step is built for.
    audio_buckets: tuple[int, ...] = (500, 1000, 1500)
    #: Self-attention lengths (tokens) a decoder step is built for.
    text_buckets: tuple[int, ...] = (64, 128, 256, 448)
    #: Encoder windows are padded to a multiple of this many mel frames when batched.
    frame_bucket = 250
    #: Windows per encoder launch at most (bounds activation memory: about 5 MB per 30 s window).
    max_encode_batch = 64
    #: Steps between checks whether every row has finished (each check waits for the device).
    done_check_every = 4
    #: Windows per word-alignment launch at most (where the decode's cross K/V are no longer on
    #: the device, they are computed for it: about 9 MB per 30 s window in fp16).
    max_align_batch = 64

    def __init__(
        self, weights: WhisperWeights, device: str | torch.device = "cuda", dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(weights)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("the cuda backend needs a CUDA GPU and a CUDA build of torch; none is available here")
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        # STREAMD_CUDA_GRAPHS=0 runs the same steps eagerly: a switch for debugging, not for speed.
        self.use_graphs = self.device.type == "cuda" and os.environ.get("STREAMD_CUDA_GRAPHS", "1") != "0"
        self._label = device_label(self.device)
        self._load(weights)
        self.greedy = GreedyDecoder(self)
        self._lock = threading.Lock()
        self._rules: GreedyRules | None = None

    # -- weights ---------------------------------------------------------------------------

    def _t(self, array: np.ndarray, dtype: torch.dtype | None = None) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device, dtype or self.dtype)

    def _scaled(self, weight: np.ndarray, bias: np.ndarray, rows: int, n_head: int) -> tuple[Tensor, Tensor]:
        """A projection with the attention scale ``1/sqrt(dh)`` folded into its first ``rows``
        (the queries), so attention runs with ``scale=1`` as the numpy graph does."""
        weight, bias = weight.copy(), bias.copy()
        scale = np.float32((rows // n_head) ** -0.5)
        weight[:rows] *= scale
        bias[:rows] *= scale
        return self._t(weight), self._t(bias)

    def _load(self, w: WhisperWeights) -> None:
        d = self.dims
        self.conv1 = (self._t(w["encoder.conv1.weight"]), self._t(w["encoder.conv1.bias"]))
        self.conv2 = (self._t(w["encoder.conv2.weight"]), self._t(w["encoder.conv2.bias"]))
        self.audio_positions = self._t(w["encoder.positions"])
        self.enc_layers = []
        for i in range(d.n_audio_layer):
            p = f"encoder.layers.{i}"
            self.enc_layers.append(
                {
                    "attn_ln": (self._t(w[f"{p}.attn_ln.weight"]), self._t(w[f"{p}.attn_ln.bias"])),
                    "qkv": self._scaled(
                        w[f"{p}.attn.qkv.weight"], w[f"{p}.attn.qkv.bias"], d.n_audio_state, d.n_audio_head
                    ),
                    "out": (self._t(w[f"{p}.attn.out.weight"]), self._t(w[f"{p}.attn.out.bias"])),
                    "mlp_ln": (self._t(w[f"{p}.mlp_ln.weight"]), self._t(w[f"{p}.mlp_ln.bias"])),
                    "fc1": (self._t(w[f"{p}.mlp.fc1.weight"]), self._t(w[f"{p}.mlp.fc1.bias"])),
                    "fc2": (self._t(w[f"{p}.mlp.fc2.weight"]), self._t(w[f"{p}.mlp.fc2.bias"])),
                }
            )
        self.enc_ln = (self._t(w["encoder.ln.weight"]), self._t(w["encoder.ln.bias"]))
        self.embedding = self._t(w["decoder.embedding"])  # [V, d]; also the output projection
        self.text_positions = self._t(w["decoder.positions"])
        # torch's CPU GEMM reads a contiguous [d, V] about 3x faster than a transposed [V, d] for
        # one row; cuBLAS takes [V, d] as it is, so only other devices keep this extra copy.
        self.embedding_t = None if self.device.type == "cuda" else self.embedding.t().contiguous()
        self.dec_layers = []
        for i in range(d.n_text_layer):
            p = f"decoder.layers.{i}"
            self.dec_layers.append(
                {
                    "attn_ln": (self._t(w[f"{p}.attn_ln.weight"]), self._t(w[f"{p}.attn_ln.bias"])),
                    "qkv": self._scaled(
                        w[f"{p}.attn.qkv.weight"], w[f"{p}.attn.qkv.bias"], d.n_text_state, d.n_text_head
                    ),
                    "out": (self._t(w[f"{p}.attn.out.weight"]), self._t(w[f"{p}.attn.out.bias"])),
                    "cross_ln": (self._t(w[f"{p}.cross_ln.weight"]), self._t(w[f"{p}.cross_ln.bias"])),
                    "cross_q": self._scaled(
                        w[f"{p}.cross.q.weight"], w[f"{p}.cross.q.bias"], d.n_text_state, d.n_text_head
                    ),
                    "cross_kv": (self._t(w[f"{p}.cross.kv.weight"]), self._t(w[f"{p}.cross.kv.bias"])),
                    "cross_out": (self._t(w[f"{p}.cross.out.weight"]), self._t(w[f"{p}.cross.out.bias"])),
                    "mlp_ln": (self._t(w[f"{p}.mlp_ln.weight"]), self._t(w[f"{p}.mlp_ln.bias"])),
                    "fc1": (self._t(w[f"{p}.mlp.fc1.weight"]), self._t(w[f"{p}.mlp.fc1.bias"])),
                    "fc2": (self._t(w[f"{p}.mlp.fc2.weight"]), self._t(w[f"{p}.mlp.fc2.bias"])),
                }
            )
        self.dec_ln = (self._t(w["decoder.ln.weight"]), self._t(w["decoder.ln.bias"]))
        # The mel front end stays float32 on every device: it is cheap and its log is sensitive.
        self.mel_filters = self._t(mel_filters(d.n_mels), torch.float32)
        self.window = torch.hann_window(N_FFT, periodic=True, device=self.device, dtype=torch.float32)

    @property
    def devices(self) -> dict[str, str]:
        return dict.fromkeys(STAGES, self._label)

    # -- mel -------------------------------------------------------------------------------

    def _log10_mel(self, audio: Tensor) -> Tensor:
        """Unnormalised log10 mel ``[..., n_mels, frames]`` of ``audio`` ``[..., samples]`` (float32)."""
        if audio.shape[-1] <= N_FFT // 2:  # reflect padding needs more samples than the pad
            audio = F.pad(audio, (0, N_FFT // 2 + 1 - audio.shape[-1]))
        spec = torch.stft(
            audio, N_FFT, HOP_LENGTH, window=self.window, center=True, pad_mode="reflect", return_complex=True
        )
        power = torch.view_as_real(spec[..., :-1]).square().sum(-1)  # Whisper drops the last frame
        return torch.log10(torch.clamp(self.mel_filters @ power, min=1e-10))

    @staticmethod
    def _normalise(log_spec: Tensor, frames: Tensor | None = None) -> Tensor:
        """Whisper's ``max - 8`` floor and ``(x + 4) / 4``; the max over each row's own frames."""
        if frames is None:
            peak = log_spec.amax(dim=(-2, -1), keepdim=True)
        else:
            valid = torch.arange(log_spec.shape[-1], device=log_spec.device) < frames[:, None]
            peak = log_spec.masked_fill(~valid[:, None, :], -torch.inf).amax(dim=(-2, -1), keepdim=True)
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0

    @torch.inference_mode()
    def log_mel_tensor(self, audio: np.ndarray | Tensor, padding: int = 0) -> Tensor:
        """:meth:`log_mel` left on the device, float32 ``[n_mels, frames]``."""
        audio_t = torch.as_tensor(audio, dtype=torch.float32).to(self.device).reshape(-1)
        if padding:
            audio_t = F.pad(audio_t, (0, padding))
        return self._normalise(self._log10_mel(audio_t))

    def log_mel(self, audio: np.ndarray, padding: int = 0) -> np.ndarray:
        return self.log_mel_tensor(audio, padding).cpu().numpy()

    @torch.inference_mode()
    def log_mel_batch(self, audios: Sequence[np.ndarray], paddings: Sequence[int] | int = 0) -> list[Tensor]:
        """Mels of many windows in one STFT, each equal to ``log_mel_tensor(audio, padding)``.

        Rows are zero-padded to a common length; that changes nothing for a row whose own padding
        covers the STFT's reflection (``N_FFT // 2`` samples), which every engine window has. Rows
        with less padding are computed on their own.
        """
        if isinstance(paddings, int):
            paddings = [paddings] * len(audios)
        out: list[Tensor | None] = [None] * len(audios)
        batch = [i for i, p in enumerate(paddings) if p >= N_FFT // 2]
        for i in set(range(len(audios))) - set(batch):
            out[i] = self.log_mel_tensor(audios[i], paddings[i])
        if batch:
            mels, frames = self._mel_stack([audios[i] for i in batch], [paddings[i] for i in batch])
            for row, i in enumerate(batch):
                out[i] = mels[row, :, : frames[row]]
        return [m for m in out if m is not None]

    def _mel_stack(self, audios: Sequence[np.ndarray], paddings: Sequence[int]) -> tuple[Tensor, list[int]]:
        """Normalised log mels ``[B, n_mels, F]`` of windows padded by at least ``N_FFT // 2``
        samples each, in one STFT, and each row's own frame count (the rest of a row is padding)."""
        lengths = [len(a) + p for a, p in zip(audios, paddings, strict=True)]
        # One host-to-device copy of the samples alone; the zero padding is made on the device.
        flat = np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in audios])
        pieces = torch.from_numpy(flat).to(self.device).split([len(a) for a in audios])
        stacked = torch.nn.utils.rnn.pad_sequence(list(pieces), batch_first=True)
        stacked = F.pad(stacked, (0, max(lengths) - stacked.shape[1]))
        frames = [n // HOP_LENGTH for n in lengths]
        return self._normalise(self._log10_mel(stacked), torch.tensor(frames, device=self.device)), frames

    # -- encoder ---------------------------------------------------------------------------

    def _check_mel(self, mel: np.ndarray | Tensor) -> Tensor:
        d = self.dims
        frames = mel.shape[-1]
        if mel.ndim != 2 or mel.shape[0] != d.n_mels or frames % 2 or not 0 < frames <= 2 * d.n_audio_ctx:
            raise ValueError(f"mel must be [{d.n_mels}, even frames <= {2 * d.n_audio_ctx}], got {tuple(mel.shape)}")
        if isinstance(mel, np.ndarray):
            mel = torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32))
        return mel.to(self.device)

    def _encoder(self, mel: Tensor, frames: Sequence[int] | None = None) -> Tensor:
        """Mels ``[B, n_mels, F]`` -> features ``[B, F // 2, d]``. ``frames``: each row's real
        length (the rest is zero padding, masked out of attention)."""
        d = self.dims
        x = F.gelu(F.conv1d(mel.to(self.dtype), *self.conv1, padding=1), approximate="tanh")
        x = F.gelu(F.conv1d(x, *self.conv2, stride=2, padding=1), approximate="tanh")
        x = x.transpose(1, 2) + self.audio_positions[: x.shape[-1]]
        b, t, _ = x.shape
        mask = None
        if frames is not None and any(f // 2 < t for f in frames):
            lengths = torch.tensor([f // 2 for f in frames], device=self.device)
            mask = (torch.arange(t, device=self.device)[None, :] < lengths[:, None])[:, None, None, :]
        h, dh = d.n_audio_head, d.n_audio_state // d.n_audio_head
        for layer in self.enc_layers:
            qkv = F.linear(F.layer_norm(x, (d.n_audio_state,), *layer["attn_ln"]), *layer["qkv"])
            q, k, v = qkv.view(b, t, 3, h, dh).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            x = x + F.linear(a.transpose(1, 2).reshape(b, t, d.n_audio_state), *layer["out"])
            hidden = F.gelu(
                F.linear(F.layer_norm(x, (d.n_audio_state,), *layer["mlp_ln"]), *layer["fc1"]), approximate="tanh"
            )
            x = x + F.linear(hidden, *layer["fc2"])
        return F.layer_norm(x, (d.n_audio_state,), *self.enc_ln)

    @torch.inference_mode()
    def encode(self, mel: np.ndarray | Tensor) -> TorchFeatures:
        return TorchFeatures(self._encoder(self._check_mel(mel)[None])[0])

    @torch.inference_mode()
    def encode_batch(self, mels: Sequence[np.ndarray | Tensor]) -> list[TorchFeatures]:
        """Encode windows of any even lengths together, in the order given.

        Windows are grouped by length bucket (:attr:`frame_bucket` frames) and each group runs as
        one launch of at most :attr:`max_encode_batch`, zero-padded with a key-padding mask: a
        window's features equal :meth:`encode`'s to floating-point tolerance.
        """
        checked = [self._check_mel(m) for m in mels]
        limit = 2 * self.dims.n_audio_ctx
        groups: dict[int, list[int]] = {}
        for i, m in enumerate(checked):
            size = min(limit, math.ceil(m.shape[-1] / self.frame_bucket) * self.frame_bucket)
            groups.setdefault(size + size % 2, []).append(i)
        out: list[TorchFeatures | None] = [None] * len(checked)
        for size, members in groups.items():
            for first in range(0, len(members), self.max_encode_batch):
                chunk = members[first : first + self.max_encode_batch]
                frames = [checked[i].shape[-1] for i in chunk]
                batch = torch.zeros(len(chunk), self.dims.n_mels, size, device=self.device, dtype=torch.float32)
                for row, i in enumerate(chunk):
                    batch[row, :, : frames[row]] = checked[i]
                x = self._encoder(batch, frames)
                for row, i in enumerate(chunk):
                    out[i] = TorchFeatures(x[row, : frames[row] // 2])
        return [f for f in out if f is not None]

    @torch.inference_mode()
    def encode_audio_batch(
        self, audios: Sequence[np.ndarray], paddings: Sequence[int], frames: Sequence[int]
    ) -> list[TorchFeatures]:
        """``encode_batch`` of ``log_mel_batch(audios, paddings)``'s row ``i`` cut to ``frames[i]``
        (even), in a fixed number of launches instead of a few per window.

        At hundreds of streams the per-window tensor calls were the cost: each one releases the
        GIL, and the event loop (busy with the streams' audio) then holds it for up to the
        interpreter's switch interval before the engine thread gets it back.
        """
        if not audios:
            return []
        if min(paddings) < N_FFT // 2 or any(f % 2 or f <= 0 for f in frames):
            mels = self.log_mel_batch(audios, paddings)
            return self.encode_batch([m[:, :f] for m, f in zip(mels, frames, strict=True)])
        mel, available = self._mel_stack(audios, paddings)
        if any(f > n for f, n in zip(frames, available, strict=True)):
            raise ValueError("frames beyond a window's audio and padding")
        limit = 2 * self.dims.n_audio_ctx
        sizes = [min(limit, math.ceil(f / self.frame_bucket) * self.frame_bucket) for f in frames]
        sizes = [size + size % 2 for size in sizes]
        width = max(sizes)
        mel = F.pad(mel, (0, max(0, width - mel.shape[-1])))[:, :, :width]
        real = torch.arange(width, device=self.device)[None, :] < torch.tensor(frames, device=self.device)[:, None]
        mel = mel.masked_fill(~real[:, None, :], 0.0)  # as encode_batch pads: zeros past a window's frames
        groups: dict[int, list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        out: list[TorchFeatures | None] = [None] * len(audios)
        for size, members in groups.items():
            for first in range(0, len(members), self.max_encode_batch):
                chunk = members[first : first + self.max_encode_batch]
                rows = mel.index_select(0, torch.tensor(chunk, device=self.device))[:, :, :size]
                x = self._encoder(rows, [frames[i] for i in chunk])
                for row, i in enumerate(chunk):
                    out[i] = TorchFeatures(x[row, : frames[i] // 2])
        return [f for f in out if f is not None]

    # -- decoder ---------------------------------------------------------------------------

    def decoder_layers(
        self,
        x: Tensor,
        write,
        self_mask: Tensor | None,
        cross_k: list[Tensor],
        cross_v: list[Tensor],
        cross_mask: Tensor | None,
        capture: np.ndarray | None = None,
        is_causal: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """The decoder's blocks over ``x`` ``[B, n, d]``. ``write(layer, k, v)`` stores the new
        self-attention keys/values ``[B, H, n, dh]`` and returns the ones to attend to. For each
        ``(layer, head)`` of ``capture``, the raw cross-attention scores ``[B, n, T]`` are kept."""
        d = self.dims
        b, n, _ = x.shape
        h, dh = d.n_text_head, d.n_text_state // d.n_text_head
        captured: list[Tensor] = []
        for li, layer in enumerate(self.dec_layers):
            qkv = F.linear(F.layer_norm(x, (d.n_text_state,), *layer["attn_ln"]), *layer["qkv"])
            q, k, v = qkv.view(b, n, 3, h, dh).permute(2, 0, 3, 1, 4)
            keys, values = write(li, k, v)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=self_mask, scale=1.0, is_causal=is_causal)
            x = x + F.linear(a.transpose(1, 2).reshape(b, n, d.n_text_state), *layer["out"])

            q = F.linear(F.layer_norm(x, (d.n_text_state,), *layer["cross_ln"]), *layer["cross_q"])
            q = q.view(b, n, h, dh).transpose(1, 2)
            if capture is not None:
                for layer_i, head in capture:
                    if layer_i == li:
                        captured.append(q[:, head] @ cross_k[li][:, head].transpose(-1, -2))
            a = F.scaled_dot_product_attention(q, cross_k[li], cross_v[li], attn_mask=cross_mask, scale=1.0)
            x = x + F.linear(a.transpose(1, 2).reshape(b, n, d.n_text_state), *layer["cross_out"])

            hidden = F.gelu(F.linear(F.layer_norm(x, (d.n_text_state,), *layer["mlp_ln"]), *layer["fc1"]))
            x = x + F.linear(hidden, *layer["fc2"])
        return F.layer_norm(x, (d.n_text_state,), *self.dec_ln), captured

    def logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits (tied to the embedding), float32."""
        if self.embedding_t is not None:
            return (hidden @ self.embedding_t).float()
        return F.linear(hidden, self.embedding).float()

    def cross_kv(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Cross-attention K and V ``[B, H, T, dh]`` of every layer for features ``[B, T, d]``."""
        d = self.dims
        b, t, _ = x.shape
        keys, values = [], []
        for layer in self.dec_layers:
            kv = F.linear(x, *layer["cross_kv"]).view(b, t, 2, d.n_text_head, d.n_text_state // d.n_text_head)
            k, v = kv.permute(2, 0, 3, 1, 4)
            keys.append(k)
            values.append(v)
        return keys, values

    def _cross(self, features: TorchFeatures) -> tuple[list[Tensor], list[Tensor]]:
        if features.cross is None:
            keys, values = self.cross_kv(features.x[None])
            features.cross = ([k.contiguous() for k in keys], [v.contiguous() for v in values])
        return features.cross

    @torch.inference_mode()
    def decoder(self, features: object, batch_size: int = 1) -> DecoderSession:
        assert isinstance(features, TorchFeatures)
        return _Session(self, features, batch_size)

    @torch.inference_mode()
    def alignment(self, features: object, tokens: np.ndarray) -> np.ndarray:
        assert isinstance(features, TorchFeatures)
        session = _Session(self, features, 1)
        _, qk = session.forward(np.asarray(tokens, dtype=np.int64)[None], capture=self.weights.alignment_heads)
        return torch.stack([s[0] for s in qk]).float().cpu().numpy()

    @torch.inference_mode()
    def alignment_batch(self, features_list: Sequence[TorchFeatures], tokens_list: Sequence[np.ndarray]) -> list:
        """:meth:`alignment` of many windows in one decoder pass per :attr:`max_align_batch`:
        token rows right-padded (causal attention keeps the padding out of real positions),
        windows' cross K/V padded and masked. Row ``i`` is ``[n_heads, len(tokens_list[i]),
        T_audio of features_list[i]]``, equal to :meth:`alignment`'s to floating-point tolerance."""
        if len(features_list) != len(tokens_list):
            raise ValueError(f"{len(features_list)} windows but {len(tokens_list)} token rows")
        out: list[np.ndarray] = []
        with self._lock, self._on_device():
            for part in self._align_chunks(len(tokens_list)):
                feats, rows = features_list[part], tokens_list[part]
                scores = self._alignment_scores(feats, rows).float().cpu().numpy()  # [B, heads, width, T]
                out += [scores[i, :, : len(rows[i]), : f.x.shape[0]] for i, f in enumerate(feats)]
        return out

    @torch.inference_mode()
    def alignment_matrix_batch(
        self,
        features_list: Sequence[TorchFeatures],
        tokens_list: Sequence[np.ndarray],
        num_frames: Sequence[int],
        first_row: int,
        medfilt_width: int = 7,
    ) -> list[np.ndarray]:
        """:func:`whisper_engine.timing.alignment_matrix` of many windows, computed on the device after one
        :meth:`alignment_batch` pass: only each window's small DTW cost matrix crosses to the host,
        and the host's per-window softmax, standardisation and median filter are gone."""
        if not len(features_list) == len(tokens_list) == len(num_frames):
            raise ValueError("one token row and one frame count per window")
        out: list[np.ndarray] = []
        with self._lock, self._on_device():
            for part in self._align_chunks(len(tokens_list)):
                feats, rows = features_list[part], tokens_list[part]
                n_audio = [max(1, min(n // 2, f.x.shape[0])) for n, f in zip(num_frames[part], feats, strict=True)]
                lengths = [len(r) for r in rows]
                matrix = _alignment_matrices(self._alignment_scores(feats, rows), lengths, n_audio, medfilt_width)
                host = matrix.cpu().numpy()
                out += [host[i, first_row : lengths[i] - 1, : n_audio[i]] for i in range(len(feats))]
        return out

    def _align_chunks(self, n: int) -> list[slice]:
        """Windows per word-alignment launch: at most :attr:`max_align_batch`."""
        return [slice(first, first + self.max_align_batch) for first in range(0, n, self.max_align_batch)]

    def _alignment_scores(self, feats: Sequence[TorchFeatures], token_rows: Sequence[np.ndarray]) -> Tensor:
        """Raw scores ``[B, heads, width, T]`` on the device: rows right-padded, frames masked."""
        dev = self.device
        frames = [f.x.shape[0] for f in feats]
        lengths = [len(r) for r in token_rows]
        if min(lengths) < 1 or max(lengths) > self.dims.n_text_ctx:
            raise ValueError(f"token rows must hold 1 to {self.dims.n_text_ctx} tokens, got lengths {lengths}")
        held = self.greedy.held_cross(feats)
        if held is not None:  # the decode that produced these tokens left the windows' K/V on the device
            cross_k, cross_v, cross_mask = held
        else:
            x = torch.nn.utils.rnn.pad_sequence([f.x for f in feats], batch_first=True)
            cross_k, cross_v = self.cross_kv(x)
            cross_mask = None
            if min(frames) < max(frames):
                valid = torch.arange(max(frames), device=dev)[None, :] < torch.tensor(frames, device=dev)[:, None]
                cross_mask = valid[:, None, None, :]
        width = max(lengths)
        padded = np.zeros((len(feats), width), np.int64)
        for i, row in enumerate(token_rows):
            padded[i, : len(row)] = row
        tokens = torch.from_numpy(padded).to(dev)
        x = self.embedding[tokens] + self.text_positions[:width]
        _, captured = self.decoder_layers(
            x,
            lambda li, k, v: (k, v),
            None,
            cross_k,
            cross_v,
            cross_mask,
            capture=self.weights.alignment_heads,
            is_causal=width > 1,
        )
        return torch.stack(captured, 1)

    # -- batched greedy decoding (cuda_greedy.py) ---------------------------------------------

    def decode_state_bytes_per_stream(self) -> int:
        """Device memory the batched decoder reserves per stream (KV cache, cross K/V, outputs)."""
        return self.greedy.bytes_per_stream()

    def greedy_rules(self, tok: WhisperTokenizer) -> GreedyRules:
        """The token masks of streaming decoding for this model, built once."""
        if self._rules is None:
            self._rules = GreedyRules.from_tokenizer(tok, self.weights)
        return self._rules

    def memory_report(self) -> dict[str, int]:
        """Device memory for ``/metrics`` and ``/healthz``: the batched decoder's static state
        (rows it holds, bytes, bytes per stream) and, on CUDA, torch's allocator counters."""
        state = self.greedy.state
        report = {
            "decode_state_bytes_per_stream": self.decode_state_bytes_per_stream(),
            "decode_state_rows": state.capacity if state is not None else 0,
            "decode_state_bytes": state.nbytes() if state is not None else 0,
        }
        if self.device.type == "cuda":
            report["allocated_bytes"] = int(torch.cuda.memory_allocated(self.device))
            report["reserved_bytes"] = int(torch.cuda.memory_reserved(self.device))
            report["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return report

    @torch.inference_mode()
    def decode_greedy_batch(
        self,
        features_list: Sequence[TorchFeatures],
        prompts: Sequence[Sequence[int]],
        max_tokens: int | Sequence[int] = 224,
        *,
        rules: GreedyRules,
        prefixed: Sequence[bool] | None = None,
        looping: Callable[[int, list[int]], bool] | None = None,
    ) -> list[GreedyResult]:
        """Greedy-decode many windows together; row ``i`` decodes ``features_list[i]`` after
        ``prompts[i]`` (its full initial tokens, see :meth:`GreedyRules.initial_tokens`).

        Gives the tokens :func:`whisper_engine.decoding.decode` gives with ``without_timestamps=True`` and
        ``sample_len=max_tokens``: masks from ``rules``; ``prefixed[i]`` (a forced prefix ends the
        prompt) lifts the first-step blank suppression, as decoding does. ``looping(i, tokens)``
        is decoding's loop guard: asked after each new non-eot token of row ``i`` (``tokens``: the
        row's generated tokens so far), ``True`` stops the row there (:attr:`GreedyResult.looped`).
        Tokens reach the host only every :attr:`done_check_every` steps, so a looping row runs at
        most that many steps past its loop, and those tokens are dropped.
        """
        if len(features_list) != len(prompts):
            raise ValueError(f"{len(features_list)} windows but {len(prompts)} prompts")
        limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
        prefixed = list(prefixed) if prefixed is not None else [False] * len(prompts)
        chunk = self.batch_buckets[-1]
        results: list[GreedyResult] = []
        with self._lock, self._on_device():
            for first in range(0, len(prompts), chunk):
                part = slice(first, first + chunk)
                guard = None if looping is None else (lambda row, toks, first=first: looping(first + row, toks))
                results += self.greedy.decode(
                    features_list[part], prompts[part], limits[part], prefixed[part], rules, guard
                )
        return results

    def _on_device(self) -> contextlib.AbstractContextManager:
        """Graph capture and replay use the current CUDA device: make it this backend's."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()


def _alignment_matrices(scores: Tensor, lengths: Sequence[int], n_audio: Sequence[int], width: int) -> Tensor:
    """:func:`whisper_engine.timing.alignment_matrix` for a batch of raw scores ``[B, heads, W, T]`` whose
    row ``i`` holds ``lengths[i]`` tokens and ``n_audio[i]`` frames; returns ``[B, W, T]`` (each
    row valid over its own tokens and frames). Padded frames and tokens are masked out of the
    softmax and the statistics, and the median filter reflects at each row's own last frame."""
    b, _, w, t = scores.shape
    dev = scores.device
    frames = torch.tensor(n_audio, device=dev)[:, None]  # [B, 1]
    tokens = torch.tensor(lengths, device=dev)[:, None]
    in_audio = torch.arange(t, device=dev)[None, :] < frames  # [B, T]
    x = scores.float().masked_fill(~in_audio[:, None, None, :], -torch.inf).softmax(-1)
    in_text = (torch.arange(w, device=dev)[None, :] < tokens).float()[:, None, :, None]  # [B, 1, W, 1]
    count = in_text.sum(-2, keepdim=True)
    mean = (x * in_text).sum(-2, keepdim=True) / count
    std = (((x - mean) ** 2 * in_text).sum(-2, keepdim=True) / count).sqrt()
    x = (x - mean) / std.clamp_min(1e-10)
    half = width // 2
    at = torch.arange(-half, t + half, device=dev)[None, :].abs().expand(b, -1)  # reflect at frame 0
    at = torch.where(at >= frames, 2 * (frames - 1) - at, at).clamp(0, t - 1)  # ... and at the last
    padded = x.gather(-1, at[:, None, None, :].expand(-1, x.shape[1], w, -1))
    filtered = padded.unfold(-1, width, 1).median(-1).values  # [B, heads, W, T]
    short = (frames <= half)[:, None, None, :]  # as median_filter: too short to filter
    return torch.where(short, x, filtered).mean(1)
