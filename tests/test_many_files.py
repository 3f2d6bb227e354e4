"""200 made-up files through one ``streamd transcribe``: no crash, bounded memory, each bad file
one line on stderr. Cuts of up to 20 s keep it near a minute; ``benchmarks/many_files.py --files
10000`` is the long version, with cuts of up to 60 s."""

from __future__ import annotations

from .conftest import load_benchmark

many = load_benchmark("many_files")

MAX_RSS_MB = 500


def test_200_files_of_every_kind_and_length_transcribe_without_a_crash(tmp_path):
    made = many.make_files(200, tmp_path, seed=1, max_s=20.0)
    bad = [m for m in made if m.bad]
    assert bad and len(bad) < 30  # some truncated and empty files among them
    assert {m.path.suffix for m in made} == {".wav", ".flac", ".ogg"}
    result = many.run(made)
    assert result.problems == [], result.problems
    assert result.peak_rss_mb < MAX_RSS_MB
