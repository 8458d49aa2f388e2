"""How often audit ids (action "audit-id") could mislead the admin, and what decoding costs.

For a host with --uids accounts (65,536 by default), it makes the id of every uid for
--tables pairs of period and querier network, counts the ids two uids share (decode-token
then names both and exits 1), and prints those counts beside the expected ones:

- two accounts sharing an id in one period and network: uids * (uids - 1) / 2 / ID_SPACE;
- an id that no account was given (a typo, a forgery) matching one by chance, as
  decode-token tries every uid in three periods: 3 * uids / ID_SPACE per key.

It also times one decode-token search (the period asked and those either side).

    python3 bench/audit_ids.py [--uids 65536] [--tables 20]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import time

from procident.auditid import ID_SPACE, AuditIds, Scheme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uids", type=int, default=65536)
    parser.add_argument("--tables", type=int, default=20)
    args = parser.parse_args()
    ids = AuditIds({1: os.urandom(32)}, Scheme(period="day"))
    start_day = datetime.date(2026, 1, 1)
    shared = 0
    began = time.perf_counter()
    for table in range(args.tables):
        day = start_day + datetime.timedelta(days=table)
        when = datetime.datetime.combine(day, datetime.time(12), datetime.timezone.utc)
        querier = ipaddress.ip_address(f"203.0.{table % 256}.1")
        made: dict[str, int] = {}
        for uid in range(args.uids):
            audit_id = ids.make(uid, when.timestamp(), querier)
            if audit_id in made:
                shared += 1
            made[audit_id] = uid
    making = time.perf_counter() - began
    pairs = args.uids * (args.uids - 1) / 2 / ID_SPACE
    chance = 3 * args.uids / ID_SPACE
    print(f"id space: {ID_SPACE:,} (26 * 36**9, about 2**{ID_SPACE.bit_length() - 1})")
    print(
        f"{args.tables} tables of {args.uids:,} uids: {shared} ids shared by two uids "
        f"(expected {pairs * args.tables:.2g}; one table in {1 / pairs:,.0f})"
    )
    print(
        f"an id no account was given matches one by chance: {chance:.2g} per key "
        f"(one in {1 / chance:,.0f})"
    )
    print(f"making ids: {making / (args.tables * args.uids) * 1e6:.1f} us each")
    querier = ipaddress.ip_address("203.0.0.1")
    began = time.perf_counter()
    found = ids.find(["abcdefghij"], range(args.uids), start_day, querier)
    searching = time.perf_counter() - began
    print(
        f"one decode-token search, {args.uids:,} uids x 3 periods x 1 key: "
        f"{searching:.2f} s ({len(found['abcdefghij'])} matches for an id no one was given)"
    )


if __name__ == "__main__":
    main()
