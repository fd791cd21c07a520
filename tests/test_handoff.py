"""runner/handoff.py: the front door passes a client's connection to the job's socket (SCM_RIGHTS).

Real unix sockets in tmp_path, the front door's side in a thread. JOBRUNNER_FRONT_DOOR_USER names the
user whose connections the job's runner believes: the current user (the front door is this process),
or another one (then this process is just some client that sends the mark).
"""

from __future__ import annotations

import array
import os
import pwd
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from pytest_mock import MockerFixture

from runner import handoff, service
from runner.config import Job, parse_config
from runner.errors import BusyError, ConfigError, CredentialError, RequestError
from runner.peer import read_peer
from runner.protocol import NoRequest

T = TypeVar("T")
MARK = b"\0jobrunner-handoff\0"  # written out here: the front door and the jobs' runner must agree


@pytest.fixture
def as_front_door(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's user is the front door's."""
    monkeypatch.setenv("JOBRUNNER_FRONT_DOOR_USER", pwd.getpwuid(os.getuid()).pw_name)


@pytest.fixture
def as_someone_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """The front door is another user ("nobody"): this process is not it."""
    try:
        other = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    if other.pw_uid == os.getuid():
        pytest.skip("running as nobody")
    monkeypatch.setenv("JOBRUNNER_FRONT_DOOR_USER", "nobody")


@pytest.fixture
def front_door() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


@pytest.fixture
def job_listener(tmp_path: Path) -> Iterator[socket.socket]:
    """The job's socket (job-NAME.socket), listening."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "build.sock"))
    listener.listen(8)
    listener.settimeout(10)
    yield listener
    listener.close()


def accept(listener: socket.socket) -> socket.socket:
    conn, _ = listener.accept()
    conn.settimeout(None)
    return conn


def pass_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])


def closed_everywhere(read_end: int, write_end: int) -> bool:
    """Whether, once we close our `write_end`, no copy of it is left open in this process: the pipe's
    reader then sees EOF, where any leaked copy would make it wait."""
    os.close(write_end)
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 1) == b""
    except BlockingIOError:
        return False
    finally:
        os.close(read_end)


def result(future: Future[T]) -> T:
    return future.result(timeout=10)


# --------------------------------------------------------------------------------------- handing over


