"""What every check of `jobrunner doctor` shares: findings, the context (programs, the clock, jobs.toml
read once), running the checks, and a few names for users, groups and files."""

from __future__ import annotations

import enum
import grp
import os
import pwd
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from runner.config import Config, config_path, parse_file
from runner.errors import RunnerError
from runner.value import Value

FRONT_DOOR_SOCKET = "/run/job.sock"
FRONT_DOOR = "job.socket"
SYSTEMCTL_TIMEOUT_S = 30.0
FALLBACK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Status(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"
    PROBLEM = "problem"


class Finding(Value):
    """One item a check found: its status, what it is, and (for a warning or a problem) how to fix it."""

    __slots__ = ("fix", "message", "status")

    def __init__(self, status: Status, message: str, fix: str | None = None) -> None:
        self.status = status
        self.message = message
        self.fix = fix


class Result(Value):
    """A finding with the name of the check that made it: one line of the output, one object of --json."""

    __slots__ = ("check", "fix", "message", "status")

    def __init__(self, check: str, status: Status, message: str, fix: str | None) -> None:
        self.check = check
        self.status = status
        self.message = message
        self.fix = fix


def ok(message: str) -> Finding:
    return Finding(Status.OK, message)


def warning(message: str, fix: str) -> Finding:
    return Finding(Status.WARNING, message, fix)


def problem(message: str, fix: str) -> Finding:
    return Finding(Status.PROBLEM, message, fix)


class NotChecked(Exception):
    """A check could not look (jobs.toml unreadable, say): reported as a problem of that check."""


# ------------------------------------------------------------------------------------ programs


class Completed(Value):
    __slots__ = ("returncode", "stderr", "stdout")

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class Run(Protocol):
    def __call__(self, argv: Sequence[str], timeout: float, *, discard_output: bool = False) -> Completed: ...


def run_program(argv: Sequence[str], timeout: float, *, discard_output: bool = False) -> Completed:
    """`argv` with a minimal environment; `discard_output`: its stdout goes to /dev/null, never through
    this process (a decrypted credential)."""
    try:
        res = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if discard_output else subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": os.environ.get("PATH") or FALLBACK_PATH, "LANG": "C.UTF-8"},
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        return Completed(127, "", f"{argv[0]} not found")
    except subprocess.TimeoutExpired:
        return Completed(124, "", f"{argv[0]} did not finish within {timeout:g} s")
    out = res.stdout.decode(errors="replace") if res.stdout is not None else ""
    return Completed(res.returncode, out, res.stderr.decode(errors="replace"))


class Context:
    """What the checks share: how to run programs, the clock, and jobs.toml, read once."""

    def __init__(self, run: Run = run_program, now: Callable[[], float] = time.time) -> None:
        self.run = run
        self.now = now
        self._config: Config | None = None
        self._config_failed = False

    def config(self) -> Config:
        if self._config is None and not self._config_failed:
            try:
                self._config = parse_file(config_path())
            except RunnerError:
                self._config_failed = True
        if self._config is None:
            raise NotChecked(f"not checked: {config_path()} cannot be read (see the check 'configuration')")
        return self._config

    def systemctl(self, *args: str) -> Completed:
        return self.run(["systemctl", *args], SYSTEMCTL_TIMEOUT_S)


Check = Callable[[Context], list[Finding]]
Stat = Callable[[str], os.stat_result]  # os.stat or os.lstat; tests give others


def run_checks(checks: Sequence[tuple[str, Check]], ctx: Context) -> Iterator[Result]:
    """Each check's findings in order; a check that raises is one problem of that check."""
    for name, check in checks:
        try:
            findings = check(ctx)
        except NotChecked as e:
            findings = [
                problem(str(e), "fix what the check it names reports, then run jobrunner doctor again")
            ]
        except Exception as e:  # a bug in one check must not hide the others' findings
            findings = [
                problem(
                    f"the check failed: {type(e).__name__}: {e}",
                    "a bug in jobrunner doctor, or something very unusual here: report it with this line",
                )
            ]
        for finding in findings:
            yield Result(name, finding.status, finding.message, finding.fix)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def read_text(path: str | Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def said(res: Completed) -> str:
    text = " ".join((res.stderr or res.stdout).split())
    return f"{text[:200] or 'no output'} (exit status {res.returncode})"
