"""The streaming core without sockets: commit policy units, then real speech through Stream."""

from __future__ import annotations

import itertools

import jiwer
import numpy as np
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from streamd.audio import load_audio
from streamd.jobs import run_job
from streamd.policy import LocalAgreement, TimedWord
from streamd.stream import Final, Partial, Stream, StreamConfig, UtteranceEnd, VadChange

from .conftest import DATA, reference


def words(text: str, start: float = 0.0) -> list[TimedWord]:
    return [TimedWord(" " + w, start + i, start + i + 0.5, 0.9) for i, w in enumerate(text.split())]


def test_local_agreement_commits_the_shared_prefix():
    policy = LocalAgreement()
    committed, partial = policy.update(words("and so my"))
    assert committed == [] and [w.word for w in partial] == [" and", " so", " my"]
    committed, partial = policy.update(words("And so, my fellow"))
    assert [w.key for w in committed] == ["and", "so", "my"]
    assert [w.key for w in partial] == ["fellow"]
    # The next hypothesis covers only what was not committed.
    committed, partial = policy.update(words("fellow Americans"))
    assert [w.key for w in committed] == ["fellow"] and [w.key for w in partial] == ["americans"]


def test_local_agreement_waits_on_disagreement_and_flushes_at_the_end():
    policy = LocalAgreement()
    policy.update(words("ask not"))
    committed, _ = policy.update(words("task not"))
    assert committed == []
    assert [w.key for w in policy.flush(words("ask not what"))] == ["ask", "not", "what"]


class CommitAtOnce:
    """A second commit policy: every hypothesis is committed whole, without waiting for another."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def update(self, hypothesis: list[TimedWord]) -> tuple[list[TimedWord], list[TimedWord]]:
        self.seen.append([w.key for w in hypothesis])
        return hypothesis, []

    def flush(self, hypothesis: list[TimedWord]) -> list[TimedWord]:
        return hypothesis

    def reset(self) -> None:
        pass


def _scripted_prefixes(policy, jfk) -> list[str]:
    """JFK's audio through a stream whose jobs get scripted words, no model: each job's forced
    prefix."""
    stream = Stream(policy=policy) if policy is not None else Stream()
    audio = load_audio(jfk)
    script = iter(["and so my", "fellow americans", "ask not", "what your country", "can do for you"] * 10)
    prefixes = []
    for i in range(0, len(audio), 1600):
        stream.feed(audio[i : i + 1600])
        if (job := stream.next_job()) is not None:
            prefixes.append(job.prefix)
            start = job.offset + len(job.audio) / 16000 - 0.6  # the newest audio the window holds
            said = next(script).split()
            scripted = [TimedWord(" " + w, start + 0.1 * k, start + 0.1 * k + 0.05, 0.9) for k, w in enumerate(said)]
            stream.on_result(job, scripted)
    return prefixes


def test_a_second_commit_policy_plugs_into_the_stream_and_sees_only_scripted_words(jfk):
    """The commit policy is a seam: with one that commits at once, the first hypothesis is the
    next job's forced prefix; with LocalAgreement nothing is committed before two agree."""
    at_once = CommitAtOnce()
    prefixes = _scripted_prefixes(at_once, jfk)
    assert at_once.seen and at_once.seen[0]  # it was asked, with the scripted words
    assert prefixes[0] == "" and prefixes[1].strip() != ""
    default_prefixes = _scripted_prefixes(None, jfk)
    assert default_prefixes[:2] == ["", ""]


@pytest.fixture(scope="module")
def streamed(engine, jfk):
    """JFK between 3 s of silence, fed in 100 ms chunks; jobs run as soon as asked for."""
    silence = np.zeros(3 * 16000, np.float32)
    audio = np.concatenate([silence, load_audio(jfk), silence])
    stream = Stream()
    events, job_times = [], []
    for i in range(0, len(audio), 1600):
        events += stream.feed(audio[i : i + 1600])
        job = stream.next_job()
        if job is not None:
            job_times.append(stream.time)
            events += stream.on_result(job, run_job(engine, job))
    events += stream.finish()
    while (job := stream.next_job()) is not None:
        events += stream.on_result(job, run_job(engine, job))
    return events, job_times


