"""runner/channel.py's ClientChannel over a real connection, and when serve_connection lets the client go."""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner import service
from runner.channel import ClientChannel
from runner.protocol import Form, Reply


class CountingSocket(socket.socket):
    """A real socket that counts its shutdown() calls (and can be made to fail them)."""

    def __init__(self, fileno: int, fail_with: int | None = None) -> None:
        super().__init__(fileno=fileno)
        self.shutdowns = 0
        self.fail_with = fail_with

    def shutdown(self, how: int) -> None:
        self.shutdowns += 1
        if self.fail_with is not None:
            raise OSError(self.fail_with, "failed on purpose")
        super().shutdown(how)


@pytest.fixture
def pair() -> Iterator[tuple[CountingSocket, socket.socket]]:
    """(server, client): the runner's end and the client's end of one connection."""
    server, client = socket.socketpair()
    counting = CountingSocket(server.detach())
    client.settimeout(5)
    yield counting, client
    counting.close()
    client.close()


def read_to_eof(client: socket.socket) -> bytes:
    """Everything the server sent, up to EOF; socket.timeout (a TimeoutError) if EOF does not come."""
    chunks = []
    while chunk := client.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_end_lets_the_client_read_eof_before_close(pair: tuple[CountingSocket, socket.socket]) -> None:
    server, client = pair
    channel = ClientChannel(server, Reply(Form.TEXT))
    channel.send(b"the final line\n")

    channel.end()

    client.settimeout(2)
    assert read_to_eof(client) == b"the final line\n"  # EOF, while the runner still holds the socket
    assert server.fileno() != -1
    client.shutdown(socket.SHUT_WR)  # the client is done too: close() need not wait for it
    channel.close()
    assert server.fileno() == -1


def test_send_final_sends_then_ends(pair: tuple[CountingSocket, socket.socket]) -> None:
    server, client = pair
    channel = ClientChannel(server, Reply(Form.JSON))

    channel.send_final(b'{"event":"exit"}\n')

    assert read_to_eof(client) == b'{"event":"exit"}\n'
    assert server.shutdowns == 1
    client.shutdown(socket.SHUT_WR)
    channel.close()
    assert server.shutdowns == 1


def test_end_is_idempotent_and_close_does_not_shut_down_again(
    pair: tuple[CountingSocket, socket.socket],
) -> None:
    server, client = pair
    channel = ClientChannel(server, Reply(Form.TEXT))

    channel.end()
    channel.end()
    client.sendall(b"late bytes from the client\n")  # still read away by close(): no reset for the client
    client.shutdown(socket.SHUT_WR)
    channel.close()

    assert server.shutdowns == 1
    assert read_to_eof(client) == b""


def test_close_alone_still_ends_the_reply(pair: tuple[CountingSocket, socket.socket]) -> None:
    server, client = pair
    channel = ClientChannel(server, Reply(Form.TEXT))
    channel.send(b"reply\n")
    client.shutdown(socket.SHUT_WR)

    channel.close()

    assert server.shutdowns == 1
    assert read_to_eof(client) == b"reply\n"


def test_end_after_the_client_left_is_quiet_and_close_still_closes() -> None:
    server, client = socket.socketpair()
    failing = CountingSocket(server.detach(), fail_with=errno.ENOTCONN)
    client.close()
    channel = ClientChannel(failing, Reply(Form.TEXT))

    channel.end()  # raises nothing
    channel.end()
    channel.close()

    assert failing.shutdowns == 1
    assert failing.fileno() == -1


# ---------------------------------------------------------------------------- serve_connection, in process


@pytest.fixture
def configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A jobs.toml with one job, and an environment like a runner's outside systemd."""
    project = tmp_path / "project"
    project.mkdir()
    config = tmp_path / "jobs.toml"
    config.write_text(f'[runner]\nproject = "{project}"\n\n[jobs.hello]\ncommand = ["/bin/echo", "hi"]\n')
    monkeypatch.setenv("JOBRUNNER_CONFIG", str(config))
    monkeypatch.setenv("JOBRUNNER_CONFIG_CACHE", "")
    for name in ("CREDENTIALS_DIRECTORY", "RUNTIME_DIRECTORY", "NOTIFY_SOCKET", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # the runner moves to the job's workdir
    return project


def serve(request: bytes, monkeypatch: pytest.MonkeyPatch, job_name: str | None) -> tuple[int, list[bytes]]:
    """serve_connection over a socketpair, as job `job_name`'s own unit (None: the front door); returns
    its status and, for each journal entry, what the client had read up to EOF when the runner wrote it
    (it must have the whole reply and EOF by then)."""
    server, client = socket.socketpair()
    client.sendall(request)
    client.settimeout(2)
    seen_at_journal: list[bytes] = []

    def journal_log(message: str, priority: int = 6, **fields: object) -> None:
        if "EXIT_CODE" in fields or "ERROR_CODE" in fields:  # a run's end entry, or a refusal's
            seen_at_journal.append(read_to_eof(client))  # TimeoutError: the client still waits for EOF
            client.shutdown(socket.SHUT_WR)  # and leaves: the runner's close() need not wait for it

    monkeypatch.setattr(service.journal, "log", journal_log)
    try:
        status = service.serve_connection(server, job_name)
    finally:
        client.close()
    return status, seen_at_journal


def test_the_client_has_eof_before_the_end_entry_is_written(
    configured: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, seen = serve(b'{"op": "run", "job": "hello"}\n', monkeypatch, "hello")

    assert status == 0
    assert len(seen) == 1
    events = [json.loads(line) for line in seen[0].splitlines()]
    assert [e["event"] for e in events] == ["accepted", "output", "exit"]
    assert events[1]["text"] == "hi\n"
    assert events[-1]["exit_code"] == 0
    assert "\n# ---- end\n" in Path(events[-1]["log"]).read_text()  # the footer came before the exit event


def test_the_client_has_eof_before_a_refusal_is_logged(
    configured: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, seen = serve(b"run nosuchjob\n", monkeypatch, None)  # the front door refuses it

    assert status == 64
    assert len(seen) == 1
    assert seen[0].startswith(b"jobrunner: error: unknown-job: ")
    assert seen[0].endswith(b"\n")
