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

For API NAME ([apis.NAME], reached by the jobs that list it; runner.endpoint, runner.apiproxy):
  jobrunner-api-NAME.socket     /run/jobrunner-api/NAME.sock (a directory only root can enter), Accept=yes
  jobrunner-api-NAME@.service   units/jobrunner-api-NAME@.service.in for NAME: the proxy, the only unit
                                that loads the API's key (30-api-profile.conf)
and the jobs that list it bind that socket in (BindReadOnlyPaths=, in their 30-job-profile.conf).

runner/generator.py writes them at every boot and `systemctl daemon-reload`; nothing here touches
systemd.
"""

from __future__ import annotations

import hashlib
import os

from runner.config import Api, Config, Job, Network
from runner.credentials import UNAVAILABLE
from runner.endpoint import ENDPOINT_HOST, socket_in_job
from runner.handoff import JOB_SOCKETS_DIR

TEMPLATE_NAME = "job-NAME@.service.in"
API_TEMPLATE_NAME = "jobrunner-api-NAME@.service.in"
API_SOCKETS_DIR = "/run/jobrunner-api"
API_INSTALL_DROPIN = "/etc/jobrunner/api-units.conf"
API_PROFILE_DROPIN = "30-api-profile.conf"
MAX_USER_NAME = 31  # what systemd accepts for User= (and utmp holds)
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


def api_socket_unit(api: str) -> str:
    return f"jobrunner-api-{api}.socket"


def api_service_template(api: str) -> str:
    return f"jobrunner-api-{api}@.service"


def api_socket_path(api: str) -> str:
    return f"{API_SOCKETS_DIR}/{api}.sock"


def user_name(prefix: str, name: str) -> str:
    """A user name of its own for a job's or an API's units (DynamicUser=): `prefix` and `name`, or, when
    that is too long for systemd, `name` cut short and a hash of it."""
    whole = prefix + name
    if len(whole) <= MAX_USER_NAME:
        return whole
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{prefix}{name[: MAX_USER_NAME - len(prefix) - 9]}-{digest}"


def job_user(job: str) -> str:
    return user_name("job-", job)


def unit_names(job: str) -> tuple[str, ...]:
    """Every unit file the generator writes for `job` (`systemctl list-unit-files '*NAME*'` lists them)."""
    return (socket_unit(job), service_template(job), operator_unit(job))


def template_path(name: str = TEMPLATE_NAME) -> str:
    """A template beside the installed code (/usr/local/lib/jobrunner/units/), or in the repository."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "units", name)


class Unit:
    """One file to write: `path` relative to the generator's directory, and either text or a link."""

    __slots__ = ("link", "path", "text")

    def __init__(self, path: str, text: str | None = None, link: str | None = None) -> None:
        self.path = path
        self.text = text
        self.link = link  # a symlink's target

    def __repr__(self) -> str:
        return f"Unit({self.path!r}, link={self.link!r})"


def render(config: Config, template: str, root: str = "/", api_template: str = "") -> list[Unit]:
    """Every file for every job and API in `config`. `root`: where install.sh's and the administrator's
    files are looked up (tests); links point at their real paths."""
    units: list[Unit] = []
    for job in config.jobs.values():
        units += render_job(job, config, template, root)
    for api in config.apis.values():
        units += render_api(api, config, api_template, root)
    return units


def render_api(api: Api, config: Config, template: str, root: str = "/") -> list[Unit]:
    header = (
        f"# Generated by jobrunner's generator from [apis.{api.name}] in {config.path} and\n"
        f"# {API_TEMPLATE_NAME}: do not edit.\n\n"
    )
    service = api_service_template(api.name)
    files = [
        Unit(api_socket_unit(api.name), text=header + api_socket_text(api, config)),
        Unit(service, text=header + template.replace("@API@", api.name)),
        Unit(f"{service}.d/{API_PROFILE_DROPIN}", text=header + api_profile(api)),
        Unit(f"{WANTED_BY}.wants/{api_socket_unit(api.name)}", link=f"../{api_socket_unit(api.name)}"),
    ]
    if os.path.exists(_under(root, API_INSTALL_DROPIN)):
        files.append(Unit(f"{service}.d/10-api-units.conf", link=API_INSTALL_DROPIN))
    return files


