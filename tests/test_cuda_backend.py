"""The torch/CUDA backend against the numpy reference engine.

Without a GPU the backend runs on torch's CPU device in float32, which must reproduce the numpy
graph (mel, encoder, decoder logits, alignment scores, greedy transcripts of the dev corpus), and
its batched paths must give each window what it gets alone. Tests marked ``gpu`` check what only
CUDA has (fp16 weights, CUDA graph replay, device memory per stream) and skip without it.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from streamd.audio import load_audio  # noqa: E402
from whisper_engine.backends.cuda import CudaBackend  # noqa: E402
from whisper_engine.decoding import DecodingOptions, GreedyRules, decode  # noqa: E402
from whisper_engine.engine import Engine  # noqa: E402
from whisper_engine.transcribe import TranscribeOptions, transcribe  # noqa: E402

from .conftest import need_corpus, speech_file  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (torch.cuda.is_available() is false)")

# Short files of different speakers and lengths for the default run; -m slow runs them all.
FAST_FILES = [
    "dev_jfk_inaugural_1961",
    "dev_librispeech_1221-135766-0002",
    "dev_vctk_p287_002_clean",
    "dev_vctk_p287_003_clean",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Decoder steps are small products: on a shared 2-core box, a second OpenMP thread that is
    not scheduled makes every op wait (measured 10x slower), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backend(engine) -> CudaBackend:
    return CudaBackend(engine.weights, device="cpu")


@pytest.fixture(scope="module")
def torch_engine(engine, backend) -> Engine:
    return Engine(engine.weights, backend, engine.tokenizer)


@pytest.fixture(scope="module")
def rules(engine) -> GreedyRules:
    return GreedyRules.from_tokenizer(engine.tokenizer, engine.weights)


@pytest.fixture(scope="module")
def mels(engine, jfk) -> list[np.ndarray]:
    """Windows of different lengths and frame buckets (one exactly on a bucket edge)."""
    audio = load_audio(jfk)
    mel = engine.backend.log_mel(audio, padding=16000)
    return [mel[:, :frames] for frames in (1100, 500, 300, 730)]


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_devices_name_the_torch_device_that_runs_every_stage(backend):
    assert backend.devices == {"mel": "cpu (torch)", "encoder": "cpu (torch)", "decoder": "cpu (torch)"}


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised where CUDA is missing")
def test_asking_for_cuda_without_a_gpu_is_an_error_not_a_cpu_fallback(engine):
    with pytest.raises(RuntimeError, match="CUDA"):
        CudaBackend(engine.weights, device="cuda")


@pytest.mark.parametrize(("samples", "padding"), [(16000 * 7 + 37, 0), (16000 * 3, 16000), (150, 0), (4000, 100)])
def test_log_mel_matches_numpy(engine, backend, jfk, samples, padding):
    audio = load_audio(jfk)[:samples]
    expected = engine.backend.log_mel(audio, padding=padding)
    got = backend.log_mel(audio, padding=padding)
    assert got.shape == expected.shape
    assert _max_diff(got, expected) < 1e-4


def test_batched_log_mel_equals_one_at_a_time(backend, jfk):
    audio = load_audio(jfk)
    windows, paddings = [audio[:48000], audio[16000:100000], audio[:3000]], [16160, 300, 50]
    batched = backend.log_mel_batch(windows, paddings)
    for window, padding, mel in zip(windows, paddings, batched, strict=True):
        alone = backend.log_mel_tensor(window, padding)
        assert mel.shape == alone.shape
        assert float((mel - alone).abs().max()) < 1e-5


def test_encoder_matches_numpy(engine, backend, mels):
    expected = engine.backend.encode(mels[0]).x
    got = backend.encode(mels[0]).x.numpy()
    assert got.shape == expected.shape == (550, 384)
    assert _max_diff(got, expected) < 2e-3 * np.abs(expected).max()


def test_decoder_logits_and_reorder_match_numpy(engine, backend, mels, rules):
    tok = engine.tokenizer
    initial = np.tile(GreedyRules.initial_tokens(tok), (2, 1))
    ref = engine.backend.decoder(engine.backend.encode(mels[2]), 2)
    got = backend.decoder(backend.encode(mels[2]), 2)
    expected = ref.step(initial, positions=(0, -1))
    assert _max_diff(got.step(initial, positions=(0, -1)), expected) < 1e-3
    tokens = expected[:, -1].argmax(-1)
    for step in range(4):
        if step == 2:  # rows swap hypotheses, as beam search does
            ref.reorder(np.array([1, 0]))
            got.reorder(np.array([1, 0]))
            tokens = tokens[::-1].copy()
        tokens = np.array([tokens[0], tok.encode(" the")[0]])
        expected = ref.step(tokens[:, None])
        assert _max_diff(got.step(tokens[:, None]), expected) < 1e-3
        tokens = expected[:, -1].argmax(-1)


def test_alignment_scores_match_numpy(engine, backend, mels):
    tok = engine.tokenizer
    tokens = np.array([*tok.sot_sequence(), tok.no_timestamps, *tok.encode(" And so my fellow Americans"), tok.eot])
    expected = engine.backend.alignment(engine.backend.encode(mels[0]), tokens)
    got = backend.alignment(backend.encode(mels[0]), tokens)
    assert got.shape == expected.shape == (len(engine.weights.alignment_heads), len(tokens), 550)
    assert _max_diff(got, expected) < 1e-3


def test_streaming_window_words_match_numpy(engine, torch_engine, jfk):
    audio = load_audio(jfk)[: 16000 * 8]
    prefix = engine.tokenizer.encode(" And so, my fellow Americans")
    expected = engine.continue_window(audio, [], prefix)
    got = torch_engine.continue_window(audio, [], prefix)
    assert [w.word for w in got] == [w.word for w in expected]
    assert all(abs(a.start - b.start) < 0.05 and abs(a.end - b.end) < 0.05 for a, b in zip(got, expected, strict=True))


def _same_tokens(engine, torch_engine, files) -> list[str]:
    """Files whose greedy transcript tokens differ between the numpy and the torch engine."""
    options = TranscribeOptions(word_timestamps=False)
    differ = []
    for path in files:
        audio = load_audio(path)
        expected = [t for s in transcribe(engine, audio, options).segments for t in s.tokens]
        got = [t for s in transcribe(torch_engine, audio, options).segments for t in s.tokens]
        if got != expected:
            differ.append(path.stem)
    return differ


def test_greedy_transcripts_match_numpy_on_short_files(engine, torch_engine):
    assert _same_tokens(engine, torch_engine, [speech_file(name) for name in FAST_FILES]) == []


@pytest.mark.slow
def test_greedy_transcripts_match_numpy_on_90_percent_of_the_corpus(engine, torch_engine):
    files = need_corpus()
    differ = _same_tokens(engine, torch_engine, files)
    assert len(differ) <= 0.1 * len(files), differ


def test_encode_batch_equals_encoding_each_window_alone(backend, mels):
    batched = backend.encode_batch(mels)
    for mel, features in zip(mels, batched, strict=True):
        alone = backend.encode(mel).x
        assert features.x.shape == alone.shape == (mel.shape[-1] // 2, 384)
        assert float((features.x - alone).abs().max()) < 1e-4 * float(alone.abs().max())


def _requests(tok, n: int) -> tuple[list[list[int]], list[bool], list[DecodingOptions]]:
    """Row ``i``'s initial tokens, whether it has a forced prefix, and decode()'s equivalent."""
    kinds = [((), ()), (tuple(tok.encode(" Ask not.")), ()), ((), tuple(tok.encode(" And so")))]
    prompts, prefixed, options = [], [], []
    for i in range(n):
        prompt, prefix = kinds[i % len(kinds)]
        prompts.append(GreedyRules.initial_tokens(tok, prompt, prefix))
        prefixed.append(bool(prefix))
        options.append(DecodingOptions(without_timestamps=True, prompt=prompt, prefix=prefix, sample_len=40))
    return prompts, prefixed, options


def test_decode_greedy_batch_equals_decoding_each_window_alone(engine, backend, mels, rules):
    tok, w = engine.tokenizer, engine.weights
    features = backend.encode_batch(mels)
    prompts, prefixed, options = _requests(tok, len(mels))
    batched = backend.decode_greedy_batch(features, prompts, 40, rules=rules, prefixed=prefixed)
    state = backend.greedy.state
    assert state is not None and state.capacity == 4  # one batch bucket, one launch per step
    for f, opts, got in zip(features, options, batched, strict=True):
        alone = decode(backend, f, tok, opts, w.suppress_tokens, w.suppress_tokens_begin)
        assert got.tokens == alone.tokens
        # The batched rows run in float32 where decoding's scores are float64: over 40 steps the
        # sum drifts by about 2e-4 of itself with torch 2.14 (-8.8098 against -8.8112).
        assert got.sum_logprob == pytest.approx(alone.sum_logprob, rel=5e-4, abs=1e-3)
        assert got.no_speech_prob == pytest.approx(alone.no_speech_prob, abs=1e-4)
    assert batched[0].tokens, "the jfk window has words"


def test_decode_greedy_batch_rows_keep_their_own_limits(engine, backend, mels, rules):
    features = backend.encode_batch(mels[:3])
    prompts, prefixed, _ = _requests(engine.tokenizer, 3)

    def tokens(max_tokens, rows=slice(None)):
        found = backend.decode_greedy_batch(
            features[rows], prompts[rows], max_tokens, rules=rules, prefixed=prefixed[rows]
        )
        return [r.tokens for r in found]

    full, cut, alone = tokens(40), tokens([40, 3, 40]), tokens(3, slice(1, 2))
    assert cut[0] == full[0] and cut[2] == full[2]
    assert cut[1] == full[1][:3] == alone[0]


def test_decode_state_per_stream_is_bounded(backend):
    # KV cache for 448 tokens and cross K/V for 1500 positions, 4 layers of 384, float32 here.
    assert backend.decode_state_bytes_per_stream() < 32 * 2**20


# -- GPU only ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_backend(engine) -> CudaBackend:
    return CudaBackend(engine.weights, device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_gpu_devices_and_mel(engine, gpu_backend, jfk):
    assert all(v.startswith("cuda:") for v in gpu_backend.devices.values())
    audio = load_audio(jfk)
    assert _max_diff(gpu_backend.log_mel(audio, 16000), engine.backend.log_mel(audio, 16000)) < 1e-3


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_equals_eager_steps(engine, gpu_backend, mels, rules):
    features = gpu_backend.encode_batch(mels)
    prompts, prefixed, _ = _requests(engine.tokenizer, len(mels))
    gpu_backend.use_graphs = False
    eager = gpu_backend.decode_greedy_batch(features, prompts, 40, rules=rules, prefixed=prefixed)
    gpu_backend.use_graphs = True
    graphed = gpu_backend.decode_greedy_batch(features, prompts, 40, rules=rules, prefixed=prefixed)
    again = gpu_backend.decode_greedy_batch(features, prompts, 40, rules=rules, prefixed=prefixed)
    assert gpu_backend.greedy.graphs, "the steps ran as CUDA graphs"
    assert graphed == eager == again


@pytest.mark.gpu
@needs_cuda
def test_fp16_gpu_greedy_mostly_agrees_with_float32(engine, backend, gpu_backend, mels, rules):
    prompts, prefixed, _ = _requests(engine.tokenizer, len(mels))
    gpu = gpu_backend.decode_greedy_batch(gpu_backend.encode_batch(mels), prompts, 40, rules=rules, prefixed=prefixed)
    cpu = backend.decode_greedy_batch(backend.encode_batch(mels), prompts, 40, rules=rules, prefixed=prefixed)
    assert sum(g.tokens == c.tokens for g, c in zip(gpu, cpu, strict=True)) >= len(mels) - 1


@pytest.mark.gpu
@needs_cuda
def test_gpu_memory_per_stream_is_bounded(engine, gpu_backend, mels, rules):
    n = 64
    features = gpu_backend.encode_batch(mels)
    prompts = [GreedyRules.initial_tokens(engine.tokenizer)] * n
    rows = [features[i % len(features)] for i in range(n)]
    gpu_backend.decode_greedy_batch(rows[:1], prompts[:1], 8, rules=rules)  # state for batch 1
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    gpu_backend.decode_greedy_batch(rows, prompts, 40, rules=rules)
    torch.cuda.synchronize()
    per_stream = (torch.cuda.max_memory_allocated() - base) / n
    print(f"GPU memory per stream at batch {n}: {per_stream / 2**20:.1f} MiB")
    assert per_stream < 32 * 2**20


@pytest.mark.gpu
@needs_cuda
def test_gpu_alignment_matrices_equal_the_host_ones(engine, gpu_backend, mels):
    from whisper_engine.timing import alignment_matrix, alignment_tokens

    tok = engine.tokenizer
    features = gpu_backend.encode_batch(mels)
    rows = [alignment_tokens(tok, tok.encode(t)) for t in (" And so, my fellow", " Ask", " Ask not what", " Yet")]
    frames = [2 * f.x.shape[0] - 30 for f in features]
    first = len(tok.sot_sequence())
    device = gpu_backend.alignment_matrix_batch(features, rows, frames, first)
    for qk, n, got in zip(gpu_backend.alignment_batch(features, rows), frames, device, strict=True):
        np.testing.assert_allclose(got, alignment_matrix(qk, n, first), atol=1e-3)
