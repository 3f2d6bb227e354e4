"""One live stream's state, sans I/O: audio in, decode jobs out, hypotheses in, captions out.

The asyncio server is a shell around this: it feeds audio, runs the jobs this object asks for
on the shared engine (off the event loop, through :mod:`streamd.jobs`), hands the results back,
and sends the events. Nothing here imports the engine, the event loop or a socket.

    stream = Stream()
    events = stream.feed(samples)          # VAD changes
    job = stream.next_job()                # a window worth decoding now, or None
    events += stream.on_result(job, words) # partials and finals
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .audio import SAMPLE_RATE
from .policy import CommitPolicy, LocalAgreement, TimedWord
from .vad import VadConfig, VadGate

__all__ = ["Final", "Job", "Partial", "Stream", "StreamConfig", "UtteranceEnd", "VadChange"]

HOP = 160  # mel frame hop: windows start on one, so a stream's mel frames can be reused
# A leading repeat of up to this many committed words is an echo: five let "What your country
# can do for you." (seven words) through twice in a row when a region split after it.
ECHO_WORDS = 12


@dataclass(frozen=True)
class StreamConfig:
    update_s: float = 0.5  # new speech needed before the window is decoded again
    first_window_s: float = 1.0  # speech needed before the first decode of a region
    # Past this, the window drops committed audio older than context_s. Short windows paid twice
    # (benchmarks/live_errors.py, the long-form and the joined short files): at 15 s 8.57% /
    # 10.91% WER and 0.53 core-s per audio second, at 8 s 7.43% / 8.73% and 0.38.
    trim_s: float = 8.0
    # Committed words kept in the window as heard context (forced as the prefix), across the
    # trims above and across pauses of up to context_gap_s between utterances: offline
    # transcription sees a window of up to 30 s cut only at pauses over 2 s (plan_windows), and
    # a first decode of 1 s of audio alone turned "Two." into "2. 2." (BENCHMARKS.md, issue 18).
    context_s: float = 5.0
    context_gap_s: float = 2.0
    # An empty hypothesis with this much speech after the last committed word (for an update,
    # after the region's start too): the model ended its text at the context (without timestamps
    # Whisper stops at a pause after a sentence), so the window drops the context and decodes again.
    stall_s: float = 1.0
    max_window_s: float = 25.0  # past this, old words are committed without agreement
    force_commit_lag_s: float = 5.0  # ... those ending this long before the window's end
    prompt_chars: int = 200  # committed text that left the window, fed back as the prompt
    min_window_s: float = 5.0  # encoder window floor (the audio plus 1 s of silence, at least this)
    vad: VadConfig = field(default_factory=VadConfig)

    def __post_init__(self) -> None:
        if not 0.1 <= self.update_s <= 5.0:
            raise ValueError(f"update_s must be from 0.1 to 5, got {self.update_s}")
        if not 0.0 <= self.context_s < self.trim_s <= self.max_window_s:
            raise ValueError(
                "need 0 <= context_s < trim_s <= max_window_s, got"
                f" {self.context_s}, {self.trim_s}, {self.max_window_s}"
            )


@dataclass
class Job:
    """Decode ``audio`` (which starts ``offset`` seconds into the stream)."""

    audio: np.ndarray
    offset: float
    prompt: str  # committed text that has left the window
    prefix: str  # committed text still inside it: forced, not decoded again
    final: bool  # the speech ended: everything decoded is final
    min_window_s: float = 5.0
    epoch: int = 0  # the stream's clear count when it was made: a result from before a clear is dropped

    @property
    def start_sample(self) -> int:
        return round(self.offset * SAMPLE_RATE)


@dataclass
class Partial:
    segment: int
    start: float
    end: float
    text: str


@dataclass
class Final:
    segment: int
    start: float
    end: float
    text: str
    words: list[TimedWord]
    closes: bool = False  # the closing decode of its utterance made it: the utterance's last final


@dataclass
class VadChange:
    speech: bool
    t: float


@dataclass
class UtteranceEnd:
    """Every final of the utterance whose speech ended at ``t`` has been emitted: what a protocol
    that reports whole utterances (OpenAI Realtime's ``completed``, Deepgram's ``speech_final``)
    waits for. It comes after the closing decode, or at once when the words had all been
    committed before the speech ended."""

    t: float


Event = Partial | Final | VadChange | UtteranceEnd


class SampleBuffer:
    """The window's samples: appends are amortised O(1) and dropping the start is free.

    Re-concatenating the window for every 100 ms frame copied up to 30 s of audio per frame, a
    tenth of the event loop's time at 64 streams. Samples already handed out as a view are
    never written again: appends go past them, and growing or compacting takes a new array.
    """

    def __init__(self, capacity: int = 16000 * 8) -> None:
        self._store = np.zeros(capacity, np.float32)
        self._lo = self._hi = 0

    def view(self) -> np.ndarray:
        return self._store[self._lo : self._hi]

    def __len__(self) -> int:
        return self._hi - self._lo

    def append(self, samples: np.ndarray) -> None:
        n = len(samples)
        if self._hi + n > len(self._store):
            live = self._hi - self._lo
            store = np.zeros(max(2 * (live + n), len(self._store)), np.float32)
            store[:live] = self._store[self._lo : self._hi]
            self._store, self._lo, self._hi = store, 0, live
        self._store[self._hi : self._hi + n] = samples
        self._hi += n

    def drop(self, n: int) -> None:
        """Forget the first ``n`` samples (all of them when there are fewer)."""
        self._lo = min(self._lo + n, self._hi)


class Stream:
    """The window keeps the audio of the current utterance and of the last ``context_s`` of
    committed words before it (across short pauses), so that every decode hears their context;
    the committed words inside it are forced as the decoder's prefix, so each hypothesis holds
    only what follows them."""

    def __init__(self, config: StreamConfig | None = None, policy: CommitPolicy | None = None) -> None:
        self.config = config or StreamConfig()
        self._vad = VadGate(self.config.vad)
        self._policy = policy if policy is not None else LocalAgreement()
        self._samples = SampleBuffer()
        self._buffer_start = 0.0  # stream time of _buffer[0]
        self._received = 0  # samples fed in all
        self._decoded_until = 0.0  # stream time covered by the last job
        self._region_start: float | None = None
        # Regions that closed and wait for their closing decode, oldest first: one each, in order,
        # even when several end before the engine gets to the first (a loaded box).
        self._speech_ends: list[float] = []
        self._busy = False
        self._segment = 0
        self._committed: list[TimedWord] = []  # committed words still inside the window
        self._committed_until = 0.0
        self._last_end: float | None = None  # where the last utterance ended (its context may stay)
        self._recent: list[TimedWord] = []  # the last committed words, wherever they are now
        self._prompt_text = ""  # committed text that has left the window
        self._epoch = 0  # clears so far

    @property
    def time(self) -> float:
        return self._received / SAMPLE_RATE

    @property
    def busy(self) -> bool:
        """A job is out and its result not yet back."""
        return self._busy

    @property
    def final_pending(self) -> bool:
        """Speech ended and its last words still wait for their final decode."""
        return bool(self._speech_ends)

    @property
    def speech_end(self) -> float | None:
        """Stream time where the oldest utterance waiting for its final ended (``None``: none waits)."""
        return self._speech_ends[0] if self._speech_ends else None

    @property
    def idle(self) -> bool:
        """Nothing is decoding or waiting to be finalised (after :meth:`finish`: all done)."""
        return not self._busy and not self._speech_ends and not self._vad.in_speech

    @property
    def lag(self) -> float:
        """Seconds of received audio not yet covered by a decode."""
        return self.time - self._decoded_until

    @property
    def vad_rejected(self) -> int:
        """Sounds webrtcvad took for speech that the speech detector did not (music, animals, taps)."""
        return self._vad.rejected

    @property
    def buffer_start_sample(self) -> int:
        return round(self._buffer_start * SAMPLE_RATE)

    @property
    def received(self) -> int:
        """Samples fed in all."""
        return self._received

    def audio_from(self, sample: int) -> np.ndarray:
        """The window's audio from stream sample ``sample`` on (a view that later feeds leave alone)."""
        return self._buffer[max(0, sample - self.buffer_start_sample) :]

    @property
    def buffered(self) -> float:
        """Seconds of audio held in the window."""
        return len(self._buffer) / SAMPLE_RATE

    def feed(self, samples: np.ndarray) -> list[Event]:
        """Take 16 kHz mono float32 audio; returns VAD changes."""
        samples = np.asarray(samples, dtype=np.float32)
        self._samples.append(samples)
        self._received += len(samples)
        events: list[Event] = []
        for region in self._vad.feed(samples):
            if region.end is None:
                self._region_start = region.start
                if not self._speech_ends:  # else an earlier utterance still waits for its final
                    self._trim_to(max(self._buffer_start, self._context_cut(region.start)))
                events.append(VadChange(True, region.start))
            else:
                self._speech_ends.append(region.end)
                events.append(VadChange(False, region.end))
        if not self._vad.in_speech and not self._speech_ends:
            # Silence: keep only what a future region's pre-roll may reach back to, and the last
            # utterance's context while the pause is short enough for it to count.
            self._trim_to(min(self._context_cut(self.time), self.time - self.config.vad.lookback_s - 0.1))
        self._settle(events)
        return events

    def finish(self) -> list[Event]:
        """The client stopped, or asked for its words now (a Realtime ``commit``, a Deepgram
        ``Finalize``): what is left is the end of speech. Audio fed after it starts afresh."""
        region = self._vad.flush()
        events: list[Event] = []
        if region is not None:
            self._speech_ends.append(region.end)
            events.append(VadChange(False, region.end or self.time))
        self._settle(events)
        return events

    def clear(self) -> None:
        """Forget what is not committed yet (a Realtime client's ``input_audio_buffer.clear``): the
        open utterance and one waiting for its closing decode; a decode in flight comes back to
        nothing. No event: the utterance is dropped, not ended."""
        self._vad.flush()
        self._epoch += 1
        self._speech_ends = []
        self._region_start = None
        self._policy.reset()
        self._trim_to(self.time)

    def next_job(self) -> Job | None:
        """A window to decode now, or ``None`` (nothing new, or a job is still running)."""
        if self._busy:
            return None
        if self._speech_ends:  # the oldest first (not yet committed: _settle ends a committed one)
            audio = self._buffer[: max(0, round((self._speech_ends[0] - self._buffer_start) * SAMPLE_RATE))]
            return self._start(self._job(audio, final=True))
        if not self._vad.in_speech or self._region_start is None:
            return None
        if self.time - self._region_start < self.config.first_window_s:
            return None
        if self.time - self._decoded_until < self.config.update_s and self.buffered < self.config.max_window_s:
            return None
        return self._start(self._job(self._buffer, final=False))  # a view that later feeds leave alone

    def on_result(self, job: Job, words: list[TimedWord]) -> list[Event]:
        """Take the words decoded for ``job`` (stream times); returns partials and finals."""
        self._busy = False
        events: list[Event] = []
        if job.epoch != self._epoch:  # made before a clear
            self._settle(events)
            return events
        context = [w.key for w in self._committed[-ECHO_WORDS:]]
        fresh = self._drop_echo(_drop_unheard_tail(_drop_unheard_repeats(words), context))
        window_end = job.offset + len(job.audio) / SAMPLE_RATE
        if not fresh and job.prefix and self._stalled(job, window_end):
            # What follows the context is decoded alone: the next job (for a closing decode, the
            # same one again) starts after the last committed word, whose text becomes the prompt.
            self._trim_to(self._committed_until)
            self._policy.reset()
            self._settle(events)
            return events
        if job.final:
            self._commit(self._policy.flush(fresh), events, closes=True)
            end = self._end_utterance(window_end)
            events.append(UtteranceEnd(end))
            self._settle(events)  # a later utterance that ended meanwhile, all committed already
            return events
        committed, partial = self._policy.update(fresh)
        if not committed and window_end - job.offset > self.config.max_window_s:
            # No agreement for too long: commit what is well behind the window's end.
            horizon = window_end - self.config.force_commit_lag_s
            cut = next((i for i, w in enumerate(fresh) if w.end > horizon), len(fresh))
            committed, partial = fresh[:cut], fresh[cut:]
            self._policy.reset()
        self._commit(committed, events)
        if partial:
            text = "".join(w.word for w in partial).strip()
            if text:
                events.append(Partial(self._segment, partial[0].start, partial[-1].end, text))
        if window_end - self._buffer_start > self.config.trim_s and self._committed:
            self._trim_to(self._keep_from(self._committed_until))
        if window_end - self._buffer_start > self.config.max_window_s:
            # Nothing could be committed far enough back (noise the VAD took for speech, or
            # words only at the very end): drop the oldest audio rather than let the window
            # outgrow the encoder's 30 s.
            self._trim_to(window_end - self.config.max_window_s + self.config.force_commit_lag_s)
            self._policy.reset()
        self._settle(events)
        return events

    # -----------------------------------------------------------------------------------------

    def _drop_echo(self, words: list[TimedWord]) -> list[TimedWord]:
        """The committed words in the window are forced as the prefix, so a hypothesis holds
        only what follows them; but once they have left the window, the tail of their audio can
        still be heard and transcribed again. Drop a leading repeat of the last committed words
        that starts within a second of where they ended."""
        tail = [w.key for w in self._recent]
        for n in range(min(len(tail), len(words)), 0, -1):
            if [w.key for w in words[:n]] == tail[-n:] and words[0].start < self._committed_until + 1.0:
                return words[n:]
        return words

    def _stalled(self, job: Job, window_end: float) -> bool:
        """Speech enough after the last committed word for an empty hypothesis to be a stall (the
        window's last ``hangover_s`` may be the silence that ended the speech)."""
        since = self._committed_until
        if not job.final and self._region_start is not None:
            since = max(since, self._region_start)
        return window_end - self.config.vad.hangover_s - since >= self.config.stall_s

    def _settle(self, events: list[Event]) -> None:
        """End the utterances that wait for their final when their words are all committed
        already (a decode reached their end before the speech did): no closing decode is needed."""
        while (
            not self._busy
            and self._speech_ends
            and (self._speech_ends[0] <= max(self._buffer_start, self._committed_until))
        ):
            events.append(UtteranceEnd(self._end_utterance(self._speech_ends[0])))

    def _commit(self, words: list[TimedWord], events: list[Event], closes: bool = False) -> None:
        text = "".join(w.word for w in words).strip()
        if not text:
            return
        # Alignment jitter must not send a final back in time over the one before.
        floor = self._committed_until
        timed = []
        for w in words:
            start = max(w.start, floor)
            floor = max(w.end, start)
            timed.append(replace(w, start=start, end=floor))
        words = timed
        events.append(Final(self._segment, words[0].start, words[-1].end, text, list(words), closes))
        self._committed += words
        self._recent = [*self._recent, *words][-ECHO_WORDS:]
        self._committed_until = max(self._committed_until, words[-1].end)
        self._segment += 1

    def _end_utterance(self, window_end: float) -> float:
        """The oldest waiting utterance is done (its closing decode covered it up to
        ``window_end``); where it ended. Later ones that ended meanwhile still wait."""
        end = self._speech_ends.pop(0) if self._speech_ends else window_end
        if not self._vad.in_speech and not self._speech_ends:
            self._region_start = None
        self._policy.reset()
        self._last_end = end
        self._trim_to(self._keep_from(end))
        return end

    def _job(self, audio: np.ndarray, final: bool) -> Job:
        prefix = "".join(w.word for w in self._committed)
        return Job(audio, self._buffer_start, self._prompt(), prefix, final, self.config.min_window_s, self._epoch)

    def _start(self, job: Job) -> Job:
        self._busy = True
        self._decoded_until = job.offset + len(job.audio) / SAMPLE_RATE
        return job

    @property
    def _buffer(self) -> np.ndarray:
        """The window's samples, as a view that later feeds and trims leave as it is."""
        return self._samples.view()

    def _keep_from(self, t: float) -> float:
        """Where the window may start and still hold, as context, the committed words of the
        last ``context_s`` before ``t`` (at a word boundary: the words before it become prompt)."""
        cut = self._buffer_start
        for w in self._committed:
            if w.end > t - self.config.context_s:
                break
            cut = w.end
        return cut

    def _context_cut(self, now: float) -> float:
        """Where the window may start at ``now`` outside speech: after the last utterance's
        context while the pause since it is at most ``context_gap_s``, else at ``now``."""
        if self._last_end is not None and self._committed and now - self._last_end <= self.config.context_gap_s:
            return self._keep_from(self._last_end)
        return now

    def _prompt(self) -> str:
        return self._prompt_text[-self.config.prompt_chars :]

    def _trim_to(self, t: float) -> None:
        """Drop buffered audio before stream time ``t``; committed words before it move to the
        prompt."""
        cut = round((t - self._buffer_start) * SAMPLE_RATE) // HOP * HOP  # windows start on a mel hop
        if cut <= 0:
            return
        self._samples.drop(cut)
        self._buffer_start += cut / SAMPLE_RATE
        gone = [w for w in self._committed if w.end <= self._buffer_start + 0.05]
        if gone:
            # Only the last prompt_chars are ever used: keep no more (a day of speech is a megabyte).
            self._prompt_text = (self._prompt_text + "".join(w.word for w in gone))[-self.config.prompt_chars :]
            self._committed = self._committed[len(gone) :]


