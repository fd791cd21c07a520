"""Who is on the other end of the connection: the kernel's word (SO_PEERCRED, SO_PEERGROUPS)."""

from __future__ import annotations

import _socket
import errno
import grp
import os

from runner.errors import ConfigError, ForbiddenError
from runner.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterable

# Not exported by Python's socket module; the value is fixed in the Linux ABI (asm-generic/socket.h).
SO_PEERGROUPS = getattr(_socket, "SO_PEERGROUPS", 59)
UCRED_SIZE = 12  # struct ucred: pid_t pid, uid_t uid, gid_t gid, each 32 bits in native byte order


class Peer(Value):
    __slots__ = ("gid", "groups", "pid", "uid")

    def __init__(self, pid: int, uid: int, gid: int, groups: frozenset[int]) -> None:
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.groups = groups  # primary and supplementary gids at connect time

    def describe(self) -> str:
        return f"uid={self.uid} ({user_name(self.uid)}) gid={self.gid} pid={self.pid}"


def read_peer(conn: _socket.socket) -> Peer:
    pid, uid, gid = _native_u32s(conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, UCRED_SIZE))
    return Peer(pid=pid, uid=uid, gid=gid, groups=frozenset({gid, *_peer_groups(conn)}))


def operator_peer() -> Peer:
    """The caller in operator mode (`systemctl start job@NAME`): whoever could start the unit."""
    return Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), groups=frozenset(os.getgroups()))


def _peer_groups(conn: _socket.socket) -> tuple[int, ...]:
    size = 64 * 4
    while True:
        try:
            raw = conn.getsockopt(_socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE and size < 65536 * 4:
                size *= 16
                continue
            raise
        return _native_u32s(raw)


def _native_u32s(raw: bytes) -> tuple[int, ...]:
    # memoryview.cast rather than the struct module, whose import every connection would pay (~0.1 ms).
    # A pid_t read as unsigned is the same number: pids are never negative.
    return tuple(memoryview(raw).cast("I"))


def check_allowed(peer: Peer, job_name: str, allowed_groups: Iterable[str]) -> None:
    """Raise ForbiddenError unless the peer is in one of the groups (an empty list allows everyone)."""
    names = list(allowed_groups)
    if not names:
        return
    if not {_group_id(name, job_name) for name in names}.isdisjoint(peer.groups):
        return
    raise ForbiddenError(
        f"{user_name(peer.uid)} may not run job '{job_name}'",
        f"members of {', '.join(names)} may run it: ask an administrator to add you "
        f"(sudo usermod -aG {names[0]} {user_name(peer.uid)}), then log in again",
    )


def _group_id(name: str, job_name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(
            f"job '{job_name}': allowed_groups names group {name!r}, which does not exist",
            "create the group (sysusers.d) or fix allowed_groups in jobs.toml",
        ) from None


def user_name(uid: int) -> str:
    import pwd  # only needed for messages

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
