#!/usr/bin/env python3
"""Fuzz the parsers of users' own files (~/.oidentd.conf, ~/.procident.toml): any text
gives choices or a UserFileError, never another exception, and every id they hold is one
the reply validator accepts.

    python3 fuzz/fuzz_userfiles.py -max_total_time=60   # or -runs=N
"""

import sys

import atheris

with atheris.instrument_imports():
    from procident.protocol import check_user_id
    from procident.userfiles import UserFileError, parse_oidentd_file, parse_procident_file


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    for parse in (parse_oidentd_file, parse_procident_file):
        try:
            parsed = parse(text)
        except UserFileError:
            continue
        for choice in (*parsed.choices, parsed.default):
            for user_id in choice.reply if choice else ():
                check_user_id(user_id)  # raises if an unsendable id got through


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
