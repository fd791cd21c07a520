"""runner.notify: STATUS= through libsystemd's sd_notify (sdnotify without python-systemd's C module) to
$NOTIFY_SOCKET, silent without one, never raising."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner import notify

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A stand-in for systemd's notification socket."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_status_reaches_the_notify_socket(manager: socket.socket) -> None:
    notify.status("running hello (run 1) for alice")
    assert manager.recv(4096) == b"STATUS=running hello (run 1) for alice"


def test_status_is_sent_by_libsystemd_not_sdnotify(
    manager: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sdnotify", None)  # importing it now raises ImportError
    notify.status("x")
    assert manager.recv(4096) == b"STATUS=x"


def test_without_python_systemds_c_module_sdnotify_sends_it(
    manager: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "systemd._daemon", None)
    notify.status("fallback")
    assert manager.recv(4096) == b"STATUS=fallback"


def test_status_without_a_manager_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    monkeypatch.setattr(notify, "_notify", sent.append)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify.status("nobody listens")
    assert sent == []
    monkeypatch.setenv("NOTIFY_SOCKET", "")  # set but empty: no manager either
    notify.status("nobody listens")
    assert sent == []
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")  # the stand-in does see a send
    notify.status("somebody")
    assert sent == ["STATUS=somebody"]


@pytest.mark.parametrize(("socket_set", "imports_libsystemd"), [(False, False), (True, True)])
def test_status_imports_nothing_without_a_manager(
    tmp_path: Path, socket_set: bool, imports_libsystemd: bool
) -> None:
    # In a fresh interpreter: what status() adds to sys.modules. Without a manager nothing; with one
    # libsystemd's module, which shows that the probe sees an import when there is one.
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    if socket_set:
        env["NOTIFY_SOCKET"] = str(tmp_path / "absent.sock")
    probe = (
        "import sys\nfrom runner import notify\nbefore = set(sys.modules)\nnotify.status('x')\n"
        "print(*sorted(set(sys.modules) - before))"
    )
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert ("systemd._daemon" in out) == imports_libsystemd, out
    if not socket_set:
        assert out == []


def test_a_failed_send_is_logged_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))
    logged: list[str] = []
    monkeypatch.setattr(notify.journal, "log", lambda message, *args, **kwargs: logged.append(message))
    notify.status("x")
    assert logged and logged[0].startswith("sd_notify failed")
