#!/usr/bin/env python3
"""Fuzz the /proc/net/nf_conntrack parser (NAT): any text gives tracked connections or
a ValueError, never another exception; the searches the daemon makes (find_inner, and
find_translated on the text cut in two, as a gateway's query reads it) fail no other way.

    python3 fuzz/fuzz_conntrack.py -max_total_time=60   # or -runs=N
"""

import contextlib
import ipaddress
import sys

import atheris

with atheris.instrument_imports():
    from procident.lookup import ConnectionId, Endpoint
    from procident.lookup.conntrack import find_inner, find_translated, parse_table

QUERY = ConnectionId(
    Endpoint(ipaddress.ip_address("203.0.113.1"), 50123),
    Endpoint(ipaddress.ip_address("198.51.100.7"), 6667),
)


def test_one_input(data: bytes) -> None:
    text = data.decode("latin-1")
    with contextlib.suppress(ValueError):
        list(parse_table(text))
    with contextlib.suppress(ValueError):
        find_inner(text, QUERY)
    half = len(text) // 2
    with contextlib.suppress(ValueError):
        find_translated([text[:half], text[half:]], QUERY.local, QUERY.remote.port, None)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
