"""Benchmark jobrunner against the sandbox floor and the alternatives, inside real systemd (issue 5).

    sudo python3 bench/run.py [--distro bookworm] [--distro trixie] [--requests 200] [--json FILE]

Boots the end-to-end tests' Debian container (tests/e2e/container.py), installs jobrunner with the
tests' own helpers (install.sh, a developer in the group, a credential stored with `jobrunner creds
set`), adds the baselines next to it, then measures from inside the container (bench/client.py, so
that no nsenter sits between the clock and what it times). Prints one table, every figure a ratio
against a baseline measured in the same run, and writes the raw numbers as JSON.

Baselines:
  floor        floor.socket + floor@.service: the no-op job's own unit, its whole sandbox and credential
               (generated from `systemctl cat job-noop@x.service`, drop-ins included), ExecStart a shell
               that reads one line and prints one line. What any per-connection sandboxed service pays.
  floor-bare   the same socket, a template with nothing but that shell: what the sandbox costs.
  floor-python job@'s sandbox, `python3 -P -S -c "import MODULE"` (started like the runner) a module
               that reads the line and the key and replies: the interpreter's own share.
  floor-contract the same, plus what issue 2's contract asks of any runner, done the cheapest way:
               shlex-split the request, spawn /bin/true and wait, one STATUS= and one journal entry
               (python-systemd's C modules) at start and at end. No Python runner can go below it.
  client-floor a plain standard-library client of the JSON protocol (argparse, json, one round trip),
               started like jobctl but without its start-up work: what any such client pays.
  python-start `python3 -I -S -c pass` as the developer: what any Python client pays first (jobctl is
               installed as a `python3 -I -S` script).
  socat        socat (default 8 KiB buffer) moving the streaming job's bytes over a plain unix socket.
  socat-tee    the same with `| tee FILE` beside the run logs: the bytes also written to a file, as the
               runner writes each byte to its run log (no redaction).

The project's logs directory is a directory on the host's disk (under --logs-dir), bound in: a real
project's run logs are on a disk, and the container's own filesystem is a tmpfs overlay, where writing
costs several times more CPU per byte (bench/stream.py shows both).

The `sudo -u` alternative needs sudo, which the test rootfs lacks: the bench installs the host's cached
/var/cache/apt/archives/sudo_*.deb into the (throwaway) container (`apt-get install -d sudo` puts one
there), else it falls back to `setpriv` as root and says so. The cached rootfs is never modified.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    from tests.e2e.conftest import (
        CHECKOUT,
        CREDENTIAL,
        DEVELOPER,
        GROUP,
        PROJECT,
        add_users,
        copy_checkout,
        make_project,
        run_install,
        store_credential,
    )
    from tests.e2e.container import DISTROS, Container
    from tests.test_imports import environment_of
except ImportError as e:  # conftest imports pytest
    sys.exit(f"bench: {e}: run it with the python3 the tests use (`make deps` installs pytest)")

CLIENT = "/root/bench-client.py"
CLIENT_AS_DEVELOPER = "/home/alice/bench-client.py"  # /root is not readable by the developer
# The concurrency pass's clients are spread over these (as a team would be): systemd 257 counts
# job.socket's MaxConnectionsPerSource=16 per user, and the runner max_runs_per_user (8).
BENCH_DEVELOPERS = (DEVELOPER, "bench-dev1", "bench-dev2", "bench-dev3")
SERVICE_USER = "jrsvc"  # the `sudo -u` alternative's service user, owner of the key file
KEY_FILE = "/etc/jrsvc/api-key"
LOGS_DISK = "/srv/bench-logs"  # in the container: the host directory bound in for the project's logs
GIB = 1 << 30
# Printable, so that the JSON protocol carries it as text (as it would a log), not as base64 or \u escapes.
STREAM_LINE = "jobrunner bench 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STREAM_COMMAND = f"yes '{STREAM_LINE}' | head -c \"$1\""
FLOOR_REPLY = "read -r line <&3; echo floor-ok >&3"
# The interpreter's share: the same sandbox, started like the runner (`python3 -P -S -c "import MODULE"`),
# reading the request and the key and replying, with nothing imported beyond what the interpreter loads.
FLOOR_PYTHON_DIR = "/usr/local/lib/jobrunner-bench"
FLOOR_PYTHON_SOURCE = """\
import os

os.read(3, 65536)
with open(os.environ["CREDENTIALS_DIRECTORY"] + "/api-key", "rb") as f:
    f.read()
os.write(3, b"floor-ok\\n")
"""
# The contract's unavoidable work, the cheapest way (sd_notify and the journal through python-systemd's C
# modules, as the runner does): what any Python implementation of job@.service pays on top of the
# interpreter.
FLOOR_CONTRACT_SOURCE = """\
import _socket
import os
import shlex

