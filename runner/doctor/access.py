"""Who else could read a key: the sockets and their group, polkit rules, administrators, and anyone
but root who can write what decides what runs."""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from runner.config import Config
from runner.config_cache import DEFAULT_CACHE_PATH
from runner.doctor.base import (
    FRONT_DOOR,
    FRONT_DOOR_SOCKET,
    Context,
    Finding,
    Stat,
    group_name,
    ok,
    problem,
    read_text,
    user_name,
    warning,
)
from runner.handoff import JOB_SOCKETS_DIR

# What install.sh installs (INSTALL.md): only root may change any of it.
LIBDIR = "/usr/local/lib/jobrunner"
UNITDIR = "/usr/local/lib/systemd/system"
GENERATOR = "/usr/local/lib/systemd/system-generators/jobrunner-generator"
ADMIN_COMMAND = "/usr/local/sbin/jobrunner"
SYSTEM_UNITS = "/etc/systemd/system"
CONFDIR = "/etc/jobrunner"
TMPFILES = "/etc/tmpfiles.d/jobrunner.conf"  # creates the outputs and logs, as root, at every boot
SYSUSERS = "/etc/sysusers.d/jobrunner.conf"
POLKIT_RULE_DIRS = ("/etc/polkit-1/rules.d", "/usr/share/polkit-1/rules.d")
POLKIT_PKLA_DIRS = ("/etc/polkit-1/localauthority", "/var/lib/polkit-1/localauthority")
# Whoever polkit grants these can start a unit that loads any credential (LoadCredentialEncrypted=).
POLKIT_ACTIONS = ("org.freedesktop.systemd1.manage-units", "org.freedesktop.systemd1.manage-unit-files")
POLKIT_WILDCARD = "org.freedesktop.systemd1.*"  # pkla's Action= takes globs
ADMIN_GROUPS = ("sudo", "wheel", "admin")
MAX_LISTED = 20  # writable paths shown one by one; the rest are counted

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
