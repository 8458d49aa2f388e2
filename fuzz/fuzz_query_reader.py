#!/usr/bin/env python3
"""Fuzz the query reader: any bytes, fed whole and in two pieces, give the same events,
never an exception, and never a query the strict grammar rejects.

    python3 fuzz/fuzz_query_reader.py -max_total_time=60   # or -runs=N
"""

import re
import sys

import atheris

with atheris.instrument_imports():
    from procident.protocol import InvalidPort, Query, QueryReader

STRICT = re.compile(rb"[ \t]*[0-9]{1,5}[ \t]*,[ \t]*[0-9]{1,5}[ \t]*\r?")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    cut = data[0] % (len(data) + 1)
    body = data[1:]
    whole = QueryReader().feed(body)
    reader = QueryReader()
    split = reader.feed(body[:cut]) + reader.feed(body[cut:])
    if split != whole:
        raise AssertionError(f"split at {cut} changes the events: {split} != {whole}")
    lines = body.split(b"\n")[:-1]
    for index, event in enumerate(whole):
        if isinstance(event, (Query, InvalidPort)) and not STRICT.fullmatch(lines[index]):
            raise AssertionError(f"accepted {lines[index]!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
