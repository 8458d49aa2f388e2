#!/usr/bin/env python3
"""Fuzz the reply formatter and parser: whatever the id and tokens, format_reply refuses
them or writes one line of the RFC grammar (no control character in the id), which
parse_reply reads back the same; and parse_reply reads any bytes as a reply or refuses
them with a ValueError, as it must for another server's answer.

    python3 fuzz/fuzz_reply.py -max_total_time=60   # or -runs=N
"""

import contextlib
import re
import sys

import atheris

with atheris.instrument_imports():
    from procident.protocol import ReplyError, UserIdReply, format_reply, parse_reply

GRAMMAR = re.compile(
    rb"[0-9]{1,5},[0-9]{1,5}:USERID:[\x21-\x2b\x2d-\x39\x3b-\x7e]{1,64}"
    rb"(?:,[\x21-\x2b\x2d-\x39\x3b-\x7e]{1,64})?:[^\x00-\x1f\x7f]{1,512}\r\n"
)


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_reply(data)  # a forward target's or inner host's answer, as received
    source = atheris.FuzzedDataProvider(data)
    ports = source.ConsumeIntInRange(1, 65535), source.ConsumeIntInRange(1, 65535)
    os = source.ConsumeUnicodeNoSurrogates(source.ConsumeIntInRange(0, 70))
    charset = source.ConsumeUnicodeNoSurrogates(source.ConsumeIntInRange(0, 70)) or None
    user_id = source.ConsumeUnicodeNoSurrogates(source.ConsumeIntInRange(0, 600))
    reply = UserIdReply(user_id, os, charset)
    try:
        line = format_reply(*ports, reply)
    except ReplyError:
        return
    if not GRAMMAR.fullmatch(line):
        raise AssertionError(f"outside the grammar: {line!r}")
    parsed = parse_reply(line[:-2])
    if (parsed.server_port, parsed.client_port, parsed.reply) != (*ports, reply):
        raise AssertionError(f"{line!r} reads back as {parsed}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
