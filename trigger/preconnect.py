"""The `jobctl` command's entry point: connect to the job socket first, then import the rest of jobctl.

Each connection starts a fresh sandboxed runner, which needs ~60 ms before it reads its request. jobctl
itself needs ~7 ms of imports (argparse, json) and argument parsing before it knows that request. Made
in that order, a developer waits for both; connected first, the runner starts while jobctl imports,
and the wait is the runner's alone. This module imports nothing but `_socket` and `os` (and `sys` and
`time`, which every interpreter has loaded before it runs a line) for that reason.

Every job NAME has a socket of its own next to the main one (job_socket()): `jobctl run NAME` goes there
directly, and only falls back to the main socket, the front door that hands a run on to the job's own
units at the cost of a second service activation, when the job's socket is not there. So the early
connection goes where jobctl will go when no --socket is given: guess_job() reads the job's name from
the command line without argparse, and the connection goes to that job's socket if it can be
connected to, else to the main socket ($JOBCTL_SOCKET, else /run/job.sock). jobctl uses it if its
options lead to that socket, and closes it otherwise (--help, a usage error, another --socket, a guess
that argparse disagrees with): the runner then sees a connection that closed without sending a byte,
which it takes as no request at all and answers with nothing (docs/protocol.md). Failing here is
silent: jobctl connects again once it knows its options, and reports errors in its usual order.
"""

from __future__ import annotations

import _socket
import os
import sys  # loaded before any module is: importing it costs a dict look-up
import time  # the same

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn

DEFAULT_SOCKET = "/run/job.sock"
SOCKET_ENV = "JOBCTL_SOCKET"
# A job's name: [a-z][a-z0-9_-]{0,63} (runner/config.py's JOB_NAME), checked without compiling a regex.
_JOB_NAME_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz")
_JOB_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_JOB_NAME_MAX = 64


def default_socket() -> str:
    """The socket jobctl uses when --socket is not given."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def job_socket(main_path: str, job: str) -> str:
    """The socket of job `job` next to the main socket `main_path` (a contract with the server's units):
    /run/job.sock -> /run/job/NAME.sock; a path not ending in .sock gets PATH.d/NAME.sock."""
    if main_path.endswith(".sock"):
        return f"{main_path[: -len('.sock')]}/{job}.sock"
    return f"{main_path}.d/{job}.sock"


def valid_job_name(name: str) -> bool:
    """Whether `name` is a job's name: only those have a socket of their own (and one that is not could
    make job_socket() a path anywhere)."""
    if len(name) > _JOB_NAME_MAX:
        return False
    return name[:1] in _JOB_NAME_FIRST and _JOB_NAME_CHARACTERS.issuperset(name)


def guess_job(argv: Sequence[str]) -> str | None:
    """The job that `jobctl ARGV` runs, guessed without argparse, or None (not a `run`, no name yet, or
    not a valid name). Options are skipped wherever they are (`--socket PATH` with its value); the first
    other word is the command, the next one after `run` the name; a `--` before it ends the search, as
    jobctl takes everything after it as job arguments. jobctl checks the guess (EarlyConnection.take())."""
    words = iter(argv)
    command = None
    for word in words:
        if word == "--":
            return None
        if word == "--socket":
            next(words, None)  # its value, whatever it looks like
        elif word.startswith("-") and word != "-":  # --socket=PATH, --json, --debug, --detach, -h, ...
            continue
        elif command is None:
            if word != "run":
                return None
            command = word
        else:
            return word if valid_job_name(word) else None
    return None


class EarlyConnection:
    """A connection made before jobctl knew which socket it needs; used at most once.

    `instead_of`: the job's own socket, when this connection was meant for it but could not be made
    there, and so goes to the main socket (`path`) instead: jobctl need not try that socket again."""

    def __init__(self, path: str, sock: _socket.socket, instead_of: str | None = None) -> None:
        self.path = path
        self.instead_of = instead_of
        self._sock: _socket.socket | None = sock
        self.made = time.monotonic()

    def age(self) -> float:
        """Seconds since it was made: the server waits 10 s for a request (docs/protocol.md)."""
        return time.monotonic() - self.made

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

    @classmethod
    def guess(cls, argv: Sequence[str], main_path: str) -> EarlyConnection | None:
        """A connection to the socket that `jobctl ARGV` will use if no --socket is given: for a run of a
        valid job name, that job's socket if it can be connected to; else the main socket."""
        job = guess_job(argv)
        direct = None if job is None else job_socket(main_path, job)
        if direct is not None and (early := cls.open(direct)) is not None:
            return early
        early = cls.open(main_path)
        if early is not None:
            early.instead_of = direct
        return early

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
    early = EarlyConnection.guess(sys.argv[1:], default_socket())
    from trigger.jobctl import run  # after connecting, on purpose: see the module's docstring

    run(early)
