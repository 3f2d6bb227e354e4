"""What unpadded encoder windows do to accuracy: WER on the dev corpus per window policy.

Whisper was trained on 30 s windows padded with silence. Encoding only the real audio is much
cheaper for short speech, but the model then often fails to close its last segment and starts
over. This prints WER, loops caught and padded retries for each policy (greedy, no word timing):

    python benchmarks/window_padding.py
"""

from __future__ import annotations

import time

from harness import CORPUS, corpus_wer, reference

from streamd.audio import load_audio
from whisper_engine.engine import Engine
from whisper_engine.transcribe import TranscribeOptions, transcribe

# (name, tail frames of silence, minimum window frames, retry padded on failure, pad to 30 s)
POLICIES = [
    ("padded to 30 s (Whisper)", 0, 0, False, True),
    ("unpadded, audio only", 0, 0, False, False),
    ("unpadded + 1 s silence", 100, 0, False, False),
    ("unpadded + 1 s silence, padded retry", 100, 0, True, False),
    ("unpadded + 1 s, >= 15 s, padded retry (default)", 100, 1500, True, False),
]


def main() -> None:
    files = sorted(CORPUS.glob("*.wav"))
    audios = [load_audio(f) for f in files]
    refs = [reference(f) for f in files]
    engine = Engine.load()
    print(f"# {len(files)} dev files; greedy, no word timestamps; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| window policy | WER % | padded retries | decode s |")
    print("|---|---:|---:|---:|")
    for name, tail, min_frames, retry, pad in POLICIES:
        engine.tail_frames, engine.min_window_frames, engine.retry_padded = tail, min_frames, retry
        engine.padded_retries = 0
        started = time.perf_counter()
        options = TranscribeOptions(word_timestamps=False, pad_to_30s=pad)
        hyps = [transcribe(engine, audio, options).text for audio in audios]
        elapsed = time.perf_counter() - started
        print(f"| {name} | {100 * corpus_wer(refs, hyps):.2f} | {engine.padded_retries} | {elapsed:.1f} |", flush=True)


if __name__ == "__main__":
    main()
