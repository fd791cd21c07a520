"""How the runner was started: by a socket connection, by an operator's `systemctl start`, or by hand.

The sd_listen_fds(3) check is done here directly rather than through `systemd.daemon`: it is two
environment variables, and importing python-systemd would cost every connection ~5-10 ms.
The connection is a `_socket.socket`, the C type that `socket.socket` extends: it has every method
the runner uses, and the `socket` module's import (enum conversions of its constants, `selectors`)
would cost every connection ~1.5 ms.
"""

from __future__ import annotations

import _socket
import enum
import os

from runner.errors import ActivationError

SD_LISTEN_FDS_START = 3


class Mode(enum.Enum):
    SOCKET = "socket"  # one connection from job.socket (Accept=yes), as fd 3
    OPERATOR = "operator"  # `systemctl start job@NAME`: no socket, output to the journal


HOW_TO_RUN = (
    "jobrunner's runner is started by systemd, not by hand: run jobs with `jobctl run NAME` "
    "(or `sudo systemctl start job@NAME` as an operator)"
)


def detect_mode(job_argument: str | None) -> Mode:
    if _listen_fds() > 0:
        return Mode.SOCKET
    if job_argument and os.environ.get("INVOCATION_ID"):
        return Mode.OPERATOR
    raise ActivationError("not started by job.socket or job@.service", HOW_TO_RUN)


def take_connection() -> _socket.socket:
    """The accepted connection systemd passed us; never inherited by the job."""
    count = _listen_fds()
    if count != 1:
        raise ActivationError(
            f"expected one connection from job.socket, got {count} file descriptors", HOW_TO_RUN
        )
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # sd_listen_fds(unset_environment=1): the job must not see them
    conn = _socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(conn.fileno(), False)
    return conn


def _listen_fds() -> int:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return 0
    try:
        return int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return 0
