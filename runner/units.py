"""The units of each job, made from jobs.toml and one shared template (units/job-NAME@.service.in).

For job NAME:
  job-NAME.socket          /run/job/NAME.sock, Accept=yes: a connection starts job-NAME@N-PID-UID.service
  job-NAME@.service        the template's text for NAME
  job@NAME.service         the same text: what an operator's `systemctl start job@NAME` starts (a unit
                           file named for the instance takes the place of the front door's template)
and drop-ins, in both services' directories: 10-job-units.conf, a link to install.sh's settings (the
project, outputs, logs, developer group, default limits); 30-job-profile.conf, the job's profile (its
credentials and no other, its network, its limits, jit); and, for job@NAME.service, links to the
administrator's own drop-ins for the job in /etc/systemd/system/job-NAME@.service.d/ (which systemd
applies to job-NAME@*.service by itself). The socket gets job.socket's 10-install.conf (its group).

runner/generator.py writes them at every boot and `systemctl daemon-reload`; nothing here touches
systemd.
"""

from __future__ import annotations

import os

from runner.config import Config, Job, Network
from runner.credentials import UNAVAILABLE
from runner.handoff import JOB_SOCKETS_DIR

TEMPLATE_NAME = "job-NAME@.service.in"
CREDSTORE = "/etc/credstore.encrypted"
SOCKET_INSTALL_DROPIN = "/etc/systemd/system/job.socket.d/10-install.conf"
JOB_INSTALL_DROPIN = "/etc/jobrunner/job-units.conf"
ADMIN_DROPINS = "/etc/systemd/system"  # job-NAME@.service.d/ below it
# Not "10-install.conf": job@NAME.service also reads the front door's job@.service.d/10-install.conf,
# which lives in /etc and so would hide a same-named drop-in of the generator's.
SOCKET_LINK_NAME = "10-install.conf"
SERVICE_LINK_NAME = "10-job-units.conf"
# After install.sh's defaults (10-job-units.conf), before the administrator's own drop-ins (say 50-*.conf).
PROFILE_DROPIN = "30-job-profile.conf"
WANTED_BY = "sockets.target"


def socket_unit(job: str) -> str:
    return f"job-{job}.socket"


def service_template(job: str) -> str:
    return f"job-{job}@.service"


def operator_unit(job: str) -> str:
    return f"job@{job}.service"


def unit_names(job: str) -> tuple[str, ...]:
    """Every unit file the generator writes for `job` (`systemctl list-unit-files '*NAME*'` lists them)."""
    return (socket_unit(job), service_template(job), operator_unit(job))


def template_path() -> str:
    """The template beside the installed code (/usr/local/lib/jobrunner/units/), or in the repository."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "units", TEMPLATE_NAME)


class Unit:
    """One file to write: `path` relative to the generator's directory, and either text or a link."""

    __slots__ = ("link", "path", "text")

    def __init__(self, path: str, text: str | None = None, link: str | None = None) -> None:
        self.path = path
        self.text = text
        self.link = link  # a symlink's target

    def __repr__(self) -> str:
        return f"Unit({self.path!r}, link={self.link!r})"


def render(config: Config, template: str, root: str = "/") -> list[Unit]:
    """Every file for every job in `config`. `root`: where install.sh's and the administrator's files
    are looked up (tests); links point at their real paths."""
    units: list[Unit] = []
    for job in config.jobs.values():
        units += render_job(job, config, template, root)
    return units


def render_job(job: Job, config: Config, template: str, root: str = "/") -> list[Unit]:
    service = _header(job, config) + template.replace("@JOB@", job.name)
    job_profile = _header(job, config) + profile(job)
    files = [
        Unit(socket_unit(job.name), text=socket_text(job, config)),
        Unit(service_template(job.name), text=service),
        Unit(operator_unit(job.name), text=service),
        Unit(f"{service_template(job.name)}.d/{PROFILE_DROPIN}", text=job_profile),
        Unit(f"{operator_unit(job.name)}.d/{PROFILE_DROPIN}", text=job_profile),
        Unit(f"{WANTED_BY}.wants/{socket_unit(job.name)}", link=f"../{socket_unit(job.name)}"),
    ]
    links = {
        f"{socket_unit(job.name)}.d": [SOCKET_INSTALL_DROPIN],
        f"{service_template(job.name)}.d": [JOB_INSTALL_DROPIN],
        f"{operator_unit(job.name)}.d": [JOB_INSTALL_DROPIN, *_admin_dropins(job.name, root)],
    }
    for directory, targets in links.items():
        for target in targets:
            if os.path.exists(_under(root, target)):
                name = {SOCKET_INSTALL_DROPIN: SOCKET_LINK_NAME, JOB_INSTALL_DROPIN: SERVICE_LINK_NAME}.get(
                    target, os.path.basename(target)
                )
                path = f"{directory}/{name}"
                # An administrator's drop-in named like one of ours wins, as systemd lets the one in
                # /etc win for job-NAME@.service: the same for job@NAME.service.
                files = [unit for unit in files if unit.path != path] + [Unit(path, link=target)]
    return files