from systemd._daemon import notify
from systemd._journal import sendv

words = shlex.split(os.read(3, 65536).decode())
with open(os.environ["CREDENTIALS_DIRECTORY"] + "/api-key", "rb") as f:
    f.read()
pid = os.posix_spawn("/bin/true", ["/bin/true"], {"PATH": "/usr/bin:/bin"})
notify("STATUS=running")
sendv("MESSAGE=floor-contract started", "JOB_NAME=noop")
os.waitpid(pid, 0)
os.write(3, b"floor-ok\\n")
_socket.socket(fileno=3).shutdown(_socket.SHUT_WR)
notify("STATUS=done")
sendv("MESSAGE=floor-contract ended", "JOB_NAME=noop")
"""
# A plain standard-library client of the JSON protocol, started as jobctl is (python3 -I -S, no garbage
# collection while importing): argparse for its command line, json for the events, one round trip (to
# the job's own socket, as jobctl), and
# none of jobctl's start-up work (no shutil or gettext through argparse). What any such client pays.
CLIENT_FLOOR_SOURCE = """\
import gc

gc.disable()
import _socket
import argparse
import json
import sys

parser = argparse.ArgumentParser(prog="minclient")
parser.add_argument("command")
parser.add_argument("name")
ns = parser.parse_args()
sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
sock.connect(f"/run/job/{ns.name}.sock")  # the job's own socket, as jobctl
sock.sendall(json.dumps({"op": ns.command, "job": ns.name}).encode() + b"\\n")
data = b""
while chunk := sock.recv(1 << 20):
    data += chunk
for line in data.splitlines():
    event = json.loads(line)
sys.stdout.flush()
sys.exit(event["exit_code"])
"""

JOBS_TOML = f"""\
# Written by bench/run.py.
[runner]
project = "{PROJECT}"
# max_runs_per_user stays at its default (8): the concurrency pass spreads its clients over developers.

[jobs.noop]
description = "Does nothing, with the key available (bench)"
command = ["/bin/true"]
credentials = ["{CREDENTIAL}"]
concurrency = "parallel"

[jobs.first]
description = "Prints a line at once, then sleeps (bench: time to first byte)"
command = ["/bin/sh", "-c", "echo first; sleep 0.2"]
concurrency = "parallel"

[jobs.stream]
description = "Prints N bytes (bench: streaming)"
command = ["/bin/sh", "-c", {json.dumps(STREAM_COMMAND)}, "stream"]
args = "[0-9]+"
# So that redaction is on: every byte is searched for the key and its encoded forms.
credentials = ["{CREDENTIAL}"]
concurrency = "parallel"
"""
# Throughput is measured over five jobs, each with units of its own (20 clients spread over them).
NOOP_JOBS = ("noop", "noop2", "noop3", "noop4", "noop5")
JOBS_TOML += "".join(
    f'\n[jobs.{job}]\ndescription = "Does nothing, with the key (bench: throughput over 5 jobs)"\n'
    f'command = ["/bin/true"]\ncredentials = ["{CREDENTIAL}"]\nconcurrency = "parallel"\n'
    for job in NOOP_JOBS[1:]
)
JOBS_TOML += (
    '\n[jobs.offline]\ndescription = "No network (bench: its exposure)"\n'
    'command = ["/bin/true"]\nnetwork = "none"\n'
)
# systemd-analyze security of these: a job's networked unit, a network = "none" one, the front door.
EXPOSURE_UNITS = ("job-noop@x.service", "job-offline@x.service", "job@x.service")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- setup


def install(ct: Container, runner_override: Path | None) -> None:
    """jobrunner as a user installs it (the e2e helpers), with the bench's jobs and a credential."""
    add_users(ct)
    make_project(ct)
    copy_checkout(ct)
    if runner_override is not None:  # A/B runs: another version of runner/ with everything else equal
        ct.run(["rm", "-rf", f"{CHECKOUT}/runner"])
        ct.copy_in(runner_override, f"{CHECKOUT}/runner")
        ct.run(
            ["find", f"{CHECKOUT}/runner", "-name", "__pycache__", "-prune", "-exec", "rm", "-rf", "{}", "+"]
        )
    run_install(ct, "--project", PROJECT, "--no-apt")
    ct.run(["usermod", "--append", "--groups", GROUP, DEVELOPER])
    for user in BENCH_DEVELOPERS[1:]:  # more developers for the concurrency pass
        ct.run(["sh", "-c", f"id {user} >/dev/null 2>&1 || useradd --no-create-home {user}"])
        ct.run(["usermod", "--append", "--groups", GROUP, user])
    ct.write_file("/etc/jobrunner/jobs.toml", JOBS_TOML)
    # The parsed copy connections use (jobrunner-config.path would refresh it too, a moment later).
    ct.run(["jobrunner", "check"])
    store_credential(ct, CREDENTIAL, "bench-" + secrets.token_hex(16))


