"""Counters of what the daemon did, in the Prometheus text format. No I/O.

The server counts; render() gives the text that the optional metrics listener
serves on GET /metrics and that the textfile writer puts, atomically, where
node_exporter's textfile collector reads it; summary() is the SIGUSR1 log line.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections import Counter

from procident.protocol import ErrorType

REPLY_TYPES = ("USERID", *(error.value for error in ErrorType))
# Lookup latency histogram bounds, seconds: netlink answers in tens of
# microseconds, /proc in milliseconds to a tenth of a second at 10,000 sockets.
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
MAX_HTTP_REQUEST = 4096


class Metrics:
    """What the daemon counts. Label values come from fixed lists, so memory is bounded."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.replies: Counter[str] = Counter({kind: 0 for kind in REPLY_TYPES})
        self.refused: Counter[str] = Counter()  # connections or queries refused, by limit
        self.malformed = 0  # lines that were no port pair
        self.overlong = 0  # lines past 1000 bytes
        self.timed_out = 0  # connections closed at the idle timeout
        self.forwards: Counter[str] = Counter()  # "answered" or "failed"
        self.lookups = [0] * (len(BUCKETS) + 1)  # per bucket, +Inf last
        self.lookup_seconds = 0.0

    def reply(self, line: bytes) -> None:
        """Count a reply line by its type: USERID or its error token."""
        parts = line.split(b":", 3)
        kind = parts[1] if len(parts) > 2 and parts[1] == b"USERID" else parts[-1]
        key = kind.strip().decode("ascii", "replace")
        if key in self.replies:
            self.replies[key] += 1

    def lookup(self, seconds: float) -> None:
        """Record one lookup's duration."""
        self.lookups[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.lookup_seconds += seconds

    def render(self, open_connections: int) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        out = [
            "# HELP procident_replies_total Replies sent, by type (USERID or the error).",
            "# TYPE procident_replies_total counter",
        ]
        out += [f'procident_replies_total{{type="{k}"}} {v}' for k, v in self.replies.items()]
        out += [
            "# HELP procident_refused_total Connections or queries refused, by the limit.",
            "# TYPE procident_refused_total counter",
        ]
        out += [
            f'procident_refused_total{{limit="{k}"}} {v}' for k, v in sorted(self.refused.items())
        ]
        for name, value, text in (
            ("malformed_total", self.malformed, "Lines that were no port pair."),
            ("overlong_total", self.overlong, "Lines longer than 1000 bytes."),
            ("timed_out_total", self.timed_out, "Connections closed at the idle timeout."),
        ):
            out += [
                f"# HELP procident_{name} {text}",
                f"# TYPE procident_{name} counter",
                f"procident_{name} {value}",
            ]
        out += [
            "# HELP procident_forwards_total Forwards to another ident server: an application's, "
            "or an inner host's (NAT).",
            "# TYPE procident_forwards_total counter",
        ]
        out += [
            f'procident_forwards_total{{result="{k}"}} {self.forwards[k]}'
            for k in ("answered", "failed")
        ]
        out += [
            "# HELP procident_open_connections Client connections open now.",
            "# TYPE procident_open_connections gauge",
            f"procident_open_connections {open_connections}",
            "# HELP procident_lookup_seconds Time to ask the kernel who owns a connection.",
            "# TYPE procident_lookup_seconds histogram",
        ]
        total = 0
        for bound, count in zip(BUCKETS, self.lookups, strict=False):
            total += count
            out.append(f'procident_lookup_seconds_bucket{{le="{bound:g}"}} {total}')
        total += self.lookups[-1]
        out += [
            f'procident_lookup_seconds_bucket{{le="+Inf"}} {total}',
            f"procident_lookup_seconds_sum {self.lookup_seconds:.6f}",
            f"procident_lookup_seconds_count {total}",
            "# HELP procident_backend_info The lookup backend in use.",
            "# TYPE procident_backend_info gauge",
            f'procident_backend_info{{backend="{self.backend}"}} 1',
        ]
        return "\n".join(out) + "\n"

    def summary(self, open_connections: int) -> str:
        """One log line of the counts (SIGUSR1)."""
        replies = " ".join(f"{k}={v}" for k, v in self.replies.items())
        refused = " ".join(f"{k}={v}" for k, v in sorted(self.refused.items())) or "none"
        count = sum(self.lookups)
        mean = self.lookup_seconds / count * 1e6 if count else 0.0
        return (
            f"metrics: replies {replies}; refused {refused}; malformed={self.malformed} "
            f"overlong={self.overlong} timed_out={self.timed_out}; "
            f"open_connections={open_connections}; lookups={count} "
            f"mean={mean:.0f}us; backend={self.backend}"
        )


def write_textfile(path: str, text: str) -> None:
    """Write `text` to `path` atomically (a temporary file in the same directory, renamed),
    so node_exporter never reads half a file."""
    temporary = f"{path}.{os.getpid()}.tmp"
    # The directory may be shared (node_exporter's): whatever sits at the temporary name,
    # a link planted there included, is removed, never followed or written through.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o644)
    try:
        # Readable by node_exporter's account whatever the umask (systemd's UMask=0077):
        # counts only, nothing secret.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def http_response(request: bytes, body: str) -> bytes | None:
    """The response to an HTTP request for the metrics, or None while the request is
    incomplete. Only GET /metrics (and /) is served."""
    end = request.find(b"\r\n\r\n")
    if end < 0:
        end = request.find(b"\n\n")
        if end < 0:
            return None
    line = request.split(b"\n", 1)[0].strip().split()
    if len(line) < 2 or line[0] not in (b"GET", b"HEAD"):
        return _http(405, "Method Not Allowed", "only GET\n")
    if line[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
        return _http(404, "Not Found", "see /metrics\n")
    response = _http(200, "OK", body, "text/plain; version=0.0.4; charset=utf-8")
    return response.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" if line[0] == b"HEAD" else response


def _http(status: int, reason: str, body: str, kind: str = "text/plain; charset=utf-8") -> bytes:
    data = body.encode()
    head = (
        f"HTTP/1.0 {status} {reason}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data