def test_no_decoding_while_silent(streamed):
    _, job_times = streamed
    assert job_times and min(job_times) > 3.0


def test_vad_events_bracket_the_speech(streamed):
    events, _ = streamed
    vad = [e for e in events if isinstance(e, VadChange)]
    assert vad[0].speech and 2.5 < vad[0].t < 3.5
    assert not vad[-1].speech and vad[-1].t > 13.0


def test_each_utterance_ends_once_after_its_last_final(streamed):
    """What the live adapters build on: one ``UtteranceEnd`` per speech region, after every final
    of it, and only the final of the closing decode says it closes its utterance."""
    events, _ = streamed
    ends = [i for i, e in enumerate(events) if isinstance(e, UtteranceEnd)]
    stops = [e for e in events if isinstance(e, VadChange) and not e.speech]
    assert len(ends) == len(stops) >= 1
    finals = [i for i, e in enumerate(events) if isinstance(e, Final)]
    assert finals and finals[-1] < ends[-1]
    closing = [i for i in finals if events[i].closes]
    assert len(closing) <= len(ends) and all(isinstance(events[i + 1], UtteranceEnd) for i in closing)


def test_an_utterance_committed_before_its_speech_ended_ends_without_a_closing_decode(jfk):
    """A decode that commits every word up to the end of speech leaves nothing for a closing
    decode: the utterance ends at once, with no final job."""
    stream = Stream(policy=CommitAtOnce())
    audio = load_audio(jfk)[: 3 * 16000]
    events = []
    for i in range(0, len(audio), 1600):
        events += stream.feed(audio[i : i + 1600])
        if (job := stream.next_job()) is not None:
            end = job.offset + len(job.audio) / 16000
            events += stream.on_result(job, [TimedWord(" word", end - 0.2, end + 5.0, 0.9)])  # past any end
    events += stream.finish()
    assert isinstance(events[-1], UtteranceEnd) and stream.next_job() is None and stream.idle
    assert not any(isinstance(e, Final) and e.closes for e in events)


def test_finish_mid_stream_ends_the_utterance_and_the_stream_goes_on(engine, jfk):
    """A client's commit (Realtime) or Finalize (Deepgram) is ``finish`` with more audio after it:
    the open utterance closes with its final, then later speech opens a new one."""
    stream = Stream()
    audio = load_audio(jfk)
    half = len(audio) // 2
    events = []

    def drain():
        while (job := stream.next_job()) is not None:
            events.extend(stream.on_result(job, run_job(engine, job)))

    for i in range(0, half, 1600):
        events += stream.feed(audio[i : min(i + 1600, half)])
        drain()
    events += stream.finish()
    drain()
    first = next(i for i, e in enumerate(events) if isinstance(e, UtteranceEnd))
    assert any(isinstance(e, Final) for e in events[:first])
    for i in range(half, len(audio), 1600):
        events += stream.feed(audio[i : i + 1600])
        drain()
    events += stream.finish()
    drain()
    assert any(isinstance(e, Final) for e in events[first:])
    assert sum(isinstance(e, UtteranceEnd) for e in events) >= 2 and stream.idle


def test_finals_carry_the_text_in_order(streamed, jfk):
    events, _ = streamed
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.segment for f in finals] == list(range(len(finals)))
    assert all(a.end <= b.start + 0.5 for a, b in itertools.pairwise(finals))
    norm = EnglishTextNormalizer()
    text = " ".join(f.text for f in finals)
    assert jiwer.wer(norm(reference(jfk)), norm(text)) <= 0.15, text  # see test_server.JFK_LIVE_WER
    for f in finals:
        assert f.words and "".join(w.word for w in f.words).strip() == f.text
        assert 2.5 <= f.start <= f.end <= 14.5  # the first word may start at the pre-roll


def test_partials_come_before_their_final(streamed):
    events, _ = streamed
    partials = [e for e in events if isinstance(e, Partial)]
    assert partials, "no partial before the finals"
    final_segments = {e.segment for e in events if isinstance(e, Final)}
    for p in partials:
        assert p.segment in final_segments or p.segment == max(final_segments) + 1


