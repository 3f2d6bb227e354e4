"""Where live finals depart from offline text: an error analysis on the dev corpus.

Each recording goes through ``Stream`` on ``stream_sim.py``'s virtual clock and through the file
path (``streamd transcribe``'s text). Both are aligned to the reference; every word error
(substitution, deletion or insertion) that live makes at a place where offline does not (a
*live-only* error), and the reverse, is attributed to the live final that holds it: how that
final was committed (two hypotheses agreeing, the utterance's closing decode, or forced past the
window's bound), how far its words were from the window's end when committed, and whether it
was the utterance's first final.

    python benchmarks/live_errors.py [FILE...] [--joined] [--show 30] [--config key=value ...]

``--joined`` streams the corpus's shorter recordings one after another as one stream (1 s of a
quiet room between them), scored against their references joined: issue 18's second bar.
``--config update_s=0.5`` (repeatable) changes a ``StreamConfig`` field.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path

import jiwer
import numpy as np
from harness import LONG_FORM, corpus_wer, joined_shorter_files, normalise, reference
from stream_sim import simulate
from threadpoolctl import threadpool_limits

from streamd.audio import load_audio
from streamd.files import transcribe_file
from streamd.stream import StreamConfig
from streamd.vad import VadConfig
from whisper_engine.engine import Engine
from whisper_engine.transcribe import TranscribeOptions


@dataclass
class Recording:
    name: str
    audio: np.ndarray
    reference: str


def recordings(args: argparse.Namespace) -> list[Recording]:
    if args.joined:
        audio, ref, n = joined_shorter_files()
        return [Recording(f"{n} shorter files, joined", audio, ref)]
    paths = [Path(f) for f in args.files] or [LONG_FORM]
    return [Recording(p.name, load_audio(p), reference(p)) for p in paths]


def words_of(text: str) -> list[str]:
    return normalise(text).split()


def errors_by_position(ref: str, hyp_words: list[str]) -> tuple[list[int], list[int | None]]:
    """Errors at each reference position ``i`` (a substitution or deletion of word ``i``, plus
    the words inserted just before it; position ``len(ref)`` holds insertions at the end), so
    that their sum is the WER's numerator; and per position the hypothesis word that stands
    there (for a deletion, the nearest one before it; ``None``: none)."""
    ref_words = words_of(ref)
    out = jiwer.process_words(" ".join(ref_words), " ".join(hyp_words) or "<empty>")
    errors = [0] * (len(ref_words) + 1)
    where: list[int | None] = [None] * (len(ref_words) + 1)
    for chunk in out.alignments[0]:
        if chunk.type == "insert":
            errors[chunk.ref_start_idx] += chunk.hyp_end_idx - chunk.hyp_start_idx
            where[chunk.ref_start_idx] = chunk.hyp_start_idx
            continue
        for k in range(chunk.ref_end_idx - chunk.ref_start_idx):
            i = chunk.ref_start_idx + k
            if chunk.type != "equal":
                errors[i] += 1
            if chunk.type in ("equal", "substitute"):
                where[i] = chunk.hyp_start_idx + k
            elif where[i] is None and chunk.hyp_start_idx > 0:
                where[i] = chunk.hyp_start_idx - 1
    if not hyp_words:
        where = [None] * len(where)
    return errors, where


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*")
    p.add_argument("--joined", action="store_true")
    p.add_argument("--show", type=int, default=25, help="print this many departures in context")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (the daemon's default is 1)")
    args = p.parse_args()
    with threadpool_limits(args.threads, user_api="blas"):
        run(args)


def run(args: argparse.Namespace) -> None:
    types = {f.name: f.type for f in fields(StreamConfig)}
    changes = {}
    for item in args.config:
        key, _, value = item.partition("=")
        if key not in types or key == "vad":
            raise SystemExit(f"--config {item}: not a number field of StreamConfig ({', '.join(types)})")
        changes[key] = (int if types[key] in (int, "int") else float)(value)
    config = replace(StreamConfig(), **changes)
    engine = Engine.load()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, StreamConfig changes: {changes or 'none'}")
    kinds: Counter[str] = Counter()
    all_refs, all_live, all_off = [], [], []
    shown = 0
    for rec in recordings(args):
        offline = transcribe_file(engine, rec.audio, TranscribeOptions(), VadConfig()).text
        live = simulate(engine, rec.audio, config)
        all_refs.append(rec.reference)
        all_live.append(live["text"])
        all_off.append(offline)
        # One normalised word list per final, so each hypothesis word knows its final.
        owner, live_words = [], []
        for k, meta in enumerate(live["finals"]):
            w = words_of(meta["text"])
            live_words += w
            owner += [k] * len(w)
        live_err, live_at = errors_by_position(rec.reference, live_words)
        off_err, _ = errors_by_position(rec.reference, words_of(offline))
        ref_words = words_of(rec.reference)
        fl = np.array(live["final_latency"])
        live_wer = 100 * corpus_wer([rec.reference], [live["text"]])
        print(
            f"\n## {rec.name}: {len(rec.audio) / 16000:.1f} s, live {live_wer:.2f}%"
            f" / offline {100 * corpus_wer([rec.reference], [offline]):.2f}%, final latency median / p90"
            f" {np.median(fl):.2f} / {np.percentile(fl, 90):.2f} s, CPU {live['cpu_per_audio_s']:.2f} s/s"
        )
        for i, (le, oe) in enumerate(zip(live_err, off_err, strict=True)):
            if le == oe:
                continue
            at = live_at[i]
            meta = live["finals"][owner[at]] if at is not None and owner else None
            kind = meta["kind"] if meta else "nothing live"
            if meta and meta["first"]:
                kind += ", first final"
            kinds[("live-only " if le > oe else "offline-only ") + kind] += abs(le - oe)
            if shown < args.show and le > oe:
                shown += 1
                before, here, after = ref_words[max(0, i - 4) : i], ref_words[i : i + 1], ref_words[i + 1 : i + 5]
                ctx = f"{' '.join(before)} [{' '.join(here)}] {' '.join(after)}"
                said = meta["text"] if meta else "-"
                lag = f"{meta['lag']:.2f}" if meta else "-"
                print(f"- {le - oe} at …{ctx}… | live final [{kind}, ends {lag} s before its window's end]: {said!r}")
    print("\n| departure | words |\n|---|---:|")
    for k, n in kinds.most_common():
        print(f"| {k} | {n} |")
    print(
        f"\nall: live {100 * corpus_wer(all_refs, all_live):.2f}% / offline {100 * corpus_wer(all_refs, all_off):.2f}%"
    )


if __name__ == "__main__":
    main()
