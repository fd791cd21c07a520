"""`jobrunner doctor`: the installation audits itself (issue #14).

Each check looks at what is, not at what the configuration says should be: the modes and owners of the
files, what systemd has loaded, what `systemd-analyze security` rates, and, for the protections the
jobs' units ask for (IPAddressDeny=, TasksMax=, MemoryMax=), what this host really enforces, found by
probing with short-lived transient units rather than guessed from the version: a container or a kernel
without a cgroup controller accepts those settings and ignores them.

A check is a function from a Context to Findings (ok, warning or problem, with the fix for the last two);
`run_checks` runs them in order and reports a check that raised as a problem of that check, never as a
traceback. No check ever holds a credential's value: `systemd-creds decrypt` writes it to /dev/null.
"""

from __future__ import annotations

import argparse
import enum
import grp
import json
import os
import pwd
import re
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

from runner import apply, creds
from runner.config import Config, Network, config_path, parse_file
from runner.config_cache import DEFAULT_CACHE_PATH
from runner.errors import RunnerError
from runner.handoff import JOB_SOCKETS_DIR
from runner.units import (
    API_TEMPLATE_NAME,
    TEMPLATE_NAME,
    Unit,
    render,
    template_path,
)
from runner.value import Value

EX_PROBLEM = 1  # a problem was found (0: none; warnings allowed)

# What install.sh installs (INSTALL.md): only root may change any of it.
LIBDIR = "/usr/local/lib/jobrunner"
UNITDIR = "/usr/local/lib/systemd/system"
GENERATOR = "/usr/local/lib/systemd/system-generators/jobrunner-generator"
ADMIN_COMMAND = "/usr/local/sbin/jobrunner"
SYSTEM_UNITS = "/etc/systemd/system"
CONFDIR = "/etc/jobrunner"
TMPFILES = "/etc/tmpfiles.d/jobrunner.conf"  # creates the outputs and logs, as root, at every boot
SYSUSERS = "/etc/sysusers.d/jobrunner.conf"
GENERATOR_DIR = "/run/systemd/generator"  # the system manager's "normal" generator directory
FRONT_DOOR_SOCKET = "/run/job.sock"
FRONT_DOOR = "job.socket"
CONFIG_WATCH = "jobrunner-config.path"
# Not a job's name (those start with a letter): job@0.service is the front door, never an operator's unit.
FRONT_DOOR_SERVICE = "job@0.service"
POLKIT_RULE_DIRS = ("/etc/polkit-1/rules.d", "/usr/share/polkit-1/rules.d")
POLKIT_PKLA_DIRS = ("/etc/polkit-1/localauthority", "/var/lib/polkit-1/localauthority")
# Whoever polkit grants these can start a unit that loads any credential (LoadCredentialEncrypted=).
POLKIT_ACTIONS = ("org.freedesktop.systemd1.manage-units", "org.freedesktop.systemd1.manage-unit-files")
POLKIT_WILDCARD = "org.freedesktop.systemd1.*"  # pkla's Action= takes globs
ADMIN_GROUPS = ("sudo", "wheel", "admin")

MIN_SYSTEMD = 252
EXPIRY_WARNING_S = 14 * 86400
FAR_FUTURE_S = 100 * 365 * 86400  # a credential still valid then has no expiry date worth the name
EXPIRY_PRECISION_S = 3600
FREE_BYTES_MIN = 1 << 30
FREE_FRACTION_MIN = 0.05
MAX_LISTED = 20  # writable paths shown one by one; the rest are counted

# README's "Security": the exposure systemd-analyze security may rate each unit at, at most.
JOB_EXPOSURE = 1.2
OFFLINE_EXPOSURE = 0.6  # network = "none"
OFFLINE_API_EXPOSURE = 0.8  # network = "none" with apis (AF_INET for the endpoints)
FRONT_DOOR_EXPOSURE = 0.6
API_EXPOSURE = 1.2

SYSTEMCTL_TIMEOUT_S = 30.0
DECRYPT_TIMEOUT_S = 60.0  # a TPM2 can take seconds
# A probe takes well under a second; these bound the worst case, on a host so loaded that starting
# python3 takes seconds. RuntimeMaxSec= of a probe unit: systemd stops it even if we are gone.
PROBE_RUNTIME_S = 30
# And then SIGKILL: systemd on cgroup v1 in a container never hears that a unit's last process is gone,
# and would wait the default 90 s for anything a probe left.
PROBE_STOP_S = 2
PROBE_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 1.0  # a connection on loopback takes microseconds; a dropped SYN never completes
FALLBACK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_KEY_ONLY = "5a1c6a86df9d4096b1d5a65e0862f19a"  # runner.creds.KEY_TYPES: the host key, no TPM2
HOST_KEY_NOTE = "not located on encrypted media"  # systemd-creds' warning on every use of the host key


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


# -------------------------------------------------------------------------------------- systemd


