"""The one list of what a reload cannot change (procident.startup.RELOAD_RULES), through
`reconcile`: what the daemon serves with after a reload, and what it says."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from procident.config import (
    Config,
    ConfigError,
    LimitsConfig,
    LogConfig,
    LookupConfig,
    MetricsConfig,
    NatConfig,
    Rule,
    ServerConfig,
    TokensConfig,
    UsersConfig,
)
from procident.startup import KEPT, RELOAD_RULES, Opened, reconcile

RUNNING = Config()
NOTHING_OPENED = Opened()


def _reload(new: Config, caplog: pytest.LogCaptureFixture, opened: Opened = NOTHING_OPENED):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="procident"):
        served = reconcile(RUNNING, new, opened, "/etc/procident.toml")
    return served, [record.getMessage() for record in caplog.records]


@pytest.mark.parametrize(
    "section, value",
    [
        ("server", ServerConfig(user="daemon")),
        ("lookup", LookupConfig(backend="procfs")),
        ("tokens", TokensConfig(key_file="/elsewhere")),
        ("metrics", MetricsConfig(listen="127.0.0.1:9113")),
    ],
)
def test_a_section_bound_at_start_keeps_its_running_value(section, value, caplog) -> None:
    new = replace(RUNNING, **{section: value}, limits=LimitsConfig(idle_timeout=7))
    served, said = _reload(new, caplog)
    assert getattr(served, section) == getattr(RUNNING, section)
    assert served.limits.idle_timeout == 7  # the rest of the reload applies
    assert said == [f"[{section}] settings take effect at the next start"]
    # The running value is what is served, so the next reload says it again.
    assert _reload(new, caplog)[1] == said


def test_log_sinks_wait_for_a_restart_but_the_level_and_user_names_apply(caplog) -> None:
    new = replace(
        RUNNING, log=LogConfig(level="debug", target="syslog", format="json", user_names=False)
    )
    served, said = _reload(new, caplog)
    assert (served.log.target, served.log.format) == ("stderr", "text")
    assert (served.log.level, served.log.user_names) == ("debug", False)
    assert said == ["log.target, log.format and the syslog settings take effect at the next start"]


def test_the_helper_socket_waits_for_a_restart_but_the_rest_of_users_applies(caplog) -> None:
    new = replace(RUNNING, users=UsersConfig(helper_socket="/run/elsewhere", noident=True))
    served, said = _reload(new, caplog, Opened(read_files=lambda uid, size: {}))
    assert served.users.helper_socket == RUNNING.users.helper_socket
    assert served.users.noident
    assert said == [
        "users.helper_socket takes effect at the next start (the helper is reached at start)"
    ]


def test_turning_nat_on_is_refused_with_the_key_and_reason(caplog) -> None:
    new = replace(RUNNING, nat=NatConfig(enabled=True))
    with pytest.raises(ConfigError) as caught:
        _reload(new, caplog)
    assert str(caught.value) == (
        "/etc/procident.toml: nat.enabled: the connection-tracking table is opened at "
        "start, as root; restart to turn NAT on"
    )


def test_user_files_and_tokens_apply_but_say_what_they_need(caplog) -> None:
    new = replace(
        RUNNING,
        users=UsersConfig(noident=True),
        rules=(Rule(name="t", action="token"),),
    )
    served, said = _reload(new, caplog)
    assert served.users.noident and served.rules == new.rules
    assert said == [
        "user files are read only if the configuration at start reads them",
        "the token key is read only if the configuration at start uses tokens; "
        "until a restart, token rules answer UNKNOWN-ERROR",
    ]
    # With the helper and the key opened at start, nothing is said.
    opened = Opened(read_files=lambda uid, size: {}, tokens=object())  # type: ignore[arg-type]
    assert _reload(new, caplog, opened) == (new, [])


def test_audit_ids_apply_but_need_the_key_read_at_start(caplog) -> None:
    new = replace(RUNNING, rules=(Rule(name="a", action="audit-id"),))
    served, said = _reload(new, caplog)
    assert served.rules == new.rules
    assert said == [
        "the token key is read only if the configuration at start uses audit ids; "
        "until a restart, audit-id rules answer UNKNOWN-ERROR"
    ]
    opened = Opened(audit_ids=object())  # type: ignore[arg-type]
    assert _reload(new, caplog, opened) == (new, [])


def test_an_unchanged_configuration_reloads_silently_and_whole(caplog) -> None:
    new = replace(RUNNING, limits=LimitsConfig(per_client_connections=3))
    assert _reload(new, caplog) == (new, [])


def test_every_rule_that_keeps_a_value_can_restore_it() -> None:
    assert all(rule.keep is not None for rule in RELOAD_RULES if rule.effect == KEPT)