def test_the_clients_connection_is_handed_over_with_its_request(
    tmp_path: Path, job_listener: socket.socket, front_door: ThreadPoolExecutor, as_front_door: None
) -> None:
    # The client: another process, so that SO_PEERCRED can tell it from the front door.
    front_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    front_listener.bind(str(tmp_path / "job.sock"))
    front_listener.listen(1)
    front_listener.settimeout(10)
    client = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1])\n"
            "s.sendall(b'run build x\\n')\n"
            "s.settimeout(10)\n"
            "data = b''\n"
            "while chunk := s.recv(100):\n"
            "    data += chunk\n"
            "sys.stdout.write(data.decode())\n",
            str(tmp_path / "job.sock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        at_front_door = accept(front_listener)
        assert at_front_door.recv(100) == b"run build x\n"  # the front door read the request line

        def hand_over() -> None:
            handoff.hand_over(at_front_door, b"run build x", str(tmp_path / "build.sock"))
            at_front_door.close()  # as the front door does once the job's runner has it

        handing = front_door.submit(hand_over)
        conn = accept(job_listener)
        assert read_peer(conn).pid == os.getpid()  # the front door (this process) connected here
        received = bytearray()

        served = handoff.receive(conn, received)

        assert bytes(received) == b"run build x\n"
        assert served is not conn
        assert conn.fileno() == -1, "the front door's connection is closed"
        peer = read_peer(served)
        assert (peer.pid, peer.uid) == (client.pid, os.getuid())  # the client's, not the front door's
        assert not os.get_inheritable(served.fileno())  # a job must not inherit it
        result(handing)  # the ACK arrived: hand_over returned without HandoffRefused
        served.sendall(b"the job's output\n")
        served.close()
        out, _ = client.communicate(timeout=10)
        assert out == "the job's output\n", "the client talks to the job's runner directly"
    finally:
        client.kill()
        client.wait()
        front_listener.close()


def test_a_long_request_line_arrives_whole(
    tmp_path: Path, job_listener: socket.socket, front_door: ThreadPoolExecutor, as_front_door: None
) -> None:
    line = b"run build " + b"x" * (64 * 1024 - 20)
    mine, theirs = socket.socketpair()
    handing = front_door.submit(handoff.hand_over, theirs, line, str(tmp_path / "build.sock"))
    received = bytearray(b"")

    served = handoff.receive(accept(job_listener), received)

    assert bytes(received) == line + b"\n"
    result(handing)
    served.sendall(b"ok")
    assert mine.recv(2) == b"ok"
    for sock in (served, mine, theirs):
        sock.close()


def test_a_mark_from_anyone_but_the_front_door_is_refused(
    tmp_path: Path, job_listener: socket.socket, as_someone_else: None
) -> None:
    read_end, write_end = os.pipe()
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sender.connect(str(tmp_path / "build.sock"))
    pass_fds(sender, MARK + b"run build\n", [write_end])
    conn = accept(job_listener)

    with pytest.raises(RequestError, match=re.escape("did not come from job.socket's front door")):
        handoff.receive(conn, bytearray())

    assert closed_everywhere(read_end, write_end), "the passed descriptor was closed"
    sender.settimeout(1)
    with pytest.raises(TimeoutError):
        sender.recv(1)  # no ACK
    conn.close()
    sender.close()


def test_the_front_door_sees_a_refusal_as_reachable_but_not_taken(
    tmp_path: Path, job_listener: socket.socket, front_door: ThreadPoolExecutor, as_someone_else: None
) -> None:
    mine, theirs = socket.socketpair()
    handing = front_door.submit(handoff.hand_over, theirs, b"run build", str(tmp_path / "build.sock"))
    conn = accept(job_listener)

    with pytest.raises(RequestError):
        handoff.receive(conn, bytearray())
    conn.close()  # the job's runner reports the error on it and exits

    with pytest.raises(handoff.HandoffRefused) as info:
        result(handing)
    assert info.value.reachable
    for sock in (mine, theirs):
        sock.close()


@pytest.mark.parametrize(
    ("data", "fd_count"),
    [
        (MARK + b"run build\n", 0),  # the mark without a connection
        (MARK + b"run build\n", 2),  # more than one
        (MARK[:5] + b"run build\n", 1),  # the start of the mark only
        (b"\0run build\n", 1),
    ],
)
def test_a_malformed_hand_over_from_the_front_doors_user_is_refused(
    tmp_path: Path, job_listener: socket.socket, as_front_door: None, data: bytes, fd_count: int
) -> None:
    pipes = [os.pipe() for _ in range(fd_count)]
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sender.connect(str(tmp_path / "build.sock"))
    pass_fds(sender, data, [w for _, w in pipes])
    conn = accept(job_listener)

    with pytest.raises(RequestError, match=re.escape("did not come from job.socket's front door")):
        handoff.receive(conn, bytearray())

    for read_end, write_end in pipes:
        assert closed_everywhere(read_end, write_end)
    conn.close()
    sender.close()


def test_without_a_front_door_user_no_hand_over_is_believed(
    tmp_path: Path, job_listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBRUNNER_FRONT_DOOR_USER", "jobrunner-no-such-user")
    assert handoff.front_door_uid() is None
    read_end, write_end = os.pipe()
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sender.connect(str(tmp_path / "build.sock"))
    pass_fds(sender, MARK + b"run build\n", [write_end])

    with pytest.raises(RequestError):
        handoff.receive(accept(job_listener), bytearray())

    assert closed_everywhere(read_end, write_end)
    sender.close()


def test_the_front_door_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBRUNNER_FRONT_DOOR_USER", "nobody")
    assert handoff.front_door_uid() == pwd.getpwnam("nobody").pw_uid
    monkeypatch.delenv("JOBRUNNER_FRONT_DOOR_USER")
    assert handoff.FRONT_DOOR_USER == "jobrunner-dispatch"
    try:
        expected: int | None = pwd.getpwnam("jobrunner-dispatch").pw_uid
    except KeyError:
        expected = None
    assert handoff.front_door_uid() == expected


# ------------------------------------------------------------------------------------ a direct client


@pytest.mark.parametrize("user", ["front door", "someone else"])
def test_a_direct_clients_descriptors_are_closed_and_its_own_connection_served(
    tmp_path: Path, job_listener: socket.socket, monkeypatch: pytest.MonkeyPatch, user: str
) -> None:
    if user == "front door":  # even the front door's user gets nothing passed without the mark
        monkeypatch.setenv("JOBRUNNER_FRONT_DOOR_USER", pwd.getpwuid(os.getuid()).pw_name)
    else:
        monkeypatch.setenv("JOBRUNNER_FRONT_DOOR_USER", "nobody")
    read_end, write_end = os.pipe()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(tmp_path / "build.sock"))
    pass_fds(client, b"run build arg\n", [write_end])
    conn = accept(job_listener)
    received = bytearray()

    served = handoff.receive(conn, received)

    assert served is conn
    assert bytes(received) == b"run build arg\n"
    assert closed_everywhere(read_end, write_end), "the passed descriptor was closed"
    served.sendall(b"reply")
    assert client.recv(5) == b"reply"
    for sock in (served, client):
        sock.close()


def test_a_direct_client_without_descriptors(tmp_path: Path, job_listener: socket.socket) -> None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(tmp_path / "build.sock"))
    client.sendall(b'{"op": "run", ')  # the rest is read_request_line's to wait for
    conn = accept(job_listener)
    received = bytearray()

    assert handoff.receive(conn, received) is conn
    assert bytes(received) == b'{"op": "run", '
    client.close()
    conn.close()