def api_socket_text(api: Api, config: Config) -> str:
    users = ", ".join(job.name for job in config.jobs.values() if api.name in job.apis) or "none yet"
    return f"""[Unit]
Description=jobrunner socket of API {api.name} (jobs: {users})
Documentation=file:///usr/local/share/doc/jobrunner/README.md

[Socket]
# Reachable only from the units of the jobs that list the API: systemd binds this socket into them
# (BindReadOnlyPaths=); the directory keeps everyone else out, root excepted.
ListenStream={api_socket_path(api.name)}
DirectoryMode=0700
SocketUser=root
SocketGroup=root
# Any user may connect once the socket is bound in: each job runs as a transient user of its own.
SocketMode=0666
Accept=yes
RemoveOnStop=yes
# A bound on the proxies alive at once over all runs (each run has its own, MAX_CONNECTIONS in
# runner/endpoint.py). Beyond it systemd refuses connections and the job gets a 502.
MaxConnections=256
TriggerLimitIntervalSec=0

[Install]
WantedBy={WANTED_BY}
"""


def api_profile(api: Api) -> str:
    return f"""[Service]
User={user_name("jobrunner-api-", api.name)}
# The API's key, and nothing else. SetCredential= is used only when the encrypted file is missing, so
# that the proxy starts and tells the job so (a 502 naming the credential).
LoadCredentialEncrypted={api.credential}:{CREDSTORE}/{api.credential}
SetCredential={api.credential}:{UNAVAILABLE.decode()}
"""


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
Documentation=file:///usr/local/share/doc/jobrunner/docs/protocol.md

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
        *_api_dependencies(job),
        "[Service]",
        "# A transient user of the job's own: no other job's runs can signal, trace or read its processes.",
        f"User={job_user(job.name)}",
    ]
    if job.credentials:
        lines.append("# Its credentials and no other. SetCredential= is used only when the encrypted file is")
        lines.append("# missing, so that the run starts and says so (runner/credentials.py).")
    else:
        lines.append("# No credentials: nothing under /run/credentials, no $CREDENTIALS_DIRECTORY.")
    for name in job.credentials:
        lines.append(f"LoadCredentialEncrypted={name}:{CREDSTORE}/{name}")
        lines.append(f"SetCredential={name}:{UNAVAILABLE.decode()}")
    lines += _network(job)
    lines += _api_sockets(job)
    if sandbox.memory_max is not None:
        lines.append(f"MemoryMax={sandbox.memory_max}")
    if sandbox.tasks_max is not None:
        lines.append(f"TasksMax={sandbox.tasks_max}")
    if sandbox.jit:
        lines.append("# jit = true: the runtime writes and then runs machine code.")
        lines.append("MemoryDenyWriteExecute=no")
    return "\n".join(lines) + "\n"


def _network(job: Job) -> list[str]:
    sandbox = job.sandbox
    endpoint = [f"IPAddressAllow={ENDPOINT_HOST}"] if job.apis else []
    if sandbox.network is Network.NONE:
        if job.apis:
            return [
                '# network = "none": a network namespace of its own (only lo). AF_INET on it only for the',
                "# runner's endpoints of the job's APIs (runner/endpoint.py), and only their address.",
                "PrivateNetwork=yes",
                "RestrictAddressFamilies=",
                "RestrictAddressFamilies=AF_UNIX AF_INET",
                "IPAddressAllow=",
                *endpoint,
            ]
        return [
            '# network = "none": a network namespace of its own (only lo), and unix sockets only.',
            "PrivateNetwork=yes",
            "RestrictAddressFamilies=",
            "RestrictAddressFamilies=AF_UNIX",
            "IPAddressAllow=",
        ]
    if sandbox.network is Network.LISTED:
        return [
            "# network = [...]: these addresses and nothing else (IPAddressDeny=any is the template's)"
            + (
                ", and 127.0.0.1 for the endpoints of its APIs\n# (which also lets it reach the host's"
                " services on 127.0.0.1: the kernel connects from that address)."
                if job.apis
                else "."
            ),
            "IPAddressAllow=",
            f"IPAddressAllow={' '.join(sandbox.addresses)}",
            *endpoint,
        ]
    return []


def _api_dependencies(job: Job) -> list[str]:
    if not job.apis:
        return []
    sockets = " ".join(api_socket_unit(api) for api in job.apis)
    return ["[Unit]", f"Requires={sockets}", f"After={sockets}"]


def _api_sockets(job: Job) -> list[str]:
    """The sockets of the job's APIs, bound into its private /tmp: no other unit can reach them."""
    if not job.apis:
        return []
    lines = ["# The proxies of its APIs (apis = [...]); the keys stay with them (runner/endpoint.py)."]
    lines += [f"BindReadOnlyPaths={api_socket_path(api)}:{socket_in_job(api)}" for api in job.apis]
    return lines


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
