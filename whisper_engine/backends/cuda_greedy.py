"""The cuda backend's batched greedy decoder: many streams' windows decoded together, one launch
per step for every row, on a self-attention KV cache and cross-attention K/V preallocated on the
device for up to 256 rows. On CUDA each fixed-shape step is captured once as a CUDA graph per
(batch, audio, text) bucket and replayed; elsewhere the same step function runs eagerly. Argmax
runs on the device, so only the chosen tokens cross to the host, every few steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..backend import GreedyResult
from ..decoding import GreedyRules

if TYPE_CHECKING:
    from .cuda import CudaBackend, TorchFeatures

__all__ = ["DecodeState", "GreedyDecoder", "RowWatch", "bucket"]

Tensor = torch.Tensor


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` (the largest one when none does)."""
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


class DecodeState:
    """Static device buffers of the batched greedy decoder for ``capacity`` rows.

    Fixed addresses are what lets a captured CUDA graph be replayed: each call copies its inputs
    into these buffers, and every bucket's graph works on views of them.
    """

    def __init__(self, capacity: int, backend: CudaBackend) -> None:
        d, dev, dt = backend.dims, backend.device, backend.dtype
        dh = d.n_text_state // d.n_text_head
        self.capacity = capacity
        kv = (capacity, d.n_text_head, d.n_text_ctx, dh)
        cross = (capacity, d.n_text_head, d.n_audio_ctx, dh)
        self.self_k = [torch.zeros(kv, device=dev, dtype=dt) for _ in range(d.n_text_layer)]
        self.self_v = [torch.zeros(kv, device=dev, dtype=dt) for _ in range(d.n_text_layer)]
        self.cross_k = [torch.zeros(cross, device=dev, dtype=dt) for _ in range(d.n_text_layer)]
        self.cross_v = [torch.zeros(cross, device=dev, dtype=dt) for _ in range(d.n_text_layer)]
        self.cross_mask = torch.ones(capacity, 1, 1, d.n_audio_ctx, device=dev, dtype=torch.bool)
        self.tokens = torch.zeros(capacity, device=dev, dtype=torch.int64)
        self.pos = torch.zeros(capacity, device=dev, dtype=torch.int64)
        self.limit = torch.zeros(capacity, device=dev, dtype=torch.int64)
        self.done = torch.ones(capacity, device=dev, dtype=torch.bool)
        self.sum_lp = torch.zeros(capacity, device=dev, dtype=torch.float32)
        self.out = torch.zeros(capacity, d.n_text_ctx, device=dev, dtype=torch.int64)
        self.lps = torch.zeros(capacity, d.n_text_ctx, device=dev, dtype=torch.float32)  # per-token log-probs
        self.step = torch.zeros((), device=dev, dtype=torch.int64)
        self.eot = torch.zeros((), device=dev, dtype=torch.int64)
        self.bias = torch.zeros(d.n_vocab, device=dev, dtype=torch.float32)  # -inf on suppressed tokens
        self.rows = torch.arange(capacity, device=dev)
        self.text_range = torch.arange(d.n_text_ctx, device=dev)

    def mutable(self) -> list[Tensor]:
        """What one step changes besides the KV cache (saved around a graph's warm-up)."""
        return [self.tokens, self.pos, self.done, self.sum_lp, self.out, self.lps, self.step]

    def nbytes_per_row(self) -> int:
        tensors = [*self.self_k, *self.self_v, *self.cross_k, *self.cross_v, self.cross_mask, self.out, self.lps]
        return sum(t.element_size() * t.numel() for t in tensors) // self.capacity

    def nbytes(self) -> int:
        return self.nbytes_per_row() * self.capacity


