"""Cross-stream batching on the cuda backend (run on torch's CPU device here).

``Engine.continue_windows`` must give every window what ``Engine.continue_window`` gives it alone
on the same backend, and a real daemon serving several live streams must decode them in batches
and report the batch sizes and the device memory per stream. The CPU backend keeps one job per
engine thread (tests/test_server.py and tests/test_stream.py check that path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import urllib.request
from types import SimpleNamespace

import jiwer
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from whisper_normalizer.english import EnglishTextNormalizer

torch = pytest.importorskip("torch")

from streamd.audio import load_audio  # noqa: E402
from streamd.hub import Source  # noqa: E402
from streamd.policy import TimedWord  # noqa: E402
from streamd.scheduler import Scheduler  # noqa: E402
from streamd.server import Daemon, ServerConfig  # noqa: E402
from streamd.service import ConfigError, add_serve_args, settings  # noqa: E402
from streamd.stream import Job  # noqa: E402
from whisper_engine.backend import Backend  # noqa: E402
from whisper_engine.backends.cuda import CudaBackend, TorchFeatures  # noqa: E402
from whisper_engine.decoding import GreedyRules  # noqa: E402
from whisper_engine.engine import Engine, WindowRequest  # noqa: E402
from whisper_engine.timing import alignment_matrix, alignment_tokens  # noqa: E402

from .conftest import reference, speech_file  # noqa: E402

normalise = EnglishTextNormalizer()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread: on a shared 2-core box a second OpenMP thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torch_engine(engine) -> Engine:
    return Engine(engine.weights, CudaBackend(engine.weights, device="cpu"), engine.tokenizer)


def _audio(name: str) -> np.ndarray:
    return load_audio(speech_file(name))


@pytest.fixture(scope="module")
def requests(engine) -> list[WindowRequest]:
    """Streaming windows of dev speech as the daemon sends them: different lengths (frame
    buckets), committed prefixes and prompts, two that loop (the same words said twice: the loop
    guard cuts them), one near the 30 s limit, one too short to decode."""
    tok = engine.tokenizer
    jfk = _audio("dev_jfk_inaugural_1961")
    said_twice = [np.concatenate([a, a]) for a in map(_audio, ["dev_vctk_p287_001_clean", "dev_vctk_p287_002_clean"])]
    return [
        WindowRequest(jfk[: 16000 * 8], [], tok.encode(" And so, my fellow Americans"), 500),
        WindowRequest(_audio("dev_librispeech_1221-135766-0002"), tok.encode(" Ask not."), [], 500),
        WindowRequest(jfk[16000 * 2 :], tok.encode(" my fellow Americans,"), tok.encode(" ask not"), 500),
        WindowRequest(said_twice[0], [], [], 500),
        WindowRequest(_audio("dev_vctk_p287_003_clean")[: 16000 * 3], [], [], 500),
        WindowRequest(said_twice[1], [], [], 300),
        WindowRequest(_audio("librivox_shakespeare_sonnets_first30s")[: 16000 * 28], tok.encode(" Sonnets."), []),
        WindowRequest(_audio("dev_librispeech_1221-135766-0001"), [], [], 500),
        WindowRequest(_audio("dev_librivox_sense_sensibility_0870"), [], [], 500),
        WindowRequest(_audio("dev_vctk_p287_004_noisy"), [], [], 500),
        WindowRequest(jfk[:100], [], [], 500),
    ]


class _OneWindowAtATime(Backend):
    """A backend seen through the one-window interface only: the engine then decodes each window
    with :func:`whisper_engine.decoding.decode`, as on the CPU."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.weights)
        self.inner = inner

    @property
    def devices(self) -> dict[str, str]:
        return self.inner.devices

    def log_mel(self, audio, padding=0):
        return self.inner.log_mel(audio, padding)

    def encode(self, mel):
        return self.inner.encode(mel)

    def decoder(self, features, batch_size=1):
        return self.inner.decoder(features, batch_size)

    def alignment(self, features, tokens):
        return self.inner.alignment(features, tokens)


