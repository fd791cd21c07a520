"""`jobctl history`, `jobctl logs` and `jobctl status` under real systemd (252 and 257), as installed: the
front door reads the run logs (under /home here, bound into it read-only by install.sh's drop-in) and
shows a developer the runs of the jobs they may run, and nothing of the others.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Installation, jobs_toml, write_jobs

pytestmark = pytest.mark.e2e

SLEEPER = "e2e-history-sleeper"
RESTRICTED = "e2e-history-restricted"
HISTORY_JOBS = f"""
[jobs.{SLEEPER}]
description = "Says begin, sleeps, says end, exits 5"
command = ["/bin/sh", "-c", "echo begin; sleep 4; echo end; exit 5"]
concurrency = "parallel"

[jobs.{RESTRICTED}]
description = "Only for the group root: not the developer"
command = ["/bin/sh", "-c", "echo restricted output; sleep 4"]
allowed_groups = ["root"]
concurrency = "parallel"
"""


@pytest.fixture(scope="module")
def jobs(installed: Installation) -> Iterator[Installation]:
    write_jobs(installed.container, jobs_toml() + HISTORY_JOBS)
    try:
        yield installed
    finally:
        write_jobs(installed.container, jobs_toml())


def detach(inst: Installation, job: str, user: str | None = None) -> str:
    """Start a run with `jobctl run --detach`; its id."""
    result = inst.jobctl("run", "--detach", job, **({"user": user} if user else {}))
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.decode().splitlines())
    return fields["run_id"]


def events(inst: Installation, *args: str, user: str | None = None) -> list[dict[str, Any]]:
    result = inst.jobctl("--json", *args, **({"user": user} if user else {}))
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def runs(inst: Installation, *args: str, user: str | None = None) -> list[dict[str, Any]]:
    (event,) = events(inst, *args, user=user)
    assert event["event"] == "runs", event
    return list(event["runs"])


def test_a_developer_sees_their_runs_and_their_output(jobs: Installation) -> None:
    ran = jobs.jobctl("--json", "run", "e2e-hello", "history")
    run_id = json.loads(ran.stdout.decode().splitlines()[0])["run_id"]

    shown = jobs.jobctl("history")
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.decode().splitlines()]
    assert rows[0] == ["RUN", "ID", "JOB", "USER", "STARTED", "DURATION", "EXIT"]
    (row,) = [r for r in rows if r[0] == run_id]
    assert row[1:3] == ["e2e-hello", jobs.developer] and row[-1] == "0"
    (record,) = [r for r in runs(jobs, "history", "e2e-hello", "-n", "5") if r["run_id"] == run_id]
    assert (record["state"], record["exit_code"], record["user"]) == ("finished", 0, jobs.developer)
    assert record["log"] == f"{jobs.logs}/e2e-hello/{run_id}.log"

    logs = jobs.jobctl("logs", run_id)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == f"hello history\nkey: {len(jobs.secret)} bytes\n".encode()
    assert logs.stderr.decode().startswith(f"jobctl: e2e-hello (run {run_id}) exited with 0 after ")
    # In the text form too, for socat.
    text = jobs.container.run(
        ["socat", "-t", "60", "-", "UNIX-CONNECT:/run/job.sock"],
        user=jobs.developer,
        input=f"logs {run_id}\n".encode(),
    ).stdout.decode()
    assert re.fullmatch(
        rf"hello history\nkey: \d+ bytes\njobrunner: e2e-hello \(run {run_id}\) exited with 0 after [\d.]+ s\n",
        text,
    ), text


def test_status_shows_a_running_job_and_follow_streams_it_to_its_end(jobs: Installation) -> None:
    run_id = detach(jobs, SLEEPER)
    status = jobs.jobctl("status")
    assert status.returncode == 0, status.stderr
    assert run_id in status.stdout.decode()
    (running,) = [r for r in runs(jobs, "status") if r["run_id"] == run_id]
    assert (running["state"], running["job"], running["exit_code"]) == ("running", SLEEPER, None)

    # Each event stamped as it arrives: `begin` streams long before `end`, and jobctl exits with the job.
    stamped = jobs.container.run(
        [
            "sh",
            "-c",
            f"jobctl --json logs --follow {run_id} | "
            'while read -r line; do printf "%s %s\\n" "$(date +%s.%N)" "$line"; done',  # dash's echo unescapes
        ],
        user=jobs.developer,
    ).stdout.decode()
    arrived = [
        (float(line.split(" ", 1)[0]), json.loads(line.split(" ", 1)[1])) for line in stamped.splitlines()
    ]
    texts = [(at, event.get("text", "")) for at, event in arrived if event["event"] == "log"]
    begin = min(at for at, text in texts if "begin" in text)
    end = min(at for at, text in texts if "end" in text)
    assert end - begin > 2, stamped
    assert arrived[-1][1]["event"] == "run" and arrived[-1][1]["exit_code"] == 5
    assert "".join(text for _, text in texts) == "begin\nend\n"

    again = jobs.jobctl("logs", "--follow", run_id)  # over by now: at once, with its status
    assert (again.returncode, again.stdout) == (5, b"begin\nend\n"), again.stderr
    assert run_id not in jobs.jobctl("status").stdout.decode()


def test_a_run_whose_runner_was_killed_is_not_running(jobs: Installation) -> None:
    run_id = detach(jobs, SLEEPER)
    assert [r["state"] for r in runs(jobs, "status") if r["run_id"] == run_id] == ["running"]
    jobs.container.run(["systemctl", "kill", "--signal=SIGKILL", f"job-{SLEEPER}@*.service"])
    followed = jobs.jobctl("logs", "--follow", run_id)
    assert followed.returncode == 255 and b"never finished" in followed.stderr, followed.stderr
    assert [r for r in runs(jobs, "status") if r["run_id"] == run_id] == []
    (record,) = [r for r in runs(jobs, "history", SLEEPER) if r["run_id"] == run_id]
    assert (record["state"], record["exit_code"]) == ("unfinished", None)


def test_runs_of_a_job_outside_the_developers_groups_are_invisible(jobs: Installation) -> None:
    root_run = detach(jobs, RESTRICTED, user="root")  # root is in the group root
    try:
        assert root_run in [r["run_id"] for r in runs(jobs, "status", user="root")]
        assert root_run not in [r["run_id"] for r in runs(jobs, "status")]
        assert root_run not in jobs.jobctl("status").stdout.decode()
        assert RESTRICTED not in jobs.jobctl("history", "-n", "1000").stdout.decode()
        assert all(r["job"] != RESTRICTED for r in runs(jobs, "history", "-n", "1000"))
        forbidden = jobs.jobctl("history", RESTRICTED)
        assert forbidden.returncode == 77, forbidden.stderr
        for args in (("logs", root_run), ("logs", "--follow", root_run)):
            refused = jobs.jobctl(*args)
            assert refused.returncode == 64 and b"unknown-run" in refused.stderr, refused.stderr
            assert b"restricted output" not in refused.stdout
        assert jobs.jobctl("logs", root_run, user="root").stdout == b"restricted output\n"
    finally:
        jobs.jobctl("logs", "--follow", root_run, user="root")
    # What README says: the file itself stays readable by the developer group, in the logs directory.
    log = jobs.container.run(["cat", f"{jobs.logs}/{RESTRICTED}/{root_run}.log"], user=jobs.developer)
    assert b"restricted output" in log.stdout