UNHEARD_WORD_S = 0.05  # mean duration per word under which a repeated copy had no audio of its own


def _drop_unheard_repeats(words: list[TimedWord]) -> list[TimedWord]:
    """Drop the second copy of a phrase of 3+ words said twice back to back when the aligner
    found no audio for it (its words last under ``UNHEARD_WORD_S`` each): Whisper repeating
    itself at the end of a short window ("what your country can do for you. What your country
    can do for you.", the copy timed 7.86-7.86 s). A phrase really said twice takes time."""
    keys = [w.key for w in words]
    for k in range(len(words) // 2, 2, -1):
        for i in range(len(words) - 2 * k + 1):
            if keys[i : i + k] == keys[i + k : i + 2 * k]:
                copy = words[i + k : i + 2 * k]
                if (copy[-1].end - copy[0].start) / k < UNHEARD_WORD_S:
                    return _drop_unheard_repeats(words[: i + k] + words[i + 2 * k :])
    return words


def _drop_unheard_tail(words: list[TimedWord], context: list[str]) -> list[TimedWord]:
    """Drop words the aligner found no audio for at the end of a hypothesis: Whisper going on
    past the audio with text it has seen, "rainbow. When the sunlight strikes raindrops" (the
    file's first line again, five words timed 121.80-121.80 s) or "can do for you. Ask not what
    your country can do for you." (the copy in 0.04 s). Such a tail is three words or more that
    last under ``UNHEARD_WORD_S`` each (the last may hold the window's leftover audio), or a
    shorter one that repeats the words just before it ("2. 2.", the second timed 54.97-54.97 s),
    or the whole hypothesis ("I'm sorry." in 0.04 s, after the speech had ended).
    Dropped from a live hypothesis, a real word at the window's edge only waits for the next."""
    keys = [*context, *(w.key for w in words)]
    n = _unheard_run(words)
    if n == 0 and _unheard_run(words[:-1]) >= 2:  # the last word holds what audio was left
        n = _unheard_run(words[:-1]) + 1
    if n and (n >= 3 or n == len(words) or keys[-n:] == keys[-2 * n : -n]):
        return words[: len(words) - n]
    return words


def _unheard_run(words: list[TimedWord]) -> int:
    """How many words at the end last under ``UNHEARD_WORD_S`` each."""
    n = 0
    while n < len(words) and words[-1 - n].end - words[-1 - n].start < UNHEARD_WORD_S:
        n += 1
    return n
