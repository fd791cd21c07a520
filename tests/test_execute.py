"""runner/execute.py: the job's environment, spawning it, and supervising it to the end, with real /bin/sh jobs."""

from __future__ import annotations

import errno
import os
import secrets
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from runner import execute
from runner.errors import ConfigError, CredentialError
from runner.execute import JOB_PATH, Outcome, Process, StopReason, Supervisor, job_environment, start
from runner.redact import Redactor
from runner.runs import RunLog


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A job's working directory; start() moves the runner there, so the test's own cwd is restored after."""
    monkeypatch.chdir(tmp_path)
    directory = tmp_path / "work"
    directory.mkdir()
    return directory


class FakeChannel:
    """The Channel protocol: collects output; `client` is the far end of a real connection, if any."""

    def __init__(self, on_output: Callable[[FakeChannel, bytes], None] | None = None) -> None:
        self.gone = False
        self.streaming = True
        self.received: list[tuple[str, bytes]] = []
        self._on_output = on_output
        self._conn: socket.socket | None = None
        self.client: socket.socket | None = None

    def connect(self) -> FakeChannel:
        self._conn, self.client = socket.socketpair()
        return self

    def close(self) -> None:
        for sock in (self._conn, self.client):
            if sock is not None:
                sock.close()

    def fileno(self) -> int | None:
        return None if self.gone or self._conn is None else self._conn.fileno()

    def has_pending(self) -> bool:
        return False

    def poll_events(self) -> int:
        return select.POLLIN

    def on_ready(self, revents: int) -> None:
        assert self._conn is not None
        if revents & (select.POLLHUP | select.POLLERR) or not self._conn.recv(4096):
            self.gone = True

    def output(self, stream: str, data: bytes) -> None:
        self.received.append((stream, data))
        if self._on_output is not None:
            self._on_output(self, data)

    def stream(self, name: str) -> bytes:
        return b"".join(data for stream, data in self.received if stream == name)


class ListLog:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def text(self) -> bytes:
        return b"".join(self.chunks)


def sh(script: str, workdir: Path, env: Mapping[str, str] | None = None) -> Process:
    return start(["/bin/sh", "-c", script], {"PATH": JOB_PATH, **(env or {})}, str(workdir))


def finish(process: Process) -> tuple[bytes, bytes, int]:
    """Read a started job's output to the end and reap it (without the Supervisor)."""
    outputs = []
    for fd in (process.stdout, process.stderr):
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        os.close(fd)
        outputs.append(b"".join(chunks))
    _, status = os.waitpid(process.pid, 0)
    os.close(process.pidfd)
    return outputs[0], outputs[1], status


def supervise(
    script: str,
    workdir: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 20.0,
    secret_values: tuple[bytes, ...] = (),
    channel: FakeChannel | None = None,
    log: ListLog | RunLog | None = None,
    cancel: bool = True,
) -> tuple[Outcome, FakeChannel, ListLog | RunLog]:
    channel = channel or FakeChannel()
    log = log if log is not None else ListLog()
    process = sh(script, workdir, env)
    outcome = Supervisor(
        process, timeout_s, Redactor(secret_values), log, channel, cancel_when_client_leaves=cancel
    ).run()
    return outcome, channel, log


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def is_gone(pid: int, wait_s: float = 3.0) -> bool:
    """Whether the process has ended (a zombie nobody reaped has ended too)."""
    give_up_at = time.monotonic() + wait_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > give_up_at:
            return False
        time.sleep(0.02)


