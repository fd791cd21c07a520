"""The job's process: the one place that spawns it, streams its output, and makes sure it ends.

The job runs in its own process group with stdin from /dev/null, a minimal explicit environment and
no inherited descriptors but its two output pipes. One poll loop watches the pipes, the process
(a pidfd), the client and the runner's own stop signals. Whatever happens (timeout, the client leaving,
`systemctl stop`, the job exiting with children still around), the whole process group is stopped:
SIGTERM, then SIGKILL 10 s later. Under systemd the unit's cgroup catches anything that escaped it.
"""

from __future__ import annotations

import _signal  # `signal` without its enum classes (stubs/_signal.pyi): ~0.4 ms of every connection
import enum
import fcntl
import os
import select
import time

from runner.errors import ConfigError, CredentialError, quoted
from runner.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms on every connection)
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Protocol

    from runner.redact import Redactor, StreamRedactor

    class Channel(Protocol):
        gone: bool
        streaming: bool

        def fileno(self) -> int | None: ...
        def has_pending(self) -> bool: ...
        def poll_events(self) -> int: ...
        def on_ready(self, revents: int) -> None: ...
        def output(self, stream: str, data: bytes) -> None: ...
        def give_up(self) -> None: ...

    class LogSink(Protocol):
        def write(self, data: bytes) -> None: ...

    class Pollables(Protocol):  # runner.endpoint.Endpoints: the job's API endpoints
        def poll_fds(self) -> list[tuple[int, int]]: ...
        def owns(self, fd: int) -> bool: ...
        def on_ready(self, fd: int) -> None: ...
        def next_timer(self) -> float | None: ...
        def check_timers(self, now: float) -> None: ...


READ_SIZE = 1 << 20
PIPE_SIZE = 1 << 20  # the largest an unprivileged process may ask for (fs.pipe-max-size)
KILL_GRACE_S = 10.0  # SIGTERM, then SIGKILL this much later
DRAIN_IDLE_S = 1.0  # after the job exits, how long a pipe held open by an escaped process may stay silent
CLIENT_STALL_S = 30.0  # after the job exits, how long a client that reads nothing may hold the run open
MAX_POLL_MS = 60_000
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
JOB_PATH = "/usr/local/bin:/usr/bin:/bin"
STOP_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)
# Python ignores SIGPIPE (and SIGXFSZ); ignored signals survive exec, so the job gets them back.
RESET_SIGNALS = (_signal.SIGPIPE, _signal.SIGXFSZ, *STOP_SIGNALS)


class StopReason(enum.Enum):
    TIMEOUT = "timed out"
    CANCELLED = "cancelled: the client went away"
    STOPPED = "stopped: the runner was asked to stop"


class Outcome(Value):
    __slots__ = ("duration_s", "exit_code", "signal", "stop_reason")

    def __init__(
        self, exit_code: int, signal: int | None, stop_reason: StopReason | None, duration_s: float
    ) -> None:
        self.exit_code = exit_code  # as a shell reports it: 128+N for signal N, 124 for a timeout
        self.signal = signal
        self.stop_reason = stop_reason
        self.duration_s = duration_s

    @property
    def timed_out(self) -> bool:
        return self.stop_reason is StopReason.TIMEOUT

    @property
    def cancelled(self) -> bool:
        return self.stop_reason is not None and not self.timed_out

    def describe(self) -> str:
        if self.signal is not None:
            how = f"killed by {signal_name(self.signal)}"
        else:
            how = f"exited with {self.exit_code}"
        return f"{self.stop_reason.value}, {how}" if self.stop_reason else how