def check_systemd(ctx: Context) -> list[Finding]:
    res = ctx.run(["systemctl", "--version"], SYSTEMCTL_TIMEOUT_S)
    first = res.stdout.splitlines()[0] if res.stdout else ""
    match = re.match(r"systemd (\d+)", first)
    if res.returncode != 0 or not match:
        return [problem(f"systemctl --version failed: {res.stderr.strip()}", "jobrunner needs systemd 252+")]
    if int(match.group(1)) < MIN_SYSTEMD:
        return [problem(f"{first}: jobrunner needs {MIN_SYSTEMD} or newer", "upgrade to Debian 12 or later")]
    return [ok(first)]


def check_configuration(ctx: Context) -> list[Finding]:
    try:
        config = parse_file(config_path())
    except RunnerError as e:  # its message quotes no more of the file than a run's error would
        return [problem(e.message, e.hint or "sudo jobrunner check")]
    return [
        ok(f"{config.path}: {len(config.jobs)} job(s), {len(config.apis)} API(s); project {config.project}")
    ]


# --------------------------------------------------------------------------------------- probes


class Enforced(enum.Enum):
    YES = "enforced"
    NO = "not enforced"
    UNKNOWN = "unknown"


class Probe(Value):
    """What a probe unit showed: whether the setting is enforced, and the evidence, in words."""

    __slots__ = ("detail", "enforced")

    def __init__(self, enforced: Enforced, detail: str) -> None:
        self.enforced = enforced
        self.detail = detail


FIREWALL_PROBE = f"""\
import socket
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
client = socket.socket()
client.settimeout({CONNECT_TIMEOUT_S})
try:
    client.connect(server.getsockname())
    print("connected")
except (TimeoutError, PermissionError):
    print("blocked")
except OSError as e:
    print("error", e.errno)
"""

TASKS_PROBE_LIMIT = 4
TASKS_PROBE = """\
import os, signal
children, refused = [], 0
for _ in range(8):
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        continue
    if pid == 0:
        signal.pause()
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print("started", len(children), "refused", refused)
"""

MEMORY_PROBE_LIMIT = "64M"
MEMORY_PROBE = """\
print("started", flush=True)
chunks = []
try:
    for _ in range(16):
        chunks.append(b"x" * (16 << 20))  # written, so really resident: 256 MiB in all
except MemoryError:
    print("refused", flush=True)
else:
    print("survived", flush=True)
"""


def probe_unit(ctx: Context, kind: str, properties: Sequence[str], code: str) -> Completed:
    """Run `code` with python3 in a transient unit with `properties`: a unique name, collected even when
    it fails, stopped by systemd after PROBE_RUNTIME_S (and killed PROBE_STOP_S later) whatever happens
    to us."""
    unit = f"jobrunner-doctor-{kind}-{secrets.token_hex(4)}.service"
    argv = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect", f"--unit={unit}"]
    argv += ["-p", f"RuntimeMaxSec={PROBE_RUNTIME_S}", "-p", f"TimeoutStopSec={PROBE_STOP_S}"]
    for prop in properties:
        argv += ["-p", prop]
    res = ctx.run([*argv, python(), "-I", "-S", "-c", code], PROBE_TIMEOUT_S)
    if res.returncode == 124:  # our timeout: systemd-run is gone, its unit may not be
        ctx.systemctl("stop", unit)
    return res


def python() -> str:
    return sys.executable if os.path.isabs(sys.executable or "") else "/usr/bin/python3"


def probe_firewall(ctx: Context) -> Probe:
    """A listener on 127.0.0.1 and a connection to it in one unit: with IPAddressDeny=any it must fail,
    without it (the control) it must succeed."""
    control = probe_unit(ctx, "firewall-control", (), FIREWALL_PROBE)
    denied = probe_unit(ctx, "firewall", ("IPAddressDeny=any",), FIREWALL_PROBE)
    return firewall_verdict(control, denied)


def firewall_verdict(control: Completed, denied: Completed) -> Probe:
    if control.stdout.split()[:1] != ["connected"]:
        return Probe(Enforced.UNKNOWN, f"the control probe could not connect either: {said(control)}")
    verdict = denied.stdout.split()[:1]
    if verdict == ["blocked"]:
        return Probe(
            Enforced.YES, "a unit with IPAddressDeny=any could not reach its own listener on 127.0.0.1"
        )
    if verdict == ["connected"]:
        return Probe(Enforced.NO, "a unit with IPAddressDeny=any reached its own listener on 127.0.0.1")
    return Probe(Enforced.UNKNOWN, f"the probe unit with IPAddressDeny=any failed: {said(denied)}")


def probe_tasks(ctx: Context) -> Probe:
    return tasks_verdict(probe_unit(ctx, "tasks", (f"TasksMax={TASKS_PROBE_LIMIT}",), TASKS_PROBE))


def tasks_verdict(res: Completed) -> Probe:
    match = re.fullmatch(r"started (\d+) refused (\d+)", res.stdout.strip())
    if not match:
        return Probe(Enforced.UNKNOWN, f"the probe unit failed: {said(res)}")
    started, refused = match.groups()
    seen = f"a unit with TasksMax={TASKS_PROBE_LIMIT} started {started} more processes, {refused} refused"
    return Probe(Enforced.YES if int(refused) else Enforced.NO, seen)


def probe_memory(ctx: Context) -> Probe:
    properties = (f"MemoryMax={MEMORY_PROBE_LIMIT}", "MemorySwapMax=0")  # no swap to escape to
    return memory_verdict(probe_unit(ctx, "memory", properties, MEMORY_PROBE))


