"""Bringing systemd in line with jobs.toml after a change: the generator (runner.generator) writes the
jobs' units at `systemctl daemon-reload`; what a generator may not do, this does next: start the
sockets of the jobs that are new, and stop those of jobs that are gone.

Runs in progress are not touched: a daemon-reload leaves running units alone, and stopping a job's
socket does not stop the runs it started (each is a unit of its own, job-NAME@N-PID-UID.service).
"""

from __future__ import annotations

import os
import subprocess

from runner.config import Config
from runner.errors import RunnerError
from runner.units import socket_unit

SYSTEMCTL_TIMEOUT_S = 120.0
EX_UNAVAILABLE = 69


class SystemdError(RunnerError):
    code = "systemd"
    exit_status = EX_UNAVAILABLE


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")  # sd_booted(3)


def apply_units(config: Config) -> list[str]:
    """daemon-reload, then start every job's socket and stop the sockets of removed jobs; returns what
    changed, as lines to show."""
    _systemctl("daemon-reload")
    wanted = [socket_unit(name) for name in config.jobs]
    done = []
    if wanted:
        _systemctl("start", *wanted)
    listed = _systemctl("list-units", "--all", "--plain", "--no-legend", "--state=not-found", "job-*.socket")
    # UNIT LOAD ACTIVE SUB DESCRIPTION: a job's socket still listening, though its unit file is gone.
    rows = [line.split() for line in listed.splitlines()]
    stale = [row[0] for row in rows if len(row) > 2 and row[0].endswith(".socket") and row[2] == "active"]
    if stale:
        # A concurrent reload (jobrunner-config.path) may have stopped them first: that is fine.
        _systemctl("stop", *stale, tolerate=True)
        done.append(f"stopped the sockets of removed jobs: {', '.join(stale)}")
    done.append(f"the units of {len(wanted)} job(s) are in place; their sockets listen")
    return done


def _systemctl(*args: str, tolerate: bool = False) -> str:
    try:
        res = subprocess.run(
            ["systemctl", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SYSTEMCTL_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise SystemdError("systemctl not found", "jobrunner needs systemd 252 or later") from None
    except subprocess.TimeoutExpired:
        raise SystemdError(f"systemctl {args[0]} did not finish in {SYSTEMCTL_TIMEOUT_S:g} s", "") from None
    if res.returncode != 0 and not tolerate:
        said = res.stderr.decode(errors="replace").strip()
        raise SystemdError(
            f"systemctl {' '.join(args)} failed (exit status {res.returncode})"
            + (f": {said}" if said else ""),
            "see: journalctl -b -u 'job-*' -n 50",
        )
    return res.stdout.decode(errors="replace")
