"""The bundled clients against the real runner: jobctl and trigger/trigger_job.sh (socat)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, Runner, wait_for

pytestmark = pytest.mark.integration


def test_jobctl_streams_output_and_exits_with_the_job_status(runner: Runner) -> None:
    ok = runner.jobctl("run", "hello", "--", "world")
    assert ok.returncode == 0, ok.stderr
    assert b"hello from hello" in ok.stdout and b"args: world" in ok.stdout
    assert runner.secret.encode() not in ok.stdout + ok.stderr
    failing = runner.jobctl("run", "fail")
    assert failing.returncode == 3 and failing.stderr.startswith(b"failing\n")
    assert runner.jobctl("run", "killed").returncode == 137
    assert runner.jobctl("run", "sleepy").returncode == 124


def test_jobctl_error_exit_codes(runner: Runner) -> None:
    assert runner.jobctl("run", "nope").returncode == 64
    assert runner.jobctl("run", "fail", "--", "x").returncode == 64
    forbidden = runner.jobctl("run", "nogroup-only")
    assert forbidden.returncode == 77 and b"nogroup" in forbidden.stderr
    assert runner.jobctl("run", "needs-missing").returncode == 78
    missing = subprocess.run(
        [sys.executable, "-m", "trigger", "--socket", str(runner.root / "absent.sock"), "list"],
        capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30, check=False,
    )  # fmt: skip
    assert missing.returncode == 69 and b"job.socket" in missing.stderr


def test_jobctl_connects_early_to_its_default_socket(runner: Runner) -> None:
    # Without --socket, jobctl connects to $JOBCTL_SOCKET before it parses its options (the runner
    # starts meanwhile), and uses that one connection for the run.
    env = {**os.environ, "PYTHONPATH": str(REPO), "JOBCTL_SOCKET": str(runner.socket)}

    def jobctl(*args: str) -> subprocess.CompletedProcess[bytes]:
        command = [sys.executable, "-m", "trigger", *args]
        return subprocess.run(command, capture_output=True, env=env, timeout=60, check=False)

    ok = jobctl("run", "hello", "--", "world")
    assert ok.returncode == 0 and b"args: world" in ok.stdout, ok.stderr
    # One runner, the job's own: the early connection went straight to the job's socket, not through
    # the front door (which never saw a connection).
    assert runner.exit_statuses(1) == [0]
    assert not runner.front_door_statuses.exists()

    # With nothing to ask, the early connection ends without a byte: the runner exits 0, warns of nothing.
    assert jobctl("--help").returncode == 0
    assert jobctl("run").returncode == 64
    assert jobctl("--socket", str(runner.root / "absent.sock"), "list").returncode == 69
    # Every runner these commands started has exited, however late (then one more, wait_until_served's):
    # a second connection per command would show as a status more.
    runner.wait_until_served()
    assert runner.front_door_statuses.read_text().split() == ["0", "0", "0", "0"]
    assert runner.statuses.read_text().split() == ["0"]
    assert b"request failed" not in runner.activator_log.read_bytes()


def test_jobctl_list_and_json(runner: Runner) -> None:
    listing = runner.jobctl("list")
    assert listing.returncode == 0
    assert any(line.startswith(b"hello") for line in listing.stdout.splitlines())
    raw = runner.jobctl("--json", "run", "fail")
    assert raw.returncode == 3
    final = json.loads(raw.stdout.splitlines()[-1])
    assert final["event"] == "exit" and final["exit_code"] == 3


def test_jobctl_ctrl_c_cancels_the_job(runner: Runner) -> None:
    client = subprocess.Popen(
        [sys.executable, "-m", "trigger", "--socket", str(runner.socket), "run", "waiter"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert client.stdout is not None
    assert client.stdout.readline() == b"started\n"
    pid_file = next((runner.outputs / "waiter").glob("*/pid"))
    job_pid = int(pid_file.read_text())
    client.send_signal(signal.SIGINT)
    assert client.wait(10) == 130
    wait_for(lambda: not Path(f"/proc/{job_pid}").exists(), 5, "the job to be cancelled")


def test_jobctl_detach(runner: Runner) -> None:
    # The job waits for a file that only this test creates, after jobctl has returned: jobctl cannot
    # have waited for the job (it would time out here instead, after 60 s).
    result = runner.jobctl("run", "--detach", "gated")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.decode().splitlines())
    output_dir = Path(fields["output_dir"])
    assert not (output_dir / "done").exists()
    (output_dir / "release").touch()
    wait_for((output_dir / "done").exists, 60, "the detached job")


def trigger_job_sh(runner: Runner, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["sh", str(REPO / "trigger" / "trigger_job.sh"), "-s", str(runner.socket), *args],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip


def test_trigger_job_sh_runs_a_job_with_socat(runner: Runner) -> None:
    ok = trigger_job_sh(runner, "echo-args", "a b", "$(id)", "it's")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(b"a b\n$(id)\nit's\n")
    assert b"jobrunner: echo-args (run " in ok.stdout
    assert trigger_job_sh(runner, "fail").returncode == 3
    assert trigger_job_sh(runner, "sleepy").returncode == 124
    assert trigger_job_sh(runner, "nope").returncode == 64
