"""jobctl takes the direct path: `run NAME` goes to the job's own socket (trigger.preconnect.job_socket()),
falls back to the main socket when that one is not there for us, and asks the main socket once more when
the job's socket closed without a byte of reply (its unit could not start); `list` uses the main socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.test_jobctl import (
    ACCEPTED,
    REPO,
    RUN_ID,
    as_nobody,
    clean_env,
    error_event,
    exit_event,
    line,
    output,
    python_for_nobody,
    shared_dir,
)
from trigger import jobctl
from trigger.preconnect import EarlyConnection, job_socket

__all__ = ["shared_dir"]  # a fixture, used here by name

CLOSE_AT_ONCE = None  # a reply: close the connection without reading it, as systemd does when it cannot
# start the service for it (the client sees EOF or ECONNRESET, depending on the race)
WHERE = b'{"event": "error", "code": "wrong-socket", "message": "this socket should not be asked"}\n'


def request(job: str = "build", *args: str, detach: bool = False) -> bytes:
    fields = {"op": "run", "job": job, "args": list(args), "detach": detach}
    return json.dumps(fields, ensure_ascii=False).encode() + b"\n"


class Server:
    """A unix socket that serves its connections one at a time: reads the request line (or what came
    before the client closed), records it, sends the next of `replies` and closes. With no reply left
    it sends WHERE, an error that no test expects, so that a client asking the wrong socket still ends."""

    def __init__(self, path: Path, *replies: bytes | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.02)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    self.answer(conn)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away first
                except BaseException as exc:
                    self.errors.append(exc)

    def answer(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        reply = self.replies.pop(0) if self.replies else WHERE
        if reply is CLOSE_AT_ONCE:
            self.requests.append(b"")
            return
        data = b""
        while not data.endswith(b"\n") and (chunk := conn.recv(65536)):
            data += chunk
        self.requests.append(data)
        if data:  # an empty one asked nothing: nothing to answer
            conn.sendall(reply)

    def finish(self) -> list[bytes]:
        """What each connection sent, once the client is done: also those still waiting to be accepted."""
        self.stopping.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the server is still serving a connection"
        self.sock.setblocking(False)
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                break
            with conn:
                conn.settimeout(1)
                self.requests.append(conn.recv(65536))
        self.sock.close()
        if self.errors:
            raise self.errors[0]
        return self.requests


@pytest.fixture
def main(tmp_path: Path) -> Path:
    return tmp_path / "job.sock"


@pytest.fixture
def direct(main: Path) -> Path:
    return Path(job_socket(str(main), "build"))


def jobctl_main(
    capsysbinary: pytest.CaptureFixture[bytes], *argv: str, early: EarlyConnection | None = None
) -> tuple[int, bytes, bytes]:
    status = jobctl.main(list(argv), early)
    out, err = capsysbinary.readouterr()
    return status, out, err


def test_the_jobs_own_socket_is_next_to_the_main_one(direct: Path, main: Path) -> None:
    assert direct == main.parent / "job" / "build.sock"


# --- the direct path ----------------------------------------------------------------------------------


def test_run_uses_the_jobs_own_socket_and_the_main_one_sees_nothing(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path
) -> None:
    front = Server(main)
    own = Server(direct, line(ACCEPTED) + output("stdout", b"hi\n") + exit_event(3))
    status = jobctl_main(capsysbinary, "run", "--socket", str(main), "build", "x")
    assert status == (3, b"hi\n", b"")
    assert own.finish() == [request("build", "x")]
    assert front.finish() == []


def test_run_detach_and_json_use_the_jobs_own_socket(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBCTL_SOCKET", str(main))  # derived from $JOBCTL_SOCKET as from --socket
    front = Server(main)
    accepted = line({**ACCEPTED, "detach": True})
    own = Server(direct, accepted)
    assert jobctl_main(capsysbinary, "--json", "run", "--detach", "build") == (0, accepted, b"")
    assert own.finish() == [request("build", detach=True)]
    assert front.finish() == []


def test_list_uses_the_main_socket_even_beside_a_job_named_list(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path
) -> None:
    front = Server(main, line({"event": "jobs", "jobs": [{"name": "list", "description": "d"}]}))
    own = Server(Path(job_socket(str(main), "list")))
    status, out, _ = jobctl_main(capsysbinary, "list", "--socket", str(main))
    assert (status, out) == (0, b"NAME  DESCRIPTION\nlist  d\n")
    assert front.finish() == [b'{"op": "list"}\n']
    assert own.finish() == []


@pytest.mark.parametrize("name", ["Build", "9lives", "a" * 65, "..", "x/../../other", "b\u00e9"])
def test_a_name_that_is_no_jobs_goes_to_the_main_socket(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, name: str
) -> None:
    # job_socket() of such a name could be a path anywhere (here a socket beside the main one): the
    # main socket refuses it with unknown-job, as it always did.
    (main.parent / "job" / "x").mkdir(parents=True)
    decoy_path = job_socket(str(main), name)
    decoy = Server(Path(decoy_path)) if len(decoy_path.encode()) < 108 else None  # what sun_path holds
    front = Server(main, error_event("unknown-job", f"no job {name!r}"))
    status, _, err = jobctl_main(capsysbinary, "run", "--socket", str(main), name)
    assert status == 64
    assert b"unknown-job" in err
    assert front.finish() == [request(name)]
    assert decoy is None or decoy.finish() == []


def not_listening(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(path))  # what a stopped socket unit leaves behind: ECONNREFUSED
    return bound


@pytest.mark.parametrize("absence", ["no-directory", "no-socket", "not-listening", "not-a-directory"])
def test_run_falls_back_to_the_main_socket_when_the_jobs_own_is_not_there(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path, absence: str
) -> None:
    leftovers = []
    if absence == "no-socket":
        direct.parent.mkdir()  # ENOENT
    elif absence == "not-listening":
        leftovers.append(not_listening(direct))  # ECONNREFUSED
    elif absence == "not-a-directory":
        direct.parent.write_text("")  # ENOTDIR
    front = Server(main, line(ACCEPTED) + exit_event(0))
    try:
        status = jobctl_main(capsysbinary, "--debug", "run", "--socket", str(main), "build")
    finally:
        for bound in leftovers:
            bound.close()
    assert status[0] == 0
    assert status[2].startswith(f"jobctl: debug: sending {request()!r} to {main} (not {direct}: ".encode())
    assert front.finish() == [request()]


def test_a_job_socket_path_too_long_for_a_unix_socket_falls_back(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    room = 107 - len(str(tmp_path / "x.sock"))  # sun_path holds 107 bytes and a NUL
    if room < 20:
        pytest.skip(f"{tmp_path} is too long to leave room for the test")
    main = tmp_path / ("m" * room + "x.sock")
    assert len(job_socket(str(main), "build")) > 107
    front = Server(main, exit_event(0))
    assert jobctl_main(capsysbinary, "run", "--socket", str(main), "build")[0] == 0
    assert front.finish() == [request()]


def test_errors_come_from_the_main_socket_as_before(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path
) -> None:
    direct.parent.mkdir()
    status, _, err = jobctl_main(capsysbinary, "run", "--socket", str(main), "build")
    assert status == 69
    assert err.startswith(f"jobctl: error: {main} does not exist\njobctl: hint: is job.socket".encode())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run jobctl as another user")
@pytest.mark.parametrize("how", ["--socket", "JOBCTL_SOCKET"])
def test_a_jobs_socket_that_is_not_ours_falls_back_to_the_main_one(shared_dir: Path, how: str) -> None:
    # EACCES. With $JOBCTL_SOCKET it is trigger.preconnect's early connection that falls back, and
    # jobctl uses it without trying the job's socket again; with --socket, jobctl's own connect().
    python = python_for_nobody()
    if python is None:
        pytest.skip("no Python 3.11+ interpreter that user 'nobody' can run")
    main = shared_dir / "job.sock"
    direct = Path(job_socket(str(main), "build"))
    front = Server(main, exit_event(0))
    own = Server(direct)
    main.chmod(0o666)
    direct.parent.chmod(0o755)
    direct.chmod(0o600)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    options = ["--socket", str(main)] if how == "--socket" else []
    if how == "JOBCTL_SOCKET":
        env["JOBCTL_SOCKET"] = str(main)
    proc = subprocess.run(
        [python, "-m", "trigger", *options, "run", "build"],
        **as_nobody(),
        cwd="/",
        env=env,
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert own.finish() == []
    assert front.finish() == [request()]


# --- the run never started: once more through the main socket ------------------------------------


@pytest.mark.parametrize("silence", [b"", CLOSE_AT_ONCE], ids=["eof-after-the-request", "closed-unread"])
def test_a_silent_close_on_the_jobs_socket_is_asked_again_on_the_main_one(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path, silence: bytes | None
) -> None:
    own = Server(direct, silence)
    hint = "the credential 'api-key' of job 'build' is corrupt or expired"
    front = Server(main, error_event("credential", "job 'build' cannot start", hint))
    status, out, err = jobctl_main(capsysbinary, "run", "--socket", str(main), "build", "a")
    assert (status, out) == (78, b"")
    assert err == f"jobctl: error: credential: job 'build' cannot start\njobctl: hint: {hint}\n".encode()
    assert len(own.finish()) == 1
    assert front.finish() == [request("build", "a")]  # the same request


def test_the_retry_is_said_with_debug(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path
) -> None:
    own = Server(direct, b"")
    front = Server(main, exit_event(0))
    status, _, err = jobctl_main(capsysbinary, "--debug", "run", "--socket", str(main), "build")
    assert status == 0
    assert err.decode().splitlines() == [
        f"jobctl: debug: sending {request()!r} to {direct}",
        "jobctl: debug: the job's socket closed the connection without a reply (its unit did not start): "
        f"sending the request to {main} instead",
    ]
    assert (own.finish(), front.finish()) == ([request()], [request()])


def test_the_retry_is_made_once(capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path) -> None:
    own = Server(direct, b"")
    front = Server(main, b"")
    # once per try: --no-retry makes one (trying again later: tests/test_jobctl_terminal.py)
    status, _, err = jobctl_main(capsysbinary, "run", "--no-retry", "--socket", str(main), "build")
    assert status == 255
    assert err == (
        b"jobctl: error: the connection to the job runner was lost before the final event\n"
        b"jobctl: hint: the server closed the connection without a reply: "
        + f"{main} may be at its connection limit (try again); ".encode()
        + b"the server's side is in the journal: journalctl -u 'job@*'\n"
    )
    assert (own.finish(), front.finish()) == ([request()], [request()])


@pytest.mark.parametrize(
    ("reply", "hint"),
    [
        pytest.param(
            line(ACCEPTED), f"jobctl: hint: run {RUN_ID} was cancelled or is still running", id="run"
        ),
        pytest.param(line(ACCEPTED)[:10], "jobctl: hint: the reply was cut off; ", id="half-a-line"),
    ],
)
def test_no_retry_once_a_reply_has_begun(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path, reply: bytes, hint: str
) -> None:
    own = Server(direct, reply)
    front = Server(main)
    status, _, err = jobctl_main(capsysbinary, "run", "--socket", str(main), "build")
    assert status == 255
    assert hint.encode() in err
    assert own.finish() == [request()]
    assert front.finish() == []  # a run that may have started is never started twice


def test_a_silent_close_on_the_main_socket_is_not_retried_with_no_retry(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path
) -> None:
    front = Server(main, b"", exit_event(0))
    assert jobctl_main(capsysbinary, "run", "--no-retry", "--socket", str(main), "build")[0] == 255
    assert front.finish() == [request()]


# --- with the early connection (trigger.preconnect) ---------------------------------------------------


def test_the_early_connection_to_the_jobs_socket_is_used(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBCTL_SOCKET", str(main))
    front = Server(main)
    own = Server(direct, exit_event(0))
    early = EarlyConnection.guess(["run", "build"], str(main))
    assert early is not None and early.path == str(direct)
    assert jobctl_main(capsysbinary, "run", "build", early=early)[0] == 0
    assert own.finish() == [request()]  # one connection: the early one
    assert front.finish() == []


def test_an_early_connection_that_fell_back_is_used_without_trying_the_jobs_socket_again(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBCTL_SOCKET", str(main))
    front = Server(main, exit_event(0))
    early = EarlyConnection.guess(["run", "build"], str(main))
    assert early is not None and (early.path, early.instead_of) == (str(main), str(direct))
    own = Server(direct)  # appeared since: the early connection is not wasted for it
    status, _, err = jobctl_main(capsysbinary, "--debug", "run", "build", early=early)
    assert status == 0
    assert err.endswith(f"to {main} (no connection to {direct} at start-up)\n".encode())
    assert front.finish() == [request()]
    assert own.finish() == []


def test_an_early_connection_to_the_main_socket_is_closed_when_the_run_goes_direct(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBCTL_SOCKET", str(main))
    closed = threading.Event()

    class Front(Server):
        def answer(self, conn: socket.socket) -> None:
            super().answer(conn)  # reads until the early connection ends
            closed.set()

    class Own(Server):
        def answer(self, conn: socket.socket) -> None:
            self.requests.append(conn.recv(65536))
            closed.wait(10)  # not left idle on the main socket for the length of the run
            conn.sendall(exit_event(0))

    front, own = Front(main), Own(direct)
    early = EarlyConnection.open(str(main))  # as for a command line that preconnect did not understand
    assert jobctl_main(capsysbinary, "run", "build", early=early)[0] == 0
    assert closed.is_set()
    assert front.finish() == [b""]
    assert own.finish() == [request()]


def test_the_command_connects_early_to_the_jobs_own_socket(main: Path, direct: Path) -> None:
    front = Server(main)
    own = Server(direct, exit_event(4))
    proc = subprocess.run(
        [sys.executable, "-m", "trigger", "run", "build"],
        cwd=REPO,
        env={**clean_env(), "JOBCTL_SOCKET": str(main)},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (4, b"")
    assert own.finish() == [request()]
    assert front.finish() == []


def test_the_command_with_another_socket_closes_the_early_connection_unused(
    tmp_path: Path, main: Path, direct: Path
) -> None:
    # preconnect does not read --socket: it connects to the default's job socket, which jobctl closes
    # unused (the server takes that as no request) before it connects to the one it was given.
    other = tmp_path / "other" / "jobs.sock"
    front, own = Server(main), Server(direct)
    other_own = Server(Path(job_socket(str(other), "build")), exit_event(0))
    proc = subprocess.run(
        [sys.executable, "-m", "trigger", "--socket", str(other), "run", "build"],
        cwd=REPO,
        env={**clean_env(), "JOBCTL_SOCKET": str(main)},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert other_own.finish() == [request()]
    assert own.finish() == [b""]
    assert front.finish() == []
