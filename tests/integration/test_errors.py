"""Bad requests and refused runs over a real socket: one clear error, a non-zero status, nothing left behind."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Runner, read_all

pytestmark = pytest.mark.integration


def error_event(reply: bytes) -> dict[str, object]:
    lines = reply.splitlines()
    assert len(lines) == 1, reply[:500]  # exactly one final event, nothing else
    event = json.loads(lines[0])
    assert event["event"] == "error" and event["message"], event
    return event


@pytest.mark.parametrize(
    ("request_line", "code"),
    [
        (b'{"op": "run", "job": "nope"}\n', "unknown-job"),
        (b'{"op": "run", "job": "../x"}\n', "unknown-job"),
        (b'{"op": "run", "job": "hello world"}\n', "unknown-job"),
        (b'{"op": "run", "job": "h\xd0\xb5llo"}\n', "unknown-job"),  # a Cyrillic look-alike
        (b'{"op": "run", "job": "fail", "args": ["x"]}\n', "bad-arguments"),
        (b'{"op": "run", "job": "hello", "args": ["$(id)"]}\n', "bad-arguments"),
        (
            b'{"op": "run", "job": "echo-args", "args": ' + json.dumps(["a"] * 2000).encode() + b"}\n",
            "bad-arguments",
        ),
        (b'{"op": "nuke"}\n', "bad-request"),
        (b'{"op": "run", "job": "fail", "extra": 1}\n', "bad-request"),
        (b'{"op": "run", "job": 5}\n', "bad-request"),
        (b'{"op": "run", "job": "fail"\n', "bad-request"),
        (b"[" * 60_000 + b"\n", "bad-request"),  # deeply nested, within the size limit
        (b'{"op": "run", "job": "\xff\xfe"}\n', "bad-request"),
        (b'{"op": "run", "job": "fail\\u0000"}\n', "unknown-job"),
        (b'{"op": "run", "job": "nogroup-only"}\n', "forbidden"),
        (b'{"op": "run", "job": "needs-missing"}\n', "credential"),
        (b'{"op": "run", "job": "no-program"}\n', "config"),
    ],
    ids=lambda value: value[:40].decode(errors="replace") if isinstance(value, bytes) else value,
)
def test_bad_json_requests_get_one_error_event(runner: Runner, request_line: bytes, code: str) -> None:
    assert error_event(runner.request(request_line))["code"] == code
    # Refused by the front door (which then exits non-zero), or by the job's own unit after the hand-over.
    assert runner.exit_statuses(front_door=True)[-1] != 0 or runner.exit_statuses()[-1] != 0


@pytest.mark.parametrize(
    ("request_line", "code"),
    [
        (b"run nope\n", "unknown-job"),
        (b"run ../../etc/passwd\n", "unknown-job"),
        (b"run 'unclosed\n", "bad-request"),
        (b"launch hello\n", "bad-request"),
        (b"\x00\x01\x02\n", "bad-request"),
        (b"\xff\xfe\n", "bad-request"),
        (b"run fail a\n", "bad-arguments"),
        (b"run\n", "bad-request"),
    ],
    ids=lambda value: value[:40].decode(errors="replace") if isinstance(value, bytes) else value,
)
def test_bad_text_requests_get_one_error_line(runner: Runner, request_line: bytes, code: str) -> None:
    reply = runner.request(request_line)
    assert reply.startswith(f"jobrunner: error: {code}: ".encode()), reply
    assert reply.count(b"\n") == 1
    assert runner.exit_statuses(front_door=True)[-1] != 0 or runner.exit_statuses()[-1] != 0


def test_an_oversized_request_is_refused_without_reading_it_all(runner: Runner) -> None:
    with runner.connect() as conn:
        conn.settimeout(15)
        try:
            conn.sendall(b"run " + b"x" * (1 << 20))  # 1 MiB, no newline
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before we finish: that is fine
        reply = read_all(conn)
    assert b"jobrunner: error: bad-request: request line longer than 65536 bytes" in reply


def test_a_silent_client_is_dropped_at_the_deadline(runner: Runner) -> None:
    # Ten slow clients at once (slow-loris): each gets its error at the 10 s deadline, none hangs.
    replies: list[bytes] = []

    # Half on the front door, half on a job's own socket. There the runner's first read (runner/handoff.py)
    # and the rest of the line share the one deadline: a client that waits 8 s before its first bytes
    # still gets its error 10 s after it connected, not 18 s (a deadline restarted by the second read).
    waited: list[float] = []

    def slow_client(path: Path, pause_s: float) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(path))
            connected = time.monotonic()
            conn.settimeout(30)
            time.sleep(pause_s)
            try:
                conn.sendall(b"ru")
            except OSError:
                pass  # a busy machine slept past the deadline: the error is there to read all the same
            replies.append(read_all(conn))
            waited.append(time.monotonic() - connected)

    clients = [(runner.socket, 0.0), (runner.job_sockets / "hello.sock", 8.0)] * 5
    threads = [threading.Thread(target=slow_client, args=client) for client in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert len(replies) == 10
    # The deadline, with a margin for a busy machine (6 s) that still tells 10 s from 18 s.
    assert all(9 < seconds < 16 for seconds in waited), waited
    assert all(
        r.startswith(b"jobrunner: error: bad-request: no complete request line within 10 s") for r in replies
    )
    assert runner.exit_statuses(5, front_door=True) == [64] * 5
    assert runner.exit_statuses(5) == [64] * 5


def test_list_shows_only_the_jobs_the_caller_may_run(runner: Runner) -> None:
    jobs = json.loads(runner.request(b'{"op": "list"}\n'))["jobs"]
    names = {j["name"] for j in jobs}
    assert {"hello", "root-only", "echo-args"} <= names
    assert "nogroup-only" not in names
    assert next(j for j in jobs if j["name"] == "echo-args")["args"] is True
    text = runner.request(b"list\n").decode()
    assert any(line.split()[0] == "hello" and "Greets" in line for line in text.splitlines())


def test_a_broken_configuration_is_a_config_error_naming_the_file(runner: Runner) -> None:
    runner.config.write_text(runner.config.read_text() + "\n[jobs.bad]\ncommand = ['x']\ntimout = 5\n")
    event = error_event(runner.request(b'{"op": "list"}\n'))
    assert event["code"] == "config"
    assert str(runner.config) in str(event["message"]) and "'timout'" in str(event["message"])
    assert "timeout" in str(event["hint"])


def test_connection_closed_before_any_request(runner: Runner) -> None:
    conn = runner.connect()
    conn.close()
    time.sleep(0.5)
    # A connection that asked nothing (a probe, jobctl's early connection when it had nothing to ask) is
    # not a failure: the runner exits 0 without a warning, and the next client is served normally.
    assert b"exited with 0" in runner.request(b"run root-only\n")
    assert runner.exit_statuses(2, front_door=True) == [0, 0]  # the probe, then the hand-over
    assert runner.exit_statuses(1) == [0]
    assert b"request failed" not in runner.activator_log.read_bytes()


def test_errors_never_carry_the_key(runner: Runner) -> None:
    # A request that quotes the job's key back at the job's unit: the error message must not echo it,
    # whether the request came through the front door or straight to the job's socket.
    secret = runner.secret
    for line in (f"run hello {secret}$\n", json.dumps({"op": "run", "job": "hello", "args": [secret + "$"]})):
        for sock in (runner.socket, runner.job_sockets / "hello.sock"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(str(sock))
                conn.settimeout(30)
                conn.sendall(line.encode() + b"\n")
                reply = read_all(conn)
            assert b"bad-arguments" in reply and secret.encode() not in reply and b"***" in reply
    assert runner.exit_statuses(4) == [64] * 4
    # The front door holds no key to redact with: what it refuses itself (a key pasted as a job name, an
    # op, a field), it quotes cut to three characters, in the reply and in the journal.
    for line in (f"run {secret}\n", f"{secret}\n", json.dumps({"op": secret}), json.dumps({secret: 1})):
        reply = runner.request(line.encode() + b"\n")
        assert b"error" in reply and secret.encode() not in reply and secret[:4].encode() not in reply, reply
    assert secret not in runner.activator_log.read_text()
    # Six front doors in all: the two that handed over above (0), then these four.
    assert runner.exit_statuses(6, front_door=True)[-4:] == [64] * 4


def test_socket_level_garbage(runner: Runner) -> None:
    with runner.connect() as conn:
        conn.settimeout(15)
        conn.sendall(b"\n")
        reply = read_all(conn)
    assert reply.startswith(b"jobrunner: error: bad-request: empty request")
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(runner.socket))
    raw.sendall(b'{"op":"list"}')  # no newline, then half-close: still one request
    raw.shutdown(socket.SHUT_WR)
    raw.settimeout(15)
    assert json.loads(read_all(raw))["event"] == "jobs"
    raw.close()


def test_a_credential_whose_encrypted_file_went_missing_is_named_with_the_fix(runner: Runner) -> None:
    # What systemd hands the unit (SetCredential= fallback) when /etc/credstore.encrypted/NAME is gone.
    (runner.credentials / "not-loaded").write_bytes(b"jobrunner:credential-file-missing")
    event = error_event(runner.request(b'{"op": "run", "job": "needs-missing"}\n'))
    assert event["code"] == "credential"
    assert "'not-loaded'" in str(event["message"]) and "missing" in str(event["message"])
    assert "jobrunner creds set not-loaded" in str(event["hint"])
    # The marker is not a secret: ordinary output containing it is not redacted.
    assert b"***" not in runner.request(b"run echo-args jobrunner:credential-file-missing\n")
