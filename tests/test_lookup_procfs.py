"""The /proc/net/tcp{,6} parser and matcher, on fixture text captured from a real kernel."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from procident.lookup import ConnectionId, Endpoint, LookupFailed, TcpState, normalize_address
from procident.lookup.procfs import ProcfsBackend, Table, find_in_tables, parse_table

DATA = Path(__file__).parent / "data"
TCP4 = (DATA / "proc_net_tcp.txt").read_text()
TCP6 = (DATA / "proc_net_tcp6.txt").read_text()
HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def ep(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    return Endpoint(ipaddress.ip_address(host.strip("[]")), int(port))


def conn(local: str, remote: str) -> ConnectionId:
    return ConnectionId(ep(local), ep(remote))


def find(local: str, remote: str):
    return find_in_tables(conn(local, remote), TCP4, TCP6, byteorder="little")


def test_parse_ipv4_row() -> None:
    """Addresses, ports, state, uid and inode are decoded from the hex of a tcp row."""
    entries = list(parse_table(TCP4, "/proc/net/tcp", "little"))
    row = next(e for e in entries if e.local.port == 40001)
    assert (row.local, row.remote) == (ep("127.0.0.1:40001"), ep("127.0.0.1:6667"))
    assert (row.state, row.uid, row.inode) == (TcpState.ESTABLISHED, 1, 7543)
    assert len(entries) == 9


def test_parse_ipv6_and_mapped_rows() -> None:
    """tcp6 rows decode to IPv6 addresses, dual-stack ones as ::ffff:a.b.c.d."""
    entries = list(parse_table(TCP6, "/proc/net/tcp6", "little"))
    by_port = {e.local.port: e for e in entries if e.state != TcpState.LISTEN}
    assert by_port[40003].local.address == ipaddress.IPv6Address("::1")
    assert by_port[40004].local.address == ipaddress.IPv6Address("::ffff:127.0.0.1")
    (listener,) = [e for e in entries if e.state == TcpState.LISTEN]
    assert listener.local == ep("[::1]:6697")


def test_parse_big_endian_host() -> None:
    """On a big-endian host the kernel prints addresses in network order."""
    text = HEADER + "   0: 7F000001:0050 0A000002:1A0B 01 0:0 0:0 0 1000 0 77 1\n"
    (entry,) = parse_table(text, byteorder="big")
    assert (entry.local, entry.remote) == (ep("127.0.0.1:80"), ep("10.0.0.2:6667"))


def test_uid_is_unsigned_32_bit() -> None:
    """A uid above 2**31 is read as the kernel prints it, not wrapped or refused."""
    found = find("127.0.0.2:40002", "127.0.0.1:6667")
    assert found is not None and found.entry.uid == 3_000_000_000


@pytest.mark.parametrize(
    "line",
    [
        "   0: 0100007F:0050 0100007F:1A0B 01 0:0 0:0 0 4294967296 0 77 1",  # uid > 32 bits
        "   0: 0100007F:0050 0100007F:1A0B 01 0:0 0:0 0 -1 0 77 1",
        "   0: 0100007F 0100007F:1A0B 01 0:0 0:0 0 0 0 77 1",
        "   0: 0100007F:0050 0100:1A0B 01 0:0 0:0 0 0 0 77 1",
        "   0: 0100007F:0050 0100007F:1A0B 01 0:0",
        "   0: 0100007F:0050 0100007F:1A0B 99 0:0 0:0 0 0 0 77 1",
    ],
)
def test_parse_refuses_malformed_rows(line: str) -> None:
    """A row the parser does not understand is an error naming its line, never a guess."""
    with pytest.raises(ValueError, match="line 2"):
        list(parse_table(HEADER + line + "\n", byteorder="little"))


def test_found_by_all_four_values() -> None:
    """The connection is found when local and remote address and port all match."""
    found = find("127.0.0.1:40001", "127.0.0.1:6667")
    assert found is not None
    assert (found.entry.uid, found.entry.owned, found.inbound) == (1, True, False)


@pytest.mark.parametrize(
    ("local", "remote"),
    [
        ("127.0.0.1:40001", "127.0.0.3:6667"),  # another querier (host C)
        ("127.0.0.2:40001", "127.0.0.1:6667"),  # query arrived on another local address
        ("127.0.0.1:40001", "127.0.0.1:6668"),  # other client port
        ("127.0.0.1:40009", "127.0.0.1:6667"),  # other server port
        ("127.0.0.1:40002", "127.0.0.1:6667"),  # that port is on 127.0.0.2, not here
        ("[::1]:40001", "[::1]:6667"),  # an IPv4 connection is not an IPv6 one
    ],
)
def test_not_found_unless_all_four_match(local: str, remote: str) -> None:
    """Any one of the four values differing means no connection (RFC 1413 §3)."""
    assert find(local, remote) is None


def test_ipv6_connection() -> None:
    """IPv6 connections are found in tcp6."""
    found = find("[::1]:40003", "[::1]:6697")
    assert found is not None and found.entry.uid == 1 and found.entry.source == "/proc/net/tcp6"


def test_ipv4_peer_on_dual_stack_socket() -> None:
    """An IPv4 connection held by an IPv6 socket is found in tcp6 as ::ffff:a.b.c.d."""
    found = find("127.0.0.1:40004", "127.0.0.1:6667")
    assert found is not None and found.entry.uid == 2 and found.entry.source == "/proc/net/tcp6"


@pytest.mark.parametrize(
    ("port", "state"), [(40005, TcpState.FIN_WAIT2), (40006, TcpState.TIME_WAIT)]
)
def test_closed_sockets_have_no_owner(port: int, state: TcpState) -> None:
    """Sockets their owner closed are listed with uid 0 and inode 0: found, but not owned."""
    found = find(f"127.0.0.1:{port}", "127.0.0.1:6667")
    assert found is not None
    assert (found.entry.state, found.entry.uid, found.entry.owned) == (state, 0, False)


@pytest.mark.parametrize(
    ("local", "remote"),
    [("127.0.0.1:6667", "127.0.0.1:40001"), ("[::1]:6697", "[::1]:40003")],
)
def test_inbound_connection_to_listening_port(local: str, remote: str) -> None:
    """A connection whose local port has a listening socket is marked inbound."""
    found = find(local, remote)
    assert found is not None and found.inbound


def test_wildcard_listener_marks_inbound() -> None:
    """A listener on 0.0.0.0 or :: covers every local address."""
    rows = (
        "   0: 00000000:0016 00000000:0000 0A 0:0 0:0 0 0 0 10 1\n"
        "   1: 0100007F:0016 0100007F:9C41 01 0:0 0:0 0 0 0 11 1\n"
    )
    found = find_in_tables(conn("127.0.0.1:22", "127.0.0.1:40001"), HEADER + rows, "", "little")
    assert found is not None and found.inbound
    other = rows.replace("00000000:0016 00000000:0000", "0200007F:0016 00000000:0000")
    found = find_in_tables(conn("127.0.0.1:22", "127.0.0.1:40001"), HEADER + other, "", "little")
    assert found is not None and not found.inbound  # a listener on 127.0.0.2 only


@pytest.mark.parametrize("order", [("ghost", "live"), ("live", "ghost")])
def test_live_socket_wins_over_time_wait_ghost(order: tuple[str, str]) -> None:
    """When a TIME_WAIT ghost and a live socket share four values, the live one is the answer."""
    rows = {
        "ghost": "   0: 0100007F:9C41 0100007F:1A0B 06 0:0 0:0 0 0 0 0 3\n",
        "live": "   1: 0100007F:9C41 0100007F:1A0B 01 0:0 0:0 0 1000 0 4242 1\n",
    }
    text = HEADER + rows[order[0]] + rows[order[1]]
    found = find_in_tables(conn("127.0.0.1:40001", "127.0.0.1:6667"), text, "", "little")
    assert found is not None and (found.entry.uid, found.entry.inode) == (1000, 4242)


def test_backend_reads_files(tmp_path: Path) -> None:
    """The backend reads both tables from their paths; a missing tcp6 is an empty one."""
    (tmp_path / "tcp").write_text(TCP4)
    backend = ProcfsBackend(str(tmp_path / "tcp"), str(tmp_path / "absent"))
    found = backend.find(conn("127.0.0.1:40001", "127.0.0.1:6667"))
    assert found is not None and found.entry.uid == 1


def test_ipv6_lookup_needs_no_ipv4_table(tmp_path: Path) -> None:
    """An IPv6 connection is looked up in tcp6 alone: tcp is not even opened."""
    (tmp_path / "tcp6").write_text(TCP6)
    backend = ProcfsBackend(str(tmp_path), str(tmp_path / "tcp6"))  # a directory: unreadable
    found = backend.find(conn("[::1]:40003", "[::1]:6697"))
    assert found is not None and found.entry.uid == 1


def test_backend_failures_are_lookup_failed(tmp_path: Path) -> None:
    """A missing, unreadable or unexpected table is 'could not look', not 'not found'."""
    with pytest.raises(LookupFailed, match="does not exist"):
        ProcfsBackend(str(tmp_path / "absent"), str(tmp_path / "absent6")).find(
            conn("127.0.0.1:1", "127.0.0.1:2")
        )
    (tmp_path / "tcp").write_text(HEADER + "   0: 0100007F:0001 0100007F:0002 garbage\n")
    with pytest.raises(LookupFailed, match="too few fields"):
        ProcfsBackend(str(tmp_path / "tcp"), str(tmp_path / "absent6")).find(
            conn("127.0.0.1:1", "127.0.0.1:2")
        )
    (tmp_path / "tcp").write_text(HEADER.replace("uid", "owner") + TCP4.split("\n", 1)[1])
    with pytest.raises(LookupFailed, match="unexpected header"):
        ProcfsBackend(str(tmp_path / "tcp"), str(tmp_path / "absent6")).find(
            conn("127.0.0.1:40001", "127.0.0.1:6667")
        )


def full_parse_find(conn: ConnectionId, tcp4: str, tcp6: str):
    """The reference: parse every line and compare values (what find_in_tables must equal)."""
    v4 = conn.local.address.version == 4
    entries = list(parse_table(tcp4, "/proc/net/tcp", "little")) if v4 else []
    entries += list(parse_table(tcp6, "/proc/net/tcp6", "little"))
    match, listening = None, False
    for entry in entries:
        local = normalize_address(entry.local.address)
        if entry.state == TcpState.LISTEN:
            covers = local == conn.local.address or (
                local.is_unspecified if v4 else entry.local.address == ipaddress.IPv6Address("::")
            )
            listening = listening or (entry.local.port == conn.local.port and covers)
        elif (
            local,
            entry.local.port,
            normalize_address(entry.remote.address),
            entry.remote.port,
        ) == (
            conn.local.address,
            conn.local.port,
            conn.remote.address,
            conn.remote.port,
        ) and (match is None or (entry.owned and not match.owned)):
            match = entry
    return None if match is None else (match, listening)


@pytest.mark.parametrize("shared", [False, True], ids=["search", "index"])
def test_text_search_equals_full_parse_on_every_pair(shared: bool) -> None:
    """For every pair of endpoints in the fixtures, found or not, the lookup gives exactly
    the answer of a full parse: by raw search on a fresh read, and through the index that
    a read builds once it serves more than one lookup."""
    tcp4, tcp6 = (
        (Table(TCP4, "/proc/net/tcp"), Table(TCP6, "/proc/net/tcp6")) if shared else (TCP4, TCP6)
    )
    entries = list(parse_table(TCP4, "", "little")) + list(parse_table(TCP6, "", "little"))
    ends = {
        Endpoint(normalize_address(e.address), e.port) for x in entries for e in (x.local, x.remote)
    }
    ends |= {ep("127.0.0.1:1"), ep("[::1]:1"), ep("127.0.0.3:6667")}
    checked = found = 0
    for local in ends:
        for remote in ends:
            if local.address.version != remote.address.version or not (local.port and remote.port):
                continue
            c = ConnectionId(local, remote)
            fast = find_in_tables(c, tcp4, tcp6, byteorder="little")
            assert (None if fast is None else (fast.entry, fast.inbound)) == full_parse_find(
                c, TCP4, TCP6
            ), c
            checked += 1
            found += fast is not None
    assert checked >= 70  # found and absent pairs alike
    assert found == sum(e.state != TcpState.LISTEN for e in entries)  # every connection row, once


def test_mapped_wildcard_listener_covers_ipv4_only() -> None:
    """A dual-stack socket listening on ::ffff:0.0.0.0 takes IPv4 connections only."""
    head6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    rows6 = (
        "   0: 0000000000000000FFFF000000000000:0016 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 10 1\n"
        "   1: 00000000000000000000000001000000:0016 00000000000000000000000001000000:9C41 01 0:0 0:0 0 5 0 11 1\n"
    )
    rows4 = "   0: 0100007F:0016 0100007F:9C41 01 0:0 0:0 0 5 0 12 1\n"
    v6 = find_in_tables(conn("[::1]:22", "[::1]:40001"), "", head6 + rows6, "little")
    v4 = find_in_tables(
        conn("127.0.0.1:22", "127.0.0.1:40001"), HEADER + rows4, head6 + rows6, "little"
    )
    assert v6 is not None and not v6.inbound
    assert v4 is not None and v4.inbound


def test_batch_reads_each_table_once(tmp_path: Path) -> None:
    """Inside a batch, lookups share one read of each table; outside, every lookup reads anew."""
    path = tmp_path / "tcp"
    path.write_text(TCP4)
    backend = ProcfsBackend(str(path), str(tmp_path / "absent6"))
    c = conn("127.0.0.1:40001", "127.0.0.1:6667")
    with backend.batch():
        assert backend.find(c) is not None
        path.write_text(HEADER)  # the connection is gone from the file...
        assert backend.find(c) is not None  # ...but this batch already read it
    assert backend.find(c) is None  # a new read sees the change
