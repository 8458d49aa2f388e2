"""A short run of each atheris fuzz target under fuzz/ (longer runs: see fuzz/README.md)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TARGETS = sorted((Path(__file__).parent.parent / "fuzz").glob("fuzz_*.py"))


@pytest.mark.parametrize("target", TARGETS, ids=[t.stem for t in TARGETS])
def test_fuzz_target_short_run(target: Path, tmp_path: Path) -> None:
    """2,000 inputs find no invariant broken."""
    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("CI"):
            pytest.fail("atheris is not installed; it is in the test extra")
        pytest.skip("atheris is not installed")
    result = subprocess.run(
        [sys.executable, str(target), "-runs=2000", "-seed=1413"],
        cwd=tmp_path,  # where a crash input would be written
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 2000 runs" in result.stderr