def logs_on_disk(ct: Container) -> None:
    """Put the project's logs directory on the host's disk (LOGS_DISK is bound in), as a real project's
    is. The container's own filesystem is a tmpfs overlay (nspawn --volatile=overlay), where writing a
    byte costs the runner several times the CPU it costs on a disk filesystem (bench/stream.py --dir on
    a tmpfs): the streaming pass writes 1 GiB run logs, and socat-tee its file beside them."""
    logs = f"{PROJECT}/logs"
    owner, mode = ct.run(["stat", "-c", "%u:%g %a", logs]).stdout.decode().split()
    ct.run(["cp", "-a", f"{logs}/.", LOGS_DISK])
    ct.run(["chown", owner, LOGS_DISK])
    ct.run(["chmod", mode, LOGS_DISK])
    ct.run(["mount", "--bind", LOGS_DISK, logs])


def unit_text(ct: Container, unit: str) -> str:
    """A unit with all its drop-ins, as one file (drop-ins are parsed as if appended to it)."""
    return ct.run(["systemctl", "cat", "--no-pager", unit]).stdout.decode()


def floor_units(ct: Container) -> None:
    """floor.socket/floor@.service (the no-op job's own sandbox and credential) and floor-bare (none)."""
    socket_text = unit_text(ct, "job.socket")
    service = unit_text(ct, "job-noop@bench.service")
    lines = [line for line in service.splitlines() if not line.startswith("ExecStart=")]
    reply = f"ExecStart=/bin/sh -c '{FLOOR_REPLY}'"
    # Started like the runner: its PYTHONPATH (python-systemd's directory, for -S) with ours in front.
    runner_path = _runner_pythonpath(lines)

    def python(module: str) -> list[str]:
        return [
            f"Environment=PYTHONPATH={FLOOR_PYTHON_DIR}:{runner_path}",
            f'ExecStart=/usr/bin/python3 -P -S -c "import {module}"',
        ]

    units = {
        "floor@.service": "\n".join([*lines, "", "[Service]", reply, ""]),
        "floor-python@.service": "\n".join([*lines, "", "[Service]", *python("benchfloor"), ""]),
        "floor-contract@.service": "\n".join([*lines, "", "[Service]", *python("benchcontract"), ""]),
        "floor-bare@.service": f"[Service]\n{reply}\n",
    }
    ct.write_file(f"{FLOOR_PYTHON_DIR}/benchfloor.py", FLOOR_PYTHON_SOURCE)
    ct.write_file(f"{FLOOR_PYTHON_DIR}/benchcontract.py", FLOOR_CONTRACT_SOURCE)
    ct.write_file(CLIENT_FLOOR_SCRIPT, CLIENT_FLOOR_SOURCE)
    ct.run(["python3", "-m", "compileall", "-q", FLOOR_PYTHON_DIR])  # like install.sh does for the runner
    for name in FLOOR_SOCKETS:
        units[f"{name}.socket"] = socket_text.replace(
            "ListenStream=/run/job.sock", f"ListenStream=/run/{name}.sock"
        )
    for name, text in units.items():
        ct.write_file(f"/etc/systemd/system/{name}", text)
    ct.run(["systemctl", "daemon-reload"])
    ct.run(["systemctl", "start", *(f"{name}.socket" for name in FLOOR_SOCKETS)])


FLOOR_SOCKETS = ("floor", "floor-python", "floor-contract", "floor-bare")


def _runner_pythonpath(unit_lines: list[str]) -> str:
    """The PYTHONPATH= a job's unit sets, drop-ins included."""
    values = [line.partition("=")[2] for line in unit_lines if line.startswith("Environment=")]
    found = environment_of(values).get("PYTHONPATH")
    if not found:
        raise RuntimeError("the job's unit sets no PYTHONPATH=")
    return found


def start_socat(ct: Container, size: int, unit: str = "bench-socat", log_file: str = "") -> str:
    """socat serving the streaming job's bytes on /run/UNIT.sock; with `log_file`, `tee` also writes
    them there (what the runner's run log does, the cheapest way a shell has)."""
    path = f"/run/{unit}.sock"
    ct.run(["systemctl", "stop", f"{unit}.service"], check=False)
    ct.run(["systemctl", "reset-failed", f"{unit}.service"], check=False)
    generator = STREAM_COMMAND.replace('"$1"', str(size)) + (f" | tee {log_file}" if log_file else "")
    ct.run(
        [
            "systemd-run", "--quiet", f"--unit={unit}", "--",
            # -U: one way only, from the command to the client.
            "socat", "-U", f"UNIX-LISTEN:{path},fork,mode=0666,unlink-early", f"SYSTEM:{generator}",
        ]
    )  # fmt: skip
    for _ in range(100):
        if ct.run(["test", "-S", path], check=False).returncode == 0:
            return path
        time.sleep(0.05)
    raise RuntimeError("socat did not start listening")