def memory_verdict(res: Completed) -> Probe:
    lines = res.stdout.split()
    unit = f"a unit with MemoryMax={MEMORY_PROBE_LIMIT}"
    if lines[:1] != ["started"]:
        return Probe(Enforced.UNKNOWN, f"the probe unit failed: {said(res)}")
    if "survived" in lines:
        return Probe(Enforced.NO, f"{unit} filled 256 MiB")
    if "refused" in lines:
        return Probe(Enforced.YES, f"{unit} could not allocate 256 MiB")
    if res.returncode != 0:
        return Probe(Enforced.YES, f"{unit} was killed filling 256 MiB")
    return Probe(Enforced.UNKNOWN, f"the probe unit ended without a verdict: {said(res)}")


def said(res: Completed) -> str:
    text = " ".join((res.stderr or res.stdout).split())
    return f"{text[:200] or 'no output'} (exit status {res.returncode})"


class Protection(Value):
    """A setting of the units that this host may ignore, and what that costs the jobs that rely on it."""

    __slots__ = ("defaults", "fix", "reliance", "what")

    def __init__(self, what: str, reliance: str, fix: str, defaults: str = "") -> None:
        self.what = what
        self.reliance = reliance  # "job 'x' ... <reliance>, and this host does not enforce it"
        self.fix = fix
        self.defaults = defaults  # the limits every unit gets anyway: a warning, not a problem


FIREWALL = Protection(
    "IPAddressDeny= (the jobs' IP firewall)",
    "relies on it to keep link-local (cloud metadata) or unlisted addresses out",
    'systemd needs cgroup v2 and BPF (CONFIG_CGROUP_BPF); or give the jobs network = "none"',
)
TASKS = Protection(
    "TasksMax= (process limits)",
    "relies on it to contain a fork bomb",
    "systemd needs the pids cgroup controller (cgroup v2; some containers lack it)",
    "install.sh's --tasks-max and the API proxies' TasksMax=",
)
MEMORY = Protection(
    "MemoryMax= (memory limits)",
    "relies on it to contain its memory use",
    "systemd needs the memory cgroup controller (cgroup v2; some containers lack it)",
    "install.sh's --memory-max and the API proxies' MemoryMax=",
)


def check_firewall(ctx: Context) -> list[Finding]:
    """Every job but those with network = "none" (a network of their own) relies on the firewall, and so
    do the API proxies (no link-local addresses)."""
    config = ctx.config()
    relying = [
        f"job '{job.name}' (network = {network_words(job.sandbox.network)})"
        for job in config.jobs.values()
        if job.sandbox.network is not Network.NONE
    ]
    relying += [f"the proxy of API '{name}'" for name in config.apis]
    return protection_findings(probe_firewall(ctx), FIREWALL, relying)


def network_words(network: Network) -> str:
    return "[addresses]" if network is Network.LISTED else f'"{network}"'


def check_tasks(ctx: Context) -> list[Finding]:
    jobs = ctx.config().jobs.values()
    relying = [f"job '{j.name}' (tasks_max = {j.sandbox.tasks_max})" for j in jobs if j.sandbox.tasks_max]
    return protection_findings(probe_tasks(ctx), TASKS, relying)


def check_memory(ctx: Context) -> list[Finding]:
    jobs = ctx.config().jobs.values()
    relying = [f"job '{j.name}' (memory_max = {j.sandbox.memory_max})" for j in jobs if j.sandbox.memory_max]
    return protection_findings(probe_memory(ctx), MEMORY, relying)


def protection_findings(probe: Probe, protection: Protection, relying: Sequence[str]) -> list[Finding]:
    """ok when enforced; else a warning that says so, and a problem for each unit that relies on it."""
    what = protection.what
    if probe.enforced is Enforced.YES:
        return [ok(f"{what} is enforced here: {probe.detail}")]
    if probe.enforced is Enforced.UNKNOWN:
        return [
            warning(
                f"could not tell whether {what} is enforced: {probe.detail}", "run jobrunner doctor again"
            )
        ]
    fix = protection.fix
    said = f"{what} is not enforced on this host: {probe.detail}"
    if protection.defaults:
        said += f"; {protection.defaults} have no effect"
    findings = [warning(said, fix)]
    findings += [
        problem(f"{unit} {protection.reliance}, and this host does not enforce it", fix) for unit in relying
    ]
    return findings


# ---------------------------------------------------------------------------------- credentials


def credential_users(config: Config) -> dict[str, list[str]]:
    """credential name -> the jobs and APIs that name it."""
    users: dict[str, list[str]] = {}
    for job in config.jobs.values():
        for name in job.credentials:
            users.setdefault(name, []).append(f"job '{job.name}'")
    for api in config.apis.values():
        users.setdefault(api.credential, []).append(f"API '{api.name}'")
    return users