def test_a_direct_client_that_closes_without_a_byte(tmp_path: Path, job_listener: socket.socket) -> None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(tmp_path / "build.sock"))
    client.close()
    conn = accept(job_listener)

    with pytest.raises(NoRequest):
        handoff.receive(conn, bytearray())
    conn.close()


def test_a_direct_client_that_sends_nothing_times_out(
    tmp_path: Path, job_listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handoff, "REQUEST_DEADLINE_S", 0.2)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(tmp_path / "build.sock"))
    conn = accept(job_listener)

    with pytest.raises(RequestError, match=re.escape("no complete request line within 0.2 s")):
        handoff.receive(conn, bytearray())
    client.close()
    conn.close()


# ------------------------------------------------------------------------------------- refused handovers


@pytest.mark.parametrize("where", ["missing.sock", "no-dir/build.sock", "file"])
def test_no_socket_is_unreachable(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("")
    mine, theirs = socket.socketpair()

    with pytest.raises(handoff.HandoffRefused) as info:
        handoff.hand_over(
            theirs, b"run build", str(tmp_path / where) + ("/build.sock" if where == "file" else "")
        )

    assert info.value.reachable is False
    for sock in (mine, theirs):
        sock.close()


def test_a_socket_nobody_listens_on_is_unreachable(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "build.sock"))
    stale.close()  # the file stays; nobody listens (a job's socket that was stopped)
    mine, theirs = socket.socketpair()

    with pytest.raises(handoff.HandoffRefused) as info:
        handoff.hand_over(theirs, b"run build", str(tmp_path / "build.sock"))

    assert info.value.reachable is False
    for sock in (mine, theirs):
        sock.close()


def refused_by(
    tmp_path: Path,
    job_listener: socket.socket,
    front_door: ThreadPoolExecutor,
    job_unit: Callable[[socket.socket], None],
) -> handoff.HandoffRefused:
    mine, theirs = socket.socketpair()
    handing = front_door.submit(handoff.hand_over, theirs, b"run build", str(tmp_path / "build.sock"))
    conn = accept(job_listener)
    try:
        job_unit(conn)
        with pytest.raises(handoff.HandoffRefused) as info:
            result(handing)
    finally:
        for sock in (conn, mine, theirs):
            sock.close()
    return info.value


def test_a_socket_that_closes_without_ack_is_reachable_but_refused(
    tmp_path: Path, job_listener: socket.socket, front_door: ThreadPoolExecutor
) -> None:
    # systemd accepted, then could not start the job's unit (a credential it cannot decrypt): closed.
    refusal = refused_by(tmp_path, job_listener, front_door, lambda conn: conn.close())
    assert refusal.reachable is True


def test_an_answer_other_than_ack_is_a_refusal(
    tmp_path: Path, job_listener: socket.socket, front_door: ThreadPoolExecutor
) -> None:
    refusal = refused_by(tmp_path, job_listener, front_door, lambda conn: conn.sendall(b"jobrunner: error"))
    assert refusal.reachable is True


def test_no_ack_within_the_deadline_is_a_refusal(
    tmp_path: Path,
    job_listener: socket.socket,
    front_door: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handoff, "ACK_DEADLINE_S", 0.2)
    refusal = refused_by(tmp_path, job_listener, front_door, lambda conn: None)  # accepted, never answers
    assert refusal.reachable is True