def sudo_alternative(ct: Container) -> str:
    """A service user owning a key file, and a sudo rule for the developer; returns how it is run."""
    ct.run(
        ["sh", "-c", f"id {SERVICE_USER} >/dev/null 2>&1 || useradd --system --no-create-home {SERVICE_USER}"]
    )
    ct.run(["install", "-d", "-m", "0700", "-o", SERVICE_USER, os.path.dirname(KEY_FILE)])
    ct.run(
        [
            "sh",
            "-c",
            f"printf %s bench-key > {KEY_FILE}; chown {SERVICE_USER} {KEY_FILE}; chmod 0600 {KEY_FILE}",
        ]
    )
    if ct.run(["sh", "-c", "command -v sudo"], check=False).returncode != 0:
        debs = sorted(Path("/var/cache/apt/archives").glob("sudo_*.deb"))
        if debs:
            ct.write_file("/root/sudo.deb", debs[-1].read_bytes())
            res = ct.run(["dpkg", "-i", "/root/sudo.deb"], check=False)
            if res.returncode != 0:
                log(f"dpkg -i sudo failed, using setpriv instead:\n{res.stderr.decode()[-800:]}")
        else:
            log("no sudo .deb in the host's apt cache (apt-get install -d sudo): using setpriv instead")
    if ct.run(["sh", "-c", "command -v sudo"], check=False).returncode == 0:
        ct.write_file(
            "/etc/sudoers.d/bench", f"{DEVELOPER} ALL=({SERVICE_USER}) NOPASSWD: /bin/true\n", mode=0o440
        )
        return "sudo"
    return "setpriv"


# ------------------------------------------------------------------------------------------- measuring


def client(ct: Container, mode: str, spec: dict[str, Any], *, user: str | None, timeout: float) -> Any:
    path = CLIENT if user is None else CLIENT_AS_DEVELOPER
    res = ct.run(["python3", "-I", path, mode, json.dumps(spec)], user=user, timeout=timeout)
    return json.loads(res.stdout)


def socket_target(name: str, path: str, line: str, expect: str) -> dict[str, Any]:
    return {"name": name, "kind": "socket", "path": path, "line": line, "expect": expect}


def exec_target(name: str, argv: list[str]) -> dict[str, Any]:
    return {"name": name, "kind": "exec", "argv": argv}


FLOOR = socket_target("floor", "/run/floor.sock", "x\n", "floor-ok")
FLOOR_PYTHON = socket_target("floor-python", "/run/floor-python.sock", "x\n", "floor-ok")
FLOOR_CONTRACT = socket_target("floor-contract", "/run/floor-contract.sock", "run noop\n", "floor-ok")
FLOOR_BARE = socket_target("floor-bare", "/run/floor-bare.sock", "x\n", "floor-ok")
# Raw clients on the job's own socket (what jobctl does), and through the front door (/run/job.sock:
# one more sandboxed start, the front door's, before the job's own).
PRODUCT = socket_target("product-raw", "/run/job/noop.sock", "run noop\n", "exited with 0")
PRODUCT_FRONT_DOOR = socket_target("product-front-door", "/run/job.sock", "run noop\n", "exited with 0")
PRODUCT_JSON = socket_target(
    "product-raw-json", "/run/job/noop.sock", '{"op": "run", "job": "noop"}\n', '"exit_code":0'
)
FIRST = socket_target("first-byte", "/run/job/first.sock", "run first\n", "exited with 0")
JOBCTL = exec_target("jobctl", ["jobctl", "run", "noop"])
CLIENT_FLOOR_SCRIPT = f"{FLOOR_PYTHON_DIR}/minclient.py"
CLIENT_FLOOR = exec_target("client-floor", ["python3", "-I", "-S", CLIENT_FLOOR_SCRIPT, "run", "noop"])
# What any Python client pays before its first line runs: the interpreter's start and exit.
PYTHON_START = exec_target("python-start", ["python3", "-I", "-S", "-c", "pass"])


def noop_target(job: str, path: str) -> dict[str, Any]:
    return socket_target(job, path, f"run {job}\n", "exited with 0")


