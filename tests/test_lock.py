"""runner/lock.py: one job's concurrency policy across runner processes, with real flock(2) holders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner import lock
from runner.config import Concurrency
from runner.errors import BusyError, InternalError

HOLD = """\
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
"""

TRY = """\
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(1)
"""


class Holder:
    """Another process holding a job's lock, as a second runner would."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == b"locked\n"

    def release(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=10)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.close()


def hold(holders: list[Holder], path: Path) -> Holder:
    holder = Holder(path)
    holders.append(holder)
    return holder


def free_for_others(path: Path) -> bool:
    """Whether another process could take the lock right now."""
    return subprocess.run([sys.executable, "-c", TRY, str(path)], check=False).returncode == 0


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def no_wait(seconds: float) -> bool:
    raise AssertionError("the reject policy must not wait")


# ---------------------------------------------------------------------------------------------- reject


def test_reject_takes_a_free_lock_and_holds_it(tmp_path: Path) -> None:
    fd = lock.acquire(str(tmp_path / "locks"), "build", Concurrency.REJECT, no_wait)

    assert fd is not None
    assert not free_for_others(tmp_path / "locks" / "build.lock")
    lock.release(fd)
    assert free_for_others(tmp_path / "locks" / "build.lock")


def test_reject_while_another_process_holds_the_lock(tmp_path: Path, holders: list[Holder]) -> None:
    hold(holders, tmp_path / "build.lock")
    before = open_fds()

    with pytest.raises(BusyError) as info:
        lock.acquire(str(tmp_path), "build", Concurrency.REJECT, no_wait)

    assert "'build'" in info.value.message
    assert info.value.hint
    assert info.value.code == "busy"
    assert info.value.exit_status == 75
    assert open_fds() == before  # the lock file's descriptor was closed again


def test_other_jobs_do_not_share_the_lock(tmp_path: Path, holders: list[Holder]) -> None:
    hold(holders, tmp_path / "build.lock")

    fd = lock.acquire(str(tmp_path), "lint", Concurrency.REJECT, no_wait)

    assert fd is not None
    lock.release(fd)


def test_a_lock_held_by_a_process_that_died_is_free(tmp_path: Path, holders: list[Holder]) -> None:
    holder = hold(holders, tmp_path / "build.lock")
    holder.kill()  # SIGKILL: no chance to unlock

    fd = lock.acquire(str(tmp_path), "build", Concurrency.REJECT, no_wait)

    assert fd is not None
    lock.release(fd)