@pytest.fixture
def strays() -> Iterator[list[int]]:
    """Pids a test saw; killed at the end whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------- job_environment


def test_job_environment_replaces_credential_references() -> None:
    secret = secrets.token_hex(20)
    base = {"PATH": JOB_PATH, "HOME": "/tmp", "JOB_NAME": "build"}

    env = job_environment(
        base,
        {"MODE": "fast", "OPENAI_API_KEY": "credential:openai", "NOTE": "Credential:openai"},
        {"openai": secret},
    )

    assert env == {
        "PATH": JOB_PATH,
        "HOME": "/tmp",
        "JOB_NAME": "build",
        "MODE": "fast",
        "OPENAI_API_KEY": secret,
        "NOTE": "Credential:openai",  # not a reference: the prefix is exact
    }
    assert base == {"PATH": JOB_PATH, "HOME": "/tmp", "JOB_NAME": "build"}


def test_job_environment_refuses_a_nul_and_does_not_show_the_value() -> None:
    secret = secrets.token_hex(10)

    with pytest.raises(CredentialError) as info:
        job_environment({"PATH": JOB_PATH}, {"KEY": "credential:k"}, {"k": secret + "\0" + secret})

    assert "KEY" in info.value.message
    assert secret not in info.value.message
    assert secret not in info.value.hint


# ------------------------------------------------------------------------------------------------ start


def test_stdin_is_dev_null(workdir: Path) -> None:
    # Give the runner a stdin that is not /dev/null, as a socket-activated runner might have.
    saved = os.dup(0)
    r, w = os.pipe()
    os.dup2(r, 0)
    try:
        process = sh('readlink /proc/$$/fd/0; cat; echo "eof"', workdir)
    finally:
        os.dup2(saved, 0)
        for fd in (saved, r, w):
            os.close(fd)

    out, err, status = finish(process)

    assert out == b"/dev/null\neof\n"
    assert err == b""
    assert os.waitstatus_to_exitcode(status) == 0


def test_environment_is_exactly_what_was_given(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_ONLY", "must not reach the job")
    env = {
        "PATH": JOB_PATH,
        "HOME": "/tmp",
        "JOB_NAME": "build",
        "MULTI": "line one\nline two",
        "UNICODE": "naïve ✓",
        "EQUALS": "a=b=c",
        "EMPTY": "",
    }

    out, _, status = finish(start(["/usr/bin/env", "-0"], env, str(workdir)))

    assert os.waitstatus_to_exitcode(status) == 0
    seen = dict(entry.split("=", 1) for entry in out.decode().split("\0") if entry)
    assert seen == env


def test_the_job_runs_in_the_workdir(workdir: Path) -> None:
    out, _, _ = finish(sh("pwd -P", workdir))

    assert out == str(workdir.resolve()).encode() + b"\n"


def test_the_job_has_its_own_process_group(workdir: Path) -> None:
    process = sh('read -r stat < /proc/$$/stat; echo "$stat"', workdir)

    out, _, _ = finish(process)

    fields = out.decode().rsplit(")", 1)[1].split()  # state ppid pgrp ...
    assert int(fields[2]) == process.pid
    assert process.pid != os.getpgrp()


def test_the_job_does_not_inherit_the_runners_descriptors(workdir: Path) -> None:
    r, w = os.pipe()
    os.set_inheritable(r, True)  # e.g. something the runner was started with
    try:
        process = sh(f"if [ -e /proc/$$/fd/{r} ]; then echo open; else echo closed; fi", workdir)
        out, _, _ = finish(process)
    finally:
        os.close(r)
        os.close(w)

    assert out == b"closed\n"


def test_the_runners_ends_of_the_output_pipes_are_not_inheritable(workdir: Path) -> None:
    process = sh("echo out; echo err >&2", workdir)

    assert not os.get_inheritable(process.stdout)
    assert not os.get_inheritable(process.stderr)
    assert finish(process)[:2] == (b"out\n", b"err\n")


def test_signals_are_reset_in_the_job(workdir: Path) -> None:
    assert signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN  # as Python sets it for the runner
    previous_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        # Shell builtins only: dash blocks every signal for a moment around each fork, so a child process
        # reading the shell's status could see that instead of what the shell was started with.
        process = sh(
            'while read -r key value; do case $key in SigIgn:|SigBlk:) echo "$key $value";; esac; done'
            " < /proc/$$/status",
            workdir,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
        signal.signal(signal.SIGHUP, previous_hup)

    out, _, _ = finish(process)

    masks = {line.split(":")[0]: int(line.split()[1], 16) for line in out.decode().splitlines()}
    for sig in (signal.SIGPIPE, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        assert not masks["SigIgn"] & (1 << (sig - 1)), sig.name
    assert masks["SigBlk"] == 0


def test_sigpipe_ends_a_job_writing_to_a_closed_pipe(workdir: Path) -> None:
    # `yes | head -n 1` ends because yes is killed by SIGPIPE; with SIGPIPE ignored yes would complain.
    out, err, status = finish(sh("yes | head -n 1", workdir))

    assert (out, err, os.waitstatus_to_exitcode(status)) == (b"y\n", b"", 0)


def test_a_program_found_in_path(workdir: Path) -> None:
    out, _, _ = finish(
        start(["sh", "-c", "echo found"], {"PATH": "/nonexistent:/usr/bin:/bin"}, str(workdir))
    )

    assert out == b"found\n"


def test_a_program_not_in_path(workdir: Path) -> None:
    name = f"no-such-program-{secrets.token_hex(4)}"

    with pytest.raises(ConfigError) as info:
        start([name], {"PATH": "/usr/bin:/bin"}, str(workdir))

    assert name not in info.value.message  # as long as a key: cut (runner.errors.quoted)
    assert f"its program {name[:3]!r}... ({len(name)} characters) is not in PATH" in info.value.message


@pytest.mark.parametrize("kind", ["missing", "not executable", "directory"])
def test_a_bad_program_is_a_config_error(workdir: Path, tmp_path: Path, kind: str) -> None:
    program = tmp_path / "bin" / "build"
    if kind != "missing":
        program.parent.mkdir()
    if kind == "not executable":
        program.write_text("#!/bin/sh\necho hi\n")
        program.chmod(0o644)
    elif kind == "directory":
        program.mkdir()
    before = open_fds()

    with pytest.raises(ConfigError) as info:
        start([str(program)], {"PATH": JOB_PATH}, str(workdir))

    # Named by its file name, cut as a key would be (jobs.toml's text, which this unit cannot redact).
    assert "its program 'build'" in info.value.message
    assert str(program.parent) not in info.value.message
    assert "jobs.toml" in info.value.hint
    assert open_fds() == before  # the pipes were closed again


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_a_bad_workdir_is_a_config_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "no-such-dir"
    if kind == "a file":
        bad.write_text("not a directory")
    before = open_fds()

    with pytest.raises(ConfigError) as info:
        start(["/bin/sh", "-c", "true"], {"PATH": JOB_PATH}, str(bad))

    assert "its workdir" in info.value.message
    assert str(bad) not in info.value.message  # jobs.toml's text, where a key may have been pasted
    assert open_fds() == before


# ------------------------------------------------------------------------------------------- Supervisor


def test_output_of_both_streams_is_captured(workdir: Path) -> None:
    outcome, channel, log = supervise("echo out1; echo err1 >&2; printf out2; exit 0", workdir)

    assert channel.stream("stdout") == b"out1\nout2"
    assert channel.stream("stderr") == b"err1\n"
    assert isinstance(log, ListLog)
    assert sorted(log.chunks) == sorted(data for _, data in channel.received)
    assert (outcome.exit_code, outcome.signal) == (0, None)
    assert not outcome.timed_out
    assert not outcome.cancelled
    assert outcome.stop_reason is None
    assert outcome.describe() == "exited with 0"


def test_large_output_arrives_whole(workdir: Path) -> None:
    size = 3_000_000
    outcome, channel, _ = supervise(f"head -c {size} /dev/zero | tr '\\0' x", workdir, secret_values=(b"zz",))

    assert outcome.exit_code == 0
    assert channel.stream("stdout") == b"x" * size


def test_output_is_redacted_even_when_a_secret_arrives_in_pieces(workdir: Path) -> None:
    secret = secrets.token_hex(20)
    first, second = secret[:17], secret[17:]
    script = (
        'printf "key=%s" "$A"; sleep 0.05; printf "%s done\\n" "$B"; '
        'printf "%s" "$A" >&2; sleep 0.05; printf "%s\\n" "$B" >&2; echo "$SECRET"'
    )

    outcome, channel, log = supervise(
        script, workdir, env={"A": first, "B": second, "SECRET": secret}, secret_values=(secret.encode(),)
    )

    assert outcome.exit_code == 0
    assert channel.stream("stdout") == b"key=*** done\n***\n"
    assert channel.stream("stderr") == b"***\n"
    assert isinstance(log, ListLog)
    everything = log.text() + b"".join(data for _, data in channel.received)
    for piece in (secret, first, second):
        assert piece.encode() not in everything


def test_exit_code(workdir: Path) -> None:
    outcome, _, _ = supervise("exit 7", workdir)

    assert (outcome.exit_code, outcome.signal, outcome.stop_reason) == (7, None, None)
    assert outcome.describe() == "exited with 7"


def test_killed_by_a_signal_is_128_plus_n(workdir: Path) -> None:
    outcome, _, _ = supervise("kill -USR1 $$", workdir)

    assert outcome.exit_code == 128 + signal.SIGUSR1
    assert outcome.signal == signal.SIGUSR1
    assert not outcome.timed_out
    assert not outcome.cancelled
    assert outcome.describe() == "killed by SIGUSR1"


def test_a_signal_without_a_name_is_described_by_its_number(workdir: Path) -> None:
    number = signal.SIGRTMIN + 1  # real-time signals have no name of their own
    outcome, _, _ = supervise(f"kill -{number} $$", workdir)

    assert outcome.exit_code == 128 + number
    assert outcome.describe() == f"killed by signal {number}"


def test_timeout_stops_the_job_with_sigterm(workdir: Path) -> None:
    outcome, channel, _ = supervise("echo started; sleep 30", workdir, timeout_s=0.3)

    assert channel.stream("stdout") == b"started\n"
    assert outcome.exit_code == 124
    assert outcome.signal == signal.SIGTERM
    assert outcome.timed_out
    assert not outcome.cancelled
    assert outcome.stop_reason is StopReason.TIMEOUT
    # Stopped at the timeout, not when the job ends (30 s): 20 s leaves a busy machine its margin.
    assert 0.3 <= outcome.duration_s < 20
    assert outcome.describe() == "timed out, killed by SIGTERM"


def test_timeout_kills_a_job_that_ignores_sigterm(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execute, "KILL_GRACE_S", 0.5)

    outcome, channel, _ = supervise("trap '' TERM; echo started; sleep 30", workdir, timeout_s=0.3)

    assert channel.stream("stdout") == b"started\n"
    assert outcome.exit_code == 124
    assert outcome.signal == signal.SIGKILL
    assert outcome.timed_out
    # The timeout, then this grace period: not the default 10 s (it would be 10.3 s at least).
    assert 0.8 <= outcome.duration_s < 8


@pytest.mark.parametrize("timeout_s", [30 * 86400.0, float("inf")], ids=["30 days", "inf"])
def test_a_long_timeout_is_accepted(workdir: Path, timeout_s: float) -> None:
    # jobs.toml accepts any positive timeout (a month, or inf); poll() cannot wait more than ~24.8 days.
    outcome, channel, _ = supervise("echo quick", workdir, timeout_s=timeout_s)

    assert outcome.exit_code == 0
    assert channel.stream("stdout") == b"quick\n"


def test_background_children_are_killed_when_the_job_exits(workdir: Path, strays: list[int]) -> None:
    outcome, channel, _ = supervise("sleep 30 >/dev/null 2>&1 & echo $!", workdir)
    grandchild = int(channel.stream("stdout"))
    strays.append(grandchild)

    assert outcome.exit_code == 0
    assert is_gone(grandchild)


def test_a_background_child_holding_the_output_pipe_does_not_keep_the_run_going(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, strays: list[int]
) -> None:
    monkeypatch.setattr(execute, "DRAIN_IDLE_S", 60.0)

    outcome, channel, _ = supervise("sleep 30 & echo $!", workdir)
    grandchild = int(channel.stream("stdout"))
    strays.append(grandchild)

    assert outcome.exit_code == 0
    # Killed with its group: no waiting for the pipe to go quiet (60 s) or the child to end (30 s).
    assert outcome.duration_s < 20
    assert is_gone(grandchild)


def test_an_escaped_process_holding_the_pipe_is_given_up_on(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, strays: list[int]
) -> None:
    monkeypatch.setattr(execute, "DRAIN_IDLE_S", 0.3)

    # A new session, so not in the job's process group; the job waits until the escape is complete.
    script = """setsid sleep 30 & pid=$!
    while [ "$(cut -d' ' -f6 /proc/$pid/stat)" != "$pid" ]; do sleep 0.01; done
    echo $pid"""
    outcome, channel, _ = supervise(script, workdir)
    strays.append(int(channel.stream("stdout")))

    assert outcome.exit_code == 0
    # Given up on after the idle time, not when the escaped process ends (30 s).
    assert 0.3 <= outcome.duration_s < 20


def test_the_job_is_cancelled_when_the_client_goes_away(workdir: Path) -> None:
    def leave_once_started(channel: FakeChannel, data: bytes) -> None:
        if b"started" in data and channel.client is not None:
            channel.client.close()
            channel.client = None

    channel = FakeChannel(leave_once_started).connect()
    try:
        outcome, _, log = supervise("echo started; sleep 30; echo finished", workdir, channel=channel)
    finally:
        channel.close()

    assert channel.gone
    assert outcome.cancelled
    assert not outcome.timed_out
    assert outcome.stop_reason is StopReason.CANCELLED
    assert outcome.signal == signal.SIGTERM
    assert outcome.exit_code == 128 + signal.SIGTERM
    assert outcome.duration_s < 20  # stopped, not run to its end (30 s)
    assert isinstance(log, ListLog)
    assert b"finished" not in log.text()


def test_the_job_is_cancelled_when_sending_its_output_finds_the_client_gone(workdir: Path) -> None:
    """ClientChannel.output() sends at once and may find the client gone there, not in on_ready(); the
    channel then has no descriptor left to poll, and the supervisor must cancel all the same."""

    def gone_while_sending(channel: FakeChannel, data: bytes) -> None:
        if b"started" in data:
            channel.gone = True

    channel = FakeChannel(gone_while_sending)  # no connection: nothing for poll() to report
    outcome, _, log = supervise("echo started; sleep 30; echo finished", workdir, channel=channel)

    assert outcome.cancelled
    assert outcome.stop_reason is StopReason.CANCELLED
    assert outcome.duration_s < 20  # stopped, not run to its end (30 s)
    assert isinstance(log, ListLog)
    assert b"finished" not in log.text()


def test_a_detached_job_goes_on_when_the_client_goes_away(workdir: Path) -> None:
    def leave_once_started(channel: FakeChannel, data: bytes) -> None:
        if b"started" in data and channel.client is not None:
            channel.client.close()
            channel.client = None

    channel = FakeChannel(leave_once_started).connect()
    try:
        outcome, _, log = supervise(
            "echo started; sleep 0.3; echo finished", workdir, channel=channel, cancel=False
        )
    finally:
        channel.close()

    assert channel.gone
    assert not outcome.cancelled
    assert outcome.stop_reason is None
    assert outcome.exit_code == 0
    assert isinstance(log, ListLog)
    assert log.text() == b"started\nfinished\n"


def test_a_stop_signal_to_the_runner_stops_the_job(workdir: Path) -> None:
    handler_before = signal.getsignal(signal.SIGTERM)
    wakeup_before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_before)

    def stop_runner(channel: FakeChannel, data: bytes) -> None:
        if b"started" in data:
            os.kill(os.getpid(), signal.SIGTERM)  # `systemctl stop` of the runner's unit

    outcome, _, _ = supervise("echo started; sleep 30", workdir, channel=FakeChannel(stop_runner))

    assert outcome.stop_reason is StopReason.STOPPED
    assert outcome.cancelled
    assert outcome.exit_code == 128 + signal.SIGTERM
    assert outcome.duration_s < 20  # stopped, not run to its end (30 s)
    assert signal.getsignal(signal.SIGTERM) == handler_before
    assert signal.set_wakeup_fd(wakeup_before) == wakeup_before


class SlowClient(FakeChannel):
    """A client that stops reading for a while: its socket buffer is full, so output stays pending."""

    def __init__(self) -> None:
        super().__init__()
        self.connect()
        assert self._conn is not None
        self._conn.setblocking(False)
        while True:  # fill the connection so that nothing more can be sent for now
            try:
                self._conn.send(b"." * 65536)
            except BlockingIOError:
                break
        self.pending = b""
        self.has_pending_calls = 0

    def has_pending(self) -> bool:
        self.has_pending_calls += 1
        return bool(self.pending)

    def poll_events(self) -> int:
        return select.POLLOUT if self.pending else select.POLLIN

    def on_ready(self, revents: int) -> None:
        assert self._conn is not None
        if revents & select.POLLOUT and self.pending:
            try:
                self.pending = self.pending[self._conn.send(self.pending) :]
            except BlockingIOError:
                pass

    def output(self, stream: str, data: bytes) -> None:
        super().output(stream, data)
        self.pending += data


def test_a_slow_client_after_the_job_exited_does_not_make_the_runner_spin(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(execute, "DRAIN_IDLE_S", 0.1)
    channel = SlowClient()
    assert channel.client is not None
    client = channel.client
    received = bytearray()

    def read_later() -> None:
        time.sleep(0.6)  # the client is busy for a while, then reads everything
        client.settimeout(5)
        try:
            while chunk := client.recv(1 << 16):
                received.extend(chunk)
        except OSError:
            pass

    reader = threading.Thread(target=read_later)
    reader.start()
    try:
        outcome, _, _ = supervise("echo done", workdir, channel=channel)
    finally:
        assert channel._conn is not None
        channel._conn.shutdown(socket.SHUT_RDWR)
        reader.join()
        channel.close()

    assert outcome.exit_code == 0
    assert received.endswith(b"done\n")
    # Waiting ~0.5 s for the client to take the output must be a wait in poll(), not a busy loop.
    assert channel.has_pending_calls < 1000


def test_a_run_log_on_a_full_disk_does_not_stop_the_run(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = RunLog(tmp_path / "run.log")
    real = log._file
    monkeypatch.setattr(log, "_file", open("/dev/full", "wb", buffering=0))  # noqa: SIM115 - log.close()

    outcome, channel, _ = supervise("echo one; echo two >&2; exit 5", workdir, log=log)
    log.close()
    real.close()

    assert outcome.exit_code == 5
    assert channel.stream("stdout") == b"one\n"
    assert channel.stream("stderr") == b"two\n"
    assert isinstance(log.write_error, OSError)
    assert log.write_error.errno == errno.ENOSPC


def test_supervision_leaves_no_descriptor_open(workdir: Path) -> None:
    supervise("true", workdir)  # first, so that anything opened once for good is already open
    before = open_fds()

    supervise("echo out; echo err >&2", workdir)
    supervise("sleep 30", workdir, timeout_s=0.1)

    assert open_fds() == before