def test_an_utterance_that_ends_while_the_previous_one_decodes_is_not_lost(jfk):
    """Input ahead of the engine: JFK's second sentence starts and ends while the first one's
    final decode is still out. Its audio must stay, and its final decode must follow."""
    audio = np.concatenate([load_audio(jfk), np.zeros(16000, np.float32)])
    stream = Stream()
    i, first_end = 0, None
    while first_end is None:
        for e in stream.feed(audio[i : i + 1600]):
            if isinstance(e, VadChange) and not e.speech:
                first_end = e.t
        i += 1600
        if first_end is None and (update := stream.next_job()) is not None:
            stream.on_result(update, [])  # the test plays the engine: no words yet
    job = stream.next_job()
    assert job is not None and job.final
    ends = [e.t for e in stream.feed(audio[i:]) if isinstance(e, VadChange) and not e.speech]
    assert ends and ends[-1] > first_end + 2.0  # the second sentence came and went meanwhile
    stream.on_result(job, [TimedWord(" For", first_end - 0.5, first_end - 0.2, 0.9)])
    covered = []  # the closing decodes that follow, one per region that ended meanwhile
    while (after := stream.next_job()) is not None:
        assert after.final
        covered.append((after.offset, after.offset + len(after.audio) / 16000))
        stream.on_result(after, [])
    assert covered, "the second sentence was dropped"
    assert covered[0][0] <= ends[-1] - 2.0 and covered[-1][1] >= ends[-1] - 0.01


def test_sample_buffer_appends_drops_and_never_rewrites_a_view_it_handed_out():
    from streamd.stream import SampleBuffer

    rng = np.random.default_rng(0)
    buffer, reference, views = SampleBuffer(capacity=100), np.zeros(0, np.float32), []
    for step in range(200):
        chunk = rng.standard_normal(int(rng.integers(0, 80))).astype(np.float32)
        buffer.append(chunk)
        reference = np.concatenate([reference, chunk])
        if step % 7 == 3:
            n = int(rng.integers(0, len(reference) + 20))  # sometimes more than it holds
            buffer.drop(n)
            reference = reference[n:]
        assert len(buffer) == len(reference) and np.array_equal(buffer.view(), reference)
        views.append((buffer.view(), reference))
    for view, expected in views:  # growing and compacting took new arrays: old views are intact
        assert np.array_equal(view, expected)


def test_a_long_phrase_heard_again_after_its_final_is_an_echo_not_a_new_final():
    """Seven committed words decoded again at the start of the next window (its audio reached
    back over them) are dropped; new words after them still come through."""
    from streamd.stream import Job

    stream = Stream()
    phrase = ["What", "your", "country", "can", "do", "for", "you."]

    def words(texts, start):
        return [TimedWord(" " + t, start + 0.3 * i, start + 0.3 * i + 0.25, 0.9) for i, t in enumerate(texts)]

    job = Job(np.zeros(16000 * 3, np.float32), 0.0, "", "", True)
    first = stream.on_result(job, words(phrase, 0.5))
    assert [e.text for e in first if isinstance(e, Final)] == ["What your country can do for you."]
    again = stream.on_result(job, words([*phrase, "Ask", "what"], 2.4))
    assert [e.text for e in again if isinstance(e, Final)] == ["Ask what"]


def test_a_phrase_repeated_with_no_audio_of_its_own_is_dropped_but_a_real_repeat_stays():
    from streamd.stream import Job

    def timed(spec):
        return [TimedWord(" " + t, a, b, 0.9) for t, a, b in spec]

    phrase = [("what", 4.92, 5.7), ("your", 5.7, 6.0), ("country", 6.0, 6.38), ("can", 6.38, 6.78)]
    unheard = [(t.capitalize() if i == 0 else t, 7.86, 7.86) for i, (t, _, _) in enumerate(phrase)]
    job = Job(np.zeros(16000 * 4, np.float32), 4.9, "", "", True)
    events = Stream().on_result(job, timed([*phrase, *unheard, ("Ask", 8.2, 8.6)]))
    assert [e.text for e in events if isinstance(e, Final)] == ["what your country can Ask"]
    said_twice = [*phrase, *[(t, a + 2.0, b + 2.0) for t, a, b in phrase]]
    events = Stream().on_result(job, timed(said_twice))
    assert [e.text for e in events if isinstance(e, Final)] == ["what your country can what your country can"]


