"""trigger/preconnect.py: jobctl connects before it imports the rest of itself, and uses or closes that
connection; the runner's side (a connection that asked nothing) is in tests/integration/test_clients.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_jobctl import REPO, clean_env
from tests.test_jobctl_direct import Server
from trigger import jobctl
from trigger.preconnect import EarlyConnection, guess_job, job_socket, valid_job_name


class Listener:
    """A unix socket that accepts every connection and records what each sent before it closed."""

    def __init__(self, path: Path, reply: bytes = b"") -> None:
        self.path = path
        self.reply = reply  # sent to each connection once its request line arrived
        self.received: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(20)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        try:
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    conn.settimeout(20)
                    data = b""
                    while chunk := conn.recv(65536):
                        data += chunk
                        if data.endswith(b"\n") and self.reply:
                            conn.sendall(self.reply)
                            break
                    self.received.append(data)
        except OSError:
            pass  # closed by stop()

    def connections(self, count: int) -> list[bytes]:
        """What the first `count` connections sent, once they have ended."""
        for _ in range(200):
            if len(self.received) >= count:
                return self.received
            threading.Event().wait(0.05)
        raise AssertionError(f"expected {count} connections, saw {self.received}")

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    server = Listener(tmp_path / "job.sock", reply=b'{"event": "jobs", "jobs": []}\n')
    yield server
    server.stop()


def test_nothing_listening_is_no_early_connection(tmp_path: Path) -> None:
    assert EarlyConnection.open(str(tmp_path / "absent.sock")) is None
    (tmp_path / "file").write_text("")
    assert EarlyConnection.open(str(tmp_path / "file")) is None


def test_the_early_connection_is_taken_once_and_only_for_its_own_socket(listener: Listener) -> None:
    early = EarlyConnection.open(str(listener.path))
    assert early is not None
    sock = early.take(str(listener.path))
    assert sock is not None and sock.getblocking()  # connected without waiting, used as usual
    assert early.take(str(listener.path)) is None  # once
    sock.close()

    other = EarlyConnection.open(str(listener.path))
    assert other is not None
    assert other.take("/elsewhere.sock") is None  # and closed: the listener sees it end with nothing
    assert listener.connections(2) == [b"", b""]


def test_main_uses_the_early_connection_for_the_default_socket(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBCTL_SOCKET", str(listener.path))
    early = EarlyConnection.open(str(listener.path))

    assert jobctl.main(["list"], early) == 0

    assert listener.connections(1) == [b'{"op": "list"}\n']  # one connection: the early one
    assert len(listener.received) == 1


@pytest.mark.parametrize(
    ("argv", "status"),
    [(["--help"], 0), (["run"], 64), (["frobnicate"], 64), (["list", "--", "x"], 64)],
)
def test_an_early_connection_with_nothing_to_ask_is_closed_without_a_byte(
    listener: Listener, monkeypatch: pytest.MonkeyPatch, argv: list[str], status: int
) -> None:
    monkeypatch.setenv("JOBCTL_SOCKET", str(listener.path))

    early = EarlyConnection.open(str(listener.path))

    assert jobctl.main(argv, early) == status

    assert listener.connections(1) == [b""]  # closed by main(), while `early` still refers to it


def test_another_socket_gets_the_request_and_the_early_connection_nothing(
    listener: Listener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBCTL_SOCKET", str(listener.path))
    other = Listener(tmp_path / "other.sock", reply=b'{"event": "jobs", "jobs": []}\n')
    try:
        early = EarlyConnection.open(str(listener.path))
        assert jobctl.main(["--socket", str(other.path), "list"], early) == 0
        assert other.connections(1) == [b'{"op": "list"}\n']
        assert listener.connections(1) == [b""]
    finally:
        other.stop()


def test_the_command_connects_before_it_imports_argparse_and_json(listener: Listener) -> None:
    # What `jobctl` and `python3 -m trigger` run: the connection is made while neither is imported yet,
    # so the runner starts while they are.
    code = (
        "import sys; from trigger import preconnect; open = preconnect.EarlyConnection.open; "
        "preconnect.EarlyConnection.open = lambda path: "
        '(sys.stderr.write(f\'{sorted({"argparse", "json"} & set(sys.modules))} {path}\\n\'), open(path))[1]; '
        "preconnect.main()"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code, "list"],
        cwd=REPO,
        env={**clean_env(), "JOBCTL_SOCKET": str(listener.path)},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.stderr.startswith(f"[] {listener.path}\n".encode())  # then "jobctl: no jobs ..."
    assert proc.returncode == 0
    assert listener.connections(1) == [b'{"op": "list"}\n']
    assert len(listener.received) == 1


# --- which socket: the job's own, or the main one -----------------------------------------------------


@pytest.mark.parametrize(
    ("main", "job", "path"),
    [
        ("/run/job.sock", "build", "/run/job/build.sock"),
        ("/tmp/x/jobs.sock", "build", "/tmp/x/jobs/build.sock"),
        ("relative.sock", "a_b-1", "relative/a_b-1.sock"),
        ("/run/job", "build", "/run/job.d/build.sock"),
        ("/run/job.socket", "build", "/run/job.socket.d/build.sock"),
        ("/run/sock", "build", "/run/sock.d/build.sock"),
    ],
)
def test_job_socket_is_derived_from_the_main_socket(main: str, job: str, path: str) -> None:
    assert job_socket(main, job) == path


@pytest.mark.parametrize("name", ["a", "build", "a-b_c9", "z" * 64])
def test_valid_job_names(name: str) -> None:
    assert valid_job_name(name)


@pytest.mark.parametrize(
    "name", ["", "Build", "9a", "-a", "_a", "a" * 65, "a.b", "a/b", "..", "a b", "b\u00e9", "\u0430", "a\n"]
)
def test_invalid_job_names(name: str) -> None:
    assert not valid_job_name(name)


@pytest.mark.parametrize(
    ("argv", "job"),
    [
        (["run", "build"], "build"),
        (["run", "build", "a", "b"], "build"),
        (["--json", "run", "--detach", "build"], "build"),
        (["--socket", "/x.sock", "run", "build"], "build"),
        (["--socket=/x.sock", "run", "build"], "build"),
        (["--socket", "run", "run", "build"], "build"),  # the first 'run' is the socket's path
        (["run", "--socket", "build", "deploy"], "deploy"),
        (["--debug", "-x", "run", "--json", "--detach", "build", "--", "-a"], "build"),
        (["run", "build", "--", "other"], "build"),
        (["list"], None),
        (["list", "build"], None),
        (["frobnicate", "run", "build"], None),
        (["build", "run"], None),
        ([], None),
        (["run"], None),
        (["run", "--detach"], None),
        (["--socket"], None),
        (["run", "--socket"], None),
        (["run", "--", "build"], None),  # after '--' everything is a job argument: a usage error
        (["--", "run", "build"], None),
        (["run", "--detach", "--", "build"], None),
        (["run", "Build"], None),
        (["run", "a" * 65], None),
        (["run", "../../etc/x"], None),
        (["run", "-", "build"], None),  # '-' is a word to argparse: the (invalid) name
    ],
)
def test_guess_job(argv: list[str], job: str | None) -> None:
    assert guess_job(argv) == job


def test_the_guess_agrees_with_argparse_when_it_names_a_job() -> None:
    for argv in (["--json", "run", "--detach", "build"], ["--socket", "run", "run", "build"]):
        assert jobctl.parse_arguments(jobctl.build_parser(), argv).name == guess_job(argv) == "build"


def test_the_early_connection_goes_to_the_jobs_own_socket_when_it_listens(tmp_path: Path) -> None:
    main = Server(tmp_path / "job.sock")
    own = Server(tmp_path / "job" / "build.sock")
    early = EarlyConnection.guess(["--json", "run", "--detach", "build"], str(main.path))
    assert early is not None
    assert (early.path, early.instead_of) == (str(own.path), None)
    early.close()
    assert own.finish() == [b""]
    assert main.finish() == []


@pytest.mark.parametrize("argv", [["run", "build"], ["run", "nosuchjob"]])
def test_the_early_connection_goes_to_the_main_socket_when_the_jobs_is_not_there(
    tmp_path: Path, argv: list[str]
) -> None:
    main = Server(tmp_path / "job.sock")
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "build.sock").touch()  # not a socket: ECONNREFUSED
    early = EarlyConnection.guess(argv, str(main.path))
    assert early is not None
    # jobctl need not try that socket again: trigger.preconnect could not connect to it
    assert (early.path, early.instead_of) == (str(main.path), job_socket(str(main.path), argv[1]))
    early.close()
    assert main.finish() == [b""]


@pytest.mark.parametrize(
    "argv", [["list"], ["run", "--", "build"], ["run", "Build"], ["--help"], ["--socket", "build"]]
)
def test_the_early_connection_goes_to_the_main_socket_without_a_job(tmp_path: Path, argv: list[str]) -> None:
    main = Server(tmp_path / "job.sock")
    own = Server(tmp_path / "job" / "build.sock")
    early = EarlyConnection.guess(argv, str(main.path))
    assert early is not None
    assert (early.path, early.instead_of) == (str(main.path), None)
    early.close()
    assert main.finish() == [b""]
    assert own.finish() == []


def test_no_early_connection_when_neither_socket_listens(tmp_path: Path) -> None:
    assert EarlyConnection.guess(["run", "build"], str(tmp_path / "job.sock")) is None