def check_credentials(ctx: Context) -> list[Finding]:
    config = ctx.config()
    store = creds.CredentialStore.from_environment()
    findings = store_directory_findings(store.directory)
    listed = store.list_credentials()
    stored = [c for c in listed if c.size is not None]
    users = credential_users(config)
    tpm2 = ctx.run(["systemd-creds", "has-tpm2"], SYSTEMCTL_TIMEOUT_S).returncode == 0
    for cred in stored:
        findings += credential_findings(
            ctx, store.directory / cred.name, cred.name, users.get(cred.name), tpm2
        )
    for cred in listed:
        if cred.has_dropin:
            findings.append(
                problem(
                    f"a legacy drop-in loads '{cred.name}' into every run: {store.dropin_dir}",
                    f"sudo jobrunner creds set {cred.name} (or run install.sh again): it removes the drop-in",
                )
            )
    for name in sorted(set(users) - {c.name for c in stored}):
        findings.append(
            problem(
                f"'{name}' is not stored, but {', '.join(users[name])} name(s) it: their runs fail",
                f"sudo jobrunner creds set {name}, or remove it from jobs.toml",
            )
        )
    return findings or [ok(f"no credentials stored in {store.directory}, and no job or API names one")]


def store_directory_findings(directory: Path) -> list[Finding]:
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return []
    issues = mode_issues(st, 0o700, directory=True)
    if issues:
        return [
            problem(
                f"{directory}: {'; '.join(issues)}", f"chown root:root {directory}; chmod 0700 {directory}"
            )
        ]
    return []


def mode_issues(st: os.stat_result, mode: int, *, directory: bool) -> list[str]:
    """What is wrong with a root-only file or directory (`mode` is what install.sh makes it)."""
    issues = []
    if directory and not stat.S_ISDIR(st.st_mode):
        issues.append("not a directory")
    if not directory and not stat.S_ISREG(st.st_mode):
        issues.append("not a regular file")
    if st.st_uid != 0 or st.st_gid != 0:
        issues.append(f"owned by {user_name(st.st_uid)}:{group_name(st.st_gid)}, not root:root")
    if stat.S_IMODE(st.st_mode) & 0o077:
        issues.append(f"mode {stat.S_IMODE(st.st_mode):04o}, not {mode:04o}: others can read it")
    return issues


def credential_findings(
    ctx: Context, path: Path, name: str, users: list[str] | None, tpm2: bool
) -> list[Finding]:
    """The credential's own line (does it decrypt, with which key, until when, for whom), then its issues."""
    key = creds._key_used(path)  # the file's header names the key that sealed it
    decrypts, reason = decrypt(ctx, path, name)
    used = f"used by {', '.join(users)}" if users else "used by no job or API"
    if not decrypts:
        what = "it has expired" if expired(reason) else reason
        findings = [
            problem(
                f"'{name}' does not decrypt: {what}; {used}",
                f"store it again: sudo jobrunner creds set {name}",
            )
        ]
    else:
        until, soon = expiry(ctx, path, name)
        findings = [ok(f"'{name}': decrypts; sealed with {describe(key)}; {until}; {used}")]
        if soon:
            findings.append(
                warning(f"'{name}' {until}", f"store a new value: sudo jobrunner creds set {name}")
            )
    findings += file_findings(path, name)
    findings += key_findings(name, key, tpm2)
    if not users:
        findings.append(
            warning(
                f"'{name}' is stored, but no job's credentials and no [apis.NAME] name it",
                f"remove it (sudo jobrunner creds rm {name}), or name it in jobs.toml",
            )
        )
    return findings


def file_findings(path: Path, name: str) -> list[Finding]:
    issues = mode_issues(os.lstat(path), 0o600, directory=False)
    if not issues:
        return []
    return [problem(f"'{name}' ({path}): {'; '.join(issues)}", f"chown root:root {path}; chmod 0600 {path}")]


def key_findings(name: str, key: str, tpm2: bool) -> list[Finding]:
    if key == creds.NULL_KEY:
        return [
            problem(
                f"'{name}' is sealed with the null key: anyone can decrypt it",
                f"sudo jobrunner creds set {name}",
            )
        ]
    if tpm2 and key == HOST_KEY_ONLY:
        return [
            warning(
                f"'{name}' is sealed with the host key only, though this host has a TPM2",
                f"store it again (sudo jobrunner creds set {name}): it is then bound to the TPM2 too",
            )
        ]
    return []


def describe(key: str) -> str:
    return creds.KEY_TYPES.get(key, "an unknown key")


def decrypt(ctx: Context, path: Path, name: str, at: float | None = None) -> tuple[bool, str]:
    """Whether systemd-creds decrypts the credential (as of `at`: --timestamp=), and why not. Its output,
    the value, goes to /dev/null."""
    argv = ["systemd-creds", "decrypt", f"--name={name}"]
    if at is not None:
        argv.append(f"--timestamp=@{int(at)}")
    res = ctx.run([*argv, str(path), "-"], DECRYPT_TIMEOUT_S, discard_output=True)
    lines = [line for line in res.stderr.splitlines() if line.strip() and HOST_KEY_NOTE not in line]
    return res.returncode == 0, " ".join(lines)[:300] or f"exit status {res.returncode}"


def expired(reason: str) -> bool:
    return "time passed" in reason  # systemd-creds: "Credential's time passed, refusing to use."


