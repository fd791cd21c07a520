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
from runner.handoff import JOB_SOCKETS_DIR
from runner.units import API_SOCKETS_DIR, api_socket_unit, socket_unit

SYSTEMCTL_TIMEOUT_S = 120.0
EX_UNAVAILABLE = 69


class SystemdError(RunnerError):
    code = "systemd"
    exit_status = EX_UNAVAILABLE


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")  # sd_booted(3)


def daemon_reload() -> None:
    _systemctl("daemon-reload")


def apply_units(config: Config) -> list[str]:
    """daemon-reload, then start every job's socket and stop the sockets of removed jobs; returns what
    changed, as lines to show."""
    daemon_reload()
    wanted = [api_socket_unit(name) for name in config.apis] + [socket_unit(name) for name in config.jobs]
    done = []
    if wanted:
        _systemctl("start", *wanted)
    listed = _systemctl(
        "list-units", "--all", "--plain", "--no-legend", "job-*.socket", "jobrunner-api-*.socket"
    )
    loaded = {word for line in listed.splitlines() for word in line.split() if word.endswith(".socket")}
    # A job's socket still there though its unit file is gone (LoadState=not-found): a removed job's.
    stale = [
        unit
        for unit in sorted(loaded - set(wanted))
        if _systemctl("show", "-P", "LoadState", unit, tolerate=True).strip() == "not-found"
    ]
    if stale:
        # A concurrent reload (jobrunner-config.path) may have stopped them first: that is fine.
        _systemctl("stop", *stale, tolerate=True)
        done.append(f"stopped the sockets of removed jobs and APIs: {', '.join(stale)}")
    done += _remove_dead_sockets(JOB_SOCKETS_DIR, set(config.jobs), "jobs")
    done += _remove_dead_sockets(API_SOCKETS_DIR, set(config.apis), "APIs")
    apis = f" and {len(config.apis)} API(s)" if config.apis else ""
    done.append(f"the units of {len(config.jobs)} job(s){apis} are in place; their sockets listen")
    return done


def _remove_dead_sockets(directory: str, names: set[str], what: str) -> list[str]:
    """Socket files of removed jobs (or APIs) that nothing listens on: systemd 257 unloads a socket unit
    whose generated file is gone without stopping it, so RemoveOnStop= never runs for it."""
    import _socket

    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    for name in entries:
        path = os.path.join(directory, name)
        if not name.endswith(".sock") or name.removesuffix(".sock") in names:
            continue
        probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            probe.close()
    return [f"removed the dead sockets of removed {what}: {', '.join(removed)}"] if removed else []


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