class RowWatch:
    """The batched rows' tokens as they reach the host, for the loop guard.

    A row is checked after each new non-eot token, as :func:`whisper_engine.decoding.decode` does, so where
    it stops (and what it keeps) does not depend on how often tokens are copied back.
    """

    def __init__(self, limits: list[int], eot: int, looping: Callable[[int, list[int]], bool]) -> None:
        self.limits, self.eot, self.looping = limits, eot, looping
        self.tokens: list[list[int]] = [[] for _ in limits]  # generated so far, eot included
        self.open = [True] * len(limits)
        self.looped = [False] * len(limits)
        self.seen = 0  # columns fed so far

    def feed(self, columns: np.ndarray) -> list[int]:
        """Take the next columns ``[n, k]`` of every row's tokens; return rows that just looped."""
        stopped = []
        for r, new in enumerate(columns.tolist()):
            tokens = self.tokens[r]
            for t in new:
                if not self.open[r] or len(tokens) >= self.limits[r]:
                    self.open[r] = False
                    break
                tokens.append(t)
                if t == self.eot:
                    self.open[r] = False
                elif self.looping(r, tokens):
                    self.open[r], self.looped[r] = False, True
                    stopped.append(r)
        self.seen += columns.shape[1]
        return stopped


class GreedyDecoder:
    """The batched greedy decode of one :class:`~whisper_engine.backends.cuda.CudaBackend`: its
    static state, grown to the largest batch bucket seen, and the CUDA graphs captured on it."""

    def __init__(self, backend: CudaBackend) -> None:
        self.backend = backend
        self.state: DecodeState | None = None
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None
        # The windows whose cross K/V the state holds (row i: held[i]), from the last decode:
        # the alignment pass that follows reads them from there.
        self.held: list[TorchFeatures] = []

    def bytes_per_stream(self) -> int:
        """Device memory the batched decoder reserves per stream (KV cache, cross K/V, outputs)."""
        d = self.backend.dims
        elem = torch.finfo(self.backend.dtype).bits // 8
        kv = 2 * d.n_text_layer * d.n_text_state * (d.n_text_ctx + d.n_audio_ctx) * elem
        return kv + d.n_audio_ctx + (8 + 4) * d.n_text_ctx  # cross mask, tokens out, log-probs out

    def state_for(self, rows: int) -> DecodeState:
        """The static buffers, grown to the batch bucket of ``rows`` (growing drops the graphs
        captured on the old buffers)."""
        if self.state is None or self.state.capacity < rows:
            self.graphs.clear()
            self._pool = None  # torch frees a pool with its last graph: the old handle is dead
            self.state = None
            self.held = []
            self.state = DecodeState(bucket(rows, self.backend.batch_buckets), self.backend)
        return self.state

    def held_cross(self, feats: Sequence[TorchFeatures]) -> tuple[list[Tensor], list[Tensor], Tensor] | None:
        """Cross K/V ``[B, H, A, dh]`` per layer and their mask ``[B, 1, 1, A]`` of ``feats`` as the
        last decode left them in the state, or ``None`` when the state does not hold all of them
        (a later decode replaced them, or they were never decoded here). The caller holds the
        backend's lock from that decode on, so no other decode can overwrite them meanwhile."""
        st = self.state
        if st is None or not feats:
            return None
        row_of = {id(f): i for i, f in enumerate(self.held)}  # (held keeps them alive: ids are unique)
        rows = [row_of.get(id(f), -1) for f in feats]
        if min(rows) < 0:
            return None
        a = max(f.x.shape[0] for f in feats)  # these windows' own length (the state's is a bucket)
        first = rows[0]
        if rows == list(range(first, first + len(rows))):  # consecutive rows: views, no copy
            pick: slice | Tensor = slice(first, first + len(rows))
        else:
            pick = torch.tensor(rows, device=st.rows.device)
        return [c[pick, :, :a] for c in st.cross_k], [c[pick, :, :a] for c in st.cross_v], st.cross_mask[pick, :, :, :a]

    def _step(self, st: DecodeState, b: int, a: int, s: int) -> None:
        """One greedy step of rows ``[:b]``, attending to ``a`` encoder positions and ``s`` cache
        slots; reads and writes only ``st``'s buffers, so it can be captured as a CUDA graph."""
        rows, pos = st.rows[:b], st.pos[:b]
        x = (self.backend.embedding[st.tokens[:b]] + self.backend.text_positions[pos])[:, None]
        self_mask = (st.text_range[:s][None, :] <= pos[:, None])[:, None, None, :]

        def write(li: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            cache_k, cache_v = st.self_k[li][:b], st.self_v[li][:b]
            cache_k[rows, :, pos] = k[:, :, 0]
            cache_v[rows, :, pos] = v[:, :, 0]
            return cache_k[:, :, :s], cache_v[:, :, :s]

        cross_k = [c[:b, :, :a] for c in st.cross_k]
        cross_v = [c[:b, :, :a] for c in st.cross_v]
        hidden, _ = self.backend.decoder_layers(x, write, self_mask, cross_k, cross_v, st.cross_mask[:b, :, :, :a])
        logits = self.backend.logits(hidden[:, 0]) + st.bias
        live = ~st.done[:b]
        chosen = logits.argmax(-1)
        logprob = logits.log_softmax(-1).gather(1, chosen[:, None])[:, 0]
        logprob = torch.where(live, logprob, 0.0)
        st.sum_lp[:b] += logprob
        chosen = torch.where(live, chosen, st.eot)
        column = st.step.view(1, 1).expand(b, 1)
        st.out[:b].scatter_(1, column, chosen[:, None])
        st.lps[:b].scatter_(1, column, logprob[:, None])
        st.done[:b] |= (chosen == st.eot) | (st.step + 1 >= st.limit[:b])
        st.tokens[:b] = chosen
        st.pos[:b] = (pos + 1).clamp(max=self.backend.dims.n_text_ctx - 1)
        st.step.copy_((st.step + 1).clamp(max=self.backend.dims.n_text_ctx - 1))

    def _run_step(self, st: DecodeState, b: int, a: int, s: int) -> None:
        if not self.backend.use_graphs:
            self._step(st, b, a, s)
            return
        graph = self.graphs.get((b, a, s))
        if graph is None:
            graph = self._capture(st, b, a, s)
        graph.replay()

    def _capture(self, st: DecodeState, b: int, a: int, s: int) -> torch.cuda.CUDAGraph:
        """Capture one step for this bucket (CUDA only). Warm-up runs execute for real, so the
        state they advance is put back; the KV slots they write are rewritten by the real step."""
        saved = [t.clone() for t in st.mutable()]
        side = torch.cuda.Stream(self.backend.device)
        side.wait_stream(torch.cuda.current_stream(self.backend.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(st, b, a, s)
        torch.cuda.current_stream(self.backend.device).wait_stream(side)
        for t, v in zip(st.mutable(), saved, strict=True):
            t.copy_(v)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # Every graph keeps its results in ``st``, so one pool serves all of them: no two replay at once.
        # thread_local: another engine thread's launches (an encode, say) may go on during capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._step(st, b, a, s)
        self.graphs[(b, a, s)] = graph
        return graph

    def decode(
        self,
        feats: Sequence[TorchFeatures],
        prompts: Sequence[Sequence[int]],
        limits: list[int],
        prefixed: list[bool],
        rules: GreedyRules,
        looping: Callable[[int, list[int]], bool] | None = None,
    ) -> list[GreedyResult]:
        d, dev = self.backend.dims, self.backend.device
        n = len(prompts)
        if n == 0:
            return []
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) >= d.n_text_ctx:
            raise ValueError(f"prompts must hold 1 to {d.n_text_ctx - 1} tokens")
        limits = [max(1, min(m, d.n_text_ctx - length)) for m, length in zip(limits, lengths, strict=True)]
        b = bucket(n, self.backend.batch_buckets)
        st = self.state_for(b)
        frames = [f.x.shape[0] for f in feats]
        a = bucket(max(frames), self.backend.audio_buckets)

        # Cross K/V of every window into the static buffers, padded positions masked out.
        x = torch.nn.utils.rnn.pad_sequence([f.x for f in feats], batch_first=True)
        keys, values = self.backend.cross_kv(F.pad(x, (0, 0, 0, a - x.shape[1])))
        for li in range(d.n_text_layer):
            st.cross_k[li][:n, :, :a] = keys[li]
            st.cross_v[li][:n, :, :a] = values[li]
        t_audio = torch.tensor(frames, device=dev)
        st.cross_mask[:n, 0, 0, :a] = torch.arange(a, device=dev)[None, :] < t_audio[:, None]
        st.cross_mask[n:b] = True  # unused rows: finite attention, results ignored
        self.held = list(feats)

        # The prompts in one causal pass, right-padded; each row's last real position picks its
        # first token. Cache slots past a row's prompt are overwritten before they are attended.
        width = max(lengths)
        padded = np.full((n, width), rules.eot, np.int64)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = p
        tokens = torch.from_numpy(padded).to(dev)
        x = self.backend.embedding[tokens] + self.backend.text_positions[:width]

        def write(li: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            st.self_k[li][:n, :, :width] = k
            st.self_v[li][:n, :, :width] = v
            return k, v

        cross_k = [c[:n, :, :a] for c in st.cross_k]
        cross_v = [c[:n, :, :a] for c in st.cross_v]
        hidden, _ = self.backend.decoder_layers(
            x, write, None, cross_k, cross_v, st.cross_mask[:n, :, :, :a], is_causal=width > 1
        )
        rows = torch.arange(n, device=dev)
        last = torch.tensor(lengths, device=dev) - 1
        st.bias.zero_()
        st.bias[list(rules.suppress)] = -torch.inf
        logits = self.backend.logits(hidden[rows, last]) + st.bias
        begin = torch.zeros(d.n_vocab, device=dev, dtype=torch.bool)
        begin[list(rules.begin_suppress)] = True
        no_prefix = torch.tensor([not p for p in prefixed], device=dev)
        logits.masked_fill_(no_prefix[:, None] & begin[None, :], -torch.inf)
        chosen = logits.argmax(-1)
        st.sum_lp[:n] = logits.log_softmax(-1).gather(1, chosen[:, None])[:, 0]
        st.lps[:n, 0] = st.sum_lp[:n]
        st.limit[:n] = torch.tensor(limits, device=dev)
        st.eot.fill_(rules.eot)
        st.out[:n, 0] = chosen
        st.done[:n] = (chosen == rules.eot) | (st.limit[:n] <= 1)
        st.done[n:b] = True
        st.tokens[:n] = chosen
        st.tokens[n:b] = rules.eot
        st.pos[:n] = last + 1
        st.pos[n:b] = 0
        st.step.fill_(1)
        no_speech = torch.full((n,), float("nan"), device=dev)
        sot = [p.index(rules.sot) if rules.sot in p else -1 for p in map(list, prompts)]
        with_sot = [i for i, s in enumerate(sot) if s >= 0]
        if with_sot and rules.no_speech >= 0:
            idx = torch.tensor(with_sot, device=dev)
            at = torch.tensor([sot[i] for i in with_sot], device=dev)
            probs = self.backend.logits(hidden[idx, at]).softmax(-1)[:, rules.no_speech]
            no_speech[idx] = probs

        steps = max(limits)
        watch = None if looping is None else RowWatch(limits, rules.eot, looping)
        for i in range(1, steps):
            self._run_step(st, b, a, bucket(min(width + i, d.n_text_ctx), self.backend.text_buckets))
            if i % self.backend.done_check_every == 0:
                if watch is not None and (stopped := watch.feed(st.out[:n, watch.seen : i + 1].cpu().numpy())):
                    st.done[torch.tensor(stopped, device=dev)] = True
                if bool(st.done[:n].all()):
                    break
        out = st.out[:n, :steps].cpu().numpy()
        lps = st.lps[:n, :steps].cpu().numpy()
        no_speech_host = no_speech.cpu().numpy()
        if watch is not None:
            watch.feed(out[:, watch.seen :])
        results = []
        for i in range(n):
            row = watch.tokens[i] if watch is not None else out[i, : limits[i]].tolist()
            if rules.eot in row:
                row = row[: row.index(rules.eot) + 1]
            row_lps = lps[i, : len(row)].astype(np.float64)
            if row and row[-1] == rules.eot:
                row = row[:-1]
            looped = watch is not None and watch.looped[i]
            results.append(GreedyResult(row, float(row_lps.sum()), float(no_speech_host[i]), row_lps.tolist(), looped))
        return results
