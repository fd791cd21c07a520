"""runner/activation.py: socket activation (LISTEN_PID/LISTEN_FDS), operator mode, or refusing to run by hand."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runner.activation import Mode, detect_mode, take_connection
from runner.errors import ActivationError

REPO = Path(__file__).resolve().parents[1]
INVOCATION_ID = secrets.token_hex(16)  # what systemd sets for each unit invocation


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "INVOCATION_ID"):
        monkeypatch.delenv(name, raising=False)


def listen(monkeypatch: pytest.MonkeyPatch, fds: str, pid: int | None = None) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() if pid is None else pid))
    monkeypatch.setenv("LISTEN_FDS", fds)


def assert_by_hand(error: ActivationError) -> None:
    assert error.exit_status == 78
    assert "jobctl run" in error.hint


# ------------------------------------------------------------------------------------------- detect_mode


def test_a_socket_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    listen(monkeypatch, "1")

    assert detect_mode(None) is Mode.SOCKET


def test_a_socket_connection_wins_over_a_job_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    listen(monkeypatch, "1")
    monkeypatch.setenv("INVOCATION_ID", INVOCATION_ID)

    assert detect_mode("build") is Mode.SOCKET


@pytest.mark.parametrize("fds", ["0", "", "one", "-1"])
def test_no_usable_listen_fds_is_not_a_socket_connection(monkeypatch: pytest.MonkeyPatch, fds: str) -> None:
    listen(monkeypatch, fds)

    with pytest.raises(ActivationError) as info:
        detect_mode(None)

    assert_by_hand(info.value)


def test_listen_fds_meant_for_another_process_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    listen(monkeypatch, "1", pid=os.getppid())  # e.g. inherited from a parent that was socket-activated

    with pytest.raises(ActivationError) as info:
        detect_mode(None)

    assert_by_hand(info.value)


def test_operator_mode_needs_invocation_id_and_a_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVOCATION_ID", INVOCATION_ID)

    assert detect_mode("build") is Mode.OPERATOR


@pytest.mark.parametrize("job", [None, ""])
def test_operator_mode_without_a_job_is_refused(monkeypatch: pytest.MonkeyPatch, job: str | None) -> None:
    monkeypatch.setenv("INVOCATION_ID", INVOCATION_ID)

    with pytest.raises(ActivationError) as info:
        detect_mode(job)

    assert_by_hand(info.value)


@pytest.mark.parametrize("invocation_id", [None, ""])
def test_run_by_hand_is_refused(monkeypatch: pytest.MonkeyPatch, invocation_id: str | None) -> None:
    if invocation_id is not None:
        monkeypatch.setenv("INVOCATION_ID", invocation_id)

    with pytest.raises(ActivationError) as info:
        detect_mode("build")

    error = info.value
    assert_by_hand(error)
    assert error.code == "activation"
    assert "systemctl start job@" in error.hint


# ------------------------------------------------------------------------------------- take_connection


@pytest.mark.parametrize("fds", ["0", "2", "3"])
def test_take_connection_wants_exactly_one_descriptor(monkeypatch: pytest.MonkeyPatch, fds: str) -> None:
    listen(monkeypatch, fds)

    with pytest.raises(ActivationError) as info:
        take_connection()

    assert fds in info.value.message
    assert_by_hand(info.value)


def test_take_connection_without_listen_pid_of_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    listen(monkeypatch, "1", pid=1)

    with pytest.raises(ActivationError):
        take_connection()


# As systemd starts a runner: the connection on fd 3 (inheritable), LISTEN_* naming this process.
ACTIVATED = """\
import json, os, subprocess, sys
os.dup2(int(sys.argv[1]), 3)
os.close(int(sys.argv[1]))
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="connection")

from runner.activation import Mode, detect_mode, take_connection

mode = detect_mode(None)
conn = take_connection()
child = subprocess.run(
    ["/bin/sh", "-c", 'env; if [ -e /proc/$$/fd/3 ]; then echo FD3=open; else echo FD3=closed; fi'],
    close_fds=False, capture_output=True, check=True,
)
report = {
    "mode": mode.value,
    "fileno": conn.fileno(),
    "inheritable": os.get_inheritable(3),
    "family": int(conn.family),
    "type": int(conn.type),
    "environ": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "child": child.stdout.decode().splitlines(),
}
conn.sendall(json.dumps(report).encode() + b"\\n")
"""


def test_take_connection_as_systemd_passes_it() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
        process = subprocess.run(
            [sys.executable, "-c", ACTIVATED, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert process.returncode == 0, process.stderr.decode()
        ours.settimeout(10)
        report = json.loads(ours.recv(1 << 20))

    assert report["mode"] == "socket"
    assert report["fileno"] == 3
    assert report["inheritable"] is False
    assert (report["family"], report["type"]) == (int(socket.AF_UNIX), int(socket.SOCK_STREAM))
    assert report["environ"] == []  # unset, so that the job cannot see them
    assert not [line for line in report["child"] if line.startswith("LISTEN_")]
    assert "FD3=closed" in report["child"]  # a process the runner starts does not get the connection


def test_the_runner_imports_without_collections_and_serves_with_them() -> None:
    """runner/__main__.py: the collector is off while the modules load (a connection's start-up), then
    on again, with what was imported frozen, before main() looks at anything a client sent."""
    code = (
        "import gc, runner.__main__ as m; before = gc.isenabled(); m.main(['runner', '--help']); "
        "print(before, gc.isenabled(), gc.get_freeze_count() > 1000, file=__import__('sys').stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-S", "-c", code],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "False True True\n")