def test_the_lock_descriptor_is_not_inherited_by_the_job(tmp_path: Path) -> None:
    fd = lock.acquire(str(tmp_path), "build", Concurrency.REJECT, no_wait)

    assert fd is not None
    assert not os.get_inheritable(fd)  # a job's leftover child must not keep the job "busy"
    # Group-writable (the unit's UMask=0007 keeps it so): every job's user is in the lock directory's
    # group, and a user's run slots are shared by all jobs.
    assert (tmp_path / "build.lock").stat().st_mode & 0o777 == 0o660 & ~_umask()
    lock.release(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_lock_directory_is_created(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "jobrunner"

    fd = lock.acquire(str(directory), "build", Concurrency.QUEUE, no_wait)

    assert fd is not None
    assert (directory / "build.lock").is_file()
    lock.release(fd)


def test_an_unusable_lock_directory_is_an_internal_error(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file, not a directory")

    with pytest.raises(InternalError) as info:
        lock.acquire(str(tmp_path / "blocker" / "locks"), "build", Concurrency.REJECT, no_wait)

    assert "'build'" in info.value.message


# ----------------------------------------------------------------------------------------------- queue


def test_queue_waits_until_the_other_run_ends(tmp_path: Path, holders: list[Holder]) -> None:
    holder = hold(holders, tmp_path / "build.lock")
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) == 3:
            holder.release()  # the other run ends while we wait
        return True

    fd = lock.acquire(str(tmp_path), "build", Concurrency.QUEUE, wait)

    assert fd is not None
    assert len(waits) == 3
    assert all(0 < s <= 1 for s in waits)  # polls, does not block the caller for long
    assert not free_for_others(tmp_path / "build.lock")
    lock.release(fd)


def test_queue_gives_up_when_the_caller_goes_away(tmp_path: Path, holders: list[Holder]) -> None:
    hold(holders, tmp_path / "build.lock")
    waits: list[float] = []
    before = open_fds()

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return len(waits) < 2

    with pytest.raises(BusyError):
        lock.acquire(str(tmp_path), "build", Concurrency.QUEUE, wait)

    assert len(waits) == 2
    assert open_fds() == before


def test_queue_without_contention_does_not_wait(tmp_path: Path) -> None:
    fd = lock.acquire(str(tmp_path), "build", Concurrency.QUEUE, no_wait)

    assert fd is not None
    lock.release(fd)


# -------------------------------------------------------------------------------------------- parallel


def test_parallel_needs_no_lock(tmp_path: Path, holders: list[Holder]) -> None:
    hold(holders, tmp_path / "held" / "build.lock")

    assert lock.acquire(str(tmp_path / "held"), "build", Concurrency.PARALLEL, no_wait) is None
    assert lock.acquire(str(tmp_path / "unused"), "build", Concurrency.PARALLEL, no_wait) is None
    assert not (tmp_path / "unused").exists()


# --------------------------------------------------------------------------------------------- where


def test_lock_directory_is_the_shared_one_the_units_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("JOBRUNNER_LOCKS", "/run/jobrunner-locks")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/jobrunner")
    assert lock.lock_directory(str(tmp_path / "logs")) == "/run/jobrunner-locks"


def test_lock_directory_is_the_units_runtime_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("JOBRUNNER_LOCKS", raising=False)
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/jobrunner")
    assert lock.lock_directory(str(tmp_path / "logs")) == "/run/jobrunner"

    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/jobrunner:/run/other")  # several: the first one
    assert lock.lock_directory(str(tmp_path / "logs")) == "/run/jobrunner"


@pytest.mark.parametrize("value", [None, ""])
def test_lock_directory_without_a_runtime_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    else:
        monkeypatch.setenv("RUNTIME_DIRECTORY", value)

    assert lock.lock_directory(str(tmp_path / "logs")) == f"{tmp_path}/logs/.locks"


def test_user_slots_run_out_at_the_limit_and_come_back_when_released(tmp_path: Path) -> None:
    held = [lock.acquire_user_slot(str(tmp_path), 1000, 2) for _ in range(2)]
    with pytest.raises(BusyError, match="2 runs in progress"):
        lock.acquire_user_slot(str(tmp_path), 1000, 2)
    other_user = lock.acquire_user_slot(str(tmp_path), 1001, 2)  # limits are per user
    lock.release(held.pop())
    again = lock.acquire_user_slot(str(tmp_path), 1000, 2)
    for fd in (*held, other_user, again):
        lock.release(fd)


def test_an_existing_lock_file_is_opened_without_o_creat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where fs.protected_regular=2 (Debian's default), O_CREAT on an existing file that another user owns,
    in a sticky directory others can write (/run/jobrunner-locks), fails with EACCES whatever the file's
    mode: so every job's user but the first would fail. Modelled here; tests/vm shows it on a real Debian."""
    real_open = os.open

    def protected_regular(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT and os.path.exists(path):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, mode)

    (tmp_path / "user-1000.0.lock").touch()  # made by another job's user
    (tmp_path / "build.lock").touch()
    monkeypatch.setattr(lock.os, "open", protected_regular)
    slot = lock.acquire_user_slot(str(tmp_path), 1000, 2)
    held = lock.acquire(str(tmp_path), "build", Concurrency.REJECT, lambda _: False)
    assert held is not None
    fresh = lock.acquire(str(tmp_path), "deploy", Concurrency.REJECT, lambda _: False)  # not there yet
    assert fresh is not None
    assert (tmp_path / "deploy.lock").exists()
    for fd in (slot, held, fresh):
        lock.release(fd)
