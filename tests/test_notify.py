"""runner.notify: STATUS= through sdnotify to $NOTIFY_SOCKET, silent without one, never raising."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from runner import notify


def test_status_reaches_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        manager.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        notify.status("running hello (run 1) for alice")
        assert manager.recv(4096) == b"STATUS=running hello (run 1) for alice"


def test_status_without_a_manager_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify.status("nobody listens")  # must not raise, nor import sdnotify for nothing


def test_a_failed_send_is_logged_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))
    logged: list[str] = []
    monkeypatch.setattr(notify.journal, "log", lambda message, *args, **kwargs: logged.append(message))
    notify.status("x")
    assert logged and logged[0].startswith("sd_notify failed")
