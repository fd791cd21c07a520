"""`jobrunner doctor` itself: the checks in order, the parser, the text and JSON output."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from typing import TypeVar

from runner import apply, creds
from runner.doctor.access import check_admins, check_polkit, check_socket, check_writable
from runner.doctor.base import Check, Context, Result, Status, run_checks
from runner.doctor.credentials import check_credentials
from runner.doctor.installation import check_outputs, check_security, check_units
from runner.doctor.probes import check_configuration, check_firewall, check_memory, check_systemd, check_tasks

EX_PROBLEM = 1  # a problem was found (0: none; warnings allowed)


CHECKS: tuple[tuple[str, Check], ...] = (
    ("systemd", check_systemd),
    ("configuration", check_configuration),
    ("firewall", check_firewall),
    ("tasks-limit", check_tasks),
    ("memory-limit", check_memory),
    ("credentials", check_credentials),
    ("socket", check_socket),
    ("polkit", check_polkit),
    ("admins", check_admins),
    ("writable", check_writable),
    ("units", check_units),
    ("outputs", check_outputs),
    ("security", check_security),
)

DESCRIPTION = """\
Check this installation as it is, not as the configuration says it should be, and print each item as
ok, warning or problem, with the fix for each warning and problem:
  systemd        its version
  configuration  jobs.toml parses
  firewall       whether this host enforces IPAddressDeny= (a probe unit), and the jobs that rely on it
  tasks-limit    whether it enforces TasksMax= (a probe unit), and the jobs that rely on it
  memory-limit   whether it enforces MemoryMax= (a probe unit), and the jobs that rely on it
  credentials    the store's and each file's mode and owner; that each decrypts (to /dev/null: values
                 are never shown), its key, its expiry date; the jobs and APIs that use it; those
                 no one uses, and those named but not stored
  socket         /run/job.sock and the jobs' sockets: root:GROUP 0660; the group and its members
  polkit         polkit rules that grant starting units (anyone with it can load any credential)
  admins         members of sudo, wheel and admin (root can read every key)
  writable       anyone but root who can change the units, drop-ins, generator, code, jobs.toml or
                 its parsed copy, also through a directory above them
  units          the units systemd has loaded match jobs.toml: none missing, none stale
  outputs        outputs and logs: the group's only (2770), and their free space
  security       systemd-analyze security of each unit against the figures README promises
The probes are transient units of a few seconds at most (jobrunner-doctor-*), removed when they end.
Must be run as root.
"""

EPILOG = """\
--json prints a list of objects {"check", "status", "message", "fix"}: status is "ok", "warning" or
"problem"; fix is null for ok.

exit status:
  0    no problem found (warnings allowed)
  1    at least one problem
  64   usage error
  69   systemd is not running on this machine
  77   not run as root
  130  interrupted
"""

P = TypeVar("P", bound=argparse.ArgumentParser)


def add_parser(commands: argparse._SubParsersAction[P]) -> None:
    """`jobrunner doctor` in the admin command's parser (runner/admin.py)."""
    parser = commands.add_parser(
        "doctor",
        help="check this installation and say what to fix (root)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON, for monitoring")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    creds.require_root("jobrunner doctor")
    if not apply.systemd_running():
        raise apply.SystemdError("systemd is not running on this machine", "jobrunner needs systemd as PID 1")
    results = []
    width = max(len(name) for name, _ in CHECKS)
    for result in run_checks(CHECKS, Context()):
        results.append(result)
        if not args.json:
            print(format_result(result, width), flush=True)
    print(format_json(results) if args.json else summary(results))
    return exit_status(results)


def format_result(result: Result, width: int) -> str:
    line = f"{result.status:<7}  {result.check:<{width}}  {result.message}"
    if result.fix is None:
        return line
    return f"{line}\n{'':<7}  {'':<{width}}  fix: {result.fix}"


def format_json(results: Sequence[Result]) -> str:
    shown = [{"check": r.check, "status": str(r.status), "message": r.message, "fix": r.fix} for r in results]
    return json.dumps(shown, indent=2)


def summary(results: Sequence[Result]) -> str:
    counts = {status: sum(r.status is status for r in results) for status in Status}
    return (
        f"\nsummary: {counts[Status.PROBLEM]} problem(s), {counts[Status.WARNING]} warning(s), "
        f"{counts[Status.OK]} ok"
    )


def exit_status(results: Iterable[Result]) -> int:
    return EX_PROBLEM if any(r.status is Status.PROBLEM for r in results) else 0