def test_batched_windows_equal_each_window_decoded_alone(torch_engine, requests):
    one_at_a_time = Engine(torch_engine.weights, _OneWindowAtATime(torch_engine.backend), torch_engine.tokenizer)
    alone = one_at_a_time.continue_windows(requests)
    batched = torch_engine.continue_windows(requests)
    assert len(batched) == len(requests)
    assert batched[-1] == [] and alone[-1] == []  # under two mel frames: nothing to decode
    for got, expected in zip(batched, alone, strict=True):
        assert [w.word for w in got] == [w.word for w in expected]
        for g, e in zip(got, expected, strict=True):
            assert g.tokens == e.tokens
            assert abs(g.start - e.start) <= 0.021 and abs(g.end - e.end) <= 0.021  # one encoder frame
            assert g.p == pytest.approx(e.p, abs=1e-3)
    text = ["".join(w.word for w in words) for words in batched]
    assert "ask not" in text[0].lower() and text[1].strip()
    assert text[3].lower().count("stella") == 1, text[3]  # the loop was cut where it started


def test_batched_rows_stop_where_the_loop_guard_says(torch_engine):
    backend = torch_engine.backend
    tok = torch_engine.tokenizer
    rules = backend.greedy_rules(tok)
    jfk = _audio("dev_jfk_inaugural_1961")[: 16000 * 8]
    mel = backend.log_mel(jfk, padding=16000)[:, :900]
    features = backend.encode_batch([mel, mel])
    prompt = GreedyRules.initial_tokens(tok)
    full = backend.decode_greedy_batch(features, [prompt, prompt], 40, rules=rules)
    seen: list[tuple[int, int]] = []

    def looping(row: int, tokens: list[int]) -> bool:
        seen.append((row, len(tokens)))
        return row == 1 and len(tokens) == 5

    guarded = backend.decode_greedy_batch(features, [prompt, prompt], 40, rules=rules, looping=looping)
    assert guarded[0].tokens == full[0].tokens and not guarded[0].looped
    assert guarded[1].tokens == full[1].tokens[:5] and guarded[1].looped
    assert guarded[1].token_logprobs == pytest.approx(full[1].token_logprobs[:5])
    assert max(n for row, n in seen if row == 1) == 5  # checked token by token, never past the stop
    assert guarded[0].sum_logprob == pytest.approx(full[0].sum_logprob)


