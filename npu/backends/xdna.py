"""The ``xdna`` backend: the quantised graph of :mod:`npu.quant` on an AMD XDNA NPU through pyxrt.

Every op of the mel stage (after framing), the encoder and (with ``decoder_on="npu"``, the
``xdna-all`` backend) each decoder step runs as a kernel call on the NPU, queued per stage and
submitted as one runlist (one per mel window, one per encoder window, one per decoder step). With
``decoder_on="cpu"`` (``xdna``, the placement :mod:`npu.xdna.perf` favours) the encoder's output
is read back once per window and the float32 CPU decoder takes it from there.

Data stays in device buffer objects between calls: the encoder's output, the decoder's
per-window cross-attention keys and values, and the decoder's self-attention KV cache, one buffer
object per window with a sub-buffer per layer, into which each step's quantise kernel writes the
new keys and values in place. Only what the host needs
crosses: mel frames in, log-mel out; the mel window in; token embeddings in and logits out.

On the CPU: cutting audio into frames and Whisper's clamp of the log-mel (one max per window),
the token embedding lookup, the search over logits, and beam reordering of the cache.

Encoding is double-buffered: :meth:`XdnaBackend.encode_async` uploads a window into its own
pooled buffers and submits it from a thread, so the next window's mel and upload proceed while
the NPU encodes the previous one.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from whisper_engine.backend import Backend, DecoderSession
from whisper_engine.weights import WhisperWeights

from .. import golden
from ..quant import QLinear, QuantDecoder, QuantEncoder
from ..xdna.artifacts import ABSENT, Artifacts, Call, Operand
from ..xdna.runtime import Runtime

__all__ = ["XdnaBackend", "XdnaFeatures"]

log = logging.getLogger(__name__)


def mat(offset: int = 0, row: int = 0, col: int = 1, batch: int = 0) -> Operand:
    return Operand(offset, batch, row, col)


@dataclass
class Tensor:
    """A buffer object holding ``count`` elements of ``dtype`` (a view into the pool)."""

    bo: object
    dtype: type[np.generic]
    count: int


class _Queue:
    """Calls of one stage, submitted together as one runlist."""

    def __init__(self, rt: Runtime, stage: str) -> None:
        self.rt, self.stage, self.runs = rt, stage, []

    def call(self, op: str, batch: int, m: int, k: int, n: int, *args: tuple[Tensor | object | None, Operand]) -> None:
        bos = [None if t is None else (t.bo if isinstance(t, Tensor) else t) for t, _ in args]
        operands = tuple(o if t is not None else ABSENT for t, o in args)
        self.runs.append(self.rt.prepare(self.stage, Call(op, batch, m, k, n, operands), bos))

    def submit(self) -> None:
        runs, self.runs = self.runs, []
        self.rt.execute(self.stage, runs)


@dataclass
class _Linear:
    """An int8 (or int16-input) linear layer's weights on the device."""

    weight: Tensor  # int8 [N, K]
    scale: Tensor  # float32 [N]
    bias: Tensor | None
    n: int
    k: int
    bits: int


@dataclass
class XdnaFeatures:
    """One window's encoder output, resident on the device, and its cross-attention K/V."""

    x: Tensor  # float32 [T, d]
    frames: int  # T
    cross: list | None = None  # per layer (kq, ks, vq_t, vs) device tensors
    on_cpu: object | None = None  # the output read back, for a decoder on the CPU
    _finalizer: object = field(default=None, repr=False)


