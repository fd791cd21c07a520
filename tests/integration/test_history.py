"""`history`, `logs` and `status` end to end: the front door over systemd-socket-activate, and jobctl."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.runs import RunLog, new_run_id
from tests.integration.conftest import REPO, Runner, read_all, wait_for

pytestmark = pytest.mark.integration


def request_json(runner: Runner, obj: dict[str, object]) -> list[dict[str, object]]:
    return [json.loads(line) for line in runner.request(json.dumps(obj).encode() + b"\n").splitlines()]


def run(runner: Runner, job: str, *args: str) -> str:
    result = runner.jobctl("--json", "run", job, *args)
    return str(json.loads(result.stdout.splitlines()[0])["run_id"])


def hidden_run(runner: Runner) -> str:
    """A finished run of nogroup-only, a job the tests' caller may not run, as its runner would write it."""
    run_id = new_run_id()
    (runner.logs / "nogroup-only").mkdir(parents=True, exist_ok=True)
    log = RunLog(str(runner.logs / "nogroup-only" / f"{run_id}.log"))
    log.header(
        {
            "job": "nogroup-only",
            "run": run_id,
            "started": "2026-11-28T15:44:02.123Z",
            "caller": "uid=0 (root)",
        }
    )
    log.write(b"secret output\n")
    log.footer({"result": "exited with 0", "exit_code": 0, "duration_s": "0.100"})
    log.close()
    return run_id


def test_history_lists_the_runs_newest_first(runner: Runner) -> None:
    first = run(runner, "hello", "one")
    second = run(runner, "fail")
    hidden = hidden_run(runner)

    (event,) = request_json(runner, {"op": "history"})
    assert event["event"] == "runs"
    runs = event["runs"]
    assert isinstance(runs, list)
    assert [r["run_id"] for r in runs] == [second, first]  # not the hidden one, newer as it is
    assert runs[0]["job"] == "fail" and runs[0]["exit_code"] == 3 and runs[0]["state"] == "finished"
    assert runs[1]["log"] == f"{runner.logs}/hello/{first}.log"
    assert (
        request_json(runner, {"op": "history", "job": "hello", "limit": 1})[0]["runs"][0]["run_id"] == first
    )

    text = runner.request(b"history\n").decode()
    assert text.splitlines()[0].split()[:3] == ["RUN", "JOB", "USER"]
    assert second in text.splitlines()[1] and hidden not in text

    shown = runner.jobctl("history")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.decode().splitlines()
    assert lines[0].split() == ["RUN", "ID", "JOB", "USER", "STARTED", "DURATION", "EXIT"]
    assert lines[1].split()[:2] == [second, "fail"] and lines[1].split()[-1] == "3"
    assert lines[2].split()[:2] == [first, "hello"] and lines[2].split()[-1] == "0"
    forbidden = runner.jobctl("history", "nogroup-only")
    assert forbidden.returncode == 77, forbidden.stderr


def test_logs_prints_the_redacted_transcript(runner: Runner) -> None:
    run_id = run(runner, "leak")  # prints the key in every plain way: the log has it redacted
    shown = runner.jobctl("logs", run_id)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout and runner.secret.encode() not in shown.stdout and b"***" in shown.stdout
    log = (runner.logs / "leak" / f"{run_id}.log").read_bytes()
    section = log.partition(b"# ---- output\n")[2].rpartition(b"# ---- end\n")[0]
    assert shown.stdout == section
    assert shown.stderr.decode().startswith(f"jobctl: leak (run {run_id}) exited with 0 after ")

    text = runner.request(f"logs {run_id}\n".encode())
    assert text == section + f"jobrunner: leak (run {run_id}) exited with 0 after ".encode() + text[-6:]

    hidden = runner.jobctl("logs", hidden_run(runner))
    assert (
        hidden.returncode == 64 and b"unknown-run" in hidden.stderr and b"secret output" not in hidden.stdout
    )
    bad = runner.jobctl("logs", "../../etc/passwd")
    assert bad.returncode == 64 and b"unknown-run" in bad.stderr


def jobctl_background(runner: Runner, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "trigger", "--socket", str(runner.socket), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_status_and_follow_a_running_job(runner: Runner) -> None:
    holder = runner.connect()  # a run of waiter (it sleeps) that lasts as long as this connection
    holder.sendall(b'{"op": "run", "job": "waiter"}\n')
    accepted = json.loads(holder.makefile("rb").readline())
    run_id = str(accepted["run_id"])
    wait_for((Path(str(accepted["output_dir"])) / "pid").exists, 5, "the job to start")
    try:
        (event,) = request_json(runner, {"op": "status"})
        assert [(r["run_id"], r["state"]) for r in event["runs"]] == [(run_id, "running")]  # type: ignore[union-attr]
        status = runner.jobctl("status")
        assert status.returncode == 0 and run_id in status.stdout.decode()

        still = runner.jobctl("logs", run_id)
        assert (still.returncode, still.stdout) == (0, b"started\n")
        assert b"is still running" in still.stderr

        follower = jobctl_background(runner, "logs", "--follow", run_id)
        time.sleep(1.5)
        assert follower.poll() is None  # still following
    finally:
        holder.close()  # cancels the run: SIGTERM
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 128 + 15, err
    assert out == b"started\n"
    assert f"jobctl: waiter (run {run_id}) cancelled".encode() in err
    assert request_json(runner, {"op": "status"})[0]["runs"] == []
    assert runner.jobctl("status").stderr == b"jobctl: there are no runs in progress that you may see\n"


def test_follow_a_detached_run_to_its_end(runner: Runner) -> None:
    started = runner.jobctl("run", "--detach", "detached")
    run_id = started.stdout.decode().split()[1]
    followed = runner.jobctl("logs", "--follow", run_id, timeout=30)
    assert (followed.returncode, followed.stdout) == (0, b"finished\n"), followed.stderr
    events = [json.loads(line) for line in runner.jobctl("--json", "logs", "-f", run_id).stdout.splitlines()]
    assert [e["event"] for e in events] == ["log", "run"]
    assert events[-1]["exit_code"] == 0 and events[-1]["state"] == "finished"


def test_a_jobs_own_socket_does_not_answer_them(runner: Runner) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(runner.job_sockets / "hello.sock"))
        conn.settimeout(30)
        conn.sendall(b"history\n")
        reply = read_all(conn)
    assert reply.startswith(b"jobrunner: error: bad-request: this is job 'hello''s own socket")
