"""The layout a maintainer can read: no tracked source file over 800 lines (vendored copies of other
projects' files aside), the framework adapters (normax.torch, normax.jax: one thin file per op
family) under 500 lines a file, and the typed pyo3 seam (options cross as one object: no positional
option lists, no kernel looked up by name)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = {".py", ".rs", ".cu", ".wgsl"}
ADAPTER_PACKAGES = ["python/normax/jax", "python/normax/torch"]
# Other projects' files, copied unmodified (their README says from where): not ours to split.
VENDORED = ("tests/conformance/jax_upstream/",)


def _tracked_files() -> list[str]:
    try:
        done = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return done.stdout.splitlines()


def _lines(path: str) -> int:
    with open(ROOT / path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def test_no_source_file_over_800_lines():
    sources = [
        p for p in _tracked_files() if Path(p).suffix in SOURCE_SUFFIXES and not p.startswith(VENDORED)
    ]
    assert sources, "no tracked source files found"
    too_long = {p: n for p in sources if (n := _lines(p)) > 800}
    assert not too_long, f"split these by topic: {too_long}"


def test_adapter_files_under_500_lines():
    files = [p for p in _tracked_files() if p.startswith(tuple(f"{d}/" for d in ADAPTER_PACKAGES))]
    assert any(p.startswith("python/normax/jax/") for p in files), "normax.jax is not a package"
    too_long = {p: n for p in files if (n := _lines(p)) >= 500}
    assert not too_long, f"one file per op family, each under 500 lines: {too_long}"


def _grep(pattern: str, under: str, suffix: str) -> list[str]:
    hits = []
    for p in _tracked_files():
        if p.startswith(under) and p.endswith(suffix):
            text = (ROOT / p).read_text(encoding="utf-8")
            hits += [f"{p}:{i}" for i, line in enumerate(text.splitlines(), 1) if pattern in line]
    return hits


@pytest.mark.parametrize(
    ("pattern", "under", "suffix"),
    [
        # The bindings take the checked options as one object, not as many positional arguments.
        ("too_many_arguments", "rust/normax-py/", ".rs"),
        # No option tuple spread into a call, no kernel looked up by a built name.
        ("*opts", "python/", ".py"),
        ("getattr(_core", "python/", ".py"),
    ],
)
def test_typed_seam(pattern, under, suffix):
    hits = _grep(pattern, under, suffix)
    assert not hits, f"{pattern!r} found: {hits}"
