"""The xdna backend end to end on the fake pyxrt (tier 4 of DESIGN.md), and on a real NPU when
one is present (marked ``npu``).

The fake device runs the golden kernels, so everything the host runtime does — buffer objects
and their syncs, access patterns, the KV cache written in place, runlists, the context cache,
double buffering, falling back to the CPU — must come out exactly as the golden quantised model.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import os
import re
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from npu.backends.golden import GoldenBackend
from npu.xdna.artifacts import Artifacts, ArtifactsError, Call, Operand, decode_synthetic, encode_synthetic
from whisper_engine.engine import Engine
from whisper_engine.transcribe import TranscribeOptions, transcribe

from .conftest import reference, speech_file

FAKE = Path(__file__).parent / "fake_pyxrt"
SOT = [50257, 50362]


@pytest.fixture(scope="module")
def fake_pyxrt():
    sys.path.insert(0, str(FAKE))
    try:
        module = importlib.import_module("pyxrt")
        assert module.__file__.startswith(str(FAKE)), "a real pyxrt shadows the fake"
        yield module
    finally:
        sys.path.remove(str(FAKE))
        sys.modules.pop("pyxrt", None)


@pytest.fixture
def pyxrt(fake_pyxrt):
    fake_pyxrt.reset()
    yield fake_pyxrt
    fake_pyxrt.reset()


@pytest.fixture(scope="module")
def artifacts(fake_pyxrt, tmp_path_factory) -> Artifacts:
    root = tmp_path_factory.mktemp("xdna")
    fake_pyxrt.make_artifacts(root)
    return Artifacts.load(root)


@pytest.fixture(scope="module")
def weights(engine):
    return engine.weights


@pytest.fixture(scope="module")
def golden(weights) -> GoldenBackend:
    return GoldenBackend(weights)


@pytest.fixture(scope="module")
def xdna(weights, artifacts, fake_pyxrt):
    from npu.backends.xdna import XdnaBackend

    return XdnaBackend(weights, artifacts, fake_pyxrt)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    audio, _ = sf.read(speech_file("dev_librispeech_1089-134686-0001"), dtype="float32")
    return audio


def test_synthetic_instructions_round_trip():
    call = Call("gemm", 6, 5, 64, 448, (Operand(3, 7, 64, 1), Operand(0, 1, 2, 3), Operand(9, 0, 448, 1)))
    assert decode_synthetic(encode_synthetic(call)) == call
    with pytest.raises(ValueError):
        decode_synthetic(np.array([1, 2, 3], np.uint32))


def test_missing_artifacts_say_where(tmp_path):
    with pytest.raises(ArtifactsError, match=r"mlir/build\.py"):
        Artifacts.load(tmp_path)


def test_a_per_design_build_manifest_is_refused_with_the_reason(tmp_path):
    (tmp_path / "manifest.json").write_text('{"schema": 1, "device": "npu1", "designs": []}')
    with pytest.raises(ArtifactsError, match="one xclbin per stage"):
        Artifacts.load(tmp_path)


def test_mel_is_the_golden_mel(xdna, golden, speech, pyxrt):
    assert np.array_equal(xdna.log_mel(speech), golden.log_mel(speech))
    assert np.array_equal(xdna.log_mel(speech[:1000], padding=3000), golden.log_mel(speech[:1000], padding=3000))


def test_encoder_and_decoder_are_the_golden_model(xdna, golden, speech, pyxrt):
    mel = golden.log_mel(speech)[:, :300]
    fx, fg = xdna.encode(mel), golden.encode(mel)
    assert np.array_equal(xdna.read(fx.x).reshape(fg.x.shape), fg.x)
    sx, sg = xdna.decoder(fx), golden.decoder(fg)
    prompt = np.array([[*SOT, 440, 257]])
    assert np.array_equal(sx.step(prompt, positions=(0, 2, 3)), sg.step(prompt, positions=(0, 2, 3)))
    for token in (1297, 13):
        assert np.array_equal(sx.step(np.array([[token]])), sg.step(np.array([[token]])))
    tokens = np.array([*SOT, 440, 257, 1297])
    assert np.array_equal(xdna.alignment(fx, tokens), golden.alignment(fg, tokens))


def test_beam_rows_and_reorder(xdna, golden, speech, pyxrt):
    mel = golden.log_mel(speech)[:, :200]
    fx, fg = xdna.encode(mel), golden.encode(mel)
    sx, sg = xdna.decoder(fx, 3), golden.decoder(fg, 3)
    first = np.array([SOT, SOT, SOT])
    assert np.array_equal(sx.step(first), sg.step(first))
    for source, step in (([2, 0, 0], [[440], [464], [1649]]), ([1, 1, 2], [[13], [11], [262]])):
        sx.reorder(np.array(source))
        sg.reorder(np.array(source))
        assert np.array_equal(sx.step(np.array(step)), sg.step(np.array(step)))


def test_a_decoder_step_is_one_runlist_and_the_cache_stays_on_the_device(xdna, golden, speech, pyxrt):
    features = xdna.encode(golden.log_mel(speech)[:, :200])
    session = xdna.decoder(features)
    session.step(np.array([SOT]))
    stats = xdna.rt.stats
    before = (stats.submissions, stats.bytes_to_device, stats.bytes_from_device, stats.buffers_allocated)
    pyxrt.EVENTS.clear()
    session.step(np.array([[440]]))
    d = xdna.dims
    assert stats.submissions - before[0] == 1
    # in: one token's embedding and its causal bound; out: one row of logits. No cache traffic.
    assert stats.bytes_to_device - before[1] == d.n_text_state * 4 + 4
    assert stats.bytes_from_device - before[2] == d.n_vocab * 4
    assert stats.buffers_allocated == before[3], "a step reuses pooled buffers"
    assert len([e for e in pyxrt.EVENTS if e[0] == "runlist"]) == 1
    layers = session.layers
    assert len(layers) == d.n_text_layer and all(t.bo._mem is session.cache.bo._mem for t in layers[0])


def test_double_buffering_uploads_the_next_window_while_the_npu_encodes(xdna, golden, speech, pyxrt):
    mel = golden.log_mel(speech)
    first, second = mel[:, :200], mel[:, 200:400]
    pyxrt.RUN_DELAY_S = 0.002  # a slower device, so that overlap is visible
    pyxrt.EVENTS.clear()
    dispatches = xdna.rt.stats.dispatches
    pending = xdna.encode_async(first)
    runs_first = xdna.rt.stats.dispatches - dispatches
    mark = len(pyxrt.EVENTS)
    pending_next = xdna.encode_async(second)  # window 2's input goes up while window 1 runs
    fx1, fx2 = pending.result(), pending_next.result()
    events = list(pyxrt.EVENTS)
    upload = next(i for i, e in enumerate(events) if i >= mark and e[0] == "to_device")
    ends = [i for i, e in enumerate(events) if e[0] == "run_end"]
    assert upload < ends[runs_first - 1], "window 2 was uploaded only after window 1 finished"
    assert np.array_equal(xdna.read(fx1.x).reshape(-1), golden.encode(first).x.reshape(-1))
    assert np.array_equal(xdna.read(fx2.x).reshape(-1), golden.encode(second).x.reshape(-1))


def test_context_cache_holds_at_most_its_limit(weights, artifacts, fake_pyxrt, speech):
    from npu.backends.xdna import XdnaBackend

    fake_pyxrt.reset()
    backend = XdnaBackend(weights, artifacts, fake_pyxrt)
    backend.rt.max_contexts = 2
    mel = backend.log_mel(speech)[:, :100]  # mel context
    features = backend.encode(mel)  # encoder
    backend.decoder(features).step(np.array([SOT]))  # decoder: evicts mel
    assert len(backend.rt._stages) == 2 and backend.rt.stats.contexts_evicted >= 1
    assert np.array_equal(backend.log_mel(speech[:4000]), GoldenBackend.log_mel(backend, speech[:4000]))
    del backend, features
    gc.collect()  # a process has 6 hardware contexts in all: give these back


def test_the_fake_device_refuses_a_seventh_context(fake_pyxrt, artifacts):
    dev = fake_pyxrt.device(0)
    xclbin = fake_pyxrt.xclbin(str(artifacts.xclbin_path("encoder")))
    dev.register_xclbin(xclbin)
    free = fake_pyxrt.MAX_CONTEXTS - fake_pyxrt._live_contexts  # other backends in this process hold some
    held = [fake_pyxrt.hw_context(dev, xclbin.get_uuid()) for _ in range(free)]
    with pytest.raises(RuntimeError, match="contexts"):
        fake_pyxrt.hw_context(dev, xclbin.get_uuid())
    del held


def test_the_fake_device_refuses_unsynced_inputs(xdna, pyxrt):
    t = xdna.tensor(np.float32, 64)
    t.bo.write(np.ones(64, np.float32), 0)  # written, never synced
    out, scale = xdna.tensor(np.int8, 64), xdna.tensor(np.float32, 1)
    from npu.backends.xdna import _Queue, mat

    qu = _Queue(xdna.rt, "encoder")
    qu.call("quantize", 1, 1, 0, 64, (t, mat(0, 64)), (out, mat(0, 64)), (scale, mat(0, 1)))
    with pytest.raises(Exception, match="state"):
        qu.submit()
    assert any("not synced" in e[2] for e in pyxrt.EVENTS if e[0] == "error")


@pytest.fixture
def xdna_engine(engine, artifacts, pyxrt, monkeypatch):
    monkeypatch.setenv("STREAMD_XDNA_ARTIFACTS", str(artifacts.root))
    from whisper_engine.backends import create_backend

    xdna_engine = Engine(engine.weights, create_backend(engine.weights, "xdna-all"), engine.tokenizer)
    yield xdna_engine
    del xdna_engine
    gc.collect()  # a process has 6 hardware contexts in all: give these back


def test_a_recording_through_xdna_gives_the_golden_text(xdna_engine, engine, golden):
    audio, _ = sf.read(speech_file("dev_librivox_sense_sensibility_0870"), dtype="float32")
    golden_engine = Engine(engine.weights, golden, engine.tokenizer)
    started = time.perf_counter()
    got = transcribe(xdna_engine, audio)
    print(f"xdna on the fake device: {time.perf_counter() - started:.1f} s")
    want = transcribe(golden_engine, audio)
    assert got.text == want.text and got.text.strip()
    assert [(w.word, w.start, w.end) for s in got.segments for w in s.words] == [
        (w.word, w.start, w.end) for s in want.segments for w in s.words
    ]
    assert all(device.startswith("xdna") for device in xdna_engine.devices.values()), xdna_engine.devices
    assert xdna_engine.backend.failures == 0


def test_a_failing_npu_stage_moves_to_the_cpu_without_losing_text(xdna_engine, pyxrt, engine):
    wav = speech_file("dev_librispeech_1089-134686-0001")
    audio, _ = sf.read(wav, dtype="float32")
    options = TranscribeOptions(word_timestamps=False)
    pyxrt.fail_after(2500)  # fails mid-way through the decoder
    got = transcribe(xdna_engine, audio, options).text
    backend = xdna_engine.backend
    assert backend.failures >= 1
    devices = xdna_engine.devices
    assert "fallback" in devices["decoder"] and devices["decoder"].startswith("cpu")
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    assert jiwer.wer(norm(reference(wav)), norm(got)) < 0.2, got


def test_auto_takes_the_cpu_here_and_says_why(engine):
    from whisper_engine.backends import create_backend, xdna_unavailable

    why = xdna_unavailable()
    if Path("/dev/accel/accel0").exists():
        pytest.skip("this machine has an NPU device node")
    assert why and "/dev/accel/accel0" in why
    assert create_backend(engine.weights, "auto").name == "cpu"


def test_auto_takes_xdna_when_device_pyxrt_and_artifacts_are_there(engine, artifacts, pyxrt, monkeypatch):
    import npu.xdna.runtime as runtime
    from whisper_engine.backends import create_backend, xdna_unavailable

    monkeypatch.setattr(runtime, "device_present", lambda: True)
    monkeypatch.setenv("STREAMD_XDNA_ARTIFACTS", str(artifacts.root))
    assert xdna_unavailable() is None
    backend = create_backend(engine.weights, "auto")
    assert backend.name == "xdna" and backend.devices["encoder"].startswith("xdna")
    assert backend.devices["decoder"] == "cpu", "the placement the performance model implies"
    monkeypatch.setenv("STREAMD_XDNA_ARTIFACTS", str(artifacts.root / "missing"))
    assert "no NPU artifacts" in xdna_unavailable()


def test_default_placement_decodes_the_npu_encoder_output_on_the_cpu(engine, artifacts, pyxrt, monkeypatch, golden):
    from whisper_engine.backends import create_backend

    monkeypatch.setenv("STREAMD_XDNA_ARTIFACTS", str(artifacts.root))
    backend = create_backend(engine.weights, "xdna")
    audio, _ = sf.read(speech_file("dev_librispeech_1221-135766-0002"), dtype="float32")
    mel = golden.log_mel(audio)[:, :300]
    features = backend.encode(mel)
    session = backend.decoder(features)
    want = engine.backend.decoder(type(engine.backend.encode(mel))(golden.encode(mel).x)).step(np.array([SOT]))
    assert np.array_equal(session.step(np.array([SOT])), want)
    assert backend.devices == {**backend.devices, "decoder": "cpu"} and backend.devices["encoder"].startswith("xdna")
    del backend, features, session
    gc.collect()


async def test_the_daemon_on_xdna_names_its_devices_and_falls_back_without_losing_text(artifacts):
    """A real `streamd serve --backend xdna` on the fake device, which starts failing every run
    after its 150th (in the second encoder window): the stream carries on on the CPU, /healthz says
    so, and the transcript is whole."""
    from websockets.asyncio.client import connect

    wav = speech_file("dev_jfk_inaugural_1961")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(FAKE), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "STREAMD_XDNA_ARTIFACTS": str(artifacts.root),
        "FAKE_PYXRT_FAIL_AFTER": "150",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamd", "serve", "--port", "0", "--backend", "xdna", "--file", str(wav),
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    log_lines: list[str] = []
    try:
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 120)).decode()
            assert line, "the daemon exited before serving: " + "".join(log_lines)
            log_lines.append(line)
            if m := re.search(r"serving .* on http://127.0.0.1:(\d+)", line):
                port = int(m[1])
        messages = []
        async with connect(f"ws://127.0.0.1:{port}/v1/captions?source={wav.stem}") as viewer:
            while not messages or messages[-1]["type"] != "end":
                messages.append(json.loads(await asyncio.wait_for(viewer.recv(), 120)))
        url = f"http://127.0.0.1:{port}/healthz"
        health = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read()))
    finally:
        proc.terminate()
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        log_lines.append(rest.decode())
        await proc.wait()
    ready = messages[0]
    assert ready["type"] == "ready" and ready["devices"]["mel"] == "cpu", ready
    assert ready["devices"]["encoder"].startswith("xdna") and ready["devices"]["decoder"] == "cpu", ready
    assert health["devices"]["encoder"].startswith("cpu (fallback: xdna encoder failed"), health["devices"]
    assert "encoder stage failed, running it on the CPU" in "".join(log_lines)
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    text = " ".join(m["text"] for m in messages if m["type"] == "final")
    assert jiwer.wer(norm(reference(wav)), norm(text)) < 0.25, text
