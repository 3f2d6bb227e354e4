"""Many files through ``streamd transcribe``: no crash, bounded memory, every bad file reported.

Makes ``--files`` recordings, alternately real speech and non-speech (cuts of 0.1 s to 60 s, log-uniform;
8-48 kHz; 1 or 2 channels; WAV, FLAC or OGG; about 1 in 25 truncated, 1 in 50 empty, 1 in 100 a
valid header with no samples), runs them through one ``streamd transcribe --format jsonl``
process, and checks:

- it exits 1 (there are bad files) and did not crash (no traceback, no signal);
- each bad file is exactly one ``streamd: <path>: ...`` line on stderr, each good one a JSON line;
- the process's peak resident memory (its VmHWM) stays under ``--max-rss-mb``.

    python benchmarks/many_files.py --files 10000          # the issue's bar (hours on 2 cores)
    python benchmarks/many_files.py --files 200 --max-s 20  # what CI runs (tests/test_many_files.py)

Sources: ``../shared/corpus/{dev,nonspeech}`` when present, else the repository's test audio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from harness import CORPUS, NONSPEECH, TEST_DATA

ROOT = Path(__file__).resolve().parents[1]
RATES = (8000, 11025, 16000, 22050, 32000, 44100, 48000)
CONTAINERS = (("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"))


@dataclass
class Made:
    path: Path
    bad: bool  # expected to be refused (truncated or empty file)
    seconds: float


def sources() -> tuple[list[Path], list[Path]]:
    """(speech, non-speech) recordings to cut from."""
    speech, other = sorted(CORPUS.glob("*.wav")), sorted(NONSPEECH.glob("*.wav"))
    if speech and other:
        return speech, other
    return sorted((TEST_DATA / "speech").glob("*.flac")), sorted(TEST_DATA.glob("*.flac"))


def make_files(n: int, out: Path, seed: int = 0, max_s: float = 60.0) -> list[Made]:
    """``n`` files in ``out``, alternating speech and non-speech sources (where both exist),
    cut to 0.1 s .. ``max_s`` (log-uniform)."""
    import soxr

    rng = np.random.default_rng(seed)
    # Each kind as one long recording, its files one after another: a cut reaches across them
    # (looping one clip would make speech repeat itself, which no meeting does).
    kinds = [np.concatenate([sf.read(p, dtype="float32")[0] for p in paths]) for paths in sources() if paths]
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(n):
        src = kinds[i % len(kinds)]
        seconds = float(np.exp(rng.uniform(np.log(0.1), np.log(max_s))))
        length = round(seconds * 16000)
        start = int(rng.integers(0, len(src)))
        x = np.resize(np.roll(src, -start), length)
        rate = int(rng.choice(RATES))
        if rate != 16000:
            x = soxr.resample(x, 16000, rate)
        channels = int(rng.integers(1, 3))
        if channels == 2:
            x = np.stack([x, 0.5 * x], axis=1)
        ext, container, subtype = CONTAINERS[int(rng.integers(0, len(CONTAINERS)))]
        if len(x) < 2048 and ext == "ogg":  # libvorbis needs a few blocks
            ext, container, subtype = CONTAINERS[0]
        path = out / f"f{i:05d}_{rate}_{channels}ch.{ext}"
        kind = rng.random()
        if kind < 0.02:  # empty file
            path.write_bytes(b"")
            made.append(Made(path, True, 0.0))
            continue
        if kind < 0.03:  # a valid header, no samples
            if ext == "flac":  # libsndfile writes nothing at all for a FLAC file without samples
                path = path.with_suffix(".wav")
                container, subtype = CONTAINERS[0][1:]
            sf.write(path, np.zeros((0, channels), np.float32), rate, format=container, subtype=subtype)
            made.append(Made(path, False, 0.0))
            continue
        write(path, x, rate, container, subtype)
        if kind < 0.07:  # truncated inside its header
            path.write_bytes(path.read_bytes()[: int(rng.integers(1, 40))])
            made.append(Made(path, True, 0.0))
            continue
        made.append(Made(path, False, len(x) / rate))
    return made


def write(path: Path, x: np.ndarray, rate: int, container: str, subtype: str) -> None:
    """``sf.write`` in blocks: libsndfile 1.2.2's Vorbis encoder segfaults when handed a long
    48 kHz stereo cut in one call (seen at file 44 of the 10,000-file run), and writes fine in
    blocks of 64k frames."""
    channels = 1 if x.ndim == 1 else x.shape[1]
    with sf.SoundFile(path, "w", rate, channels, subtype, format=container) as f:
        for i in range(0, len(x), 65536):
            f.write(x[i : i + 65536])


@dataclass
class Result:
    files: int
    bad: int
    audio_s: float
    wall_s: float
    exit_code: int
    peak_rss_mb: float
    records: int  # JSON lines on stdout
    error_lines: int  # lines on stderr
    problems: list[str]


def run(made: list[Made], extra: list[str] | None = None) -> Result:
    """One ``streamd transcribe`` over every file; what it did, and what was wrong with it."""
    cmd = [sys.executable, "-m", "streamd", "transcribe", "--format", "jsonl", *(extra or []),
           *(str(m.path) for m in made)]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The child's own peak RSS, VmHWM, sampled until it exits: ru_maxrss of a child counts the
    # parent's memory at fork (Linux carries the high-water mark across exec), and under pytest
    # that parent holds torch.
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                peak = max(peak, int(next(line.split()[1] for line in status if line.startswith("VmHWM:"))))
            except (OSError, StopIteration):
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    wall = time.perf_counter() - started
    problems = []
    if peak == 0:  # (or the bar below would pass on no measurement at all)
        problems.append("could not read the child's peak RSS (VmHWM in /proc/PID/status)")
    bad = {str(m.path) for m in made if m.bad}
    errors = stderr.splitlines()
    if "Traceback" in stderr:
        problems.append("a traceback on stderr")
    if proc.returncode < 0:
        problems.append(f"killed by signal {-proc.returncode}")
    if proc.returncode != (1 if bad else 0):
        problems.append(f"exit status {proc.returncode}, expected {1 if bad else 0}")
    named = set()
    for line in errors:
        path = line.removeprefix("streamd: ").split(": ", 1)[0]
        if not line.startswith("streamd: ") or path not in bad:
            problems.append(f"unexpected stderr line: {line[:200]}")
        named.add(path)
    if missing := bad - named:
        problems.append(f"{len(missing)} bad files not reported, e.g. {sorted(missing)[0]}")
    if len(errors) != len(bad):
        problems.append(f"{len(errors)} stderr lines for {len(bad)} bad files")
    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    good = [str(m.path) for m in made if not m.bad]
    if [r["file"] for r in records] != good:
        problems.append(f"{len(records)} JSON lines for {len(good)} good files, or out of order")
    return Result(len(made), len(bad), sum(m.seconds for m in made), wall, proc.returncode, peak / 1024,
                  len(records), len(errors), problems)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--dir", type=Path, default=Path("/tmp/streamd-many-files"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-mb", type=float, default=500.0)
    p.add_argument("--max-s", type=float, default=60.0, help="longest cut (default 60 s)")
    args = p.parse_args()
    made = make_files(args.files, args.dir, args.seed, args.max_s)
    r = run(made)
    print(f"# many_files: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, sources: {sources()[0][0].parent}")
    print("| files | bad | audio s | wall s | x realtime | exit | peak RSS MB | JSON lines | stderr lines | result |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    ok = not r.problems and r.peak_rss_mb < args.max_rss_mb
    print(f"| {r.files} | {r.bad} | {r.audio_s:.0f} | {r.wall_s:.0f} | {r.audio_s / r.wall_s:.1f} | {r.exit_code} "
          f"| {r.peak_rss_mb:.0f} | {r.records} | {r.error_lines} | {'pass' if ok else 'FAIL'} |")  # fmt: skip
    for problem in r.problems:
        print("  ", problem)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