def measure(ct: Container, args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "distro": ct.distro,
        "systemd": _systemd_version(ct),
        "python": _python_version(ct),
        "run_logs_filesystem": ct.run(["stat", "-f", "-c", "%T", f"{PROJECT}/logs"]).stdout.decode().strip(),
    }
    raw["exposure"] = {unit: _exposure(ct, unit) for unit in EXPOSURE_UNITS}
    n, warmup, pause, seed = args.requests, args.warmup, args.pause, args.seed
    if "latency" in args.only:
        how = sudo_alternative(ct)
        alt = (
            [exec_target("alt-sudo", ["sudo", "-n", "-u", SERVICE_USER, "/bin/true"])]
            if how == "sudo"
            else []
        )
        targets = [
            FLOOR_BARE, FLOOR, FLOOR_PYTHON, FLOOR_CONTRACT, PRODUCT, PRODUCT_FRONT_DOOR, PRODUCT_JSON,
            JOBCTL, CLIENT_FLOOR,
            PYTHON_START,
            FIRST, *alt,
        ]  # fmt: skip
        log(f"latency: {n} rounds over {', '.join(t['name'] for t in targets)} (as {DEVELOPER})")
        spec = {"targets": targets, "requests": n, "warmup": warmup, "pause_s": pause, "seed": seed}
        raw["latency"] = client(ct, "latency", spec, user=DEVELOPER, timeout=3600)
        root_targets = [
            FLOOR,
            exec_target(
                "alt-systemd-run",
                [
                    "systemd-run",
                    "--quiet",
                    "--wait",
                    "--pipe",
                    "-p",
                    "DynamicUser=yes",
                    "-p",
                    f"LoadCredentialEncrypted={CREDENTIAL}:/etc/credstore.encrypted/{CREDENTIAL}",
                    "/bin/true",
                ],
            ),
        ]
        if how == "setpriv":
            root_targets.append(
                exec_target(
                    "alt-setpriv",
                    [
                        "setpriv",
                        f"--reuid={SERVICE_USER}",
                        f"--regid={SERVICE_USER}",
                        "--init-groups",
                        "/bin/true",
                    ],
                )
            )
        log(f"latency: {n} rounds over {', '.join(t['name'] for t in root_targets)} (as root)")
        spec = {"targets": root_targets, "requests": n, "warmup": warmup, "pause_s": pause, "seed": seed}
        raw["latency_root"] = client(ct, "latency", spec, user=None, timeout=3600)
        raw["alternative_sudo"] = how
    if "concurrency" in args.only:
        raw["concurrency"] = {"product": [], "product-front-door": [], "floor": []}
        over_jobs = {
            "product": [noop_target(job, f"/run/job/{job}.sock") for job in NOOP_JOBS],
            "product-front-door": [noop_target(job, "/run/job.sock") for job in NOOP_JOBS],
            "floor": [FLOOR],
        }
        for round_ in range(args.rounds):
            for name, targets in over_jobs.items():
                log(f"concurrency: {args.clients} x {args.per_client} requests, {name} (round {round_ + 1})")
                spec = {
                    "targets": targets,
                    "clients": args.clients,
                    "requests_per_client": args.per_client,
                    "users": list(BENCH_DEVELOPERS),
                }
                # As root: client.py forks one process per developer and becomes each.
                raw["concurrency"][name].append(client(ct, "concurrent", spec, user=None, timeout=3600))
                time.sleep(2)  # let the last instances finish before the next pass
    if "stream" in args.only:
        size = args.stream_bytes
        socat_path = start_socat(ct, size)
        tee_log = f"{PROJECT}/logs/bench-socat-tee.log"  # beside the run logs: the same filesystem
        socat_tee_path = start_socat(ct, size, "bench-socat-tee", tee_log)
        logs = f"{PROJECT}/logs/stream/*.log"
        kinds = {
            "socat": {"path": socat_path, "line": "", "expect": ""},
            "socat-tee": {"path": socat_tee_path, "line": "", "expect": "", "cleanup": [tee_log]},
            "text": {
                "path": "/run/job/stream.sock",
                "line": f"run stream {size}\n",
                "expect": "exited with 0",
                "runner": True,  # its peak memory is sampled
            },
            "json": {
                "path": "/run/job/stream.sock",
                "line": json.dumps({"op": "run", "job": "stream", "args": [str(size)]}) + "\n",
                "expect": '"exit_code":0',
                "runner": True,
            },
        }
        raw["stream"] = {kind: [] for kind in kinds}
        # Round 0 is a warm-up, not kept: the first 1 GiB run log of a container is written markedly
        # slower (its first text round was the slowest of five in each of the last runs).
        # In a new order each round, as the latency rounds: what ran before (a 1 GiB file just written
        # and deleted, say) must not favour one kind.
        order = list(kinds)
        shuffled = random.Random(args.seed)  # noqa: S311 - an order to measure in, not a secret
        for round_ in range(args.stream_rounds + 1):
            shuffled.shuffle(order)
            for kind in order:
                where = kinds[kind]
                log(f"streaming: {size} bytes, {kind} ({f'round {round_}' if round_ else 'warm-up'})")
                spec = {"cleanup": [logs], **where, "payload_bytes": size}
                result = client(ct, "stream", spec, user=DEVELOPER, timeout=600)
                if round_:
                    raw["stream"][kind].append(result)
        ct.run(["systemctl", "stop", "bench-socat.service", "bench-socat-tee.service"], check=False)
    return raw