class XdnaBackend(Backend):
    name = "xdna"

    def __init__(
        self,
        weights: WhisperWeights,
        artifacts: Artifacts | None = None,
        pyxrt=None,
        decoder_on: str = "npu",
        cpu: Backend | None = None,
    ) -> None:
        """``decoder_on="cpu"`` is the placement :mod:`npu.xdna.perf` predicts to be faster on
        npu1 today: a decoder step is ~156 kernel calls, whose dispatch alone (~5.6 ms) costs more
        than the CPU's whole float32 step; the encoder's output is then read back once per window
        for the CPU decoder (``cpu``, or a new :class:`~whisper_engine.backends.cpu.CpuBackend`), and the
        decoder is neither quantised nor uploaded."""
        super().__init__(weights)
        if decoder_on not in ("npu", "cpu"):
            raise ValueError(f"decoder_on must be npu or cpu, got {decoder_on!r}")
        self.rt = Runtime(artifacts or Artifacts.load(), pyxrt)
        self.label = f"xdna ({self.rt.artifacts.manifest.get('device', 'npu1')})"
        self.encoder_model = QuantEncoder(weights)
        self.decoder_model: QuantDecoder | None = None
        self.cpu: Backend | None = None
        if decoder_on == "npu":
            self.decoder_model = QuantDecoder(weights)
        else:
            from whisper_engine.backends.cpu import CpuBackend

            self.cpu = cpu or CpuBackend(weights)
        self._lock = threading.Lock()  # one window's buffers are set up at a time
        self._upload_weights()

    @property
    def devices(self) -> dict[str, str]:
        return {"mel": self.label, "encoder": self.label, "decoder": self.label if self.cpu is None else "cpu"}

    # -- buffers ------------------------------------------------------------------------------

    def tensor(self, dtype: type[np.generic], count: int) -> Tensor:
        return Tensor(self.rt.buffer(count * np.dtype(dtype).itemsize), dtype, count)

    def upload(self, array: np.ndarray) -> Tensor:
        array = np.ascontiguousarray(array)
        t = self.tensor(array.dtype.type, array.size)
        self.rt.write(t.bo, array)
        return t

    def free(self, *tensors: Tensor | None) -> None:
        self.rt.release(*(t.bo for t in tensors if t is not None))

    def read(self, t: Tensor, count: int | None = None, offset: int = 0) -> np.ndarray:
        itemsize = np.dtype(t.dtype).itemsize
        return self.rt.read(t.bo, t.dtype, t.count if count is None else count, offset * itemsize)

    def _linear(self, q: QLinear) -> _Linear:
        bias = None if q.bias is None else self.upload(q.bias)
        n, k = q.weight.shape
        return _Linear(self.upload(q.weight), self.upload(q.scale), bias, n, k, q.activation_bits)

    def _norm(self, params: tuple[np.ndarray, np.ndarray]) -> tuple[Tensor, Tensor]:
        return self.upload(params[0]), self.upload(params[1])

    def _layer(self, layer: dict) -> dict:
        """A transformer layer's weights on the device: layer norms as (gamma, beta), the rest linear."""
        return {k: self._norm(v) if k.endswith("_ln") else self._linear(v) for k, v in layer.items()}

    def _upload_weights(self) -> None:
        enc = self.encoder_model
        self.conv1 = [self._linear(t) for t in enc.conv1]
        self.conv2 = [self._linear(t) for t in enc.conv2]
        self.enc_positions = self.upload(enc.positions)
        self.enc_layers = [self._layer(layer) for layer in enc.layers]
        self.enc_ln_post = self._norm(enc.ln_post)
        self.basis = self.upload(golden.dft_basis())
        dec = self.decoder_model
        if dec is not None:
            self.dec_layers = [self._layer(layer) for layer in dec.layers]
            self.dec_ln = self._norm(dec.ln)
            self.vocab = self._linear(dec.embedding)
            self.ones = self.upload(np.ones(max(64, self.dims.n_text_state), np.float32))

    # -- op helpers (row-major float32 / int8 matrices held in Tensors) ------------------------

    def _apply(
        self,
        qu: _Queue,
        lin: _Linear,
        x: Tensor,
        rows: int,
        out: Tensor,
        residual: Tensor | None = None,
        x_offset: int = 0,
        row_stride: int | None = None,
        out_offset: int = 0,
        out_stride: int | None = None,
    ) -> None:
        """``out = residual + dequant(gemm(quantize(x), W^T)) + b`` over ``rows`` rows."""
        k, n = lin.k, lin.n
        ld = k if row_stride is None else row_stride
        ldo = n if out_stride is None else out_stride
        xq = self.tensor(np.int8 if lin.bits == 8 else np.int16, rows * k)
        xs = self.tensor(np.float32, rows)
        acc = self.tensor(np.int32, rows * n)
        qop, gop = ("quantize", "gemm") if lin.bits == 8 else ("quantize_i16", "gemm_i16")
        qu.call(qop, 1, rows, 0, k, (x, mat(x_offset, ld)), (xq, mat(0, k)), (xs, mat(0, 1)))
        qu.call(gop, 1, rows, k, n, (xq, mat(0, k)), (lin.weight, mat(0, 1, k)), (acc, mat(0, n)))
        qu.call(
            "dequant", 1, rows, 0, n,
            (acc, mat(0, n)), (xs, mat(0, 1)), (lin.scale, mat()), (lin.bias, mat()),
            (residual, mat(out_offset, ldo)), (out, mat(out_offset, ldo)),
        )  # fmt: skip
        self._scratch.extend([xq, xs, acc])

    def _layernorm(self, qu: _Queue, params: tuple[Tensor, Tensor], x: Tensor, rows: int, out: Tensor) -> None:
        d = self.dims.n_audio_state
        qu.call("layernorm", 1, rows, 0, d, (x, mat(0, d)), (params[0], mat()), (params[1], mat()), (out, mat(0, d)))

    def _mlp(self, qu: _Queue, layer: dict, x: Tensor, rows: int, hbuf: Tensor, hidden: Tensor) -> None:
        """``x += fc2(gelu(fc1(layer_norm(x))))`` over ``rows`` rows."""
        width = layer["fc1"].n
        self._layernorm(qu, layer["mlp_ln"], x, rows, hbuf)
        self._apply(qu, layer["fc1"], hbuf, rows, hidden)
        qu.call("gelu", 1, rows, 0, width, (hidden, mat(0, width)), (None, ABSENT), (hidden, mat(0, width)))
        self._apply(qu, layer["fc2"], hidden, rows, x, residual=x)

    def _keys_values(self, qu: _Queue, src: Tensor, h: int, dh: int, t: int, row_stride: int, k_offset: int,
                     v_offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """A window's attention keys quantised per token and head ``[h, t, dh]`` and values per
        channel, read transposed ``[h, dh, t]``, from the float rows of ``src``."""
        kq, ks = self.tensor(np.int8, h * t * dh), self.tensor(np.float32, h * t)
        vq, vs = self.tensor(np.int8, h * dh * t), self.tensor(np.float32, h * dh)
        qu.call("quantize", h, t, 0, dh, (src, mat(k_offset, row_stride, batch=dh)), (kq, mat(0, dh, batch=t * dh)),
                (ks, mat(0, 1, batch=t)))  # fmt: skip
        qu.call("quantize", h, dh, 0, t, (src, mat(v_offset, 1, row_stride, batch=dh)),
                (vq, mat(0, t, batch=dh * t)), (vs, mat(0, 1, batch=dh)))  # fmt: skip
        return kq, ks, vq, vs

    def _attend(
        self,
        qu: _Queue,
        h: int,
        n: int,
        t: int,
        dh: int,
        q: tuple[Tensor, Operand],
        k: tuple[Tensor, Operand],
        ks: tuple[Tensor, Operand],
        v: tuple[Tensor, Operand],
        vs: tuple[Tensor, Operand],
        out: tuple[Tensor, Operand],
        *,
        values_per_token: bool = False,
        n_valid: Tensor | None = None,
        scores_out: Tensor | None = None,
    ) -> None:
        """Attention of ``h`` heads at once (the batch axis): ``n`` queries ``q`` (float32) over
        ``t`` quantised keys/values. Keys are given as the logical ``[dh, t]`` operand of the
        scores GEMM; values as the logical ``[t, dh]`` operand of the output GEMM."""
        qq, qs = self.tensor(np.int8, h * n * dh), self.tensor(np.float32, h * n)
        s_acc = self.tensor(np.int32, h * n * t)
        scores = scores_out or self.tensor(np.float32, h * n * t)
        p = self.tensor(np.float32, h * n * t)
        pq, ps = self.tensor(np.int8, h * n * t), self.tensor(np.float32, h * n)
        o_acc = self.tensor(np.int32, h * n * dh)
        qu.call("quantize", h, n, 0, dh, q, (qq, mat(0, dh, batch=n * dh)), (qs, mat(0, 1, batch=n)))
        qu.call("gemm", h, n, dh, t, (qq, mat(0, dh, batch=n * dh)), k, (s_acc, mat(0, t, batch=n * t)))
        qu.call(
            "dequant", h, n, 0, t,
            (s_acc, mat(0, t, batch=n * t)), (qs, mat(0, 1, batch=n)), ks, (None, ABSENT), (None, ABSENT),
            (scores, mat(0, t, batch=n * t)),
        )  # fmt: skip
        qu.call(
            "softmax", h, n, 0, t,
            (scores, mat(0, t, batch=n * t)), (n_valid, mat(0, 1, batch=0)),
            vs if values_per_token else (None, ABSENT), (p, mat(0, t, batch=n * t)),
        )  # fmt: skip
        qu.call("quantize", h, n, 0, t, (p, mat(0, t, batch=n * t)), (pq, mat(0, t, batch=n * t)),
                (ps, mat(0, 1, batch=n)))  # fmt: skip
        qu.call("gemm", h, n, t, dh, (pq, mat(0, t, batch=n * t)), v, (o_acc, mat(0, dh, batch=n * dh)))
        col_scale = (self.ones, mat(0, 1, 1, batch=0)) if values_per_token else vs
        qu.call(
            "dequant", h, n, 0, dh,
            (o_acc, mat(0, dh, batch=n * dh)), (ps, mat(0, 1, batch=n)), col_scale, (None, ABSENT), (None, ABSENT),
            out,
        )  # fmt: skip
        self._scratch.extend([qq, qs, s_acc, p, pq, ps, o_acc] + ([] if scores_out else [scores]))

    # -- mel ----------------------------------------------------------------------------------

    def log_mel(self, audio: np.ndarray, padding: int = 0) -> np.ndarray:
        frames = golden.frames_i16(audio, padding)  # framing on the CPU (a DMA gather on the NPU)
        f = len(frames)
        with self._lock:
            self._scratch: list[Tensor] = []
            qu = _Queue(self.rt, "mel")
            x = self.upload(frames)
            spec = self.tensor(np.int32, f * 402)
            out = self.tensor(np.float32, f * 80)
            qu.call("dft", 1, f, 400, 402, (x, mat(0, 400)), (self.basis, mat(0, 402)), (spec, mat(0, 402)))
            qu.call("mel_log", 1, f, 402, 80, (spec, mat(0, 402)), (out, mat(0, 80)))
            qu.submit()
            logmel = self.read(out, f * 80).reshape(f, 80)
            self.free(x, spec, out)
        return golden.mel.normalize(logmel)

    # -- encoder ------------------------------------------------------------------------------

    def encode(self, mel: np.ndarray) -> XdnaFeatures:
        return self.encode_async(mel).result()

    def encode_async(self, mel: np.ndarray) -> _PendingEncode:
        """Upload ``mel`` and submit its encoder runlist; returns at once. The NPU works while
        the caller prepares (and uploads) the next window."""
        n_frames = mel.shape[-1]
        if mel.shape[0] != self.dims.n_mels or n_frames % 2 or not 0 < n_frames <= 2 * self.dims.n_audio_ctx:
            raise ValueError(f"mel must be [{self.dims.n_mels}, even frames <= 3000], got {mel.shape}")
        with self._lock:
            self._scratch = []
            qu = _Queue(self.rt, "encoder")
            features = self._queue_encoder(qu, np.ascontiguousarray(mel.T, np.float32))
            scratch, self._scratch = self._scratch, []
            pending = _PendingEncode(self, qu, features, scratch)
            pending.start()
            return pending

    def _queue_encoder(self, qu: _Queue, mel_t: np.ndarray) -> XdnaFeatures:
        d, h = self.dims.n_audio_state, self.dims.n_audio_head
        dh = d // h
        f, n_mels = mel_t.shape
        t = f // 2
        padded = np.zeros((f + 2, n_mels), np.float32)
        padded[1:-1] = mel_t
        x_in = self.upload(padded)  # the window's input: the only upload (double-buffered slot)
        h1 = self.tensor(np.float32, (f + 2) * d)
        self.rt.write(h1.bo, np.zeros(d, np.float32), 0)  # conv2's zero padding rows
        self.rt.write(h1.bo, np.zeros(d, np.float32), (f + 1) * d * 4)
        x = self.tensor(np.float32, t * d)
        self._conv(qu, self.conv1, x_in, f, n_mels, 1, h1, d)  # rows 1..f of h1
        qu.call("gelu", 1, f, 0, d, (h1, mat(d, d)), (None, ABSENT), (h1, mat(d, d)))
        self._conv(qu, self.conv2, h1, t, d, 2, x, 0)
        qu.call("gelu", 1, t, 0, d, (x, mat(0, d)), (self.enc_positions, mat(0, d)), (x, mat(0, d)))
        hbuf = self.tensor(np.float32, t * d)
        qkv = self.tensor(np.float32, t * 3 * d)
        heads = self.tensor(np.float32, t * d)
        mlp = self.tensor(np.float32, t * 4 * d)
        for layer in self.enc_layers:
            self._layernorm(qu, layer["attn_ln"], x, t, hbuf)
            self._apply(qu, layer["qkv"], hbuf, t, qkv)
            kq, ks, vq, vs = self._keys_values(qu, qkv, h, dh, t, 3 * d, d, 2 * d)
            self._scratch.extend([kq, ks, vq, vs])
            self._attend(
                qu, h, t, t, dh,
                q=(qkv, mat(0, 3 * d, batch=dh)),
                k=(kq, mat(0, 1, dh, batch=t * dh)), ks=(ks, mat(0, 0, 1, batch=t)),
                v=(vq, mat(0, 1, t, batch=dh * t)), vs=(vs, mat(0, 0, 1, batch=dh)),
                out=(heads, mat(0, d, batch=dh)),
            )  # fmt: skip
            self._apply(qu, layer["out"], heads, t, x, residual=x)
            self._mlp(qu, layer, x, t, hbuf, mlp)
        out = self.tensor(np.float32, t * d)
        self._layernorm(qu, self.enc_ln_post, x, t, out)
        self._scratch.extend([x_in, h1, x, hbuf, qkv, heads, mlp])
        features = XdnaFeatures(out, t)
        features._finalizer = weakref.finalize(features, self._release_features, out, [])
        return features

    def _conv(
        self,
        qu: _Queue,
        taps: list[_Linear],
        x: Tensor,
        n_out: int,
        c_in: int,
        stride: int,
        out: Tensor,
        out_offset: int,
    ) -> None:
        """Kernel-3 convolution over zero-padded rows of ``x``: one quantise, then per tap a GEMM
        over every ``stride``-th row from row ``tap``, dequantised into the running sum."""
        rows = (n_out - 1) * stride + 3
        wide = taps[0].bits == 16
        qop, gop = ("quantize_i16", "gemm_i16") if wide else ("quantize", "gemm")
        xq, xs = self.tensor(np.int16 if wide else np.int8, rows * c_in), self.tensor(np.float32, rows)
        qu.call(qop, 1, rows, 0, c_in, (x, mat(0, c_in)), (xq, mat(0, c_in)), (xs, mat(0, 1)))
        n = taps[0].n
        for tap, lin in enumerate(taps):
            acc = self.tensor(np.int32, n_out * n)
            qu.call(gop, 1, n_out, c_in, n, (xq, mat(tap * c_in, stride * c_in)), (lin.weight, mat(0, 1, c_in)),
                    (acc, mat(0, n)))  # fmt: skip
            qu.call(
                "dequant", 1, n_out, 0, n,
                (acc, mat(0, n)), (xs, mat(tap, stride)), (lin.scale, mat()), (lin.bias, mat()),
                (out if tap else None, mat(out_offset, n)), (out, mat(out_offset, n)),
            )  # fmt: skip
            self._scratch.append(acc)
        self._scratch.extend([xq, xs])

    def _release_features(self, out: Tensor, cross: list) -> None:
        self.rt.release(out.bo, *(t.bo for t in cross))

    def _cross(self, features: XdnaFeatures) -> list:
        """Cross-attention keys (per token and head) and values (per channel) of every layer,
        computed once per window on the device and kept there."""
        if features.cross is not None:
            return features.cross
        d, h = self.dims.n_text_state, self.dims.n_text_head
        dh, t = d // h, features.frames
        with self._lock:
            self._scratch = []
            qu = _Queue(self.rt, "decoder")
            kv = self.tensor(np.float32, t * 2 * d)
            cross, owned = [], []
            for layer in self.dec_layers:
                self._apply(qu, layer["cross_kv"], features.x, t, kv)
                kv_q = self._keys_values(qu, kv, h, dh, t, 2 * d, 0, d)
                cross.append(kv_q)
                owned.extend(kv_q)
            qu.submit()
            self.free(kv, *self._scratch)
            self._scratch = []
        features.cross = cross
        features._finalizer.detach()
        features._finalizer = weakref.finalize(features, self._release_features, features.x, owned)
        return cross

    # -- decoder ------------------------------------------------------------------------------

    def _cpu_features(self, features: XdnaFeatures) -> object:
        """The encoder output read back once for the CPU decoder (``decoder_on="cpu"``)."""
        if features.on_cpu is None:
            from whisper_engine.backends.cpu import CpuFeatures

            features.on_cpu = CpuFeatures(self.read(features.x).reshape(features.frames, -1))
        return features.on_cpu

    def decoder(self, features: object, batch_size: int = 1) -> DecoderSession:
        assert isinstance(features, XdnaFeatures)
        if self.cpu is not None:
            return self.cpu.decoder(self._cpu_features(features), batch_size)
        return _XdnaSession(self, features, self._cross(features), batch_size)

    def alignment(self, features: object, tokens: np.ndarray) -> np.ndarray:
        assert isinstance(features, XdnaFeatures)
        if self.cpu is not None:
            return self.cpu.alignment(self._cpu_features(features), tokens)
        session = _XdnaSession(self, features, self._cross(features), 1)
        heads = [tuple(int(v) for v in p) for p in np.asarray(self.weights.alignment_heads)]
        try:
            return session.forward(np.asarray(tokens, np.int64)[None], positions=(), capture=heads)[1]
        finally:
            session.close()


class _PendingEncode:
    """A submitted encoder window: :meth:`result` waits for it and frees its scratch buffers."""

    def __init__(self, backend: XdnaBackend, queue: _Queue, features: XdnaFeatures, scratch: list[Tensor]) -> None:
        self.backend, self.queue, self.features, self.scratch = backend, queue, features, scratch
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        def submit() -> None:
            try:
                self.queue.submit()
            except BaseException as e:
                self._error = e

        self._thread = threading.Thread(target=submit, name="xdna-encode", daemon=True)
        self._thread.start()

    def result(self) -> XdnaFeatures:
        assert self._thread is not None
        self._thread.join()
        self.backend.free(*self.scratch)
        self.scratch = []
        if self._error is not None:
            raise self._error
        return self.features


class _XdnaSession(DecoderSession):
    """One window's decoder: the self-attention KV cache in one device buffer (a sub-buffer per
    layer for keys, values and their scales), written in place by each step."""

    def __init__(self, backend: XdnaBackend, features: XdnaFeatures, cross: list, batch: int) -> None:
        self.b = backend
        self.features, self.cross, self.batch = features, cross, batch
        d = backend.dims
        self.h, self.dh, self.ctx = d.n_text_head, d.n_text_state // d.n_text_head, d.n_text_ctx
        self.length = 0
        rows = batch * self.h * self.ctx
        per_layer = 2 * rows * self.dh + 2 * rows * 4  # keys, values (int8), their scales (float32)
        self.cache = backend.tensor(np.uint8, per_layer * d.n_text_layer)
        rt = backend.rt
        self.layers = []
        for li in range(d.n_text_layer):
            base = li * per_layer
            k = Tensor(rt.sub_buffer(self.cache.bo, rows * self.dh, base), np.int8, rows * self.dh)
            v = Tensor(rt.sub_buffer(self.cache.bo, rows * self.dh, base + rows * self.dh), np.int8, rows * self.dh)
            ks = Tensor(rt.sub_buffer(self.cache.bo, rows * 4, base + 2 * rows * self.dh), np.float32, rows)
            vs = Tensor(rt.sub_buffer(self.cache.bo, rows * 4, base + 2 * rows * self.dh + rows * 4), np.float32, rows)
            self.layers.append((k, ks, v, vs))
        self._finalizer = weakref.finalize(self, rt.release, self.cache.bo)

    def close(self) -> None:
        self._finalizer()

    def step(self, tokens: np.ndarray, positions: Sequence[int] = (-1,)) -> np.ndarray:
        return self.forward(np.asarray(tokens, np.int64), positions)[0]

    def forward(self, tokens: np.ndarray, positions: Sequence[int], capture: list[tuple[int, int]] | None = None):
        """Feed ``tokens`` ``[B, n]``; return (logits ``[B, len(positions), V]``, captured raw
        cross-attention scores ``[len(capture), n, T]`` of row 0)."""
        b = self.b
        d, h, dh, ctx = b.dims.n_text_state, self.h, self.dh, self.ctx
        batch, n = tokens.shape
        if batch != self.batch:
            raise ValueError(f"session has {self.batch} rows, got {batch}")
        start, end = self.length, self.length + n
        if end > ctx:
            raise ValueError(f"decoder context full: {end} > {ctx} tokens")
        t = self.features.frames
        rows = batch * n
        positions = [p % n for p in positions]
        capture = capture or []
        with b._lock:
            b._scratch = []
            qu = _Queue(b.rt, "decoder")
            x = b.upload(b.decoder_model.embed(tokens, start).reshape(rows, d))  # lookup on the CPU
            hbuf, heads = b.tensor(np.float32, rows * d), b.tensor(np.float32, rows * d)
            qkv, q = b.tensor(np.float32, rows * 3 * d), b.tensor(np.float32, rows * d)
            mlp = b.tensor(np.float32, rows * 4 * d)
            causal = b.upload(np.arange(start + 1, end + 1, dtype=np.int32))
            captured: dict[int, Tensor] = {}
            for li, layer in enumerate(b.dec_layers):
                k_cache, ks_cache, v_cache, vs_cache = self.layers[li]
                b._layernorm(qu, layer["attn_ln"], x, rows, hbuf)
                b._apply(qu, layer["qkv"], hbuf, rows, qkv)
                for r in range(batch):
                    src = r * n * 3 * d
                    base = r * h * ctx  # this row's first cache row
                    qu.call("quantize", h, n, 0, dh, (qkv, mat(src + d, 3 * d, batch=dh)),
                            (k_cache, mat((base + start) * dh, dh, batch=ctx * dh)),
                            (ks_cache, mat(base + start, 1, batch=ctx)))  # fmt: skip
                    qu.call("quantize", h, n, 0, dh, (qkv, mat(src + 2 * d, 3 * d, batch=dh)),
                            (v_cache, mat((base + start) * dh, dh, batch=ctx * dh)),
                            (vs_cache, mat(base + start, 1, batch=ctx)))  # fmt: skip
                    b._attend(
                        qu, h, n, end, dh,
                        q=(qkv, mat(src, 3 * d, batch=dh)),
                        k=(k_cache, mat(base * dh, 1, dh, batch=ctx * dh)), ks=(ks_cache, mat(base, 0, 1, batch=ctx)),
                        v=(v_cache, mat(base * dh, dh, 1, batch=ctx * dh)), vs=(vs_cache, mat(base, 0, 1, batch=ctx)),
                        out=(heads, mat(r * n * d, d, batch=dh)), values_per_token=True, n_valid=causal,
                    )  # fmt: skip
                b._apply(qu, layer["out"], heads, rows, x, residual=x)
                b._layernorm(qu, layer["cross_ln"], x, rows, hbuf)
                b._apply(qu, layer["cross_q"], hbuf, rows, q)
                kq, ks, vq, vs = self.cross[li]
                wanted = [head for (cl, head) in capture if cl == li]
                for r in range(batch):
                    scores = None
                    if wanted and r == 0:
                        scores = captured[li] = b.tensor(np.float32, h * n * t)
                    b._attend(
                        qu, h, n, t, dh,
                        q=(q, mat(r * n * d, d, batch=dh)),
                        k=(kq, mat(0, 1, dh, batch=t * dh)), ks=(ks, mat(0, 0, 1, batch=t)),
                        v=(vq, mat(0, 1, t, batch=dh * t)), vs=(vs, mat(0, 0, 1, batch=dh)),
                        out=(heads, mat(r * n * d, d, batch=dh)), scores_out=scores,
                    )  # fmt: skip
                b._apply(qu, layer["cross_out"], heads, rows, x, residual=x)
                b._mlp(qu, layer, x, rows, hbuf, mlp)
            b._layernorm(qu, b.dec_ln, x, rows, hbuf)
            vocab = b.dims.n_vocab
            logits = b.tensor(np.float32, batch * len(positions) * vocab)
            for i, p in enumerate(positions):
                # rows r * n + p of every batch row -> logits rows r * len(positions) + i
                b._apply(qu, b.vocab, hbuf, batch, logits, x_offset=p * d, row_stride=n * d,
                         out_offset=i * vocab, out_stride=len(positions) * vocab)  # fmt: skip
            qu.submit()
            if positions:
                out = b.read(logits).reshape(batch, len(positions), vocab)
            else:
                out = np.zeros((batch, 0, vocab), np.float32)
            # in the reference's order: by layer, then as listed
            qk = [
                b.read(captured[li]).reshape(h, n, t)[head]
                for li in range(len(b.dec_layers))
                for cl, head in capture
                if cl == li
            ]
            b.free(x, hbuf, heads, qkv, q, mlp, causal, logits, *captured.values(), *b._scratch)
            b._scratch = []
        self.length = end
        return out, (np.stack(qk) if capture else None)

    def reorder(self, source: np.ndarray) -> None:
        """Beam search: row ``i`` continues row ``source[i]``; the cache rows are permuted on the
        host (beam search is the offline path; streaming decodes greedily)."""
        source = np.asarray(source)
        if np.array_equal(source, np.arange(len(source))):
            return
        b = self.b
        for tensors in self.layers:
            for t in tensors:
                data = b.read(t).reshape(self.batch, -1)
                b.rt.write(t.bo, np.ascontiguousarray(data[source]))
