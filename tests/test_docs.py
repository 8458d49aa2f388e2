"""The documentation cannot drift from the code: man pages lint clean and cover every
config key and command-line option; the README's test command is the one CI runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from procident.cli import main
from procident.config import Config, Rule

ROOT = Path(__file__).parent.parent
MAN8 = (ROOT / "man" / "procident.8").read_text()
MAN5 = (ROOT / "man" / "procident.toml.5").read_text()


def test_man_pages_lint_clean() -> None:
    """mandoc -Tlint finds nothing at warning level or above."""
    if shutil.which("mandoc") is None:
        if os.environ.get("CI"):
            pytest.fail("mandoc is not installed; .ci/run should install it")
        pytest.skip("mandoc is not installed")
    result = subprocess.run(
        ["mandoc", "-Tlint", "-W", "warning", "man/procident.8", "man/procident.toml.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_every_config_key_documented() -> None:
    """Each [section] and key of the configuration has its entry in procident.toml(5)."""
    config = Config()
    rules = MAN5.split(".Ss \\&[\\&[rules\\&]\\&]", 1)[1].split(".Ss ", 1)[0]
    for key in Rule.__dataclass_fields__:
        assert re.search(rf"^\.It Ic {key} No \(", rules, re.M), f"rules.{key}"
    for section in config.__dataclass_fields__:
        if section == "rules":
            continue
        assert f".Ss \\&[{section}\\&]" in MAN5, section
        body = MAN5.split(f".Ss \\&[{section}\\&]", 1)[1].split(".Ss ", 1)[0]
        for key in getattr(config, section).__dataclass_fields__:
            assert re.search(rf"^\.It Ic {key} No \(", body, re.M), f"{section}.{key}"


def test_every_cli_option_documented() -> None:
    """Each command and each of its options appears in procident(8)."""
    assert isinstance(main, click.Group)
    for name, command in main.commands.items():
        assert re.search(rf"^\.Cm {name}\b", MAN8, re.M), name
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                for option in param.opts:
                    # an entry of its own (not just the synopsis): ".It Fl -daemon", or
                    # ".It Fl l , -listen Ar ..." beside its short form
                    if option.startswith("--"):
                        pattern = rf"^\.It Fl [^\n]*?(?<![\w-])-{option[2:]}\b"
                    else:
                        pattern = rf"^\.It Fl {option[1:]}\b"
                    assert re.search(pattern, MAN8, re.M), f"{name} {option}"
    assert re.search(r"^\.It Fl V , -version$", MAN8, re.M)


def test_readme_test_command_is_what_ci_runs() -> None:
    """The README's test command is, to the byte, the one .ci/run runs."""
    ci = (ROOT / ".ci" / "run").read_text()
    command = ci.split("# test-command (keep identical to the README)\n", 1)[1].strip()
    readme = (ROOT / "README.md").read_text()
    assert f"\n{command}\n" in readme


def test_every_key_has_type_default_and_example() -> None:
    """Each key's entry in procident.toml(5) gives its type, its default and an example."""
    body = MAN5.split(".Sh DESCRIPTION", 1)[1].split(".Sh USER FILES", 1)[0]
    entries = re.split(r"^(?=\.It Ic \w+ No \()", body, flags=re.M)[1:]
    assert len(entries) >= 50
    for entry in entries:
        key = re.match(r"\.It Ic (\w+) No \(([^)]+)\)", entry)
        assert key, entry[:60]
        text = entry.split("\n.Ss ", 1)[0]
        assert "Default" in text and "Example" in text, key[1]


def test_man_page_examples_are_valid_configurations() -> None:
    """Every example configuration in procident.toml(5) is accepted as it stands."""
    import tomllib

    from procident.config import parse_config

    examples = MAN5.split(".Sh EXAMPLES", 1)[1].split(".Sh ", 1)[0]
    blocks = re.findall(r"^\.Bd -literal[^\n]*\n(.*?)^\.Ed", examples, re.M | re.S)
    assert len(blocks) >= 2
    for block in blocks:
        parse_config(tomllib.loads(block.replace("\\(dq", '"').replace("\\&", "")))


def test_security_md_names_tests_that_exist() -> None:
    """Every test SECURITY.md gives as holding a promise is defined: in the module named
    with it, or, written as a bare name after one, in that same module."""
    text = (ROOT / "SECURITY.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "test" in line]
    named = 0
    for row in rows:
        module = None
        for match in re.finditer(r"`(?:tests/(test_\w+)\.py)?(?:::)?(test_\w+)?", row):
            if match[1]:
                module = match[1]
            if match[2]:
                assert module, f"no module for {match[2]} in: {row[:80]}"
                source = (ROOT / "tests" / f"{module}.py").read_text()
                assert re.search(rf"^def {match[2]}\b", source, re.M), f"{module}::{match[2]}"
                named += 1
    assert named >= 40
