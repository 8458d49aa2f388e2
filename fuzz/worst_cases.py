"""The worst inputs we know for each parser of what others write, at any size.

Each is built to make a backtracking or rescanning parser slow: unterminated strings and
comments repeated, nesting, long runs with no delimiter. They are used four ways: the
fuzz targets start from them (tests/test_fuzz.py writes them into each target's corpus),
tests/test_properties.py checks that each gives a result or the parser's planned error,
tests/test_security.py that the time they take grows in proportion to their size, and
bench/parser_worst.py prints how long each takes at 64 KiB (the target: under 50 ms).
"""

from __future__ import annotations

from collections.abc import Callable


def _repeat(unit: str, size: int, head: str = "", tail: str = "") -> bytes:
    count = max(1, (size - len(head) - len(tail)) // len(unit))
    return (head + unit * count + tail).encode()


def _nested(size: int, prefix: str) -> bytes:
    depth = max(1, (size - len(prefix)) // 2)
    return (prefix + "[" * depth + "]" * depth + "\n").encode()


# parser name -> case name -> size in bytes -> the input
CASES: dict[str, dict[str, Callable[[int], bytes]]] = {
    "oidentd": {
        # One quote, then escaped quotes: a string that never ends (once quadratic).
        "unterminated-escaped-string": lambda n: _repeat('\\"', n, head='"'),
        "many-unterminated-strings": lambda n: _repeat('"\\', n),
        "many-open-comments": lambda n: _repeat("/* ", n),
        "comment-never-closed": lambda n: _repeat("*", n, head="/*"),
        "long-word": lambda n: _repeat("a", n),
        "many-lines": lambda n: _repeat('global { reply "x" }\n', n),
        "hash-runs": lambda n: _repeat("#", n),
        "open-braces": lambda n: _repeat("{", n),
        "long-string": lambda n: _repeat("a", n, head='global { reply "', tail='" }'),
    },
    "procident.toml": {
        "nested-arrays": lambda n: _nested(n, 'action = "reply"\nreply = '),
        "long-integer": lambda n: _repeat("9", n, head='action = "reply"\nreply = "x"\nn = '),
        "many-keys": lambda n: b"".join(b"k%05d = 1\n" % i for i in range(max(1, n // 10))),
        "many-rules": lambda n: _repeat('[[rules]]\naction = "hide"\n', n),
        "unterminated-string": lambda n: _repeat("a", n, head='reply = "'),
        "long-dotted-key": lambda n: _repeat("a.", n, tail="a = 1\n"),
    },
    "config": {
        "nested-arrays": lambda n: _nested(n, "x = "),
        "long-integer": lambda n: _repeat("9", n, head="[limits]\nidle_timeout = "),
        "many-rules": lambda n: _repeat('[[rules]]\naction = "hide"\n', n),
        "long-string": lambda n: _repeat("a", n, head='[server]\nuser = "', tail='"\n'),
    },
    "procfs": {
        "one-long-line": lambda n: _repeat("0", n),
        "many-colons": lambda n: _repeat(":", n, head="header\n"),
        "many-short-lines": lambda n: _repeat("0: 0\n", n, head="header\n"),
        "spaces": lambda n: _repeat(" ", n, head="header\n", tail="x\n"),
    },
    "conntrack": {
        "one-long-line": lambda n: _repeat("src=", n),
        "many-fields": lambda n: _repeat("a=b ", n, head="ipv4 2 tcp 6 "),
        "many-short-lines": lambda n: _repeat("ipv4 2 tcp 6 1 ESTABLISHED\n", n),
    },
    "reply": {
        "spaces": lambda n: _repeat(" ", n),
        "letters-no-colon": lambda n: _repeat("A", n, head="1,1:"),
        "colons": lambda n: _repeat(":", n, head="1,1:USERID:"),
        "spaces-then-digits": lambda n: _repeat(" \t", n, tail="1"),
    },
    "query": {
        "lone-carriage-returns": lambda n: _repeat("1,1\r", n),
        "spaces-no-newline": lambda n: _repeat(" ", n),
        "many-short-lines": lambda n: _repeat("1,1\n", n),
        "digits": lambda n: _repeat("9", n),
    },
}

# fuzz target -> the parsers whose worst cases start its corpus
TARGETS = {
    "fuzz_userfiles": ("oidentd", "procident.toml"),
    "fuzz_config": ("config",),
    "fuzz_procfs": ("procfs",),
    "fuzz_conntrack": ("conntrack",),
    "fuzz_reply": ("reply",),
    "fuzz_query_reader": ("query",),
}


def write_corpus(target: str, directory: str, size: int = 4096) -> int:
    """Write the worst cases of `target`'s parsers into `directory` (a libFuzzer corpus:
    one input a file; 4 KiB, libFuzzer's default input size); return how many."""
    import os

    count = 0
    for parser in TARGETS.get(target, ()):
        for name, make in CASES[parser].items():
            with open(os.path.join(directory, f"{parser}-{name}"), "wb") as file:
                file.write(make(size))
            count += 1
    return count


def parse(parser: str, data: bytes, scratch: str = "/tmp") -> str:
    """Run `parser` on `data` as the daemon would: "ok", or the message of the error the
    parser plans for bad input. Any other exception propagates (and is a bug)."""
    import ipaddress
    import os
    import tempfile

    from procident.config import ConfigError, load_config
    from procident.lookup import ConnectionId, Endpoint, conntrack, procfs
    from procident.protocol import QueryReader, parse_reply
    from procident.userfiles import UserFileError, parse_oidentd_file, parse_procident_file

    try:
        if parser == "oidentd":
            parse_oidentd_file(data.decode("utf-8", "replace"))
        elif parser == "procident.toml":
            parse_procident_file(data.decode("utf-8", "replace"))
        elif parser == "config":
            fd, path = tempfile.mkstemp(suffix=".toml", dir=scratch)
            try:
                os.write(fd, data)
                os.close(fd)
                load_config(path)
            finally:
                os.unlink(path)
        elif parser == "procfs":
            list(procfs.parse_table(data.decode("latin-1"), "/proc/net/tcp"))
        elif parser == "conntrack":
            text = data.decode("latin-1")
            list(conntrack.parse_table(text))
            asked = ConnectionId(
                Endpoint(ipaddress.ip_address("203.0.113.1"), 50123),
                Endpoint(ipaddress.ip_address("198.51.100.7"), 6667),
            )
            conntrack.find_inner(text, asked)
        elif parser == "reply":
            parse_reply(data)
        elif parser == "query":
            QueryReader().feed(data)
        else:
            raise KeyError(parser)
    except (UserFileError, ConfigError, ValueError) as err:
        return str(err)[:200]
    return "ok"
