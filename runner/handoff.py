"""Handing a client's connection from the front door (job@.service) to the job's own unit.

A connection to /run/job.sock starts the front door, which holds no credential. For `run NAME` it
connects to the job's own socket, /run/job/NAME.sock (job-NAME.socket, Accept=yes), which starts the
job's unit with that job's credentials and sandbox, and passes it the client's connection (SCM_RIGHTS)
together with the request line it read. The job's runner then talks to the client directly: no byte
of output goes through the front door, and SO_PEERCRED on the passed connection still names the client.

On the job's socket, a handed-over request starts with HANDOFF_MARK (a NUL byte no client request may
contain) and carries exactly one descriptor. The job's runner believes it only from the front door's
user (FRONT_DOOR_USER, a static system user from sysusers.d): jobs run as another user, and developers
may connect to a job's socket directly, so anyone else who sends the mark, or descriptors, is refused.
The job's runner answers ACK once it has the connection; the front door then closes its copy and exits.
If the job's socket closes without ACK, systemd did not start the job's unit: a credential that cannot
be decrypted, or the socket's connection limit. The front door then tells the two apart by whether
systemd counted a refusal at the limit (socket_refusals) while it tried once more.
"""

from __future__ import annotations

import _socket
import os
import sys

from runner.errors import RequestError
from runner.peer import read_peer
from runner.protocol import (
    MAX_REQUEST_BYTES,
    REQUEST_DEADLINE_S,
    NoRequest,
    closed_early_error,
    deadline_error,
)

JOB_SOCKETS_DIR = "/run/job"  # a job's own socket: /run/job/NAME.sock (a contract, docs/protocol.md)
HANDOFF_MARK = b"\0jobrunner-handoff\0"
ACK = b"+"
FRONT_DOOR_USER = "jobrunner-dispatch"
# How long the front door waits for the job's unit to take the connection: its start-up (~60 ms) under
# load, far below systemd's own start timeout, which would then have failed it.
ACK_DEADLINE_S = 60.0
_FD_SIZE = 4  # an int in SCM_RIGHTS


SOCKETS_ENV = "JOBRUNNER_JOB_SOCKETS"  # tests: another directory for the jobs' sockets
FRONT_DOOR_USER_ENV = "JOBRUNNER_FRONT_DOOR_USER"  # tests: the user the front door runs as


def job_socket(job: str) -> str:
    return f"{os.environ.get(SOCKETS_ENV) or JOB_SOCKETS_DIR}/{job}.sock"


class HandoffRefused(Exception):
    """The job's socket did not take the connection."""

    def __init__(self, reachable: bool) -> None:
        super().__init__()
        self.reachable = reachable  # False: no such socket (the job's units do not exist yet)


def hand_over(client: _socket.socket, request_line: bytes, path: str) -> None:
    """Pass `client` and its request line to the job's socket at `path`; return once the job's runner
    has it. Raises HandoffRefused when there is no socket, or it closed without taking the connection."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise HandoffRefused(reachable=False) from None
        sock.settimeout(ACK_DEADLINE_S)
        fd = client.fileno().to_bytes(_FD_SIZE, sys.byteorder)
        try:
            sock.sendmsg(
                [HANDOFF_MARK + request_line + b"\n"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd)]
            )
            answer = sock.recv(1)
        except (ConnectionError, TimeoutError):
            answer = b""
        if answer != ACK:
            raise HandoffRefused(reachable=True)
    finally:
        sock.close()


def socket_refusals(job_name: str) -> int | None:
    """How many connections the job's socket has refused at its connection limit so far (systemd's
    NRefused=, since 239), or None when systemd cannot be asked. Only for a run that did not start:
    it costs a `systemctl` process (about 10 ms), which the front door's start-up does not pay."""
    import subprocess  # here: not imported on the path of a run that starts

    show = ["systemctl", "show", "--property=NRefused", "--value", f"job-{job_name}.socket"]
    try:
        done = subprocess.run(show, capture_output=True, timeout=10, check=True)
        return int(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def receive(conn: _socket.socket, received: bytearray) -> _socket.socket:
    """The connection to serve on a job's socket: `conn` itself (a client that connected directly), or
    the client's connection that the front door handed over on it. What the client sent so far is
    appended to `received`. Raises NoRequest when `conn` closed without a byte."""
    conn.settimeout(REQUEST_DEADLINE_S)
    try:
        data, ancillary, _flags, _address = conn.recvmsg(
            MAX_REQUEST_BYTES + 1, _socket.CMSG_SPACE(_FD_SIZE), _socket.MSG_CMSG_CLOEXEC
        )
    except TimeoutError:
        raise deadline_error(REQUEST_DEADLINE_S) from None
    except ConnectionError:
        raise closed_early_error() from None
    fds = _descriptors(ancillary)
    if not data.startswith(HANDOFF_MARK[:1]):  # a client's request never starts with NUL
        for fd in fds:
            os.close(fd)  # descriptors from anyone but the front door are never used
        if not data:
            raise NoRequest
        received += data
        return conn
    return _take_over(conn, data, fds, received)


def _take_over(conn: _socket.socket, data: bytes, fds: list[int], received: bytearray) -> _socket.socket:
    if not data.startswith(HANDOFF_MARK) or len(fds) != 1 or read_peer(conn).uid != front_door_uid():
        for fd in fds:
            os.close(fd)
        raise RequestError("a handed-over connection that did not come from job.socket's front door", "")
    client = _socket.socket(fileno=fds[0])
    os.set_inheritable(client.fileno(), False)
    try:
        line = _rest_of_line(conn, bytearray(data[len(HANDOFF_MARK) :]))
        conn.sendall(ACK)
    except BaseException:
        client.close()
        raise
    conn.close()
    received += line + b"\n"
    return client


def _rest_of_line(conn: _socket.socket, data: bytearray) -> bytes:
    """The request line the front door sent (it read and checked it: at most MAX_REQUEST_BYTES)."""
    while b"\n" not in data and len(data) <= MAX_REQUEST_BYTES:
        chunk = conn.recv(MAX_REQUEST_BYTES + 1 - len(data))
        if not chunk:
            break
        data += chunk
    line, newline, _ = bytes(data).partition(b"\n")
    if not newline:
        raise RequestError("the front door handed over an incomplete request line", "")
    return line


def front_door_uid() -> int | None:
    import pwd  # only for a handed-over connection

    try:
        return pwd.getpwnam(os.environ.get(FRONT_DOOR_USER_ENV) or FRONT_DOOR_USER).pw_uid
    except KeyError:
        return None


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds += [
                int.from_bytes(payload[i : i + _FD_SIZE], sys.byteorder) for i in range(0, usable, _FD_SIZE)
            ]
    return fds