def test_what_the_front_door_sends(
    tmp_path: Path, job_listener: socket.socket, front_door: ThreadPoolExecutor
) -> None:
    """The wire format: the mark, the request line and a newline, with exactly one descriptor."""
    mine, theirs = socket.socketpair()
    handing = front_door.submit(handoff.hand_over, theirs, b"run build x", str(tmp_path / "build.sock"))
    conn = accept(job_listener)
    data, ancillary, _, _ = conn.recvmsg(1024, socket.CMSG_SPACE(4 * 4))
    [(level, kind, payload)] = ancillary
    assert (level, kind, len(payload)) == (socket.SOL_SOCKET, socket.SCM_RIGHTS, 4)
    [fd] = array.array("i", payload)
    assert data == MARK + b"run build x\n"
    conn.sendall(b"+")
    result(handing)
    passed = socket.socket(fileno=fd)
    passed.sendall(b"same connection")
    assert mine.recv(100) == b"same connection"
    for sock in (passed, conn, mine, theirs):
        sock.close()


def test_job_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JOBRUNNER_JOB_SOCKETS", raising=False)
    assert handoff.job_socket("build") == "/run/job/build.sock"
    monkeypatch.setenv("JOBRUNNER_JOB_SOCKETS", str(tmp_path))
    assert handoff.job_socket("build") == f"{tmp_path}/build.sock"


# ---------------------------------------------------------------- a run the job's socket did not take


def keyed_and_plain_jobs() -> dict[str, Job]:
    config = parse_config(
        {
            "runner": {"project": "/p"},
            "jobs": {"plain": {"command": ["b"]}, "keyed": {"command": ["k"], "credentials": ["api-key"]}},
        },
        "/etc/jobrunner/jobs.toml",
    )
    return config.jobs


def refused_again(
    mocker: MockerFixture, job: Job, refusals: list[int | None], second_try_taken: bool = False
) -> Exception | None:
    """service._hand_over_again with the second hand-over refused (or taken) and NRefused as given."""
    attempts = mocker.patch.object(
        handoff, "hand_over", side_effect=None if second_try_taken else handoff.HandoffRefused(reachable=True)
    )
    mocker.patch.object(handoff, "socket_refusals", side_effect=refusals)
    a, b = socket.socketpair()
    try:
        service._hand_over_again(job, a, b"run x", "/run/job/x.sock")
    except Exception as error:
        return error
    finally:
        a.close()
        b.close()
    assert attempts.call_count == 1
    return None


def test_a_second_try_that_is_taken_is_the_run(mocker: MockerFixture) -> None:
    assert refused_again(mocker, keyed_and_plain_jobs()["keyed"], [7, 7], second_try_taken=True) is None


def test_a_refusal_systemd_counted_at_the_limit_is_busy_even_for_a_job_with_keys(
    mocker: MockerFixture,
) -> None:
    for job in keyed_and_plain_jobs().values():
        error = refused_again(mocker, job, [7, 8])
        assert isinstance(error, BusyError) and "at its connection limit" in error.message, error
        assert "credential" not in error.message


def test_a_job_with_keys_refused_below_the_limit_has_a_credential_systemd_cannot_load(
    mocker: MockerFixture,
) -> None:
    error = refused_again(mocker, keyed_and_plain_jobs()["keyed"], [7, 7])
    assert isinstance(error, CredentialError), error
    assert "'api-key'" in error.message and "connection limit" not in error.message
    # When systemd cannot be asked, the message says it may also be the limit.
    unsure = refused_again(mocker, keyed_and_plain_jobs()["keyed"], [None, None])
    assert isinstance(unsure, CredentialError) and "connection limit" in unsure.message


def test_a_job_without_keys_refused_below_the_limit_has_a_failing_unit(mocker: MockerFixture) -> None:
    error = refused_again(mocker, keyed_and_plain_jobs()["plain"], [3, 3])
    assert isinstance(error, ConfigError) and "its unit failed" in error.message, error
    unsure = refused_again(mocker, keyed_and_plain_jobs()["plain"], [None, 3])
    assert isinstance(unsure, BusyError), unsure


def test_socket_refusals_asks_systemd_and_says_none_when_it_cannot(mocker: MockerFixture) -> None:
    run = mocker.patch("subprocess.run", return_value=subprocess.CompletedProcess([], 0, b"12\n", b""))
    assert handoff.socket_refusals("build") == 12
    assert run.call_args.args[0] == [
        "systemctl",
        "show",
        "--property=NRefused",
        "--value",
        "job-build.socket",
    ]
    run.side_effect = FileNotFoundError("systemctl")
    assert handoff.socket_refusals("build") is None
    run.side_effect = None
    run.return_value = subprocess.CompletedProcess([], 0, b"\n", b"")
    assert handoff.socket_refusals("build") is None