def _exposure(ct: Container, unit: str) -> float:
    out = ct.run(["systemd-analyze", "security", "--no-pager", unit], check=False).stdout.decode()
    for line in out.splitlines():
        if line.startswith("→ Overall exposure level"):
            return float(line.split(":")[1].split()[0])
    raise RuntimeError(f"no exposure level for {unit}: {out[-300:]}")


def _systemd_version(ct: Container) -> str:
    return ct.run(["systemctl", "--version"]).stdout.decode().splitlines()[0]


def _python_version(ct: Container) -> str:
    return ct.run(["python3", "--version"]).stdout.decode().strip()


# ------------------------------------------------------------------------------------------- the table


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between the closest ranks."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def noisy(values: list[float]) -> bool:
    """Noisy: the two halves of the run disagree on the median by more than 10 %, or the spread
    (p95 over p50) is above 2."""
    if len(values) < 10:
        return False
    half = len(values) // 2
    a, b = statistics.median(values[:half]), statistics.median(values[half:])
    return abs(a - b) / min(a, b) > 0.10 or pct(values, 0.95) / pct(values, 0.5) > 2


Row = tuple[str, str, str, str, str]  # measure, value, ratio, baseline, target verdict


def rows(raw: dict[str, Any]) -> list[Row]:  # noqa: PLR0912, PLR0915 - one table, read top to bottom
    out: list[Row] = []
    lat = raw.get("latency")
    if lat:

        def ms(name: str, series: str = "total", src: dict[str, Any] = lat) -> list[float]:
            return [v * 1000 for v in src[name][series]]

        def latency_row(  # noqa: PLR0917
            label: str, values: list[float], base50: float, base95: float, base: str, target: str = ""
        ) -> Row:
            p50, p95 = pct(values, 0.5), pct(values, 0.95)
            flag = " (noisy)" if noisy(values) else ""
            return (
                label,
                f"{p50:6.1f} / {p95:6.1f} ms{flag}",
                f"{p50 / base50:4.2f} / {p95 / base95:4.2f}",
                base,
                target,
            )

        fl = ms("floor")
        b50, b95 = pct(fl, 0.5), pct(fl, 0.95)
        out.append(latency_row("floor: the job's sandbox + key, sh reply", fl, b50, b95, "itself"))
        out.append(latency_row("floor without sandbox (sh reply)", ms("floor-bare"), b50, b95, "floor"))
        for name, label in (  # the interpreter's own share, then with the contract's minimum
            ("floor-python", "floor, python3 -P -S -c: reads line + key"),
            ("floor-contract", "floor, python + the contract's minimum"),
        ):
            if name in lat:
                out.append(latency_row(label, ms(name), b50, b95, "floor"))
        product = ms("product-raw")
        p50, p95 = pct(product, 0.5), pct(product, 0.95)
        verdict = _verdict(p50 / b50 <= 1.3 and p95 / b95 <= 1.5)
        out.append(
            latency_row(
                "no-op job, raw, its own socket (p50 / p95)", product, b50, b95, "floor",
                f"<=1.3/1.5 {verdict}",
            )
        )  # fmt: skip
        if "product-front-door" in lat:
            door = ms("product-front-door")
            more = pct(door, 0.5) - p50
            label = "no-op job, raw, through /run/job.sock"
            out.append(latency_row(label, door, b50, b95, "floor", f"+{more:.1f} ms: the front door's start"))
        if "product-raw-json" in lat:
            json_raw = ms("product-raw-json")
            out.append(latency_row("no-op job, raw socket, JSON request", json_raw, b50, b95, "floor"))
        jobctl = ms("jobctl")
        extra = pct(jobctl, 0.5) - p50
        out.append(
            latency_row(
                "no-op job, jobctl", jobctl, b50, b95, "floor",
                f"+{extra:.1f} ms over raw (<=15) {_verdict(extra <= 15)}",
            )
        )  # fmt: skip
        if "client-floor" in lat:
            least = ms("client-floor")
            over = pct(least, 0.5) - p50
            label = "  plain stdlib client: argparse + json"
            out.append(latency_row(label, least, b50, b95, "floor", f"+{over:.1f} ms over raw"))
        if "python-start" in lat:
            start = ms("python-start")
            out.append(latency_row("  of which: python3 -I -S -c pass", start, b50, b95, "floor"))
        first = ms("first-byte", "ttfb")
        out.append(latency_row("time to first byte (job prints, sleeps)", first, b50, b95, "floor", ""))
        if "alt-sudo" in lat:
            out.append(latency_row("alt: sudo -u service-user /bin/true", ms("alt-sudo"), b50, b95, "floor"))
        root = raw.get("latency_root", {})
        if root:
            rf = [v * 1000 for v in root["floor"]["total"]]
            r50, r95 = pct(rf, 0.5), pct(rf, 0.95)
            for name, label in (
                ("alt-systemd-run", "alt: systemd-run --wait --pipe DynamicUser+key"),
                ("alt-setpriv", "alt: setpriv (no sudo here) service user"),
            ):
                if name in root:
                    out.append(latency_row(label, ms(name, src=root), r50, r95, "floor (root pass)"))
    for unit, level in raw.get("exposure", {}).items():
        limit = 0.6 if unit.startswith(("job-offline", "job@")) else 1.2
        out.append(
            (
                f"systemd-analyze security {unit}",
                f"{level:6.1f}",
                "",
                "",
                f"<={limit} {_verdict(level <= limit)}",
            )
        )
    conc = raw.get("concurrency")
    if conc:

        def throughput(results: list[dict[str, Any]]) -> float:  # answered requests only
            return statistics.median(len(r["latencies"]) / r["wall_s"] for r in results)

        def p95(results: list[dict[str, Any]]) -> float:
            return statistics.median(pct(r["latencies"], 0.95) * 1000 for r in results)

        tp, tf = throughput(conc["product"]), throughput(conc["floor"])
        errors = sum(r.get("error_count", len(r["errors"])) for r in conc["product"] + conc["floor"])
        spread = [len(r["latencies"]) / r["wall_s"] for r in conc["product"]]
        flag = " (noisy)" if max(spread) / min(spread) > 1.15 else ""
        first = conc["product"][0]
        shape = f"{first['requests']} requests, {first.get('users', 1)} users"
        out.append(("concurrency, floor: throughput", f"{tf:6.1f} req/s", "1.00", "itself", shape))
        out.append(
            (
                "concurrency, 5 no-op jobs, own sockets",
                f"{tp:6.1f} req/s{flag}",
                f"{tp / tf:4.2f}",
                "floor",
                f">=0.75 {_verdict(tp / tf >= 0.75)}" + (f", {errors} errors" if errors else ""),
            )
        )
        if conc.get("product-front-door"):
            td = throughput(conc["product-front-door"])
            label = "concurrency, 5 no-op jobs, /run/job.sock"
            out.append((label, f"{td:6.1f} req/s", f"{td / tf:4.2f}", "floor", "two starts per run"))
        pp, pf = p95(conc["product"]), p95(conc["floor"])
        out.append(("concurrency, floor: p95", f"{pf:6.1f} ms", "1.00", "itself", ""))
        out.append(("concurrency, no-op job: p95", f"{pp:6.1f} ms", f"{pp / pf:4.2f}", "floor", ""))
    stream = raw.get("stream")
    if stream:

        def rate(results: list[dict[str, Any]]) -> float:
            return statistics.median(r["payload_bytes"] / r["seconds"] / 1e6 for r in results)

        socat = rate(stream["socat"])
        out.append(("streaming: socat, plain unix socket", f"{socat:6.0f} MB/s", "1.00", "itself", ""))
        if "socat-tee" in stream:  # runs before this one have no such baseline
            tee = rate(stream["socat-tee"])
            row = ("  socat, and tee to a log file", f"{tee:6.0f} MB/s", f"{tee / socat:4.2f}", "socat", "")
            out.append(row)
        for kind, need in (("text", 1.0), ("json", 0.5)):
            r = rate(stream[kind])
            rates = [x["payload_bytes"] / x["seconds"] / 1e6 for x in stream[kind]]
            flag = " (noisy)" if max(rates) / min(rates) > 1.15 else ""
            out.append(
                (
                    f"streaming: {kind} protocol",
                    f"{r:6.0f} MB/s{flag}",
                    f"{r / socat:4.2f}",
                    "socat",
                    f">={need:g} {_verdict(r / socat >= need)}",
                )
            )
        peaks = [x["runner_vmhwm_kib"] for k in ("text", "json") for x in stream[k] if x["runner_vmhwm_kib"]]
        if peaks:
            peak = max(peaks) / 1024
            out.append(
                (
                    "runner peak memory (VmHWM)",
                    f"{peak:6.1f} MB",
                    f"{peak / 30:4.2f}",
                    "30 MB target",
                    _verdict(peak < 30),
                )
            )
    return out


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_table(per_distro: dict[str, dict[str, Any]]) -> None:
    tables = {distro: rows(raw) for distro, raw in per_distro.items()}
    labels = [r[0] for r in next(iter(tables.values()))]
    header = ["measure", "baseline"]
    for distro, raw in per_distro.items():
        version = raw["systemd"].split()[1]
        header += [f"{distro} ({version}): value", "ratio", "target"]
    body = []
    for i, label in enumerate(labels):
        base = next(iter(tables.values()))[i][3]
        line = [label, base]
        for table in tables.values():
            row = table[i] if i < len(table) else ("", "", "", "", "")
            line += [row[1], row[2], row[4]]
        body.append(line)
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    fmt = " | ".join(f"{{:{w}}}" for w in widths)
    print(fmt.format(*header))
    print("-|-".join("-" * w for w in widths))
    for line in body:
        print(fmt.format(*line))
    print("\nlatency values: p50 / p95; ratio: p50 / p95 over the baseline's, same run.")
    filesystems = [f"{d}: {raw.get('run_logs_filesystem', 'tmpfs')}" for d, raw in per_distro.items()]
    print(f"run logs (and socat-tee's file) on: {', '.join(filesystems)}")


