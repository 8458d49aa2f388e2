"""What `check-config` warns about in a valid configuration: ids IRC servers cut or refuse.

IRC servers keep at most 10 characters of an ident (USERLEN), and ngIRCd refuses one that
is not letters and digits. A long audit token (action "token", about 106 characters)
or a fixed id that breaks that arrives cut, or is refused, and an abuse report about it
can never be traced. A rule whose clients keep long ids (mail servers, audit logs) says
so with long_ids = true.
"""

from __future__ import annotations

import re

from procident.config import Config
from procident.settings import Rule

IRC_PORTS = ((6660, 6669), (6697, 6697), (7000, 7000))
IRC_SAFE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,9}")
_SAFE_TEXT = "at most 10 letters and digits, starting with a letter"


def _reaches_irc(rule: Rule) -> bool:
    """Whether the rule may answer a query about a connection to an IRC port."""
    if not rule.client_ports:
        return True
    return any(lo <= high and low <= hi for lo, hi in rule.client_ports for low, high in IRC_PORTS)


def _to_whom(rule: Rule) -> str:
    if rule.client_ports:
        return "IRC ports (6660-6669, 6697, 7000)"
    return "every client port, IRC's (6660-6669, 6697, 7000) among them"


def irc_warnings(config: Config) -> list[str]:
    """One sentence per rule or key whose ids an IRC server would cut or refuse."""
    warnings = []
    for rule in config.rules:
        if rule.long_ids or not _reaches_irc(rule):
            continue
        if rule.action == "token":
            warnings.append(
                f'{rule.name}: action "token" sends ids of about 106 characters to '
                f"{_to_whom(rule)}; IRC servers keep 10 at most, so such an id cannot be "
                'traced: use action "audit-id", or say long_ids = true if its clients '
                "keep long ids"
            )
        for user_id in rule.reply:
            if not IRC_SAFE.fullmatch(user_id):
                warnings.append(
                    f"{rule.name}.reply: {user_id!r} is not {_SAFE_TEXT}: IRC servers cut it "
                    "or refuse it (ngIRCd); say long_ids = true if its clients keep such ids"
                )
    for key in ("reply_all", "fallback"):
        user_id = getattr(config.reply, key)
        if user_id and not IRC_SAFE.fullmatch(user_id):
            warnings.append(
                f"reply.{key}: {user_id!r} is not {_SAFE_TEXT}: IRC servers cut it or "
                "refuse it (ngIRCd)"
            )
    return warnings
