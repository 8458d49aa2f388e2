#!/usr/bin/env python3
"""Fuzz the /proc/net/nf_conntrack parser (NAT): any text gives tracked connections or
a ValueError, never another exception, and find_inner never fails otherwise either.

    python3 fuzz/fuzz_conntrack.py -max_total_time=60   # or -runs=N
"""

import contextlib
import ipaddress
import sys

import atheris

with atheris.instrument_imports():
    from procident.lookup import ConnectionId, Endpoint
    from procident.lookup.conntrack import find_inner

QUERY = ConnectionId(
    Endpoint(ipaddress.ip_address("203.0.113.1"), 50123),
    Endpoint(ipaddress.ip_address("198.51.100.7"), 6667),
)


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        find_inner(data.decode("latin-1"), QUERY)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