def test_batched_alignment_equals_alignment_alone(torch_engine, requests):
    backend, tok = torch_engine.backend, torch_engine.tokenizer
    mels = [backend.log_mel(r.audio, padding=16000)[:, : 2 * (len(r.audio) // 320)] for r in requests[:3]]
    features = backend.encode_batch(mels)
    rows = [alignment_tokens(tok, tok.encode(text)) for text in (" And so, my fellow", " Yet these", " Ask not what")]
    batched = backend.alignment_batch(features, rows)
    for f, row, got in zip(features, rows, batched, strict=True):
        alone = backend.alignment(f, row)
        assert got.shape == alone.shape
        assert float(np.abs(got - alone).max()) < 1e-3


def test_alignment_after_a_decode_reuses_its_cross_attention_and_gives_the_same_scores(torch_engine, requests):
    """The alignment pass that follows a batched decode reads the windows' cross-attention K/V
    the decode left on the device (any subset of its rows, in any order) instead of projecting
    the encoder output again, and gets the scores a fresh projection gives; windows a later
    decode replaced are projected again."""
    backend, tok = torch_engine.backend, torch_engine.tokenizer
    mels = [backend.log_mel(r.audio, padding=16000)[:, : 2 * (len(r.audio) // 320)] for r in requests[:4]]
    features = backend.encode_batch(mels)
    prompt = GreedyRules.initial_tokens(tok)
    backend.decode_greedy_batch(features, [prompt] * 4, 8, rules=backend.greedy_rules(tok))
    texts = (" And so, my fellow", " Yet these", " Ask not what", " Stella")
    rows = [alignment_tokens(tok, tok.encode(text)) for text in texts]
    for pick in ([0, 1, 2, 3], [1, 2], [3, 0]):  # all rows; consecutive rows (views); others (a gather)
        chosen = [features[i] for i in pick]
        assert backend.greedy.held_cross(chosen) is not None
        reused = backend.alignment_batch(chosen, [rows[i] for i in pick])
        for i, got in zip(pick, reused, strict=True):
            alone = backend.alignment(features[i], rows[i])  # its own projection of the features
            assert got.shape == alone.shape
            assert float(np.abs(got - alone).max()) < 1e-3
    backend.decode_greedy_batch(features[:1], [prompt], 4, rules=backend.greedy_rules(tok))
    assert backend.greedy.held_cross(features[1:2]) is None  # replaced: projected again
    again = backend.alignment_batch(features[1:2], rows[1:2])[0]
    assert float(np.abs(again - backend.alignment(features[1], rows[1])).max()) < 1e-3


def test_encoding_audio_in_one_pass_equals_mel_then_encode(torch_engine, requests):
    backend, engine = torch_engine.backend, torch_engine
    audios = [r.audio for r in requests] + [requests[0].audio[:4000]]
    frames = [engine._encoder_frames(min(len(a) // 320 * 2, 3000), 500) for a in audios]
    paddings = [engine.window_padding(len(a), 500) for a in audios]
    fused = backend.encode_audio_batch(audios, paddings, frames)
    mels = backend.log_mel_batch(audios, paddings)
    apart = backend.encode_batch([m[:, :f] for m, f in zip(mels, frames, strict=True)])
    assert len({f.x.shape[0] for f in fused}) > 1  # windows of different lengths in one call
    for got, expected in zip(fused, apart, strict=True):
        assert got.x.shape == expected.x.shape
        assert float((got.x - expected.x).abs().max()) < 1e-4


def test_device_alignment_matrices_equal_the_host_ones(torch_engine, requests):
    """The softmax, standardisation and median filter of many windows on the device give what
    :func:`whisper_engine.timing.alignment_matrix` gives each on the host: windows and token rows of
    different lengths (masked padding), a window too short to filter, and a reflection at each
    window's own last frame."""
    backend, tok = torch_engine.backend, torch_engine.tokenizer
    mels = [backend.log_mel(r.audio, padding=16000)[:, : 2 * (len(r.audio) // 320)] for r in requests[:3]]
    features = backend.encode_batch(mels)
    features += [TorchFeatures(features[0].x[:3]), TorchFeatures(features[1].x[:9])]
    texts = (" And so, my fellow", " Yet these", " Ask not what your country", " Ask", " Ask not")
    rows = [alignment_tokens(tok, tok.encode(text)) for text in texts]
    frames = [2 * f.x.shape[0] for f in features]
    frames[1] -= 40  # fewer real frames than encoder positions: the matrix stops at the audio
    first = len(tok.sot_sequence())
    device = backend.alignment_matrix_batch(features, rows, frames, first)
    for qk, n, got in zip(backend.alignment_batch(features, rows), frames, device, strict=True):
        expected = alignment_matrix(qk, n, first)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_memory_report_bounds_the_decoder_state_per_stream(torch_engine):
    report = torch_engine.backend.memory_report()
    per_stream = report["decode_state_bytes_per_stream"]
    assert 0 < per_stream < 32 * 2**20
    if report["decode_state_rows"]:  # the state exists once a batch ran: rows x per-stream bytes
        assert report["decode_state_bytes"] == report["decode_state_rows"] * per_stream


def test_max_batch_is_a_setting_like_the_others(tmp_path):
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    assert settings(parser.parse_args([]), {})["max_batch"] == 64
    assert settings(parser.parse_args(["--max-batch", "8"]), {})["max_batch"] == 8
    assert settings(parser.parse_args([]), {"STREAMD_MAX_BATCH": "4"})["max_batch"] == 4
    config = tmp_path / "s.toml"
    config.write_text('max_batch = 16\nbackend = "cuda"\ncuda_device = "cuda:1"\n')
    values = settings(parser.parse_args(["--config", str(config)]), {})
    assert (values["max_batch"], values["backend"], values["cuda_device"]) == (16, "cuda", "cuda:1")
    with pytest.raises(ConfigError, match="max_batch must be at least 1"):
        settings(parser.parse_args(["--max-batch", "0"]), {})


def test_only_a_batching_backend_gets_batches(engine, torch_engine):
    assert Scheduler(engine, max_batch=64).max_batch == 1  # numpy: one job per engine thread, as before
    assert Scheduler(torch_engine, max_batch=8).max_batch == 8
    cpu = Daemon(engine, ServerConfig(port=0))
    assert cpu.status.health()["engine"]["max_batch"] == 1 and "device_memory" not in cpu.status.health()["engine"]
    body = cpu.metrics.render()[0].decode()
    assert "streamd_max_batch 1.0" in body and "streamd_device_memory_bytes" not in body


class _Owner:
    def __init__(self) -> None:
        self.messages: list[dict] = []

    def put(self, message) -> None:
        self.messages.append(json.loads(message.text))


async def test_a_failed_batch_is_retried_job_by_job_and_only_the_bad_job_errs():
    def run(engine, jobs, mels):
        if len(jobs) > 1:
            raise RuntimeError("batch failed")
        if jobs[0].prefix == "bad":
            raise ValueError("bad window")
        return [[TimedWord(" hello", jobs[0].offset, jobs[0].offset + 0.5, 0.9)]]

    batching = SimpleNamespace(backend=SimpleNamespace(max_batch=256, mel_from_audio=True))
    scheduler = Scheduler(batching, workers=1, max_batch=8, run=run)
    sources = [Source(f"s{i}", "ws", {}, set()) for i in range(2)]
    for source in sources:
        source.owner = _Owner()
    jobs = [Job(np.zeros(16000, np.float32), 0.0, "", "", True), Job(np.zeros(16000, np.float32), 0.0, "", "bad", True)]
    await scheduler._execute(list(zip(sources, jobs, strict=True)))
    good, bad = (s.owner.messages for s in sources)
    assert [m["text"] for m in good if m["type"] == "final"] == ["hello"]
    assert [m["code"] for m in bad if m["type"] == "error"] == ["engine_error"]
    assert scheduler.stats.failures == 1 and scheduler.stats.jobs == 2 and scheduler.stats.last_batch == 2
    scheduler._executor.shutdown()
    scheduler._mel_executor.shutdown()


# -- a real daemon -------------------------------------------------------------------------

LIVE = ["dev_jfk_inaugural_1961", "dev_librispeech_1221-135766-0002", "dev_vctk_p287_003_clean"]


async def _stream(port: int, name: str, speed: float = 2.0) -> list[dict]:
    """One client sending ``name`` at ``speed`` times real time; every message it gets back."""
    audio = _audio(name)
    step = 1600
    messages: list[dict] = []
    async with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
        start = {
            "type": "start",
            "protocol": 1,
            "source": name,
            "audio": {"encoding": "pcm_f32le", "sample_rate": 16000},
        }
        await ws.send(json.dumps(start))

        async def receive() -> None:
            try:
                async for frame in ws:
                    messages.append(json.loads(frame))
            except ConnectionClosed:
                pass

        receiving = asyncio.create_task(receive())
        for i in range(0, len(audio), step):
            await ws.send(audio[i : i + step].astype("<f4").tobytes())
            await asyncio.sleep(step / 16000 / speed)
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(receiving, 120)
    return messages


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match[1])


async def test_a_daemon_on_the_cuda_backend_batches_live_streams_and_reports_memory():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamd", "serve", "--port", "0", "--backend", "cuda", "--cuda-device", "cpu",
        "--max-batch", "8", "--threads", "1", "--log-level", "warning", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 120)).decode()
            assert line, "the daemon exited before serving"
            if m := re.search(r"serving .* on http://127.0.0.1:(\d+)", line):
                port = int(m[1])
        results = await asyncio.gather(*(_stream(port, name) for name in LIVE))
        metrics = await asyncio.to_thread(_get, port, "/metrics")
        health = json.loads(await asyncio.to_thread(_get, port, "/healthz"))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    for name, messages in zip(LIVE, results, strict=True):
        assert messages[0]["type"] == "ready" and messages[-1]["type"] == "end"
        # Every stage on the backend's device, mel included: a batch's window mels are one device STFT.
        assert messages[0]["devices"] == dict.fromkeys(("mel", "encoder", "decoder"), "cpu (torch)")
        assert not [m for m in messages if m["type"] == "error"], name
        finals = [m for m in messages if m["type"] == "final"]
        text = " ".join(m["text"] for m in finals)
        error = jiwer.wer(normalise(reference(speech_file(name))), normalise(text))
        assert error <= 0.2, (name, error, text)
        for f in finals:
            assert "".join(w["word"] for w in f["words"]).strip() == f["text"]
            assert f["start"] <= f["words"][0]["start"] <= f["words"][-1]["end"] <= f["end"]

    engine = health["engine"]
    assert engine["mel_s"] == 0 and engine["window_mel_s"] == 0  # no mel frames computed on the host
    assert engine["max_batch"] == 8 and 1 < engine["largest_batch"] <= 3  # one job per stream per batch
    jobs, batches = _metric(metrics, "streamd_batch_size_sum"), _metric(metrics, "streamd_batch_size_count")
    assert jobs == engine["jobs"] and batches == engine["batches"] and jobs > batches  # batches of more than one
    per_stream = _metric(metrics, "streamd_decode_state_bytes_per_stream")
    assert per_stream == engine["device_memory"]["decode_state_bytes_per_stream"] > 0
    rows = engine["device_memory"]["decode_state_rows"]
    assert 2 <= rows <= 8  # the decoder's state grew to the batch bucket, never past max_batch
    assert _metric(metrics, 'streamd_device_memory_bytes{kind="decode_state"}') == rows * per_stream
