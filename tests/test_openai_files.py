"""OpenAI's file transcription API on a real daemon, driven by the official ``openai`` SDK: every
response format, word timestamps, streaming, MP3 and M4A, and each error status as the SDK sees it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import jiwer
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from streamd.audio import load_audio
from streamd.files import transcribe_file
from streamd.server import Daemon
from streamd.vad import VadConfig
from whisper_engine.transcribe import TranscribeOptions

from .conftest import DATA, need_corpus, reference, running, speech_file

openai = pytest.importorskip("openai")

normalise = EnglishTextNormalizer()
TOKEN = "file-api-test-token"


@pytest.fixture
async def daemon(engine):
    async with running(engine) as d:
        yield d


def client(d: Daemon, key: str = "unused", **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key=key, max_retries=0, **kwargs)


def offline_text(engine, path) -> str:
    """What ``streamd transcribe`` prints for the file (the same function, the same defaults)."""
    return transcribe_file(engine, load_audio(path), TranscribeOptions(), VadConfig()).text


@pytest.fixture(scope="module")
def jfk_text(engine, jfk) -> str:
    return offline_text(engine, jfk)


async def test_json_text_srt_and_vtt_answers_carry_the_offline_text(daemon, engine, jfk, jfk_text):
    api = client(daemon)
    with open(jfk, "rb") as f:
        plain = await api.audio.transcriptions.create(file=f, model="whisper-1")
    assert plain.text == jfk_text and "ask not what your country can do for you" in plain.text.lower()
    with open(jfk, "rb") as f:
        text = await api.audio.transcriptions.create(file=f, model=engine.model_name, response_format="text")
    assert text.strip() == jfk_text
    with open(jfk, "rb") as f:
        srt = await api.audio.transcriptions.create(file=f, model="whisper-1", response_format="srt")
    assert srt.startswith("1\n00:00:0") and " --> " in srt and "ask not" in srt.lower()
    with open(jfk, "rb") as f:
        vtt = await api.audio.transcriptions.create(file=f, model="whisper-1", response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:0") and "ask not" in vtt.lower()


async def test_verbose_json_has_segments_and_words_as_openai_gives_them(daemon, jfk, jfk_text):
    api = client(daemon)
    with open(jfk, "rb") as f:
        segments = await api.audio.transcriptions.create(file=f, model="whisper-1", response_format="verbose_json")
    assert segments.text == jfk_text and segments.language == "english"
    assert 10.5 < segments.duration < 11.5
    assert segments.segments and not segments.words  # words only when asked
    assert "".join(s.text for s in segments.segments).strip() == jfk_text
    assert all(s.start < s.end for s in segments.segments)
    with open(jfk, "rb") as f:
        both = await api.audio.transcriptions.create(
            file=f, model="whisper-1", response_format="verbose_json", timestamp_granularities=["word", "segment"]
        )
    assert both.segments and both.words
    words = [w.word for w in both.words]
    assert words == jfk_text.split()  # each word with its punctuation, as OpenAI gives them
    assert all(a.end <= b.start + 1e-6 for a, b in zip(both.words, both.words[1:], strict=False))
    assert both.words[0].start < 0.5 and 9.0 < both.words[-1].end <= both.duration
    with open(jfk, "rb") as f:
        only_words = await api.audio.transcriptions.create(
            file=f, model="whisper-1", response_format="verbose_json", timestamp_granularities=["word"]
        )
    assert only_words.words and not only_words.segments  # OpenAI leaves segments out here


async def test_a_streamed_answer_sends_deltas_then_the_whole_text(daemon, jfk, jfk_text):
    api = client(daemon)
    with open(jfk, "rb") as f:
        stream = await api.audio.transcriptions.create(file=f, model="whisper-1", stream=True)
        events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"}
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == jfk_text


@pytest.mark.parametrize("container", ["mp3", "m4a", "webm"])
async def test_mp3_m4a_and_webm_made_by_ffmpeg_give_the_text_of_the_original(daemon, engine, container):
    """``tests/data/speech/*.{mp3,m4a,webm}`` were made from the FLAC with ffmpeg (the README there
    says how): 44.1 kHz stereo MP3, AAC in MP4, Opus in WebM."""
    name = "dev_librispeech_1221-135766-0002"
    original = offline_text(engine, speech_file(name))
    api = client(daemon)
    with open(DATA / "speech" / f"{name}.{container}", "rb") as f:
        got = await api.audio.transcriptions.create(file=f, model="whisper-1")
    assert jiwer.wer(normalise(original), normalise(got.text)) <= 0.1, (original, got.text)
    assert jiwer.wer(normalise(reference(speech_file(name))), normalise(got.text)) <= 0.25


async def test_the_models_list_names_the_loaded_model(daemon, engine):
    ids = [m.id async for m in client(daemon).models.list()]
    assert ids == [engine.model_name, "whisper-1"]


async def test_bad_fields_are_400s_in_openais_shape(daemon, jfk):
    api = client(daemon)
    cases = [
        ({"response_format": "xml"}, "response_format"),
        ({"temperature": 1.5}, "temperature"),
        ({"language": "de"}, "language"),
        ({"response_format": "json", "timestamp_granularities": ["word"]}, "timestamp_granularities"),
    ]
    for fields, param in cases:
        with open(jfk, "rb") as f, pytest.raises(openai.BadRequestError) as err:
            await api.audio.transcriptions.create(file=f, model="whisper-1", **fields)
        assert err.value.status_code == 400 and err.value.param == param, fields
        assert err.value.body["type"] == "invalid_request_error" and err.value.body["message"]
    with open(jfk, "rb") as f, pytest.raises(openai.NotFoundError) as err:
        await api.audio.transcriptions.create(file=f, model="gpt-4o-transcribe")
    assert err.value.code == "model_not_found"


async def test_a_file_that_is_not_audio_is_a_400_naming_the_file(daemon, tmp_path):
    junk = tmp_path / "notes.mp3"
    junk.write_bytes(b"this is not audio at all, just text " * 100)
    with open(junk, "rb") as f, pytest.raises(openai.BadRequestError) as err:
        await client(daemon).audio.transcriptions.create(file=f, model="whisper-1")
    assert err.value.param == "file" and "notes.mp3" in err.value.message and "decode" in err.value.message


async def test_a_file_over_the_size_limit_is_a_413(engine, jfk):
    async with running(engine, max_upload_bytes=100_000) as d:
        with open(jfk, "rb") as f, pytest.raises(openai.APIStatusError) as err:
            await client(d).audio.transcriptions.create(file=f, model="whisper-1")
        assert err.value.status_code == 413
        with open(jfk, "rb") as f:  # the connection was closed after the 413; the daemon serves on
            small = f.read()[:60_000]
        with pytest.raises(openai.BadRequestError):  # under the limit, but cut: not decodable
            await client(d).audio.transcriptions.create(file=("cut.flac", small), model="whisper-1")


async def test_without_the_token_it_is_a_401_and_with_it_the_text(engine, jfk, jfk_text):
    async with running(engine, token=TOKEN) as d:
        with open(jfk, "rb") as f, pytest.raises(openai.AuthenticationError) as err:
            await client(d, "wrong").audio.transcriptions.create(file=f, model="whisper-1")
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await client(d, "wrong").models.list()
        with open(jfk, "rb") as f:
            assert (await client(d, TOKEN).audio.transcriptions.create(file=f, model="whisper-1")).text == jfk_text


async def test_a_full_queue_answers_429_with_retry_after_and_loses_nothing_it_took(engine, jfk, jfk_text):
    async with running(engine, max_file_requests=1) as d:
        api = client(d)
        data = jfk.read_bytes()
        first = asyncio.create_task(api.audio.transcriptions.create(file=("a.flac", data), model="whisper-1"))
        while d.files.pending == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as err:
            await api.audio.transcriptions.create(file=("b.flac", data), model="whisper-1")
        assert err.value.status_code == 429 and int(err.value.response.headers["retry-after"]) >= 1
        assert (await first).text == jfk_text
        assert (await api.audio.transcriptions.create(file=("c.flac", data), model="whisper-1")).text == jfk_text
        metrics = await asyncio.to_thread(_get, d.port, "/metrics")
        assert "streamd_file_requests_total 2.0" in metrics and "streamd_file_requests_refused_total 1.0" in metrics
        assert "streamd_file_requests_pending 0.0" in metrics


async def test_live_streams_and_file_requests_share_the_port(daemon, jfk):
    """The captions websocket, the page, health and the file API on one port, one after another
    and at once."""
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{daemon.port}/v1/captions?source=x") as viewer:
        with open(jfk, "rb") as f:
            text = (await client(daemon).audio.transcriptions.create(file=f, model="whisper-1")).text
        assert "ask not" in text.lower()
        await viewer.ping()
    health = await asyncio.to_thread(_get, daemon.port, "/healthz")
    assert json.loads(health)["status"] == "ok"


def _get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def test_the_api_gives_streamd_transcribes_text_on_the_whole_dev_corpus(engine, tmp_path):
    """Every dev recording: the file API's text equals ``streamd transcribe``'s (the CLI in its own
    process, the API through a daemon it runs)."""
    files = need_corpus()
    cli = subprocess.run(
        [sys.executable, "-m", "streamd", "transcribe", "--format", "jsonl", *map(str, files)],
        capture_output=True, text=True, timeout=1800, check=True,
    )  # fmt: skip
    expected = {json.loads(line)["file"]: json.loads(line)["text"] for line in cli.stdout.splitlines()}

    async def api_texts() -> dict[str, str]:
        async with running(engine) as d:
            api, out = client(d, timeout=600), {}
            for path in files:
                with open(path, "rb") as f:
                    out[str(path)] = (await api.audio.transcriptions.create(file=f, model="whisper-1")).text
            return out

    got = asyncio.run(api_texts())
    assert got == expected
