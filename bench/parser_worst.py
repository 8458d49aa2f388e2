#!/usr/bin/env python3
"""How long each parser of what others write takes on its worst known inputs.

    python3 bench/parser_worst.py            # 8 KiB and 64 KiB, best of 5
    python3 bench/parser_worst.py --sizes 4096 65536 262144 --repeat 3

For each parser (users' oidentd and procident files, the configuration, /proc/net/tcp,
/proc/net/nf_conntrack, ident replies, the query reader) and each worst case of
fuzz/worst_cases.py, it prints the best time at each size, the ratio of the largest to
the smallest (a linear parser gives about the ratio of the sizes; a quadratic one its
square) and what the parser answered. The target: every case under 50 ms at 64 KiB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))

from worst_cases import CASES, parse  # noqa: E402

TARGET_MS = 50.0


def best_time(parser: str, data: bytes, repeat: int, scratch: str) -> tuple[float, str]:
    best, answer = float("inf"), ""
    for _ in range(repeat):
        started = time.perf_counter()
        answer = parse(parser, data, scratch)
        best = min(best, time.perf_counter() - started)
    return best, answer


def main() -> int:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--sizes", type=int, nargs="+", default=[8192, 65536])
    options.add_argument("--repeat", type=int, default=5)
    args = options.parse_args()
    sizes = sorted(args.sizes)
    scratch = tempfile.mkdtemp(prefix="procident-bench-")
    parse("oidentd", b"global { hide }\n", scratch)  # import everything before timing
    head = " ".join(f"{size // 1024:>6} KiB" for size in sizes)
    print(f"{'parser':15} {'case':30} {head}  ratio  answer")
    slowest = 0.0
    for parser, cases in CASES.items():
        for name, make in cases.items():
            times = []
            answer = ""
            for size in sizes:
                seconds, answer = best_time(parser, make(size), args.repeat, scratch)
                times.append(seconds)
            if 65536 in sizes:
                slowest = max(slowest, times[sizes.index(65536)])
            cells = " ".join(f"{seconds * 1000:7.2f} ms" for seconds in times)
            ratio = times[-1] / times[0] if times[0] > 0 else float("nan")
            print(f"{parser:15} {name:30} {cells} {ratio:6.1f}  {answer[:48]!r}")
    if 65536 in sizes:
        verdict = "met" if slowest * 1000 < TARGET_MS else "NOT met"
        print(f"slowest at 64 KiB: {slowest * 1000:.2f} ms (target {TARGET_MS:g} ms: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