def expiry(ctx: Context, path: Path, name: str) -> tuple[str, bool]:
    """When the credential expires, in words, and whether that is within EXPIRY_WARNING_S. The file does
    not say (its not-after date is encrypted, and systemd-creds has no command that shows it): decrypting
    as of a later time (--timestamp=) does, bisected to the hour."""
    now = ctx.now()
    soon = now + EXPIRY_WARNING_S
    valid_then, reason = decrypt(ctx, path, name, soon)
    low, high = (soon, now + FAR_FUTURE_S) if valid_then else (now, soon)
    if valid_then:
        valid, reason = decrypt(ctx, path, name, high)
        if valid:
            return "no expiry date", False
    if not expired(reason):
        return f"expiry date unknown ({reason})", False
    when = bisect_expiry(ctx, path, name, low, high)
    if when is None:
        return "expiry date unknown", False
    return f"expires around {when_words(when)}", not valid_then


def bisect_expiry(ctx: Context, path: Path, name: str, low: float, high: float) -> float | None:
    """The time the credential expires, within EXPIRY_PRECISION_S: valid at `low`, expired at `high`."""
    while high - low > EXPIRY_PRECISION_S:
        middle = (low + high) / 2
        valid, reason = decrypt(ctx, path, name, middle)
        if valid:
            low = middle
        elif expired(reason):
            high = middle
        else:
            return None
    return high


def when_words(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:00 %Z")


# ------------------------------------------------------------------------------------- socket


def socket_group(ctx: Context) -> str:
    """job.socket's SocketGroup= as systemd has it (install.sh's --group): the developer group."""
    return ctx.systemctl("show", "-P", "SocketGroup", FRONT_DOOR).stdout.strip() or "root"


def check_socket(ctx: Context) -> list[Finding]:
    config = ctx.config()
    name = socket_group(ctx)
    try:
        group = grp.getgrnam(name)
    except KeyError:
        return [
            problem(f"the socket's group '{name}' does not exist", "run install.sh again (it creates it)")
        ]
    paths = [FRONT_DOOR_SOCKET, *(f"{JOB_SOCKETS_DIR}/{job}.sock" for job in config.jobs)]
    findings = [socket_findings(path, group) for path in paths]
    people = [m for m in members(group) if m != "root"]
    if people:
        findings.append(ok(f"group '{name}' (may connect): {', '.join(people)}"))
    else:
        findings.append(
            warning(
                f"no one is in group '{name}': no developer can run a job", f"sudo usermod -aG {name} USER"
            )
        )
    return findings


def socket_findings(path: str, group: grp.struct_group, lstat: Stat = os.lstat) -> Finding:
    fix = "sudo jobrunner reload; a drop-in in /etc/systemd/system/job.socket.d/ may override install.sh's"
    try:
        st = lstat(path)
    except FileNotFoundError:
        return problem(f"{path} is missing: no one can connect", fix)
    issues = []
    if not stat.S_ISSOCK(st.st_mode):
        issues.append("not a socket")
    if st.st_uid != 0:
        issues.append(f"owned by {user_name(st.st_uid)}")
    if st.st_gid != group.gr_gid:
        issues.append(f"group {group_name(st.st_gid)}, not {group.gr_name}")
    if stat.S_IMODE(st.st_mode) != 0o660:
        issues.append(f"mode {stat.S_IMODE(st.st_mode):04o}, not 0660")
    if issues:
        return problem(f"{path}: {'; '.join(issues)}", fix)
    return ok(f"{path}: root:{group.gr_name} 0660")


def members(group: grp.struct_group) -> list[str]:
    """Everyone in `group`: its listed members and the users whose primary group it is."""
    primary = {user.pw_name for user in pwd.getpwall() if user.pw_gid == group.gr_gid}
    return sorted(set(group.gr_mem) | primary)


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


# ------------------------------------------------------------------------ who else could read a key


def check_polkit(ctx: Context) -> list[Finding]:
    developers = developer_names(ctx)
    findings = []
    for path, action in polkit_grants(POLKIT_RULE_DIRS, POLKIT_PKLA_DIRS):
        text = read_text(path)
        named = sorted(name for name in developers if mentions(text, name))
        if named:
            findings.append(
                problem(
                    f"{path} grants {action} and names {', '.join(named)} (the developers): they can start a "
                    "unit that loads any credential",
                    f"remove that grant from {path}",
                )
            )
        else:
            findings.append(
                warning(
                    f"{path} mentions {action}: whoever it grants that can start a unit that loads "
                    "any credential",
                    "make sure it grants it to administrators only",
                )
            )
    return findings or [ok("no polkit rule grants org.freedesktop.systemd1.manage-units")]


def developer_names(ctx: Context) -> set[str]:
    """The developer group's name and its members: a polkit rule naming any of them grants developers."""
    name = socket_group(ctx)
    try:
        group = grp.getgrnam(name)
    except KeyError:
        return {name}
    return {name, *members(group)} - {"root"}


def mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text) is not None


