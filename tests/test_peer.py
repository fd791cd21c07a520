"""runner/peer.py: the kernel's word on who connected (SO_PEERCRED, SO_PEERGROUPS), and allowed_groups."""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from runner.errors import ConfigError, ForbiddenError
from runner.peer import Peer, check_allowed, operator_peer, read_peer, user_name

CONNECT = """\
import os, socket, sys
name, ids = sys.argv[1], [int(x) for x in sys.argv[2:]]
if ids:  # become another user first (the interpreter may live where that user cannot read)
    uid, gid, *extra = ids
    os.setgroups(extra)
    os.setgid(gid)
    os.setuid(uid)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(b"\\0" + name.encode())
s.recv(1)  # stay connected until the test is done
"""


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def own_groups() -> set[int]:
    return {os.getgid(), *os.getgroups()}


def group_not_mine() -> grp.struct_group:
    mine = own_groups()
    for group in grp.getgrall():
        if group.gr_gid not in mine:
            return group
    pytest.skip("every group on this system is one of ours")


def peer_of(*ids: int) -> Peer:
    """Connect from a child process (as uid, gid, *supplementary gids when given); read its credentials."""
    name = f"jobrunner-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(b"\0" + name.encode())  # abstract: no file permissions in the way of another user
        server.listen(1)
        child = subprocess.Popen([sys.executable, "-c", CONNECT, name, *map(str, ids)])
        try:
            server.settimeout(10)
            conn, _ = server.accept()
            with conn:
                peer = read_peer(conn)
                conn.sendall(b"x")
        finally:
            child.wait(timeout=10)
    assert peer.pid == child.pid
    return peer


# ------------------------------------------------------------------------------------------- read_peer


def test_read_peer_over_a_socketpair_is_this_process(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair

    peer = read_peer(server)

    assert peer.pid == os.getpid()
    assert peer.uid == os.getuid()
    assert peer.gid == os.getgid()
    assert peer.gid in peer.groups
    assert set(os.getgroups()) <= peer.groups
    assert peer.groups <= own_groups()


def test_read_peer_of_another_process() -> None:
    peer = peer_of()  # checks the pid is the child's

    assert peer.uid == os.getuid()
    assert peer.groups == frozenset(own_groups())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
def test_read_peer_of_another_user_with_supplementary_groups() -> None:
    gids = [g.gr_gid for g in grp.getgrall() if g.gr_gid != 0][:3]
    if len(gids) < 3:
        pytest.skip("needs three groups besides root's")
    primary, *extra = gids

    peer = peer_of(65534, primary, *extra)

    assert peer.uid == 65534
    assert peer.gid == primary
    assert peer.groups == frozenset(gids)  # SO_PEERGROUPS: the supplementary groups, plus the primary


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
def test_membership_of_another_user_comes_from_the_connection() -> None:
    groups = [g for g in grp.getgrall() if g.gr_gid != 0]
    if len(groups) < 3:
        pytest.skip("needs three groups besides root's")
    primary, member, outsider = groups[:3]
    peer = peer_of(65534, primary.gr_gid, member.gr_gid)

    check_allowed(peer, "deploy", [outsider.gr_name, member.gr_name])  # raises if refused
    check_allowed(peer, "deploy", [primary.gr_name])  # raises if refused
    with pytest.raises(ForbiddenError):
        check_allowed(peer, "deploy", [outsider.gr_name])


# ----------------------------------------------------------------------------------------- check_allowed


def test_an_empty_list_allows_everyone() -> None:
    peer = Peer(pid=1, uid=12345, gid=12345, groups=frozenset({12345}))

    check_allowed(peer, "build", [])  # raises if refused
    check_allowed(peer, "build", ())  # raises if refused


def test_a_member_of_the_primary_group_is_allowed(pair: tuple[socket.socket, socket.socket]) -> None:
    peer = read_peer(pair[0])
    own = grp.getgrgid(os.getgid()).gr_name

    check_allowed(peer, "build", [own])  # raises if refused


def test_a_member_of_any_listed_group_is_allowed(pair: tuple[socket.socket, socket.socket]) -> None:
    peer = read_peer(pair[0])
    own = grp.getgrgid(os.getgid()).gr_name

    check_allowed(peer, "build", [group_not_mine().gr_name, own])  # raises if refused


def test_a_non_member_is_forbidden_with_a_hint(pair: tuple[socket.socket, socket.socket]) -> None:
    peer = read_peer(pair[0])
    other = group_not_mine()
    me = pwd.getpwuid(os.getuid()).pw_name

    with pytest.raises(ForbiddenError) as info:
        check_allowed(peer, "deploy", [other.gr_name])

    error = info.value
    assert error.code == "forbidden"
    assert error.exit_status == 77
    assert me in error.message
    assert "'deploy'" in error.message
    assert other.gr_name in error.hint
    assert f"usermod -aG {other.gr_name} {me}" in error.hint


def test_an_unknown_group_is_a_configuration_error(pair: tuple[socket.socket, socket.socket]) -> None:
    peer = read_peer(pair[0])
    missing = f"no-such-group-{secrets.token_hex(4)}"
    with pytest.raises(KeyError):
        grp.getgrnam(missing)

    with pytest.raises(ConfigError) as info:
        check_allowed(peer, "deploy", [missing])

    assert repr(missing) in info.value.message
    assert "'deploy'" in info.value.message
    assert info.value.hint


# ------------------------------------------------------------------------------------------------ misc


def test_describe_names_the_user() -> None:
    peer = Peer(pid=4242, uid=os.getuid(), gid=os.getgid(), groups=frozenset())

    text = peer.describe()

    assert f"uid={os.getuid()} ({pwd.getpwuid(os.getuid()).pw_name})" in text
    assert f"gid={os.getgid()}" in text
    assert "pid=4242" in text


def test_user_name_of_an_unknown_uid_is_the_number() -> None:
    uid = next(u for u in range(54_321, 60_000) if u not in {p.pw_uid for p in pwd.getpwall()})

    assert user_name(uid) == str(uid)


def test_operator_peer_is_this_process() -> None:
    peer = operator_peer()

    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert set(os.getgroups()) <= peer.groups