def test_utterances_that_all_end_before_the_engine_gets_to_them_each_end_once_in_order(jfk):
    """An engine far behind (a loaded box): every region of JFK starts and ends before any job
    runs. Each still gets its own closing decode, its words and its ``UtteranceEnd``, in order;
    one closing decode for them all would hand an adapter one item's text for several (a
    Realtime item would never complete)."""
    audio = np.concatenate([load_audio(jfk), np.zeros(16000, np.float32)])
    stream = Stream()
    events = []
    for i in range(0, len(audio), 1600):
        events += stream.feed(audio[i : i + 1600])
    stops = [e.t for e in events if isinstance(e, VadChange) and not e.speech]
    assert len(stops) >= 2, "JFK should be more than one region"
    while (job := stream.next_job()) is not None:
        assert job.final
        end = job.offset + len(job.audio) / 16000
        events += stream.on_result(job, [TimedWord(" word", end - 0.3, end - 0.1, 0.9)])
    ends = [e.t for e in events if isinstance(e, UtteranceEnd)]
    assert ends == pytest.approx(stops, abs=0.01) and stream.idle
    finals = [e for e in events if isinstance(e, Final)]
    assert len(finals) == len(stops) and all(f.closes for f in finals)
    # Each final lies inside its own region: before its end, after the previous one's.
    for previous, end, final in zip([0.0, *stops], stops, finals, strict=False):
        assert previous - 0.01 <= final.start <= final.end <= end + 0.01


# --- Context across trims and pauses, stalls, unheard tails (issue 18) -------------------------


def _drive(stream: Stream, audio: np.ndarray, respond) -> list[tuple[object, list]]:
    """Feed ``audio`` in 100 ms chunks and answer every job at once with ``respond(job)``'s
    words (the test plays the engine); ``(job, events)`` per job, in order."""
    done = []

    def run(job):
        done.append((job, stream.on_result(job, respond(job))))

    for i in range(0, len(audio), 1600):
        stream.feed(audio[i : i + 1600])
        if (job := stream.next_job()) is not None:
            run(job)
    stream.finish()
    while (job := stream.next_job()) is not None:
        run(job)
    return done


def _a_word_at_the_end(job) -> list[TimedWord]:
    end = job.offset + len(job.audio) / 16000
    return [TimedWord(f" w{round(end * 10)}", end - 0.3, end - 0.1, 0.9)]


def _utterances(done) -> list[list]:
    """The jobs of each utterance (split after each ``UtteranceEnd``)."""
    groups: list[list] = [[]]
    for job, events in done:
        groups[-1].append(job)
        if any(isinstance(e, UtteranceEnd) for e in events):
            groups.append([])
    return [g for g in groups if g]


def test_after_a_short_pause_the_next_utterance_is_decoded_after_the_last_ones_words(jfk_audio):
    """Offline transcription sees the words before a pause of under 2 s in the same window; live,
    the next utterance's window keeps them too, as its forced prefix. JFK pauses under a second
    between its phrases."""
    done = _drive(Stream(policy=CommitAtOnce()), jfk_audio, _a_word_at_the_end)
    utterances = _utterances(done)
    assert len(utterances) >= 2
    for before, after in itertools.pairwise(utterances):
        assert after[0].prefix.strip(), "the next utterance started without the last one's words"
        assert after[0].offset < before[-1].offset + len(before[-1].audio) / 16000


def test_after_a_long_pause_the_next_utterance_starts_afresh_with_the_words_as_its_prompt(jfk_audio):
    cut = 2.8  # "And so my fellow Americans", then a 3 s pause
    pause = np.zeros(3 * 16000, np.float32)
    audio = np.concatenate([jfk_audio[: round(cut * 16000)], pause, jfk_audio[round(cut * 16000) :]])
    done = _drive(Stream(policy=CommitAtOnce()), audio, _a_word_at_the_end)
    utterances = _utterances(done)
    assert utterances[0][0].offset < cut
    after = utterances[1][0]
    assert after.prefix == "" and after.offset > cut + 2.0
    assert after.prompt.strip(), "the last utterance's words should be the prompt"


