"""Audit ids: short pseudonyms that survive IRC, which the admin turns back into accounts.

IRC servers keep at most USERLEN characters of an ident (10 on Solanum, charybdis and
UnrealIRCd; InspIRCd cuts to its own limit), and ngIRCd refuses one that is not letters
and digits. So action "audit-id" sends ID_LENGTH characters: a lowercase letter, then
lowercase letters and digits:

    mac = HMAC-SHA256(subkey, PREFIX | period kind | period | querier network | uid)
    subkey = HMAC-SHA256(key, SUBKEY_LABEL), for each key of the token key file

written as one number from the first 8 bytes of the MAC, in base 26 for the first
character and base 36 for the other nine (26 * 36**9, about 2**51 ids). The subkey keeps
the key of the long tokens (AES-GCM) from being used as is for a second purpose. Only
the standard library's HMAC is used: no cipher of ours.

An id is stable for one account, querier network and period (so an IRC network can ban
it, and the admin can find who it was), and differs across querier networks (so a user
is not linked across IRC networks by it) unless the scheme says "all". Without the key
it says nothing. With the key file, `procident decode-token ID` tries every account of
the host and every uid of [tokens] audit_uids, with each key, in the period of the date
given and those either side, and names every account whose id it is: with 65,536 uids
two share an id in one period and network about once in 1.2 million such tables, and an
id no account was given matches one by chance about once in 13,000 million per key (see
bench/audit_ids.py, which counts).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import re
import string
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from procident.lookup.types import IPAddress

ID_LENGTH = 10
FIRST = string.ascii_lowercase
REST = string.ascii_lowercase + string.digits
ID_SPACE = len(FIRST) * len(REST) ** (ID_LENGTH - 1)
ID_PATTERN = re.compile(rf"[a-z][a-z0-9]{{{ID_LENGTH - 1}}}")
PERIODS = ("day", "week", "month", "forever")
SCOPES = ("network", "all")
PREFIX = b"procident audit id\0"
SUBKEY_LABEL = b"procident audit id v1"
_EPOCH = datetime.date(1970, 1, 1)
_HEAD = struct.Struct("!Bq")  # period kind, period
_UID = struct.Struct("!I")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Scheme:
    """How ids are made ([tokens] audit_*): what they stay stable over."""

    period: str = "week"
    scope: str = "network"
    ipv4_prefix: int = 24
    ipv6_prefix: int = 48


@dataclass(frozen=True, slots=True)
class Match:
    """An account whose id it is: its uid, the key and the period it was made in."""

    uid: int
    key_id: int
    period: int


def period_of(kind: str, when: datetime.date) -> int:
    """The number of the period of `kind` that holds the day `when` (UTC)."""
    days = (when - _EPOCH).days
    if kind == "day":
        return days
    if kind == "week":  # weeks from Monday: 1970-01-01 was a Thursday
        return (days + 3) // 7
    if kind == "month":
        return when.year * 12 + when.month - 1
    assert kind == "forever", kind
    return 0


def describe_period(kind: str, period: int) -> str:
    """The period in words: its first day, or its month."""
    if kind == "day":
        return f"{_EPOCH + datetime.timedelta(days=period)} (a day, UTC)"
    if kind == "week":
        start = _EPOCH + datetime.timedelta(days=period * 7 - 3)
        return f"the week from Monday {start} (UTC)"
    if kind == "month":
        return f"{period // 12:04d}-{period % 12 + 1:02d} (a month, UTC)"
    return "any time (the period is forever)"


def querier_network(address: IPAddress, scheme: Scheme) -> Network | None:
    """The querier's network an id is made for (None: the scheme makes one for all)."""
    if scheme.scope == "all":
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = scheme.ipv4_prefix if address.version == 4 else scheme.ipv6_prefix
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


def describe_scope(querier: IPAddress | None, scheme: Scheme) -> str:
    """The queriers an id was made for, in words."""
    if scheme.scope == "all" or querier is None:
        return 'every querier (audit_scope = "all")'
    return f"the querier network {querier_network(querier, scheme)}"


def _network_bytes(network: Network | None) -> bytes:
    if network is None:
        return b"\0"
    return bytes([network.version, network.prefixlen]) + network.network_address.packed


def encode(mac: bytes) -> str:
    """The id written from the first 8 bytes of a MAC."""
    number = int.from_bytes(mac[:8], "big")
    chars = [FIRST[number % len(FIRST)]]
    number //= len(FIRST)
    for _ in range(ID_LENGTH - 1):
        chars.append(REST[number % len(REST)])
        number //= len(REST)
    return "".join(chars)


class AuditIds:
    """Makes audit ids with the current (last) key of a key file, and finds the accounts
    an id stands for with any of its keys."""

    def __init__(self, keys: dict[int, bytes], scheme: Scheme) -> None:
        if not keys:
            raise ValueError("no key")
        self.scheme = scheme
        self.subkeys = {
            key_id: hmac.new(key, SUBKEY_LABEL, hashlib.sha256).digest()
            for key_id, key in keys.items()
        }
        self.current = list(keys)[-1]
        self._kind = PERIODS.index(scheme.period)

    def _base(self, key_id: int, period: int, network: Network | None) -> hmac.HMAC:
        mac = hmac.new(self.subkeys[key_id], PREFIX, hashlib.sha256)
        mac.update(_HEAD.pack(self._kind, period) + _network_bytes(network))
        return mac

    def make(self, uid: int, when: float, querier: IPAddress) -> str:
        """The id of `uid` for the querier at `querier`, at `when` (seconds since the
        epoch)."""
        day = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).date()
        mac = self._base(
            self.current, period_of(self.scheme.period, day), querier_network(querier, self.scheme)
        )
        mac.update(_UID.pack(uid))
        return encode(mac.digest())

    def find(
        self,
        ids: Iterable[str],
        uids: Iterable[int],
        day: datetime.date,
        querier: IPAddress | None,
    ) -> dict[str, list[Match]]:
        """For each of `ids`, every uid of `uids` it is the id of, with any key, in the
        period of `day` or either next to it (one pass over the uids per key and period,
        however many ids are asked about)."""
        wanted = set(ids)
        found: dict[str, list[Match]] = {audit_id: [] for audit_id in wanted}
        network = None if querier is None else querier_network(querier, self.scheme)
        middle = period_of(self.scheme.period, day)
        periods = [middle] if self.scheme.period == "forever" else [middle - 1, middle, middle + 1]
        candidates = sorted(set(uids))
        for key_id in self.subkeys:
            for period in periods:
                base = self._base(key_id, period, network)
                for uid in candidates:
                    mac = base.copy()
                    mac.update(_UID.pack(uid))
                    made = encode(mac.digest())
                    if made in wanted:
                        found[made].append(Match(uid, key_id, period))
        return found
