"""How the runner is started: by systemd for an operator (`systemctl start job@NAME`), or wrongly by hand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, Runner, make_secret

pytestmark = pytest.mark.integration


def run_runner(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    clean = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], capture_output=True, env=clean, timeout=60, check=False
    )


@pytest.fixture
def project(tmp_path: Path) -> Runner:
    return Runner(tmp_path, make_secret())  # only its files: no socket is started


def operator_env(project: Runner) -> dict[str, str]:
    # What systemd gives job@NAME.service: an invocation id, the credentials, no LISTEN_FDS.
    return {
        "INVOCATION_ID": "0123456789abcdef0123456789abcdef",
        "JOBRUNNER_CONFIG": str(project.config),
        "CREDENTIALS_DIRECTORY": str(project.credentials),
    }


def test_operator_mode_runs_the_job_and_exits_with_its_status(project: Runner) -> None:
    result = run_runner(["hello"], operator_env(project))
    assert result.returncode == 0, result.stderr
    assert b"hello from hello" in result.stdout
    assert project.secret.encode() not in result.stdout + result.stderr
    assert b"jobrunner: hello (run " in result.stderr and b"exited with 0" in result.stderr
    logs = list((project.logs / "hello").glob("*.log"))
    assert len(logs) == 1 and "# exit_code: 0" in logs[0].read_text()

    failing = run_runner(["fail"], operator_env(project))
    assert failing.returncode == 3  # systemctl start job@fail fails with the job
    assert b"failing" in failing.stderr


def test_operator_mode_with_an_unknown_job(project: Runner) -> None:
    result = run_runner(["nope"], operator_env(project))
    assert result.returncode == 64
    assert b"jobrunner: error: unknown-job: no job named 'nope'" in result.stderr


def test_running_the_runner_by_hand_fails_clearly(project: Runner) -> None:
    for args in ([], ["hello"]):
        result = run_runner(args, {"JOBRUNNER_CONFIG": str(project.config)})
        assert result.returncode == 78
        assert b"jobctl run NAME" in result.stderr
        assert b"Traceback" not in result.stderr
        assert not project.logs.exists()  # nothing was run


def test_a_stale_listen_pid_is_not_socket_activation(project: Runner) -> None:
    # LISTEN_FDS meant for another process (e.g. inherited from a shell) must not be trusted.
    result = run_runner([], {"LISTEN_PID": "1", "LISTEN_FDS": "1"})
    assert result.returncode == 78
