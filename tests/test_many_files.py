"""200 made-up files through one ``streamd transcribe``: no crash, bounded memory, each bad file
one line on stderr. Cuts of up to 20 s keep it near a minute; ``benchmarks/many_files.py --files
10000`` is the long version, with cuts of up to 60 s."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("many_files", ROOT / "benchmarks" / "many_files.py")
assert _spec is not None and _spec.loader is not None
many = importlib.util.module_from_spec(_spec)
sys.modules["many_files"] = many
_spec.loader.exec_module(many)

MAX_RSS_MB = 500


def test_200_files_of_every_kind_and_length_transcribe_without_a_crash(tmp_path):
    made = many.make_files(200, tmp_path, seed=1, max_s=20.0)
    bad = [m for m in made if m.bad]
    assert bad and len(bad) < 30  # some truncated and empty files among them
    assert {m.path.suffix for m in made} == {".wav", ".flac", ".ogg"}
    result = many.run(made)
    assert result.problems == [], result.problems
    assert result.peak_rss_mb < MAX_RSS_MB
