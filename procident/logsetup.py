"""Where procident's log goes, and how its lines look: text (with what others wrote
escaped, so it can neither forge a line nor drive a terminal) or JSON, to standard error
or syslog."""

from __future__ import annotations

import datetime
import errno
import json
import logging
import logging.handlers
import os
import re
import socket
import sys
import time
from dataclasses import replace
from typing import Any

from procident.config import LogConfig
from procident.protocol import UNPRINTABLE, printable

log = logging.getLogger("procident")


class LogSetupError(Exception):
    """The configured log sink cannot be used; the message says why."""


TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class FastInfo:
    """The answer lines' way around the logging module, where nothing but procident's
    own text handler on standard error would see them: the same line TextFormatter
    writes ("2026-12-01 15:04:05,123 INFO answer ..."), built with one f-string and the
    time's text kept per second, then written and flushed as StreamHandler does. The
    logging module's way (a LogRecord, its formatting, the handler's lock) costs about
    as much as the lookup itself; a daemon logs one line per answer.

    `for_logger` gives one only when the one handler a record of the logger would reach
    (itself or through its parents) is procident's text handler, and no filter is on
    the way; anything else (JSON, syslog, a handler a test or an embedding program
    added) goes through logging."""

    __slots__ = ("stream", "_second", "_stamp")

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._second = -1
        self._stamp = ""

    @staticmethod
    def for_logger(logger: logging.Logger) -> FastInfo | None:
        if logger.filters:
            return None
        handlers: list[logging.Handler] = []
        current: logging.Logger | None = logger
        while current is not None:  # the handlers logging would call, as callHandlers does
            handlers += current.handlers
            current = current.parent if current.propagate else None
        if len(handlers) != 1:
            return None
        handler = handlers[0]
        if (
            type(handler) is not logging.StreamHandler
            or handler.filters
            or type(handler.formatter) is not TextFormatter
            or handler.formatter._fmt != TEXT_FORMAT
            or handler.formatter.datefmt is not None
            or handler.level > logging.INFO
        ):
            return None
        return FastInfo(handler.stream)

    def write(self, message: str, when: float, flush: bool = True) -> None:
        """One INFO line of `message` (escaped as TextFormatter escapes it); flushed
        now, or by the caller (the daemon flushes once per turn of its loop)."""
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        millis = int((when - second) * 1000)
        self.stream.write(f"{self._stamp},{millis:03d} INFO {printable(message)}\n")
        if flush:
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


class TextFormatter(logging.Formatter):
    """Log lines whose text others may have written (a user's file, a client, a forward
    target) cannot forge another line or drive a terminal: every control, separator and
    format character of the message is escaped (protocol.printable). A traceback keeps
    its lines, each indented, with the controls inside them escaped as well."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        return "\n".join("  " + printable(line) for line in text.splitlines())


def _json_escape(match: re.Match[str]) -> str:
    return "".join(f"\\u{unit:04x}" for unit in _utf16_units(ord(match[0])))


def _utf16_units(code: int) -> tuple[int, ...]:
    if code < 0x10000:
        return (code,)
    code -= 0x10000
    return (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, and an answer's fields. Characters
    that JSON may carry raw but a terminal would obey are written as \\u escapes."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        # json.dumps escapes C0 controls itself; the rest of what printable() escapes (DEL,
        # C1, separators, format characters, lone surrogates) it leaves raw.
        return UNPRINTABLE.sub(_json_escape, json.dumps(entry, ensure_ascii=False))


def setup_logging(config: LogConfig) -> None:
    """Send procident's log to stderr or syslog at the configured level and format."""
    handler: logging.Handler
    if config.target == "syslog":
        try:
            _probe_syslog(config.syslog_socket)
            handler = logging.handlers.SysLogHandler(
                address=config.syslog_socket,
                facility=logging.handlers.SysLogHandler.facility_names[config.syslog_facility],
            )
        except OSError as err:
            raise LogSetupError(
                f"cannot log to syslog at {config.syslog_socket}: {err.strerror or err}"
            ) from None
        handler.setFormatter(TextFormatter("procident[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(config.level.upper())
    log.propagate = False


def setup_logging_or_fall_back(config: LogConfig, client_fd: int | None = None) -> str:
    """setup_logging, but a log sink that cannot be opened never stops the answers: the
    log goes to standard error instead, or, where standard error is the client's own
    connection (`client_fd`: inetd mode), nowhere. What happened, for the caller to say
    where it can ("" when the configured sink works)."""
    try:
        setup_logging(config)
        return ""
    except LogSetupError as err:
        problem = str(err)
    if _is_the_client(client_fd):
        for old in list(log.handlers):
            log.removeHandler(old)
            old.close()
        log.addHandler(logging.NullHandler())  # a log line must never reach the client
        log.propagate = False
        return f"{problem}; not logging (standard error is the client's connection)"
    setup_logging(replace(config, target="stderr"))
    log.warning("%s; logging to standard error instead", problem)
    return f"{problem}; logging to standard error"


def _is_the_client(client_fd: int | None) -> bool:
    """Whether standard error is closed, or is the very socket `client_fd` is (classic
    inetd passes the connection as 0, 1 and 2; systemd's Accept=yes passes the journal
    as 2, which is fine to log to)."""
    if client_fd is None:
        return False
    try:
        err, client = os.fstat(2), os.fstat(client_fd)
    except OSError:
        return True  # no standard error at all
    return (err.st_dev, err.st_ino) == (client.st_dev, client.st_ino)


def _probe_syslog(path: str) -> None:
    """Fail now if nothing listens at `path`: SysLogHandler itself would silently drop
    every line (as openlog() does), and an admin who asked for syslog would see nothing."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(path)
                return
            except OSError as err:
                if err.errno != errno.EPROTOTYPE:  # a stream socket: try that
                    raise