def polkit_grants(rule_dirs: Iterable[str], pkla_dirs: Iterable[str]) -> list[tuple[str, str]]:
    """(file, action) for each polkit rule (.rules) or local authority file (.pkla) that mentions an
    action which lets its subject start units. A text search: what the rule grants, and to whom, is
    JavaScript, and only polkit runs it."""
    files = [p for d in rule_dirs for p in sorted(Path(d).glob("*.rules"))]
    files += [p for d in pkla_dirs for p in sorted(Path(d).rglob("*.pkla"))]
    found = []
    for path in files:
        text = read_text(path)
        action = next((a for a in (*POLKIT_ACTIONS, POLKIT_WILDCARD) if a in text), None)
        if action:
            found.append((str(path), action))
    return found


def read_text(path: str | Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def check_admins(ctx: Context) -> list[Finding]:
    developers = developer_names(ctx)
    findings = []
    for name in ADMIN_GROUPS:
        try:
            people = [m for m in members(grp.getgrnam(name)) if m != "root"]
        except KeyError:
            continue
        both = sorted(set(people) & developers)
        if both:
            findings.append(
                warning(
                    f"{', '.join(both)}: developer(s) in group '{name}': as root (sudo) they can read "
                    "every key",
                    f"if they are not meant to: sudo gpasswd -d USER {name}",
                )
            )
        if people:
            findings.append(
                ok(f"group '{name}' (administrators, who can read every key): {', '.join(people)}")
            )
    return findings or [ok(f"no one is in {', '.join(ADMIN_GROUPS)}")]


# ------------------------------------------------------------------------------------ writable


def protected_paths(config: Config) -> list[tuple[str, bool]]:
    """(path, recursive) for what decides which code runs with a key: the units, drop-ins, generator, code,
    jobs.toml and its parsed copy, and the CA bundles the API proxies trust."""
    fixed = [
        (LIBDIR, True),
        (GENERATOR, False),
        (ADMIN_COMMAND, False),
        (CONFDIR, True),
        (config.path, False),
        (TMPFILES, False),
        (SYSUSERS, False),
    ]
    fixed.append((os.path.dirname(DEFAULT_CACHE_PATH), True))
    units = sorted(str(p) for p in Path(UNITDIR).glob("job*")) + sorted(
        str(p) for p in Path(SYSTEM_UNITS).glob("job*")
    )
    cas = [api.ca for api in config.apis.values() if api.ca]
    return fixed + [(path, True) for path in units] + [(path, False) for path in cas]


def check_writable(ctx: Context) -> list[Finding]:
    found = find_writable(protected_paths(ctx.config()), who_is_in)
    findings = [
        problem(message, f"chown root:root {path}; chmod go-w {path}") for path, message in found[:MAX_LISTED]
    ]
    if len(found) > MAX_LISTED:
        findings.append(problem(f"... and {len(found) - MAX_LISTED} more such paths", "the same"))
    return findings or [
        ok("only root can change the units, drop-ins, generator, code, jobs.toml and its parsed copy")
    ]


def who_is_in(gid: int) -> list[str]:
    try:
        return [m for m in members(grp.getgrgid(gid)) if m != "root"]
    except KeyError:
        return []


def find_writable(
    paths: Iterable[tuple[str, bool]], group_members: Callable[[int], list[str]], lstat: Stat = os.lstat
) -> list[tuple[str, str]]:
    """(path, message) for each path, or directory above one, that someone but root can change."""
    found: dict[str, str] = {}

    def note(path: str, child: str | None = None) -> None:
        who = [] if path in found else writers(lstat(path), group_members)
        if who and child is None:
            found[path] = f"{path} can be changed by {' and '.join(who)}"
        elif who:
            found[path] = f"{path} can be changed by {' and '.join(who)}, and with it {child}"

    for top, recursive in paths:
        if not os.path.lexists(top):
            continue
        for path in sorted({top, os.path.realpath(top)}):  # a link, and where it leads
            for parent, child in ancestors(path):
                note(parent, child)
        if recursive and os.path.isdir(top) and not os.path.islink(top):
            for path in walk(top):
                note(path)
    return sorted(found.items())


def ancestors(path: str) -> Iterator[tuple[str, str | None]]:
    """`path` itself (child None), then each directory above it with the entry below it."""
    yield path, None
    child = path
    while child != "/":
        parent = os.path.dirname(child)
        yield parent, child
        child = parent


def walk(top: str) -> Iterator[str]:
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            yield os.path.join(directory, name)


def writers(st: os.stat_result, group_members: Callable[[int], list[str]]) -> list[str]:
    """Who but root can change this file or directory, by its owner and mode (ACLs are not read). A
    symbolic link cannot be changed, only replaced through its directory. In a sticky directory (/tmp)
    others cannot replace what is not theirs."""
    if stat.S_ISLNK(st.st_mode):
        return []
    who = []
    if st.st_uid != 0:
        who.append(f"its owner {user_name(st.st_uid)}")
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return who
    people = group_members(st.st_gid)
    if st.st_mode & stat.S_IWGRP and people:
        who.append(f"group {group_name(st.st_gid)} ({', '.join(people)})")
    if st.st_mode & stat.S_IWOTH:
        who.append("every user")
    return who


# --------------------------------------------------------------------------------------- units


def expected_units(config: Config) -> list[Unit]:
    """What the generator writes for this jobs.toml (runner.generator does the same)."""
    template = read_text(template_path(TEMPLATE_NAME))
    api_template = read_text(template_path(API_TEMPLATE_NAME)) if config.apis else ""
    return render(config, template, api_template=api_template)


def check_units(ctx: Context) -> list[Finding]:
    config = ctx.config()
    expected = expected_units(config)
    names = [u.path for u in expected if "/" not in u.path]
    sockets = [name for name in names if name.endswith(".socket")]
    listed = ctx.systemctl(
        "list-units", "--all", "--plain", "--no-legend", "job-*.socket", "jobrunner-api-*.socket"
    )
    loaded = {
        word for line in listed.stdout.splitlines() for word in line.split()[:1] if word.endswith(".socket")
    }
    states = unit_states(ctx, [FRONT_DOOR, CONFIG_WATCH, *names, *sorted(loaded - set(names))])
    findings = unit_findings(names, sockets, states, loaded)
    # What is missing or stale in systemd is so in the generator's directory too: said once is enough.
    said_already = {n for n in [*names, *loaded] if states.get(n, {}).get("ActiveState") != "inactive"}
    said_already |= {n for n in names if states.get(n, {}).get("LoadState") != "loaded"}
    findings += generated_findings(expected, GENERATOR_DIR, said_already)
    findings += service_findings(states)
    if not any(f.status is not Status.OK for f in findings):
        findings.append(
            ok(f"the units of {len(config.jobs)} job(s) and {len(config.apis)} API(s) match jobs.toml")
        )
    return findings


def unit_states(ctx: Context, names: Sequence[str]) -> dict[str, dict[str, str]]:
    """`systemctl show` of each unit: Id, LoadState, ActiveState, NeedDaemonReload. systemctl shows no
    template, so a template's are those of an instance of it (loaded for the look, never started)."""
    shown = {name.replace("@.", "@0."): name for name in names}
    props = ("Id", "LoadState", "ActiveState", "NeedDaemonReload")
    res = ctx.systemctl("show", *(f"--property={p}" for p in props), "--", *shown)
    return {shown[unit]: fields for unit, fields in parse_show(res.stdout).items() if unit in shown}


def parse_show(text: str) -> dict[str, dict[str, str]]:
    states: dict[str, dict[str, str]] = {}
    for block in text.split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in fields:
            states[fields["Id"]] = fields
    return states


RELOAD_FIX = (
    "sudo jobrunner reload (and is jobrunner-config.path running? systemctl status jobrunner-config.path)"
)


def unit_findings(
    names: Sequence[str], sockets: Sequence[str], states: dict[str, dict[str, str]], loaded: set[str]
) -> list[Finding]:
    """Units jobs.toml calls for that systemd has not loaded, or that changed on disk since; sockets of
    its jobs that do not listen; and sockets systemd still has for jobs and APIs jobs.toml no longer has."""
    findings = []
    missing = [n for n in names if states.get(n, {}).get("LoadState") != "loaded"]
    changed = [n for n in names if states.get(n, {}).get("NeedDaemonReload") == "yes"]
    silent = [n for n in sockets if n not in missing and states.get(n, {}).get("ActiveState") != "active"]
    # A socket systemd merely remembers (not-found, inactive) is harmless; one that listens serves a job
    # or an API that jobs.toml no longer has.
    stale = sorted(n for n in loaded - set(sockets) if states.get(n, {}).get("ActiveState") != "inactive")
    if missing:
        findings.append(
            problem(f"jobs.toml calls for units systemd has not loaded: {', '.join(missing)}", RELOAD_FIX)
        )
    if changed:
        findings.append(
            problem(f"units changed on disk since systemd loaded them: {', '.join(changed)}", RELOAD_FIX)
        )
    if silent:
        findings.append(
            problem(f"sockets of jobs.toml's jobs and APIs not listening: {', '.join(silent)}", RELOAD_FIX)
        )
    if stale:
        findings.append(
            problem(f"sockets of jobs or APIs jobs.toml no longer has: {', '.join(stale)}", RELOAD_FIX)
        )
    return findings


def generated_findings(expected: Sequence[Unit], directory: str, said: Iterable[str] = ()) -> list[Finding]:
    """The generator's files as they are against what it would write now: a difference means jobs.toml
    (or the template, or a drop-in) changed since the last daemon-reload. By unit, less those in `said`."""
    differ = {unit_of(u.path) for u in expected if not same_file(os.path.join(directory, u.path), u)}
    ours = ("job-", "job@", "jobrunner-api-")
    present = {unit_of(n) for n in list_names(directory) if n.startswith(ours)}
    wants = os.path.join(directory, "sockets.target.wants")
    present |= {n for n in list_names(wants) if n.startswith(ours)}
    extra = present - {unit_of(u.path) for u in expected}
    differ, extra = differ - set(said), extra - set(said)
    findings = []
    if differ:
        found = ", ".join(sorted(differ))
        findings.append(problem(f"generated from an earlier jobs.toml (or template): {found}", RELOAD_FIX))
    if extra:
        found = ", ".join(sorted(extra))
        findings.append(problem(f"generated for jobs or APIs jobs.toml no longer has: {found}", RELOAD_FIX))
    return findings


def unit_of(path: str) -> str:
    """The unit a file of the generator's belongs to: job-x.socket.d/10-install.conf -> job-x.socket."""
    first, _, rest = path.partition("/")
    if first == "sockets.target.wants":
        return rest
    return first.removesuffix(".d")


def same_file(path: str, unit: Unit) -> bool:
    try:
        if unit.link is not None:
            return os.readlink(path) == unit.link
        return read_text(path) == unit.text
    except OSError:
        return False


def list_names(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def service_findings(states: dict[str, dict[str, str]]) -> list[Finding]:
    findings = []
    if states.get(FRONT_DOOR, {}).get("ActiveState") != "active":
        findings.append(
            problem(
                f"{FRONT_DOOR} is not listening: {FRONT_DOOR_SOCKET} serves no one",
                f"sudo systemctl enable --now {FRONT_DOOR}",
            )
        )
    if states.get(CONFIG_WATCH, {}).get("ActiveState") != "active":
        findings.append(
            warning(
                f"{CONFIG_WATCH} is not running: edits of jobs.toml are not applied to the units",
                f"sudo systemctl enable --now {CONFIG_WATCH}",
            )
        )
    return findings


# -------------------------------------------------------------------------- outputs and logs


def check_outputs(ctx: Context) -> list[Finding]:
    config = ctx.config()
    group = socket_group(ctx)
    findings = []
    devices: set[int] = set()
    for what, path in (("outputs", config.outputs), ("logs", config.logs)):
        findings += shared_directory_findings(what, path, group)
        if os.path.isdir(path) and os.stat(path).st_dev not in devices:
            devices.add(os.stat(path).st_dev)
            findings.append(space_finding(path, os.statvfs(path)))
    return findings


def shared_directory_findings(what: str, path: str, group: str, stat_of: Stat = os.stat) -> list[Finding]:
    """OUTPUTS and LOGS are 2770 root:GROUP (install.sh's tmpfiles.d): the group's, and nobody else's."""
    fix = f"chown root:{group} {path}; chmod 2770 {path}"
    try:
        st = stat_of(path)
    except FileNotFoundError:
        return [
            problem(
                f"{what} {path} does not exist: runs fail",
                "sudo systemd-tmpfiles --create /etc/tmpfiles.d/jobrunner.conf",
            )
        ]
    mode = stat.S_IMODE(st.st_mode)
    findings = []
    if mode & 0o007:
        findings.append(problem(f"{what} {path}: mode {mode:04o}: every user can get at the results", fix))
    if group_name(st.st_gid) != group:
        findings.append(problem(f"{what} {path}: group {group_name(st.st_gid)}, not {group}", fix))
    if not mode & stat.S_ISGID:
        findings.append(warning(f"{what} {path}: not setgid: new files would not be the group's", fix))
    if st.st_uid != 0:
        findings.append(
            warning(f"{what} {path}: owned by {user_name(st.st_uid)}, who can change its mode", fix)
        )
    return findings or [ok(f"{what} {path}: {mode:04o} root:{group}")]


def space_finding(path: str, vfs: os.statvfs_result) -> Finding:
    free = vfs.f_bavail * vfs.f_frsize
    total = vfs.f_blocks * vfs.f_frsize
    words = f"{free / (1 << 30):.1f} GiB free of {total / (1 << 30):.1f} GiB"
    if free < FREE_BYTES_MIN or (total and free / total < FREE_FRACTION_MIN):
        return warning(f"{path}: only {words}: runs fail once it is full", f"remove old runs from {path}")
    return ok(f"{path}: {words}")


# ------------------------------------------------------------------------------------ security


def exposure_limits(config: Config) -> dict[str, float]:
    """Each unit to rate, with the exposure README's "Security" promises it at most."""
    limits = {FRONT_DOOR_SERVICE: FRONT_DOOR_EXPOSURE}
    for job in config.jobs.values():
        limit = JOB_EXPOSURE
        if job.sandbox.network is Network.NONE:
            limit = OFFLINE_API_EXPOSURE if job.apis else OFFLINE_EXPOSURE
        limits[f"job-{job.name}@x.service"] = limit
    for api in config.apis:
        limits[f"jobrunner-api-{api}@x.service"] = API_EXPOSURE
    return limits


def parse_exposures(text: str) -> dict[str, float]:
    found = re.findall(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)", text)
    return {unit: float(level) for unit, level in found}


def check_security(ctx: Context) -> list[Finding]:
    limits = exposure_limits(ctx.config())
    res = ctx.run(["systemd-analyze", "security", "--no-pager", *limits], SYSTEMCTL_TIMEOUT_S)
    return exposure_findings(limits, parse_exposures(res.stdout))


def exposure_findings(limits: dict[str, float], levels: dict[str, float]) -> list[Finding]:
    findings = []
    for unit, limit in limits.items():
        fix = f"systemd-analyze security {unit} lists each setting: a drop-in may have weakened the sandbox"
        level = levels.get(unit)
        if level is None:
            findings.append(warning(f"{unit}: systemd-analyze security gave no rating", fix))
        elif level > limit:
            findings.append(problem(f"{unit}: exposure {level}, above the {limit} README promises", fix))
        else:
            findings.append(ok(f"{unit}: exposure {level} (at most {limit})"))
    return findings


# ---------------------------------------------------------------------------------- the command

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
