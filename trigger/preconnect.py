"""The `jobctl` command's entry point: connect to the job socket first, then import the rest of jobctl.

Each connection starts a fresh sandboxed runner, which needs ~60 ms before it reads its request. jobctl
itself needs ~7 ms of imports (argparse, json) and argument parsing before it knows that request. Made
in that order, a developer waits for both; connected first, the runner starts while jobctl imports,
and the wait is the runner's alone. This module imports nothing but `_socket` and `os` for that reason.

The early connection goes to the socket jobctl uses when no --socket is given ($JOBCTL_SOCKET, else
/run/job.sock). jobctl uses it if its options name that socket, and closes it otherwise (--help, a
usage error, another --socket): the runner then sees a connection that closed without sending a byte,
which it takes as no request at all and answers with nothing (docs/protocol.md). Failing here is
silent: jobctl connects again once it knows its options, and reports errors in its usual order.
"""

from __future__ import annotations

import _socket
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import NoReturn

DEFAULT_SOCKET = "/run/job.sock"
SOCKET_ENV = "JOBCTL_SOCKET"


def default_socket() -> str:
    """The socket jobctl uses when --socket is not given."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class EarlyConnection:
    """A connection made before jobctl knew which socket it needs; used at most once."""

    def __init__(self, path: str, sock: _socket.socket) -> None:
        self.path = path
        self._sock: _socket.socket | None = sock

    @classmethod
    def open(cls, path: str) -> EarlyConnection | None:
        """Connect to `path` without waiting (a full backlog, like any error, means: not now)."""
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)  # close-on-exec, as every Python socket
        try:
            sock.setblocking(False)
            sock.connect(path)
            sock.setblocking(True)
        except OSError:
            sock.close()
            return None
        return cls(path, sock)

    def take(self, path: str) -> _socket.socket | None:
        """The connection, if it goes to `path` and was not taken yet; else None (and it is closed)."""
        sock, self._sock = self._sock, None
        if sock is not None and path != self.path:
            sock.close()
            return None
        return sock

    def close(self) -> None:
        """Close it unless it was taken: the runner sees a connection that asked nothing."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def main() -> NoReturn:
    """The `jobctl` command (installed script, `python3 -m trigger`, the package's console script)."""
    early = EarlyConnection.open(default_socket())
    from trigger.jobctl import run  # after connecting, on purpose: see the module's docstring

    run(early)
