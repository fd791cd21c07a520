"""What a run leaves behind: its id, its output directory (with a `latest` link) and its run log."""

from __future__ import annotations

import fcntl
import os
import time

from runner.errors import InternalError
from runner.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import BinaryIO


def new_run_id(now: float | None = None) -> str:
    """`20261128T154402-123456-3fa9c0de`: UTC start to the microsecond, then random bits; sorts by time."""
    now = time.time() if now is None else now
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(seconds))}-{micros:06d}-{os.urandom(4).hex()}"


def iso_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


class RunPaths(Value):
    __slots__ = ("log", "output_dir")

    def __init__(self, output_dir: str, log: str) -> None:
        self.output_dir = output_dir
        self.log = log


def create_run_paths(outputs: str, logs: str, job: str, run_id: str) -> RunPaths:
    """Create `OUTPUTS/JOB/RUN_ID/` (and point `OUTPUTS/JOB/latest` at it); name `LOGS/JOB/RUN_ID.log`."""
    job_outputs = os.path.join(outputs, job)
    output_dir = os.path.join(job_outputs, run_id)
    log_dir = os.path.join(logs, job)
    try:
        os.makedirs(output_dir)
        os.makedirs(log_dir, exist_ok=True)
        _point_latest(job_outputs, run_id)
    except OSError as e:
        raise InternalError(
            f"cannot create the run's directories: {e.strerror}: {e.filename}",
            "check that the outputs and logs directories exist and are writable by the service",
        ) from None
    return RunPaths(output_dir=output_dir, log=os.path.join(log_dir, f"{run_id}.log"))


def _point_latest(job_outputs: str, run_id: str) -> None:
    # Build the new link beside the old one and rename it over: readers never see a missing `latest`.
    tmp = os.path.join(job_outputs, f".latest-{run_id}")
    os.symlink(run_id, tmp)
    os.replace(tmp, os.path.join(job_outputs, "latest"))


# A run log is written once and seldom read back, so past this many bytes the runner hands the pages it
# has written back to the kernel (posix_fadvise DONTNEED: written to disk, then dropped from the page
# cache), and the same few pages serve the whole run. Without that, a job printing gigabytes fills the
# page cache with its log, evicting what other processes use, and every new page costs: the runner's
# CPU per GiB streamed was 1.4-2.0 s against 0.9-1.2 s on the test VMs (bench/stream.py, "log kept in
# cache"). Smaller logs, nearly every run's, stay cached for whoever reads them next.
RELEASE_CACHE_EVERY = 16 << 20


class RunLog:
    """The run log: a header (who, when, what), the redacted transcript as it happens, a footer."""

    def __init__(self, path: str, *, release_cache_every: int = RELEASE_CACHE_EVERY) -> None:
        try:
            # Unbuffered: whatever the job printed is on disk even if the runner is killed mid-run.
            self._file: BinaryIO = open(path, "xb", buffering=0)  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise InternalError(f"cannot create the run log: {e.strerror}: {path}", "") from None
        self.path = path
        self.marked = mark_in_progress(self._file.fileno())  # held until close(), or the runner's death
        self._ends_with_newline = True
        self._release_cache_every = release_cache_every  # 0: never
        self._written = 0
        self._released_at = 0  # how much had been written when the cache was last released
        self.write_error: OSError | None = None  # e.g. ENOSPC: the log keeps what fit, the run goes on

    def header(self, fields: dict[str, object]) -> None:
        lines = ["# jobrunner run log (a log without a '# ---- end' section is a run that never finished)\n"]
        lines += [_field(key, value) for key, value in fields.items()]
        self._write_text([*lines, "# ---- output\n"])

    def write(self, data: bytes) -> None:
        if data and self.write_error is None:
            try:
                _write_all(self._file, data)
            except OSError as e:
                self.write_error = e
            self._ends_with_newline = data.endswith(b"\n")
            self._written += len(data)
            if 0 < self._release_cache_every <= self._written - self._released_at:
                self._release_cache()

    def note(self, text: str) -> None:
        """A line of the runner's own among the job's output (an API request), marked with '# '."""
        line = ("" if self._ends_with_newline else "\n") + f"# {text}\n"
        self.write(line.encode("utf-8", "surrogateescape"))

    def footer(self, fields: dict[str, object]) -> None:
        lines = ["" if self._ends_with_newline else "\n", "# ---- end\n"]
        self._write_text(lines + [_field(key, value) for key, value in fields.items()])

    def _write_text(self, lines: list[str]) -> None:
        try:
            _write_all(self._file, "".join(lines).encode("utf-8", "surrogateescape"))
        except OSError as e:
            self.write_error = self.write_error or e

    def close(self) -> None:
        if self._released_at:  # a large log: its tail need not stay cached either
            self._release_cache()
        self._file.close()

    def _release_cache(self) -> None:
        # The whole file each time: pages still being written to disk at the last call are dropped now.
        self._released_at = self._written
        try:
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # only advice: a filesystem that cannot take it keeps the pages cached, as before


# How long the runner tries to take its run log's lock (mark_in_progress) while a reader's momentary
# test of it (runner.history) is in the way: a reader holds it for microseconds.
MARK_ATTEMPTS = 50
MARK_RETRY_S = 0.01


def mark_in_progress(fd: int) -> bool:
    """Hold an exclusive flock on the run log for as long as it is open: the mark of a run in progress
    (runner.history, docs/protocol.md). The kernel drops it when the runner closes the log or dies, even
    by SIGKILL, so a log whose lock is free belongs to a run that is over, finished or not. Readers
    only test it for a moment; one that holds it longer (a developer may open the group's files) costs
    the run at most half a second of start-up and then only the mark, never the run: False."""
    for _ in range(MARK_ATTEMPTS):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(MARK_RETRY_S)
        except OSError:
            return False  # a filesystem without flock: the run goes on unmarked
    return False


def _field(key: str, value: object) -> str:
    text = _render(value)
    return f"# {key}: {text}\n" if text else f"# {key}:\n"


def _render(value: object) -> str:
    """A header or footer value, for people: a string as it is; a list (args, command, warnings) as
    Python writes it, ['--all', 'two words'], which escapes every character that is not printable, so a
    newline in an argument cannot start a line and forge a field (ast.literal_eval reads it back); true or
    false; a number in decimal. (Not json: a text request does without importing it.)"""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return repr([str(item) for item in value])
    return str(value)


def _write_all(file: BinaryIO, data: bytes) -> None:
    # An unbuffered write may be short (a full disk fills up mid-write): go on until it fails outright.
    view = memoryview(data)
    while view:
        view = view[file.write(view) or 0 :]
