"""Which of the units' protections this host really enforces (IPAddressDeny=, TasksMax=, MemoryMax=),
found by probing with short-lived transient units, and the jobs that rely on each; and first, systemd's
version and whether jobs.toml parses."""

from __future__ import annotations

import enum
import os
import re
import secrets
import sys
from collections.abc import Sequence

from runner.config import Network, config_path, parse_file
from runner.doctor.base import SYSTEMCTL_TIMEOUT_S, Completed, Context, Finding, ok, problem, said, warning
from runner.errors import RunnerError
from runner.value import Value

MIN_SYSTEMD = 252
# A probe takes well under a second; these bound the worst case, on a host so loaded that starting
# python3 takes seconds. RuntimeMaxSec= of a probe unit: systemd stops it even if we are gone.
PROBE_RUNTIME_S = 30
# And then SIGKILL: systemd on cgroup v1 in a container never hears that a unit's last process is gone,
# and would wait the default 90 s for anything a probe left.
PROBE_STOP_S = 2
PROBE_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 1.0  # a connection on loopback takes microseconds; a dropped SYN never completes

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
