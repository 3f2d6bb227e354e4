"""The code's shape, checked: the layers and what each may import (pyproject's import-linter
contracts, docs/architecture.md), no reaching into another module's private names, no probing
the engine or a backend for what its interface should declare."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("streamd", "whisper_engine", "npu")


def _modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def test_the_import_contracts_hold():
    """Layers (streamd over npu over whisper_engine, the daemon reaching the NPU only through the
    engine's registry), a sans-I/O streaming core, and no import circle among sibling modules:
    ``lint-imports`` reads them from pyproject.toml."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    run = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "BROKEN" not in run.stdout and "Contracts: 4 kept, 0 broken." in run.stdout


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{getattr(node, 'lineno', 0)}"


def _private_imports(path: Path) -> list[str]:
    """``from other_module import _name``: a private name used outside its own module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{_where(path, node)}: {alias.name} from {node.module}")
    return found


def test_no_module_imports_another_modules_private_names():
    found = [hit for path in _modules(*PACKAGES) for hit in _private_imports(path)]
    assert found == []


def _probes(path: Path) -> list[str]:
    """``getattr``/``hasattr`` on something named engine or backend: a question the backend
    interface (``whisper_engine.backend``) should answer by declaration."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            target = ast.unparse(node.args[0]) if node.args else ""
            if "engine" in target or "backend" in target:
                found.append(f"{_where(path, node)}: {ast.unparse(node)}")
    return found


def test_nothing_probes_the_engine_or_a_backend_for_what_it_can_do():
    found = [hit for path in _modules(*PACKAGES) for hit in _probes(path)]
    assert found == []


def test_a_planted_private_import_and_probe_are_caught(tmp_path):
    """The two checks above can fail."""
    planted = tmp_path / "planted.py"
    planted.write_text("from whisper_engine.decoding import _x\nhasattr(engine.backend, 'y')\n")
    assert _private_imports(planted) == ["planted.py:1: _x from whisper_engine.decoding"]
    assert _probes(planted) == ["planted.py:2: hasattr(engine.backend, 'y')"]


def test_the_daemon_and_the_engine_agree_on_the_sample_rate_and_the_mel_hop():
    """The streaming core may not import the engine, so it keeps its own copy of two facts."""
    from streamd import audio, stream
    from whisper_engine import mel

    assert audio.SAMPLE_RATE == mel.SAMPLE_RATE and stream.HOP == mel.HOP_LENGTH


def test_no_module_is_over_700_lines():
    """A module that long holds several subjects; split it where its own sections show the seams.
    (Tests are left out: a test file is a list of cases.)"""
    long = {}
    for folder in (*PACKAGES, "benchmarks", "mlir"):
        for path in (ROOT / folder).rglob("*.py"):
            lines = len(path.read_text().splitlines())
            if lines > 700:
                long[str(path.relative_to(ROOT))] = lines
    assert long == {}
