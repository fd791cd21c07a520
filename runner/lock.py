"""One job's concurrency policy across runner processes (each connection is its own process): flock(2).

The kernel drops the lock when the holding process dies, so a killed runner can never leave a job
stuck as "busy".
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable

from runner.config import Concurrency
from runner.errors import BusyError, InternalError

QUEUE_POLL_S = 0.2
# Group-writable: the directory is setgid to jobrunner-jobs, so another job's user can take a slot in
# a user's lock file that the first job created (max_runs_per_user counts over all jobs).
LOCK_MODE = 0o660
Waiter = Callable[[float], bool]


def open_lock(path: str) -> int:
    """Open (creating it if need be) a lock file that another job's user may have created.

    An existing file is opened without O_CREAT: in a sticky directory that others can write, such as
    /run/jobrunner-locks (3770), the kernel refuses O_CREAT on a file another user owns when
    fs.protected_regular is 2 (Debian's default, /usr/lib/sysctl.d/protect-links.conf), even with the
    file's group and mode allowing it. Containers share the host's setting, so only a whole machine
    shows it (tests/vm).
    """
    flags = os.O_RDWR | os.O_CLOEXEC
    while True:
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            pass
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, LOCK_MODE)
        except FileExistsError:
            continue  # another runner created it in between: open that one


def lock_directory(logs: str) -> str:
    """Where lock files live: the jobs' units set $JOBRUNNER_LOCKS (/run/jobrunner-locks, shared by every
    job's user, out of developers' reach); else a RuntimeDirectory= (tests); else beside the logs."""
    shared = os.environ.get("JOBRUNNER_LOCKS")
    if shared:
        return shared
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    return runtime.split(":")[0] if runtime else os.path.join(logs, ".locks")


def acquire(directory: str, job: str, policy: Concurrency, wait: Waiter) -> int | None:
    """Take the job's lock as the policy says; return the fd to keep for the run (None: no lock needed).

    `wait(seconds)` is called between attempts when queueing; it returns False when the caller went away.
    """
    if not policy.needs_lock():
        return None
    try:
        os.makedirs(directory, exist_ok=True)
        fd = open_lock(os.path.join(directory, f"{job}.lock"))
    except OSError as e:
        raise InternalError(f"cannot open the lock for job '{job}': {e.strerror}: {e.filename}", "") from None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        if policy is Concurrency.REJECT or not wait(QUEUE_POLL_S):
            os.close(fd)
            raise BusyError(f"job '{job}' is already running", "wait for it to finish and try again")


def release(fd: int) -> None:
    os.close(fd)  # closing the only descriptor drops the flock


def acquire_user_slot(directory: str, uid: int, limit: int) -> int:
    """Take one of the caller's `limit` run slots (a flock each); BusyError when all are taken.

    This is what keeps one user (or one runaway script) from taking every one of the socket's
    MaxConnections= and starving everyone else: queued runs hold their slot while they wait.
    """
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise InternalError(f"cannot create the lock directory: {e.strerror}: {e.filename}", "") from None
    for slot in range(limit):
        fd = open_lock(os.path.join(directory, f"user-{uid}.{slot}.lock"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
    raise BusyError(
        f"you already have {limit} runs in progress, the most one user may have at once",
        "wait for one to finish (the limit is max_runs_per_user in jobs.toml)",
    )
