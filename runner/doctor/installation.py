"""The units systemd has loaded against jobs.toml, the outputs and logs directories, and each unit's
`systemd-analyze security` against the figures README promises."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence

from runner.config import Config, Network
from runner.doctor.access import socket_group
from runner.doctor.base import (
    FRONT_DOOR,
    FRONT_DOOR_SOCKET,
    SYSTEMCTL_TIMEOUT_S,
    Context,
    Finding,
    Stat,
    Status,
    group_name,
    ok,
    problem,
    read_text,
    user_name,
    warning,
)
from runner.units import (
    API_TEMPLATE_NAME,
    TEMPLATE_NAME,
    Unit,
    render,
    template_path,
)

GENERATOR_DIR = "/run/systemd/generator"  # the system manager's "normal" generator directory
CONFIG_WATCH = "jobrunner-config.path"
# Not a job's name (those start with a letter): job@0.service is the front door, never an operator's unit.
FRONT_DOOR_SERVICE = "job@0.service"
FREE_BYTES_MIN = 1 << 30
FREE_FRACTION_MIN = 0.05
# README's "Security": the exposure systemd-analyze security may rate each unit at, at most.
JOB_EXPOSURE = 1.2
OFFLINE_EXPOSURE = 0.6  # network = "none"
OFFLINE_API_EXPOSURE = 0.8  # network = "none" with apis (AF_INET for the endpoints)
FRONT_DOOR_EXPOSURE = 0.6
API_EXPOSURE = 1.2

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
