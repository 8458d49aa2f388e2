"""A short run of each atheris fuzz target under fuzz/ (longer runs: see fuzz/README.md)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent.parent / "fuzz"
TARGETS = sorted(FUZZ.glob("fuzz_*.py"))
sys.path.insert(0, str(FUZZ))
import worst_cases  # noqa: E402


@pytest.mark.parametrize("target", TARGETS, ids=[t.stem for t in TARGETS])
def test_fuzz_target_short_run(target: Path, tmp_path: Path) -> None:
    """2,000 inputs, starting from the parsers' known worst cases, find no invariant
    broken."""
    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("CI"):
            pytest.fail("atheris is not installed; it is in the test extra")
        pytest.skip("atheris is not installed")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = worst_cases.write_corpus(target.stem, str(corpus))
    assert seeds > 0, f"no worst cases for {target.stem} in fuzz/worst_cases.py"
    result = subprocess.run(
        [sys.executable, str(target), "-runs=2000", "-seed=1413", str(corpus)],
        cwd=tmp_path,  # where a crash input would be written
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 2000 runs" in result.stderr
