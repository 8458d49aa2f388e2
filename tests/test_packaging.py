"""The wheel installs what admins look for: man pages where man(1) finds them, the
sample configuration and the systemd units under share/procident."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built and installed under a prefix of its own."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = work.glob("procident-*.whl")
    # A virtual environment of its own: pip install --prefix would uninstall the
    # procident the tests run from.
    target = work / "prefix"
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, timeout=600)
    subprocess.run(
        [str(target / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return target


def test_shared_files_installed(prefix: Path) -> None:
    """The man pages, the sample configuration and every unit are installed, unchanged."""
    expected = {
        "share/man/man8/procident.8": "man/procident.8",
        "share/man/man5/procident.toml.5": "man/procident.toml.5",
        "share/procident/procident.toml": "etc/procident.toml",
    }
    for unit in (ROOT / "etc" / "systemd").rglob("*.*"):
        relative = unit.relative_to(ROOT / "etc")
        expected[f"share/procident/{relative}"] = f"etc/{relative}"
    for installed, source in expected.items():
        assert (prefix / installed).read_bytes() == (ROOT / source).read_bytes(), installed


def test_man_finds_the_pages(prefix: Path) -> None:
    """With the installed script on PATH, `man procident` and `man procident.toml` find
    the installed pages (man-db looks beside each PATH directory)."""
    man = shutil.which("man")
    if man is None:
        if os.environ.get("CI"):
            pytest.fail("man is not installed; .ci/run should install man-db")
        pytest.skip("man is not installed")
    env = dict(os.environ, PATH=f"{prefix / 'bin'}:/usr/bin:/bin")
    env.pop("MANPATH", None)
    for page, path in (
        ("procident", "share/man/man8/procident.8"),
        ("procident.toml", "share/man/man5/procident.toml.5"),
    ):
        result = subprocess.run([man, "-w", page], env=env, capture_output=True, text=True)
        assert result.stdout.strip() == str(prefix / path), result.stderr