def socket_text(job: Job, config: Config) -> str:
    return f"""{_header(job, config)}[Unit]
Description=jobrunner socket of job {job.name}
Documentation=file:///usr/local/share/doc/jobrunner/README.md
Documentation=file:///usr/local/share/doc/jobrunner/protocol.md

[Socket]
# Developers connect here directly (jobctl), and job.socket's front door hands connections over.
ListenStream={JOB_SOCKETS_DIR}/{job.name}.sock
Accept=yes
SocketUser=root
# install.sh's --group (job.socket.d/10-install.conf, linked in).
SocketGroup=jobrunner
SocketMode=0660
DirectoryMode=0755
RemoveOnStop=yes
# As job.socket (units/job.socket). No MaxConnectionsPerSource=: on 257 it counts per UID, and every
# connection the front door hands over comes from its one user; runs per user are limited by the
# runner (max_runs_per_user).
MaxConnections=64
TriggerLimitIntervalSec=0

[Install]
WantedBy={WANTED_BY}
"""


def profile(job: Job) -> str:
    """The job's own part of its units: what jobs.toml says of it beyond the shared template."""
    sandbox = job.sandbox
    lines = [
        f"\n# --- The profile of job {job.name} (jobs.toml), after the template: a drop-in still wins.",
        "[Service]",
    ]
    if job.credentials:
        lines.append("# Its credentials and no other. SetCredential= is used only when the encrypted file is")
        lines.append("# missing, so that the run starts and says so (runner/credentials.py).")
    else:
        lines.append("# No credentials: nothing under /run/credentials, no $CREDENTIALS_DIRECTORY.")
    for name in job.credentials:
        lines.append(f"LoadCredentialEncrypted={name}:{CREDSTORE}/{name}")
        lines.append(f"SetCredential={name}:{UNAVAILABLE.decode()}")
    if sandbox.network is Network.NONE:
        lines += [
            '# network = "none": a network namespace of its own (only lo), and unix sockets only.',
            "PrivateNetwork=yes",
            "RestrictAddressFamilies=",
            "RestrictAddressFamilies=AF_UNIX",
            "IPAddressAllow=",
        ]
    elif sandbox.network is Network.LISTED:
        lines += [
            "# network = [...]: these addresses and nothing else (IPAddressDeny=any is the template's).",
            "IPAddressAllow=",
            f"IPAddressAllow={' '.join(sandbox.addresses)}",
        ]
    if sandbox.memory_max is not None:
        lines.append(f"MemoryMax={sandbox.memory_max}")
    if sandbox.tasks_max is not None:
        lines.append(f"TasksMax={sandbox.tasks_max}")
    if sandbox.jit:
        lines.append("# jit = true: the runtime writes and then runs machine code.")
        lines.append("MemoryDenyWriteExecute=no")
    return "\n".join(lines) + "\n"


def _header(job: Job, config: Config) -> str:
    return (
        f"# Generated by jobrunner's generator from [jobs.{job.name}] in {config.path} and\n"
        f"# {TEMPLATE_NAME}: do not edit. Drop-ins go in /etc/systemd/system/"
        f"{service_template(job.name)}.d/.\n\n"
    )


def _admin_dropins(job: str, root: str) -> list[str]:
    directory = f"{ADMIN_DROPINS}/{service_template(job)}.d"
    try:
        names = sorted(os.listdir(_under(root, directory)))
    except OSError:
        return []
    return [f"{directory}/{name}" for name in names if name.endswith(".conf")]


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def write(units: list[Unit], directory: str) -> None:
    """Write `units` below `directory` (the generator's output directory)."""
    for unit in units:
        path = os.path.join(directory, unit.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if unit.link is not None:
            os.symlink(unit.link, path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(unit.text or "")
