"""trigger/runs.py: `jobctl history`, `logs` and `status` against a fake server (tests/test_jobctl.py's)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_jobctl import FakeServer, error_event, jobctl_main, line
from trigger import runs

RUN_ID = "20261128T154402-123456-3fa9c0de"
RECORD: dict[str, Any] = {
    "job": "build",
    "run_id": RUN_ID,
    "user": "alice",
    "uid": 1000,
    "started": "2026-11-28T15:44:02.123Z",
    "state": "finished",
    "exit_code": 3,
    "duration_s": 6.878,
    "result": "exited with 3",
    "log": f"/srv/project/logs/build/{RUN_ID}.log",
}


@pytest.fixture
def sock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    return tmp_path / "job.sock"


def log_event(text: str) -> bytes:
    return line({"event": "log", "text": text})


def run_event(**fields: Any) -> bytes:
    return line({"event": "run", **RECORD, **fields})


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["history"], {"op": "history", "limit": 20}),
        (["history", "build", "-n", "5"], {"op": "history", "limit": 5, "job": "build"}),
        (["status"], {"op": "status"}),
        (["logs", RUN_ID], {"op": "logs", "run_id": RUN_ID, "follow": False}),
        (["logs", "-f", RUN_ID], {"op": "logs", "run_id": RUN_ID, "follow": True}),
    ],
)
def test_requests(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path, argv: list[str], expected: dict[str, Any]
) -> None:
    final = run_event() if argv[0] == "logs" else line({"event": "runs", "runs": []})
    server = FakeServer(sock, [final])
    jobctl_main(capsysbinary, "--socket", str(sock), *argv)
    assert server.request_json() == expected


def test_history_table(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    running = {
        **RECORD,
        "run_id": RUN_ID[:-1] + "f",
        "state": "running",
        "exit_code": None,
        "duration_s": 75.2,
    }
    FakeServer(sock, [line({"event": "runs", "runs": [running, RECORD]})])
    status, out, err = jobctl_main(capsysbinary, "--socket", str(sock), "history")
    assert (status, err) == (0, b"")
    assert out.decode().splitlines() == [
        "RUN ID                           JOB    USER   STARTED              DURATION    EXIT",
        f"{RUN_ID[:-1]}f  build  alice  2026-11-28 15:44:02  1 min 15 s  running",
        f"{RUN_ID}  build  alice  2026-11-28 15:44:02  6.9 s       3",
    ]


def test_status_table_and_none(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    running = {**RECORD, "state": "running", "exit_code": None, "duration_s": 7300}
    FakeServer(sock, [line({"event": "runs", "runs": [running]})])
    status, out, _ = jobctl_main(capsysbinary, "--socket", str(sock), "status")
    assert status == 0
    assert out.decode().splitlines() == [
        "RUN ID                           JOB    USER   STARTED              RUNNING FOR",
        f"{RUN_ID}  build  alice  2026-11-28 15:44:02  2 h 01 min",
    ]
    sock.unlink()
    FakeServer(sock, [line({"event": "runs", "runs": []})])
    assert jobctl_main(capsysbinary, "--socket", str(sock), "status") == (
        0,
        b"",
        b"jobctl: there are no runs in progress that you may see\n",
    )


@pytest.mark.parametrize(
    ("follow", "fields", "status", "said"),
    [
        (False, {}, 0, "build (run R) exited with 3 after 6.9 s"),
        (True, {}, 3, "build (run R) exited with 3 after 6.9 s"),
        (
            True,
            {"exit_code": 137, "result": "timed out, killed by SIGKILL"},
            137,
            "timed out, killed by SIGKILL",
        ),
        (
            True,
            {"state": "unfinished", "exit_code": None, "duration_s": None, "result": ""},
            255,
            "never finished",
        ),
        (
            False,
            {"state": "running", "exit_code": None, "duration_s": 2.0},
            0,
            "is still running (2.0 s so far)",
        ),
        (True, {"exit_code": None, "result": "not started: no such file"}, 70, "not started: no such file"),
    ],
)
def test_logs(  # noqa: PLR0917 - pytest's fixtures and parameters
    capsysbinary: pytest.CaptureFixture[bytes],
    sock: Path,
    follow: bool,
    fields: dict[str, Any],
    status: int,
    said: str,
) -> None:
    FakeServer(sock, [log_event("one\n"), 0.05, log_event("two\n"), run_event(**fields)])
    got, out, err = jobctl_main(
        capsysbinary, "--socket", str(sock), "logs", *(["-f"] if follow else []), RUN_ID
    )
    assert (got, out) == (status, b"one\ntwo\n")
    assert err.decode().startswith("jobctl: ") and said.replace("R", RUN_ID) in err.decode(), err


def test_logs_json_is_passed_through(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    script = [log_event("one\n"), line({"event": "log", "base64": "/w=="}), run_event()]
    FakeServer(sock, script)
    assert jobctl_main(capsysbinary, "--json", "--socket", str(sock), "logs", "-f", RUN_ID) == (
        3,
        b"".join(script),
        b"",
    )


def test_logs_base64_and_errors(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    FakeServer(sock, [line({"event": "log", "base64": "/w=="}), run_event()])
    assert jobctl_main(capsysbinary, "--socket", str(sock), "logs", RUN_ID)[1] == b"\xff"
    sock.unlink()
    FakeServer(sock, [error_event("unknown-run", f"no run {RUN_ID} that you may see")])
    status, _, err = jobctl_main(capsysbinary, "--socket", str(sock), "logs", RUN_ID)
    assert status == 64 and b"unknown-run" in err


def test_malformed_replies(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    FakeServer(sock, [line({"event": "runs", "runs": [{"job": 1}]})])
    assert jobctl_main(capsysbinary, "--socket", str(sock), "history")[0] == 70
    sock.unlink()
    FakeServer(sock, [run_event()])  # a `run` in reply to `history`
    assert jobctl_main(capsysbinary, "--socket", str(sock), "history")[0] == 70
    sock.unlink()
    FakeServer(sock, [run_event(exit_code=300)])
    assert jobctl_main(capsysbinary, "--socket", str(sock), "logs", "-f", RUN_ID)[0] == 70


def test_helpers() -> None:
    assert runs.duration_text(0.04) == "0.0 s"
    assert runs.duration_text(59.96) == "60.0 s"
    assert runs.duration_text(3599) == "59 min 59 s"
    assert runs.duration_text(86400) == "24 h 00 min"
    assert runs.local_time("not a time") == "not a time"
    assert runs.local_time(None) == ""
    assert json.dumps(runs.encode(type("NS", (), {"command": "status"})())) == '{"op": "status"}'
