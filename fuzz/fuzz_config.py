#!/usr/bin/env python3
"""Fuzz the configuration loader: any bytes as a TOML file give a Config or a
ConfigError naming the file, never another exception.

    python3 fuzz/fuzz_config.py -max_total_time=60   # or -runs=N
"""

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from procident.config import ConfigError, load_config

PATH = os.path.join(tempfile.mkdtemp(prefix="procident-fuzz-"), "f.toml")


def test_one_input(data: bytes) -> None:
    with open(PATH, "wb") as file:
        file.write(data)
    try:
        load_config(PATH)
    except ConfigError as err:
        if not str(err).startswith(f"{PATH}: "):
            raise AssertionError(f"error without the file: {err}") from None


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