def test_a_trim_keeps_the_last_seconds_of_committed_words_as_context():
    """Past ``trim_s`` the window drops committed audio, but keeps ``context_s`` of it: the
    next decode still hears the words before the new ones (a window cut to its last committed
    word turned "too cruel" into "two cruel", decoded alone)."""
    sonnet = load_audio(DATA / "speech" / "librivox_shakespeare_sonnets_first30s.flac")
    config = StreamConfig(trim_s=6.0, context_s=2.0)
    done = _drive(Stream(config, policy=CommitAtOnce()), sonnet, _a_word_at_the_end)
    trimmed = [job for (prev, _), (job, _) in itertools.pairwise(done) if job.offset > prev.offset and not job.final]
    assert trimmed, "no window outgrew trim_s"
    for job in trimmed:  # (the reader never pauses for 2 s: every window keeps its context)
        assert job.prefix, f"the window at {job.offset:.2f} s lost its context"
        ends = [int(w[1:]) / 10 for w in job.prefix.split()]
        assert min(ends) > job.offset and max(ends) - min(ends) >= config.context_s - 1.0, job.prefix
    assert all(len(job.audio) / 16000 <= config.trim_s + 2 * config.update_s for job, _ in done)


def test_a_closing_decode_that_stops_at_the_context_is_decoded_again_alone(jfk_audio):
    """Without timestamps Whisper may end its text at the pause after the context's last
    sentence ("... with hope than apprehension." and seven seconds of the next speaker lost).
    An empty closing decode with speech after the context is run again from the last committed
    word on; no utterance ends without its words."""

    def stops_at_context(job):
        if job.final and job.prefix:
            return []
        end = job.offset + len(job.audio) / 16000
        return [TimedWord(f" w{round(end * 10)}", end - 0.3, end - 0.1, 0.9)]  # never agreed twice

    done = _drive(Stream(), jfk_audio, stops_at_context)
    utterances = _utterances(done)
    assert len(utterances) >= 2
    for jobs in utterances:
        closing = [job for job in jobs if job.final]
        assert closing[-1].prefix == ""
    closing_finals = [e for _, events in done for e in events if isinstance(e, Final) and e.closes]
    assert len(closing_finals) == len(utterances)
    retried = [jobs for jobs in utterances[1:] if sum(job.final for job in jobs) == 2]
    assert retried, "no closing decode was run again"


def _timed(spec) -> list[TimedWord]:
    return [TimedWord(" " + t, a, b, 0.9) for t, a, b in spec]


def _closing_text(spec) -> str:
    from streamd.stream import Job

    job = Job(np.zeros(16000 * 4, np.float32), 118.0, "", "", True)
    return " ".join(e.text for e in Stream().on_result(job, _timed(spec)) if isinstance(e, Final))


def test_words_with_no_audio_at_the_end_of_a_hypothesis_are_dropped():
    rainbow = [("form", 120.52, 120.68), ("a", 120.68, 120.8), ("rainbow.", 120.8, 121.18)]
    again = [("When", 121.8, 121.8), ("the", 121.8, 121.8), ("sunlight", 121.8, 121.8), ("strikes", 121.8, 121.8)]
    assert _closing_text([*rainbow, *again]) == "form a rainbow."
    # ... the last word may hold what audio is left
    assert _closing_text([*rainbow, *again[:3], ("strikes", 121.8, 121.98)]) == "form a rainbow."
    assert _closing_text([("2.", 118.0, 118.9), ("2.", 118.97, 118.97)]) == "2."  # a copy of the one before
    assert _closing_text([("I'm", 121.47, 121.49), ("sorry.", 121.49, 121.51)]) == ""  # nothing heard at all


def test_a_word_heard_twice_and_an_edge_word_with_no_audio_yet_stay():
    assert _closing_text([("no,", 118.0, 118.4), ("no.", 118.5, 118.9)]) == "no, no."
    edge = [("for", 118.0, 118.3), ("your", 118.3, 118.6), ("country.", 119.0, 119.0)]
    assert _closing_text(edge) == "for your country."


def test_a_context_that_would_not_fit_the_trimmed_window_is_refused():
    with pytest.raises(ValueError, match="context_s < trim_s"):
        StreamConfig(context_s=8.0, trim_s=8.0)
    assert StreamConfig(context_s=0.0).context_s == 0.0  # no context: the window starts at its last word
