#!/usr/bin/env python3
"""Fuzz the /proc/net/tcp parser: any text gives entries or a ValueError, never
another exception.

    python3 fuzz/fuzz_procfs.py -max_total_time=60   # or -runs=N
"""

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from procident.lookup.procfs import parse_table


def test_one_input(data: bytes) -> None:
    text = data.decode("latin-1")
    with contextlib.suppress(ValueError):
        list(parse_table(text, "/proc/net/tcp"))


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