# ------------------------------------------------------------------------------------------------ main


def bench(distro: str, args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        binds = []
        if args.logs_dir:  # a directory on the host's disk, for the project's logs (logs_on_disk)
            host_logs = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="jobrunner-bench-logs-", dir=args.logs_dir)
            )
            binds = [f"--bind={host_logs}:{LOGS_DISK}"]
        ct = stack.enter_context(
            Container.boot(distro, name="bench", binds_ro={REPO: "/src"}, nspawn_args=binds)
        )
        log(f"{distro}: installing jobrunner")
        install(ct, args.runner)
        if args.logs_dir:
            logs_on_disk(ct)
        floor_units(ct)
        ct.write_file(CLIENT, (REPO / "bench" / "client.py").read_bytes())
        ct.write_file(CLIENT_AS_DEVELOPER, (REPO / "bench" / "client.py").read_bytes())
        if args.shell:
            print(
                f"container up, jobrunner installed: {ct.nsenter_hint()}\nCtrl-C to power it off", flush=True
            )
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
            return {}
        return measure(ct, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--distro", action="append", choices=DISTROS, help="repeat for both (default: bookworm)"
    )
    parser.add_argument(
        "--requests", type=int, default=200, help="timed round trips per target (default 200)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed round trips first (default 20)")
    parser.add_argument(
        "--pause", type=float, default=0.03, help="seconds between round trips (default 0.03)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the latency and streaming rounds' shuffled order (default 1)",
    )
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--per-client", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5, help="concurrency repeats (default 5)")
    parser.add_argument(
        "--stream-rounds",
        type=int,
        default=9,  # one 1 GiB round of a kind spreads widely on these VMs; 4 kinds x 9 is ~2 min a distro
        help="streaming repeats of every kind (default 9)",
    )
    parser.add_argument(
        "--stream-bytes", type=int, default=GIB, help="streaming job's output (default 1 GiB)"
    )
    parser.add_argument("--only", default="latency,concurrency,stream", help="comma-separated parts to run")
    parser.add_argument(
        "--logs-dir",
        default="/var/tmp",  # noqa: S108 - a disk on most hosts; the bench's own directory is made with mkdtemp
        help="host directory (on disk) under which the project's logs directory is made and bound in "
        "(default /var/tmp; '' leaves it on the container's tmpfs overlay)",
    )
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--runner", type=Path, help="install this runner/ directory instead (A/B runs)")
    parser.add_argument(
        "--shell", action="store_true", help="install, then keep the container up (profiling)"
    )
    parser.add_argument("--from-json", type=Path, help="only print the table of an earlier --json file")
    args = parser.parse_args(argv)
    args.only = set(args.only.split(","))
    if args.from_json:
        print_table(json.loads(args.from_json.read_text())["distros"])
        return 0
    if os.geteuid() != 0:
        parser.error("must run as root (it boots a container)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results: dict[str, Any] = {}
    started = time.time()
    for distro in args.distro or ["bookworm"]:
        results[distro] = bench(distro, args)
    if args.shell:
        return 0
    document = {
        "command": shlex.join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "host": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "distros": results,
    }
    if args.json:
        if args.json.exists():  # bench/api.py's figures ("api") stay: this run does not measure them
            previous = json.loads(args.json.read_text()).get("distros", {})
            for distro, raw in results.items():
                if "api" in previous.get(distro, {}):
                    raw["api"] = previous[distro]["api"]
        args.json.write_text(json.dumps(document, indent=1) + "\n")
        log(f"raw numbers in {args.json}")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