def signal_name(number: int) -> str:
    """The signal's name (SIGKILL for 9), or "signal 35" for one without a name (SIGRTMIN+1)."""
    import signal  # lazily: only a job killed by a signal needs it

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Process(Value):
    __slots__ = ("pid", "pidfd", "stderr", "stdout")

    def __init__(self, pid: int, pidfd: int, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.stdout = stdout
        self.stderr = stderr


def job_environment(
    base: Mapping[str, str], extra: Mapping[str, str], credentials: Mapping[str, str]
) -> dict[str, str]:
    """The job's whole environment: `base` (PATH, HOME, JOB_*), then `extra` with credential references
    (`credential:NAME`) replaced by the credential's value."""
    env = dict(base)
    for name, value in extra.items():
        ref = value.removeprefix("credential:")
        env[name] = credentials[ref] if ref != value else value
    for name, value in env.items():
        if "\0" in value:
            raise CredentialError(f"environment variable {name} would contain a NUL byte", "")
    return env


def start(argv: Sequence[str], env: Mapping[str, str], workdir: str) -> Process:
    """Spawn the job; raise ConfigError when its program or workdir cannot be used."""
    program = _find_program(argv[0], env.get("PATH", JOB_PATH))
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    for fd in (out_r, err_r):
        _enlarge_pipe(fd)
    try:
        # posix_spawn cannot change directory; the runner has no use for its own cwd, so move there.
        os.chdir(workdir)
        pid = os.posix_spawn(
            program,
            list(argv),
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
                *((os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd not in (out_w, err_w)),
            ],
            setpgroup=0,
            setsigmask=(),
            setsigdef=RESET_SIGNALS,
        )
    except OSError as e:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        # Not the paths themselves: they come from jobs.toml, where a key may have been pasted, and this
        # unit holds only its own job's keys to redact (runner.errors.quoted). `jobrunner check` shows them.
        bad_workdir = e.filename == workdir or isinstance(e, NotADirectoryError)
        what = "its workdir" if bad_workdir else f"its program {quoted(os.path.basename(argv[0]))}"
        raise ConfigError(
            f"cannot start the job: {what}: {e.strerror}",
            "check command and workdir of the job in jobs.toml (sudo jobrunner check)",
        ) from None
    os.close(out_w)
    os.close(err_w)
    return Process(pid=pid, pidfd=os.pidfd_open(pid), stdout=out_r, stderr=err_r)


def _inheritable_fds() -> list[int]:
    """Descriptors above stderr that would survive exec: posix_spawn has no close_fds, so close them.
    (Python opens everything close-on-exec; this catches what the runner was started with.)"""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                fds.append(fd)
        except OSError:
            pass  # the directory listing's own descriptor, already closed
    return fds


def _find_program(name: str, path: str) -> str:
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise ConfigError(
        f"cannot start the job: its program {quoted(name)} is not in PATH ({path})",
        "use an absolute path in command",
    )


def _enlarge_pipe(fd: int) -> None:
    # Fewer, larger reads: the runner's cost per byte is mostly per read.
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


class Supervisor:
    """Runs the poll loop for one job until the job has exited and its output has been read."""

    def __init__(
        self,
        process: Process,
        timeout_s: float,
        redactor: Redactor,
        log: LogSink,
        channel: Channel,
        *,
        cancel_when_client_leaves: bool,
        endpoints: Pollables | None = None,
    ) -> None:
        self.process = process
        self.endpoints = endpoints
        self.log = log
        self.channel = channel
        self.cancel_when_client_leaves = cancel_when_client_leaves
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        self.streams: dict[int, tuple[str, StreamRedactor]] = {
            process.stdout: ("stdout", redactor.stream()),
            process.stderr: ("stderr", redactor.stream()),
        }
        self.status: int | None = None  # the wait status, once the job has exited
        self.stop_reason: StopReason | None = None
        self.kill_at: float | None = None
        self.last_output = self.started
        self.exited_at = self.started  # set when the job exits
        self.stop_requested = False

    def run(self) -> Outcome:
        wakeup_r, wakeup_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        previous = self._catch_stop_signals(wakeup_w)
        try:
            while self.streams or self.status is None:
                self._check_timers(time.monotonic())
                if self.status is not None and self.streams and self._drain_expired():
                    for fd in list(self.streams):
                        self._close_stream(fd)
                    break
                self._poll_once(wakeup_r)
        finally:
            self._restore_signals(previous)
            for fd in (wakeup_r, wakeup_w, self.process.pidfd, *self.streams):
                os.close(fd)
            if self.status is None:  # only reached on an exception: leave nothing behind
                self._signal_group(_signal.SIGKILL)
                os.waitpid(self.process.pid, 0)
        return self._outcome(time.monotonic() - self.started)

    # --- one round of the loop

    def _poll_once(self, wakeup_r: int) -> None:
        poller = select.poll()
        poller.register(wakeup_r, select.POLLIN)
        if self.status is None:
            poller.register(self.process.pidfd, select.POLLIN)
        # Back-pressure: while the client has not taken the last chunk, leave the job's pipes alone.
        if not self.channel.has_pending():
            for fd in self.streams:
                poller.register(fd, select.POLLIN)
        client_fd = self.channel.fileno()
        if client_fd is not None:
            poller.register(client_fd, self.channel.poll_events())
        endpoints = self._register_endpoints(poller)
        for fd, revents in poller.poll(self._next_timer_ms()):
            if endpoints is not None and endpoints.owns(fd):
                endpoints.on_ready(fd)
            elif fd == wakeup_r:
                self._on_wakeup(wakeup_r)
            elif fd == self.process.pidfd:
                self._on_exit()
            elif fd in self.streams:
                self._on_output(fd)
            elif fd == client_fd:
                self.channel.on_ready(revents)
        # The client may be found gone here or while its output was sent (_emit): either way, once.
        if self.channel.gone and self.cancel_when_client_leaves:
            self._stop(StopReason.CANCELLED)

    def _register_endpoints(self, poller: select.poll) -> Pollables | None:
        if self.endpoints is None or self.status is not None:  # no new API requests once the job is gone
            return None
        for fd, events in self.endpoints.poll_fds():
            poller.register(fd, events)
        return self.endpoints

    def _on_output(self, fd: int) -> None:
        name, redactor = self.streams[fd]
        data = os.read(fd, READ_SIZE)
        if data:
            self.last_output = time.monotonic()
            self._emit(name, redactor.feed(data))
        else:
            self._close_stream(fd)

    def _close_stream(self, fd: int) -> None:
        name, redactor = self.streams.pop(fd)
        self._emit(name, redactor.flush())
        os.close(fd)

    def _emit(self, stream: str, data: bytes) -> None:
        if data:
            # The client first: the channel sends what the socket takes at once, and the client reads
            # it while the run log is written.
            self.channel.output(stream, data)
            self.log.write(data)

    def _on_exit(self) -> None:
        # The job is a zombie until reaped, so its pid (= its process group id) cannot have been reused:
        # kill what it left running in its group first, then reap it.
        self._signal_group(_signal.SIGKILL)
        _, self.status = os.waitpid(self.process.pid, 0)
        self.exited_at = self.last_output = time.monotonic()

    def _on_wakeup(self, wakeup_r: int) -> None:
        try:
            os.read(wakeup_r, 512)
        except BlockingIOError:
            pass
        if self.stop_requested:
            self._stop(StopReason.STOPPED)

    # --- timers

    def _check_timers(self, now: float) -> None:
        if self.endpoints is not None:
            self.endpoints.check_timers(now)
        if self.status is None and self.stop_reason is None and now >= self.deadline:
            self._stop(StopReason.TIMEOUT)
        if self.status is None and self.kill_at is not None and now >= self.kill_at:
            self._signal_group(_signal.SIGKILL)
            self.kill_at = None
        if self.status is not None and self.channel.has_pending() and now >= self.exited_at + CLIENT_STALL_S:
            self.channel.give_up()  # the job is done; a client that takes nothing must not keep us here

    def _next_timer(self) -> float | None:
        if self.status is None:
            return self.kill_at if self.kill_at is not None else self.deadline
        if self.channel.has_pending():
            return self.exited_at + CLIENT_STALL_S
        return self.last_output + DRAIN_IDLE_S if self.streams else None

    def _next_timer_ms(self) -> int:
        timer = self._next_timer()
        endpoint_timer = self.endpoints.next_timer() if self.endpoints is not None else None
        if endpoint_timer is not None:
            timer = endpoint_timer if timer is None else min(timer, endpoint_timer)
        if timer is None:
            return MAX_POLL_MS
        # poll() takes an int of milliseconds; the loop re-checks its timers after every wake-up anyway.
        return int(max(0.0, min(MAX_POLL_MS, (timer - time.monotonic()) * 1000 + 1)))

    def _drain_expired(self) -> bool:
        # Pipes still open after the job exited: something outside its process group holds them.
        return not self.channel.has_pending() and time.monotonic() - self.last_output > DRAIN_IDLE_S

    def _stop(self, reason: StopReason) -> None:
        if self.stop_reason is not None or self.status is not None:
            return
        self.stop_reason = reason
        self._signal_group(_signal.SIGTERM)
        self.kill_at = time.monotonic() + KILL_GRACE_S

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already empty

    # --- signals sent to the runner itself (systemctl stop, Ctrl-C in operator mode)

    def _catch_stop_signals(self, wakeup_w: int) -> dict[int, object]:
        def request_stop(signum: int, frame: object) -> None:
            self.stop_requested = True

        previous: dict[int, object] = {sig: _signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
        previous[-1] = _signal.set_wakeup_fd(wakeup_w)
        return previous

    def _restore_signals(self, previous: dict[int, object]) -> None:
        old_wakeup = previous.pop(-1)
        _signal.set_wakeup_fd(old_wakeup if isinstance(old_wakeup, int) else -1)
        for sig, handler in previous.items():
            _signal.signal(sig, handler)  # type: ignore[arg-type]

    def _outcome(self, duration_s: float) -> Outcome:
        status = self.status if self.status is not None else 0
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = 128 + sig if sig is not None else os.WEXITSTATUS(status)
        if self.stop_reason is StopReason.TIMEOUT:
            code = 124
        return Outcome(exit_code=code, signal=sig, stop_reason=self.stop_reason, duration_s=duration_s)
