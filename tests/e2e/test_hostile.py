"""Hostile conditions (issue 4): load, faults, bad input and secrets, against the installed product under
real systemd 252 (bookworm) and 257 (trixie).

Every case is a plain function that drives an installation (the session's `installed`, see conftest.py)
and returns an `Outcome`: figures, and the list of problems (empty when the claim holds). The tests
assert that list is empty; bench/hostile.py runs the same functions and prints their figures.

Load and bad input come from inside the container: hostile_client.py (standard library only, run as a
developer) opens hundreds of connections at once, stalls, dribbles, fuzzes. /run/job.sock is a front
door that hands each run to the job's own socket (/run/job/NAME.sock, job-NAME.socket) and its units
(job-NAME@*.service). A connection that systemd closes without a word, because job.socket's
MaxConnections= (or, on systemd 257, a MaxConnectionsPerSource=) is reached, and a run the front door
reports as "did not start" because the job's socket refused it, are counted apart as "refused by the
socket limit", and must be matched by systemd's own count of refusals (the sockets' NRefused=): a runner
that died without a reply, or a unit that failed, would not.

What these containers cannot show, and what is done instead: TasksMax= and MemoryMax= need the pids and
memory cgroup controllers, which this host binds to cgroup v1, and nspawn mounts v1 hierarchies
read-only. `limited` boots a bookworm container of its own on cgroup v1 whose pids and memory hierarchies
its systemd may write (see `cgroup_v1_container`). systemd 257 refuses to boot on cgroup v1, so the fork
bomb and the memory hog run here on bookworm only; a whole machine shows them on both (tests/vm/test_vm.py).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import secrets
import shlex
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from .conftest import (
    CREDENTIAL,
    DEVELOPER,
    GROUP,
    OUTSIDER,
    PROJECT,
    REPO,
    Installation,
    add_users,
    copy_checkout,
    jobs_toml,
    make_project,
    run_install,
    selected_distros,
    store_credential,
    write_jobs,
)
from .container import CGROUP_PARENT, Container

pytestmark = pytest.mark.e2e

CONFIG = "/etc/jobrunner/jobs.toml"
CLIENT = Path(__file__).with_name("hostile_client.py")  # runs inside the container
CLIENT_PATH = "/opt/jobrunner-hostile/client.py"
CREDSTORE = "/etc/credstore.encrypted"
SECOND_DEVELOPER = "bob"  # in the group too: "another user is still served"
MORE_DEVELOPERS = ("carol", "dave")  # a burst from several users stays within any per-user socket limit
SECOND_CREDENTIAL = "hostile-key"  # a second key, with characters that URL-encoding changes
REQUEST_DEADLINE_S = 10.0  # docs/protocol.md
CLIENT_STALL_S = 30.0  # runner/execute.py: after the job, how long a client that reads nothing may take
STOP_TIMEOUT_S = 20.0  # job@.service's TimeoutStopSec=: how long systemd lets stragglers ignore SIGTERM
# A runner in `ps -eo args`: job@.service's ExecStart (python3 ... -c "import runner.__main__; ...") or
# one started by hand (python3 -m runner).
RUNNER_MARKS = ("runner.__main__", "-m runner")
# The runner's VmHWM, whatever the job prints: under README's "runner peak memory < 30 MB" (30,000,000
# bytes, in the kB of /proc/PID/status, which are KiB). It is about 14 MiB here (docs/performance.md).
RUNNER_MEMORY_LIMIT_KB = 30_000_000 // 1024
TRACEBACK = "Traceback (most recent call last)"

# -------------------------------------------------------------------------------------------- the jobs

# The overlap detector: a run that finds another one in flight (its directory exists) says so and fails.
EXCLUSIVE_SPAN = """
mkdir "$JOB_OUTPUT_DIR/../.inflight" 2>/dev/null || {{ echo OVERLAP; exit 99; }}
start=$(date +%s%N); sleep {sleep}; end=$(date +%s%N)
rmdir "$JOB_OUTPUT_DIR/../.inflight"
echo "span $start $end"
"""
SPAN = """
start=$(date +%s%N); sleep {sleep}; end=$(date +%s%N)
echo "span $start $end"
"""


def stubborn(tag: int, *, then: str) -> str:
    """A job that ignores SIGTERM and leaves a child, a grandchild and a double-forked daemon in a
    session of its own (which holds the job's stdout open) behind. Each process is `sleep 900TR`:
    T the scenario's tag, R its role (1 child, 2 grandchild, 3 daemon, 4 the job's own last command)."""
    return f"""
trap "" TERM
procs="$JOB_OUTPUT_DIR/procs"
sleep 900{tag}1 & echo "child $!" >> "$procs"
sh -c 'sleep 900{tag}2 & echo "grandchild $!" >> "$1"; wait' sh "$procs" &
setsid sh -c 'sleep 900{tag}3 & echo "daemon $!" >> "$1"' sh "$procs" </dev/null 2>/dev/null
echo "$$ $PPID" > "$JOB_OUTPUT_DIR/pids"
echo ready
{then}
"""


STUBBORN = {  # scenario -> (tag, what the job does after starting its processes, timeout)
    "timeout": (1, "sleep 90014", 2),
    "cancel": (2, "sleep 90024", 600),
    "end": (3, "sleep 3; exit 0", 600),
    "sigkill": (4, "sleep 90044", 600),
}

FLOOD = """
echo "$$ $PPID" > "$JOB_OUTPUT_DIR/pids"
yes 'the quick brown fox jumps over the lazy dog, again and again and again' | head -c {size}
echo
grep VmHWM /proc/$PPID/status > "$JOB_OUTPUT_DIR/runner-memory"
echo flood-done
"""

VERSION = """
echo version 1
echo started > "$JOB_OUTPUT_DIR/started"
sleep 6
echo still version 1
"""
VERSION_2 = """
echo version 2
"""

FILL = """
status=0
head -c "$1" /dev/zero > "$JOB_OUTPUT_DIR/data" || {{ echo "fill: could not write $1 bytes of data" >&2; status=1; }}
i=0; while [ $i -lt "$2" ]; do echo "line $i of the transcript, padded to fill the run log"; i=$((i+1)); done
echo fill-done
exit $status
"""

# Prints its key in every way issue 4 names; the runner must leave nothing recognisable of it.
LEAK = """
import base64, os, re, sys, time, traceback, urllib.parse
key = open(os.path.join(os.environ["CREDENTIALS_DIRECTORY"], "{credential}"), "rb").read()
out, err = sys.stdout.buffer, sys.stderr.buffer
def say(stream, *parts):
    stream.write(b"".join(parts)); stream.flush()
say(out, b"plain: ", key, b"\\n")
say(out, b"split: ", key[:len(key) // 2]); time.sleep(0.3); say(out, key[len(key) // 2:], b"\\n")
say(err, b"stderr: ", key, b"\\n")
say(out, b"env: ", os.environ["HOSTILE_KEY"].encode(), b"\\n")
for pad in (b"", b"x", b"xy"):
    say(out, b"base64: ", base64.b64encode(pad + key), b"\\n")
    say(out, b"base64url: ", base64.urlsafe_b64encode(pad + key), b"\\n")
say(out, b"hex: ", key.hex().encode(), b"\\n")
say(out, b"HEX: ", key.hex().upper().encode(), b"\\n")
quoted = urllib.parse.quote(key, safe="")
say(out, b"url: ", quoted.encode(), b"\\n")
say(out, b"urllower: ", re.sub("%[0-9A-F]{{2}}", lambda m: m.group().lower(), quoted).encode(), b"\\n")
try:
    raise RuntimeError("cannot authenticate with " + key.decode())
except RuntimeError:
    traceback.print_exc()
sys.stderr.flush()
time.sleep(0.2)
say(out, b"last: ", key)
"""


def toml_literal(text: str) -> str:
    assert "'''" not in text
    return f"'''{text}'''"


def hostile_jobs(credential: str = CREDENTIAL) -> str:
    """The suite's jobs, appended to the session's jobs.toml."""
    jobs: dict[str, dict[str, str]] = {
        "hostile-quick": {"command": '["/bin/echo", "ok"]', "concurrency": '"parallel"'},
        "hostile-echo": {
            "command": '["/usr/bin/printf", "%s\\\\n"]',
            "args": "'.*'",
            "concurrency": '"parallel"',
        },
        "hostile-slow": {"command": '["/bin/sh", "-c", "sleep 2; echo slept"]', "concurrency": '"parallel"'},
        "hostile-hold": {"command": '["/bin/sleep", "4"]', "concurrency": '"parallel"'},
        "hostile-reject": {"script": EXCLUSIVE_SPAN.format(sleep="0.5"), "concurrency": '"reject"'},
        "hostile-queue": {"script": EXCLUSIVE_SPAN.format(sleep="0.05"), "concurrency": '"queue"'},
        "hostile-parallel": {"script": SPAN.format(sleep="1"), "concurrency": '"parallel"'},
        "hostile-flood": {"script": FLOOD.format(size=10**9), "concurrency": '"parallel"', "timeout": "120"},
        "hostile-flood-short": {
            "script": FLOOD.format(size=10**9),
            "concurrency": '"parallel"',
            "timeout": "2",
        },
        "hostile-fill": {"script": FILL.format(), "args": "'[0-9]+'", "concurrency": '"parallel"'},
        "hostile-version": {"script": VERSION, "concurrency": '"parallel"'},
        "hostile-leak": {
            "command": f'["/usr/bin/python3", "-c", {toml_literal(LEAK.format(credential=SECOND_CREDENTIAL))}]',
            "credentials": f'["{SECOND_CREDENTIAL}"]',
            "env": f'{{ HOSTILE_KEY = "credential:{SECOND_CREDENTIAL}" }}',
            "concurrency": '"parallel"',
        },
        "hostile-leak-timeout": {
            "command": f'["/bin/sh", "-c", "cat \\"$CREDENTIALS_DIRECTORY/{credential}\\"; echo; sleep 60"]',
            "credentials": f'["{credential}"]',
            "timeout": "1",
        },
    }
    for scenario, (tag, then, timeout) in STUBBORN.items():
        jobs[f"hostile-stubborn-{scenario}"] = {
            "script": stubborn(tag, then=then),
            "timeout": str(timeout),
            "concurrency": '"parallel"',
        }
    text = "\n# Written by tests/e2e/test_hostile.py.\n"
    for name, keys in jobs.items():
        text += f"\n[jobs.{name}]\n"
        for key, value in keys.items():
            if key == "script":
                text += f'command = ["/bin/sh", "-c", {toml_literal(value)}, "{name}"]\n'
            else:
                text += f"{key} = {value}\n"
    return text


# ------------------------------------------------------------------------------------- what a case saw


@dataclass
class Outcome:
    """One hostile case: its figures, and what went wrong (nothing, when the claim holds)."""

    name: str
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    @property
    def survived(self) -> bool:
        return not self.problems


@dataclass
class Reply:
    """What one connection got back (from CLIENT)."""

    raw: str
    elapsed: float = 0.0
    reset: bool = False
    timeout: bool = False
    connect_error: str | None = None

    @classmethod
    def of(cls, data: dict[str, Any]) -> Reply:
        return cls(
            raw=data.get("reply", ""),
            elapsed=data.get("elapsed", 0.0),
            reset=data.get("reset", False),
            timeout=data.get("timeout", False),
            connect_error=data.get("connect_error"),
        )

    def events(self) -> list[dict[str, Any]] | None:
        """The JSON Lines reply, or None when it is not one."""
        try:
            events = [json.loads(line) for line in self.raw.splitlines() if line.strip()]
        except ValueError:
            return None
        return events if all(isinstance(e, dict) and "event" in e for e in events) else None

    def final(self) -> dict[str, Any] | None:
        """The one final event, last; None when there is none, more than one, or it is not last."""
        events = self.events() or []
        finals = [e for e in events if e["event"] in ("exit", "error", "jobs")]
        return finals[0] if len(finals) == 1 and events[-1] is finals[0] else None

    def output(self) -> str:
        return "".join(e.get("text", "") for e in self.events() or [] if e["event"] == "output")


def client(inst: Installation, *args: str, user: str | None = None, timeout: float = 300) -> Any:
    """Run CLIENT inside the container (as the developer); its JSON answer."""
    result = inst.container.run(["python3", CLIENT_PATH, *args], user=user or inst.developer, timeout=timeout)
    return json.loads(result.stdout)


def job_units(inst: Installation) -> list[str]:
    # The front doors (job@N-PID-UID.service, job@NAME.service) and the runs (job-NAME@N-PID-UID.service).
    out = inst.sh("systemctl list-units --all --plain --no-legend 'job@*' 'job-*@*'")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_for_runs_to_end(inst: Installation, timeout: float = 60.0) -> list[str]:
    """Wait until no job@ instance is left; return those still there after `timeout` (none, normally)."""
    deadline = time.monotonic() + timeout
    while (units := job_units(inst)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return units


def socket_state(inst: Installation, unit: str = "job.socket") -> dict[str, str]:
    out = inst.sh(f"systemctl show {unit} -p ActiveState -p SubState -p Result -p NRefused -p NAccepted")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def refusals(inst: Installation, *jobs: str) -> dict[str, int]:
    """NRefused of job.socket (the front door) and of the jobs' own sockets (job-NAME.socket)."""
    units = ["job.socket", *(f"job-{job}.socket" for job in jobs)]
    return {unit: int(socket_state(inst, unit).get("NRefused") or 0) for unit in units}


def log_footers(inst: Installation, job: str) -> dict[str, bool]:
    """Every run log of `job`: whether it has its '# ---- end' section."""
    out = inst.sh(f"cd {inst.logs} && [ -d {job} ] && grep -c -H '^# ---- end$' {job}/*.log || true")
    return {name: count != "0" for name, _, count in (line.rpartition(":") for line in out.splitlines())}


def latest_run(inst: Installation, job: str) -> str:
    return inst.sh(f"readlink {inst.outputs}/{job}/latest || true").strip()


def wait_for_new_run(inst: Installation, job: str, previous: str, file: str, timeout: float = 20.0) -> str:
    """The run id of `job` started after `previous`, once its output directory holds `file`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = latest_run(inst, job)
        if run and run != previous:
            found = inst.container.run(["test", "-s", f"{inst.outputs}/{job}/{run}/{file}"], check=False)
            if found.returncode == 0:
                return run
        time.sleep(0.1)
    raise AssertionError(f"no new run of {job} wrote {file} within {timeout:g} s")


def read_log(inst: Installation, job: str, run: str, limit: int = 64 * 1024) -> str:
    path = f"{inst.logs}/{job}/{run}.log"
    return inst.sh(f"head -c {limit} {path}; echo; echo ...; tail -c {limit} {path}")


def log_result(log: str) -> str:
    match = re.search(r"^# result: (.*)$", log, re.MULTILINE)
    return match[1] if match else ""


def runner_memory_kb(inst: Installation, pids: list[int]) -> dict[int, int]:
    """VmHWM (the most resident memory it ever had) of each process still alive."""
    if not pids:
        return {}
    listed = " ".join(map(str, pids))
    out = inst.sh(f"for p in {listed}; do echo $p $(grep VmHWM /proc/$p/status 2>/dev/null); done")
    return {int(w[0]): int(w[2]) for w in (line.split() for line in out.splitlines()) if len(w) >= 3}


def alive(inst: Installation, pids: list[int]) -> list[int]:
    if not pids:
        return []
    out = inst.container.run(["ps", "-o", "pid=", "-p", ",".join(map(str, pids))], check=False).stdout
    return [int(p) for p in out.split()]


def journal_cursor(inst: Installation) -> str:
    out = inst.container.run(["journalctl", "--show-cursor", "-n", "0", "--quiet"]).stdout.decode()
    return out.rpartition("-- cursor: ")[2].strip()


def journal_since(inst: Installation, cursor: str, *args: str) -> bytes:
    inst.container.run(["journalctl", "--sync"], check=False)
    return inst.container.run(
        ["journalctl", "--no-pager", f"--after-cursor={cursor}", *args], check=False
    ).stdout


@contextlib.contextmanager
def edited_config(inst: Installation, edit: Callable[[str], str], *, apply: bool = False) -> Iterator[str]:
    """jobs.toml changed by `edit` (read at every connection, so at once), restored afterwards. `apply`:
    and its jobs' units in place before going on (jobrunner check), not a moment later."""
    original = inst.sh(f"cat {CONFIG}")
    if apply:
        write_jobs(inst.container, edit(original))
    else:
        inst.container.write_file(CONFIG, edit(original))
    try:
        yield original
    finally:
        write_jobs(inst.container, original)  # and the jobs' units as they were (jobrunner check)


def runner_setting(key: str, value: object) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert "\n[runner]\n" in text and f"\n{key} =" not in text
        return text.replace("\n[runner]\n", f"\n[runner]\n{key} = {value}\n", 1)

    return edit


class SocketSampler:
    """job.socket's state, sampled while a case runs: it must never leave active/success."""

    def __init__(self, inst: Installation, interval: float = 0.2) -> None:
        self.inst = inst
        self.interval = interval
        self.states: set[tuple[str, str]] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = self.inst.container.run(
                ["systemctl", "show", "job.socket", "-p", "ActiveState", "-p", "Result"], check=False
            ).stdout.decode()
            state = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
            self.states.add((state.get("ActiveState", "?"), state.get("Result", "?")))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> SocketSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Start `target` in a thread; its result (or exception) lands in the dict."""
    box: dict[str, Any] = {}

    def wrapper() -> None:
        try:
            box["result"] = target()
        except BaseException as e:  # reported by the caller
            box["error"] = e

    thread = threading.Thread(target=wrapper, daemon=True)
    thread.start()
    return thread, box


def completed(result: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    return {"rc": result.returncode, "stdout": result.stdout.decode(errors="replace"),
            "stderr": result.stderr.decode(errors="replace")}  # fmt: skip


# ------------------------------------------------------------------------------------- set up, undone


def prepare(inst: Installation) -> str:
    """Install the client, the suite's jobs and a second developer; return jobs.toml as it was."""
    ct = inst.container
    ct.copy_in(CLIENT, CLIENT_PATH)
    original = inst.sh(f"cat {CONFIG}")
    write_jobs(ct, original + hostile_jobs(inst.credential))  # and the jobs' units (jobrunner check)
    for user in (SECOND_DEVELOPER, *MORE_DEVELOPERS):
        ct.run(["sh", "-c", f"id {user} >/dev/null 2>&1 || useradd --create-home {user}"])
        ct.run(["usermod", "--append", "--groups", inst.group, user])
    return original


def undo(inst: Installation, original_config: str) -> None:
    ct = inst.container
    wait_for_runs_to_end(inst)
    write_jobs(ct, original_config)
    for user in (SECOND_DEVELOPER, *MORE_DEVELOPERS):
        ct.run(["userdel", "--remove", user], check=False)
    ct.run(["jobrunner", "creds", "rm", SECOND_CREDENTIAL], check=False)
    ct.run(["rm", "-rf", "/opt/jobrunner-hostile"], check=False)


@pytest.fixture(scope="module")
def hostile(installed: Installation) -> Iterator[Installation]:
    original = prepare(installed)
    try:
        yield installed
    finally:
        undo(installed, original)


# ------------------------------------------------------------------------------------------------ load


def not_started(job: str, code: str, message: str) -> bool:
    """The front door's answer when the job's socket closed without taking the connection (its own
    MaxConnections=): a refusal by a socket limit, said in words (runner/service.py _not_started)."""
    return (code, message) in {
        ("busy", f"job '{job}' did not start: its socket is at its connection limit, or its unit failed"),
    } or (code == "credential" and message.startswith(f"job '{job}' did not start: systemd could not load"))


def classify(reply: Reply, job_output: str, job: str) -> str:
    """served, busy, refused (closed by systemd without a byte: job.socket's MaxConnections=, or the
    front door saying the job's socket did not take it: job-JOB.socket's), or failed."""
    if reply.connect_error is not None or reply.timeout:
        return "failed"
    if not reply.raw:
        return "refused"
    final = reply.final()
    if (
        final is not None
        and final["event"] == "exit"
        and final["exit_code"] == 0
        and reply.output() == job_output
    ):
        return "served"
    if final is None or final["event"] != "error":
        return "failed"
    if not_started(job, final.get("code", ""), final.get("message", "")):
        return "refused"
    return "busy" if final.get("code") == "busy" and final.get("message") else "failed"


def classify_jobctl(run: dict[str, Any], job_output: str, job: str) -> str:
    if run["rc"] == 0 and run["stdout"] == job_output:
        return "served"
    if (
        run["rc"] == 75
        and f"jobctl: error: busy: job '{job}' did not start: its socket is at its" in run["stderr"]
    ):
        return "refused"
    if run["rc"] == 75 and "jobctl: error: busy: " in run["stderr"]:
        return "busy"
    if (
        run["rc"] == 255
        and "lost before the final event" in run["stderr"]
        and "closed the connection without a reply" in run["stderr"]
    ):
        return "refused"
    return "failed"


def load_burst(inst: Installation, connections: int = 500, jobctl_runs: int = 50) -> Outcome:
    """`connections` runs of a quick job opened at once by one developer, with `jobctl_runs` jobctl runs
    of a slow one (sleep 2): each is served, refused as busy, or refused by the socket limit."""
    out = Outcome("load")
    out.check(not wait_for_runs_to_end(inst), "runs of earlier cases did not end")
    before = refusals(inst, "hostile-quick", "hostile-slow")
    logs_before = {**log_footers(inst, "hostile-quick"), **log_footers(inst, "hostile-slow")}
    with SocketSampler(inst) as sampler:
        data = client(
            inst, "burst", str(connections), "hostile-quick",
            "--jobctl-runs", str(jobctl_runs), "--jobctl-job", "hostile-slow",
        )  # fmt: skip
    left = wait_for_runs_to_end(inst)
    after = socket_state(inst)
    refused_after = refusals(inst, "hostile-quick", "hostile-slow")
    counts = dict.fromkeys(("served", "busy", "refused", "failed"), 0)
    examples: list[str] = []
    for raw in data["connections"]:
        kind = classify(Reply.of(raw), "ok\n", "hostile-quick")
        counts[kind] += 1
        if kind == "failed" and len(examples) < 3:
            examples.append(f"connection: {raw!r}"[:500])
    for run in data["jobctl"]:
        kind = classify_jobctl(run, "slept\n", "hostile-slow")
        counts[kind] += 1
        if kind == "failed" and len(examples) < 6:
            examples.append(f"jobctl: {run!r}"[:500])
    refused_by = {unit: refused_after[unit] - before[unit] for unit in before}
    refused_by_systemd = sum(refused_by.values())
    logs = {**log_footers(inst, "hostile-quick"), **log_footers(inst, "hostile-slow")}
    new_logs = {name: done for name, done in logs.items() if name not in logs_before}
    out.figures = {
        "tried": connections + jobctl_runs,
        **counts,
        "refused_by_systemd": refused_by_systemd,
        "refused_by_socket": refused_by,
        "seconds": round(data["seconds"], 1),
        "socket_states": sorted(sampler.states),
        "socket_samples": sampler.samples,
        "run_logs": len(new_logs),
    }
    out.check(counts["failed"] == 0, f"{counts['failed']} requests neither ran nor got busy: {examples}")
    out.check(counts["served"] > 0 and counts["busy"] > 0, f"no run or no busy at all: {counts}")
    # Every connection closed without a word (job.socket's MaxConnections=), and every "did not start"
    # from the front door (the job's socket's MaxConnections=), is one that systemd refused and counted:
    # none is a runner that died or a unit that failed. systemd may count more, by as many jobctl runs:
    # jobctl tries the job's socket first, and after a refusal there, the front door once.
    out.check(
        counts["refused"] <= refused_by_systemd <= counts["refused"] + jobctl_runs,
        f"{counts['refused']} connections refused by a socket limit (closed without a reply, or 'did not "
        f"start'), systemd refused {refused_by_systemd} ({refused_by}), jobctl runs {jobctl_runs}",
    )
    out.check(
        sampler.samples > 0 and sampler.states == {("active", "success")},
        f"job.socket left active/success: {sampler.states}",
    )
    out.check((after["ActiveState"], after["Result"]) == ("active", "success"), f"job.socket after: {after}")
    out.check(not left, f"runs still going a minute later: {left}")
    out.check(
        len(new_logs) == counts["served"], f"{len(new_logs)} run logs for {counts['served']} runs served"
    )
    unfinished = sorted(name for name, done in new_logs.items() if not done)
    out.check(not unfinished, f"run logs without their end section: {unfinished[:5]}")
    for user in (SECOND_DEVELOPER, inst.developer):  # the next users are served as usual
        result = inst.jobctl("run", "e2e-hello", "after", user=user)
        out.check(
            result.returncode == 0 and result.stdout.startswith(b"hello after\n"),
            f"{user} was not served after the burst: {completed(result)}",
        )
    return out


def concurrency_policy(inst: Installation, policy: str, triggers: int = 50) -> Outcome:
    """`triggers` simultaneous runs of a job with concurrency = `policy`, from four developers each allowed
    that many runs at once (so that only the job's policy says busy)."""
    out = Outcome(f"concurrency-{policy}")
    job = f"hostile-{policy}"
    users = (inst.developer, SECOND_DEVELOPER, *MORE_DEVELOPERS)
    shares = [triggers // len(users) + (i < triggers % len(users)) for i in range(len(users))]
    out.check(not wait_for_runs_to_end(inst), "runs of earlier cases did not end")
    logs_before = log_footers(inst, job)
    with edited_config(inst, runner_setting("max_runs_per_user", triggers)):
        bursts = [
            run_in_thread(lambda u=user, n=share: client(inst, "burst", str(n), job, user=u))
            for user, share in zip(users, shares, strict=True)
        ]
        for thread, _ in bursts:
            thread.join()
        left = wait_for_runs_to_end(inst)
    for _, box in bursts:
        if "error" in box:
            raise box["error"]
    replies = [Reply.of(raw) for _, box in bursts for raw in box["result"]["connections"]]
    ran, busy, other = [], [], []
    for reply in replies:
        final = reply.final() or {}
        if final.get("event") == "exit" and final.get("exit_code") == 0:
            ran.append(reply)
        elif final.get("code") == "busy":
            busy.append(final["message"])
        else:
            other.append(reply.raw[:300])
    spans = sorted(
        (int(m[1]), int(m[2]))
        for r in ran
        for m in re.finditer(r"^span (\d+) (\d+)$", r.output(), re.MULTILINE)
    )
    overlapping = [(a, b) for a, b in itertools.pairwise(spans) if b[0] < a[1]]
    most_at_once = max_overlap(spans)
    logs = {name: done for name, done in log_footers(inst, job).items() if name not in logs_before}
    out.figures = {
        "tried": triggers,
        "served": len(ran),
        "busy": len(busy),
        "refused": 0,  # 50 connections are within MaxConnections=: any refusal is a failure here
        "failed": len(other),
        "most_at_once": most_at_once,
    }
    out.check(not other, f"{len(other)} triggers neither ran nor got busy: {other[:3]}")
    out.check(len(spans) == len(ran), f"{len(ran)} runs but {len(spans)} spans")
    out.check(not left, f"runs still going a minute later: {left}")
    out.check(len(logs) == len(ran) and all(logs.values()), f"run logs: {len(logs)} for {len(ran)} runs")
    if policy == "reject":
        out.check(len(ran) >= 1 and len(ran) + len(busy) == triggers, f"ran {len(ran)}, busy {len(busy)}")
        out.check(
            all(f"job '{job}' is already running" in m for m in busy), f"busy for another reason: {busy[:3]}"
        )
        out.check(not overlapping, f"two runs at once: {overlapping[:3]}")
    elif policy == "queue":
        out.check(len(ran) == triggers, f"queued runs lost: {len(ran)} of {triggers} ran, busy: {busy[:3]}")
        out.check(len({(r.final() or {}).get("run_id") for r in ran}) == triggers, "run ids not distinct")
        out.check(not overlapping, f"two runs at once: {overlapping[:3]}")
    else:
        out.check(len(ran) == triggers, f"only {len(ran)} of {triggers} ran, busy: {busy[:3]}")
        out.check(most_at_once > 1, "parallel runs never overlapped")
    return out


def max_overlap(spans: list[tuple[int, int]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def per_user_limit(inst: Installation) -> Outcome:
    """One developer at max_runs_per_user (the default, 8) gets busy; another developer is served."""
    out = Outcome("per-user-limit")
    out.check(not wait_for_runs_to_end(inst), "runs of earlier cases did not end")
    limit = 8  # runner/config.py DEFAULT_MAX_RUNS_PER_USER; the session's jobs.toml does not change it
    held = client(inst, "burst", str(limit), "hostile-hold", "--detach")
    accepted = [r for r in map(Reply.of, held["connections"]) if '"event":"accepted"' in r.raw]
    out.check(len(accepted) == limit, f"{len(accepted)} of {limit} holding runs started")
    over = inst.jobctl("run", "hostile-quick")
    other = inst.jobctl("run", "hostile-quick", user=SECOND_DEVELOPER)
    left = wait_for_runs_to_end(inst)
    again = inst.jobctl("run", "hostile-quick")
    over_busy = over.returncode == 75
    served = len(accepted) + (other.returncode == 0) + (again.returncode == 0)
    out.figures = {
        "limit": limit,
        "tried": limit + 3,
        "served": served,
        "busy": int(over_busy),
        "refused": 0,
        "failed": limit + 3 - served - over_busy,
    }
    out.check(
        over.returncode == 75 and f"you already have {limit} runs in progress".encode() in over.stderr
        and b"max_runs_per_user" in over.stderr,
        f"the developer over the limit: {completed(over)}",
    )  # fmt: skip
    out.check(other.returncode == 0 and other.stdout == b"ok\n", f"the other developer: {completed(other)}")
    out.check(not left, f"runs still going a minute later: {left}")
    out.check(again.returncode == 0, f"the developer once the runs ended: {completed(again)}")
    return out


# ------------------------------------------------------------------------------ faults: processes


@dataclass
class FaultRun:
    """One run of the process-faults fixture: a job that leaves processes behind, ended some way."""

    scenario: str
    job: str
    client: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    job_pid: int = 0
    runner_pid: int = 0
    cgroup: str = ""
    procs: dict[str, int] = field(default_factory=dict)  # role -> pid, as the job wrote them
    alive_during: list[str] = field(default_factory=list)  # roles seen alive while it ran
    in_cgroup_during: list[str] = field(default_factory=list)  # roles in the unit's cgroup.procs then
    alive_after: list[int] = field(default_factory=list)
    cgroup_after: bool = False  # the unit's cgroup still exists once the runs are over
    runner_memory_kb: int = 0
    log: str = ""
    # Seconds after the SIGKILL of the sigkill scenario's runner (all scenarios run at once): when the
    # client had its answer, and when the unit's cgroup was gone (its last process dead).
    client_done_s: float | None = None
    cgroup_gone_s: float | None = None


def process_faults(inst: Installation) -> dict[str, FaultRun]:
    """Start every process fault at once (their waits overlap): a stubborn job (ignores SIGTERM, leaves a
    child, a grandchild and a daemon in a session of its own) that times out, is cancelled by its client,
    ends by itself, or whose runner is killed with SIGKILL; and a flood whose client neither reads nor
    closes. Then wait for every unit to end and look for what is left."""
    assert not wait_for_runs_to_end(inst), "runs of earlier cases did not end"
    runs = {scenario: FaultRun(scenario, f"hostile-stubborn-{scenario}") for scenario in STUBBORN}
    runs["stall"] = FaultRun("stall", "hostile-flood-short")
    previous = {name: latest_run(inst, run.job) for name, run in runs.items()}
    starters: dict[str, Callable[[], Any]] = {
        "timeout": lambda: completed(inst.jobctl("run", runs["timeout"].job)),
        "cancel": lambda: client(inst, "cancel", runs["cancel"].job, "ready"),
        "end": lambda: completed(inst.jobctl("run", runs["end"].job)),
        "sigkill": lambda: completed(inst.jobctl("run", runs["sigkill"].job)),
        "stall": lambda: client(inst, "stall", runs["stall"].job, "hold", "90"),
    }
    threads = {name: run_in_thread(start) for name, start in starters.items()}
    for name, run in runs.items():
        run.run_id = wait_for_new_run(inst, run.job, previous[name], "pids")
        job_pid, runner_pid = inst.sh(f"cat {inst.outputs}/{run.job}/{run.run_id}/pids").split()
        run.job_pid, run.runner_pid = int(job_pid), int(runner_pid)
        run.cgroup = inst.sh(f"cat /proc/{run.runner_pid}/cgroup || true").strip().rpartition("::")[2]
        run.runner_memory_kb = runner_memory_kb(inst, [run.runner_pid]).get(run.runner_pid, 0)
    time.sleep(0.3)  # the grandchild writes its pid asynchronously
    processes = inst.sh("ps -eo args")
    for run in runs.values():
        tag = STUBBORN.get(run.scenario, (0,))[0]
        run.alive_during = [
            role
            for n, role in enumerate(("child", "grandchild", "daemon", "job"), 1)
            if f"sleep 900{tag}{n}" in processes
        ]
        # The daemon left the job's process group and session, not the unit's cgroup.
        # Quoted: the job's slice and unit names hold systemd's escapes (system-job\\x2dNAME.slice).
        procs_file = shlex.quote(f"/sys/fs/cgroup{run.cgroup}/cgroup.procs")
        in_cgroup = inst.sh(f"cat {procs_file} 2>/dev/null || true").split()
        run.in_cgroup_during = [
            role for role, pid in job_processes(inst, run).items() if str(pid) in in_cgroup
        ]
    inst.container.run(["kill", "-KILL", str(runs["sigkill"].runner_pid)])
    killed = time.monotonic()
    memory = {run.runner_pid: run.runner_memory_kb for run in runs.values()}
    give_up = killed + 2 + CLIENT_STALL_S + STOP_TIMEOUT_S + 30
    while time.monotonic() < give_up and any(
        r.cgroup_gone_s is None or r.client_done_s is None for r in runs.values()
    ):
        for pid, kb in runner_memory_kb(inst, [r.runner_pid for r in runs.values()]).items():
            memory[pid] = max(kb, memory.get(pid, 0))
        listed = " ".join(shlex.quote(r.cgroup) for r in runs.values())
        existing = inst.sh(
            f'for c in {listed}; do [ -e "/sys/fs/cgroup$c" ] && printf \'%s\\n\' "$c"; done; true'
        ).split()
        for name, run in runs.items():
            if run.client_done_s is None and not threads[name][0].is_alive():
                run.client_done_s = round(time.monotonic() - killed, 1)
            if run.cgroup_gone_s is None and run.cgroup not in existing:
                run.cgroup_gone_s = round(time.monotonic() - killed, 1)
        time.sleep(0.5)
    left = wait_for_runs_to_end(inst, timeout=10)
    assert not left, f"runs still going: {left}"
    for name, run in runs.items():
        thread, box = threads[name]
        thread.join()
        if "error" in box:
            raise box["error"]
        run.client = box["result"]
        run.runner_memory_kb = memory.get(run.runner_pid, 0)
        run.procs = job_processes(inst, run)
        run.alive_after = alive(inst, list(run.procs.values()))
        run.cgroup_after = (
            bool(run.cgroup)
            and inst.container.run(["test", "-e", f"/sys/fs/cgroup{run.cgroup}"], check=False).returncode == 0
        )
        run.log = read_log(inst, run.job, run.run_id, limit=4096)
    return runs


def job_processes(inst: Installation, run: FaultRun) -> dict[str, int]:
    """The job's processes by role, as it wrote them down (see `stubborn`)."""
    procs = inst.sh(f"cat {inst.outputs}/{run.job}/{run.run_id}/procs 2>/dev/null || true")
    return {
        **{role: int(pid) for role, pid in (line.split() for line in procs.splitlines())},
        "job": run.job_pid,
    }


def check_fault_run(run: FaultRun) -> Outcome:
    """What must hold for every process fault, and what each scenario tells its client and its run log."""
    out = Outcome(f"fault-{run.scenario}")
    out.figures = {
        "runner_memory_kb": run.runner_memory_kb,
        "left_behind": len(run.alive_after),
        "client_done_s": run.client_done_s,
        "cgroup_gone_s": run.cgroup_gone_s,
    }
    stubborn_job = run.scenario in STUBBORN
    expected_roles = {"child", "grandchild", "daemon"} if stubborn_job else set()
    out.check(expected_roles <= set(run.procs), f"the job did not start all its processes: {run.procs}")
    if stubborn_job:
        out.check(
            {"child", "grandchild", "daemon"} <= set(run.alive_during),
            f"processes not seen alive during the run: {run.alive_during}",
        )
        out.check(
            {"child", "grandchild", "daemon", "job"} <= set(run.in_cgroup_during),
            f"processes not in the unit's cgroup {run.cgroup} during the run: {run.in_cgroup_during}",
        )
    out.check(not run.alive_after, f"processes left behind: {run.alive_after} of {run.procs}")
    out.check(not run.cgroup_after, f"the unit's cgroup {run.cgroup} is still there")
    out.check(
        0 < run.runner_memory_kb < RUNNER_MEMORY_LIMIT_KB, f"runner memory (VmHWM): {run.runner_memory_kb} kB"
    )
    result = log_result(run.log)
    has_end = "\n# ---- end\n" in run.log
    client = run.client
    if run.scenario == "timeout":
        out.check(client["rc"] == 124 and "timed out" in client["stderr"], f"client: {client}")
        out.check(result == "timed out, killed by SIGKILL", f"run log result: {result!r}")
    elif run.scenario == "cancel":
        out.check("ready" in client["reply"] and client["elapsed"] < 30, f"client: {client}")
        out.check(
            result == "cancelled: the client went away, killed by SIGKILL", f"run log result: {result!r}"
        )
    elif run.scenario == "end":
        out.check(client["rc"] == 0 and client["stdout"] == "ready\n", f"client: {client}")
        out.check(result == "exited with 0", f"run log result: {result!r}")
    elif run.scenario == "sigkill":
        out.check(
            client["rc"] == 255 and "lost before the final event" in client["stderr"],
            f"client: {client}",
        )
        out.check(not has_end and "ready" in run.log, f"the run log of a killed runner: {run.log[-500:]!r}")
    elif run.scenario == "stall":
        # The job times out at 2 s; the runner then waits CLIENT_STALL_S (30 s) for a client that takes
        # nothing, and hangs up: never for ever.
        hangup = client["hangup_after"]
        out.check(
            hangup is not None and hangup < 2 + CLIENT_STALL_S + 15, f"the runner hung up after {hangup} s"
        )
        out.check(result == "timed out, killed by SIGTERM", f"run log result: {result!r}")
        out.figures["hangup_after_s"] = hangup
    return out


@pytest.fixture(scope="module")
def fault_runs(hostile: Installation) -> dict[str, FaultRun]:
    return process_faults(hostile)


# ------------------------------------------------------------------------- faults: a client that stalls


def client_stalls(inst: Installation) -> Outcome:
    """A client that leaves mid-stream, one that reads nothing for a while and then leaves, and a
    detached run that prints 1 GB: the runner's memory stays flat, the first two are cancelled, the
    detached one completes."""
    out = Outcome("client-stalls")
    job = "hostile-flood"
    out.check(not wait_for_runs_to_end(inst), "runs of earlier cases did not end")

    previous = latest_run(inst, job)
    gone = client(inst, "midstream", job, str(1 << 20))
    out.check(not wait_for_runs_to_end(inst), "the run went on after its client left mid-stream")
    run = latest_run(inst, job)
    result = log_result(read_log(inst, job, run, limit=2048)) if run != previous else ""
    out.check(
        result == "cancelled: the client went away, killed by SIGTERM",
        f"a client that left mid-stream ({gone}): run log result {result!r}",
    )

    previous = latest_run(inst, job)
    thread, _ = run_in_thread(lambda: client(inst, "stall", job, "close", "4"))
    run = wait_for_new_run(inst, job, previous, "pids")
    runner_pid = int(inst.sh(f"cat {inst.outputs}/{job}/{run}/pids").split()[1])
    time.sleep(2.5)  # the client has read nothing for a while: the job is blocked on its pipe by now
    stalled_kb = runner_memory_kb(inst, [runner_pid]).get(runner_pid, 0)
    written = int(inst.sh(f"stat -c %s {inst.logs}/{job}/{run}.log"))
    thread.join()
    out.check(not wait_for_runs_to_end(inst), "the run went on after its stalled client left")
    result = log_result(read_log(inst, job, run, limit=2048))
    out.check(
        result == "cancelled: the client went away, killed by SIGTERM",
        f"a client that read nothing, then left: run log result {result!r}",
    )
    out.check(
        0 < stalled_kb < RUNNER_MEMORY_LIMIT_KB, f"runner memory with a stalled client: {stalled_kb} kB"
    )
    # Back-pressure: with nobody reading, the job cannot get far ahead (pipes and socket buffers).
    out.check(written < 64 << 20, f"{written} bytes reached the run log while the client read nothing")

    started = inst.jobctl("--json", "run", "--detach", job)
    accepted = json.loads(started.stdout.splitlines()[0]) if started.returncode == 0 else {}
    out.check(accepted.get("event") == "accepted", f"detached flood: {completed(started)}")
    out.check(not wait_for_runs_to_end(inst, timeout=120), "the detached 1 GB run did not end")
    run = accepted.get("run_id", "")
    size = int(inst.sh(f"stat -c %s {inst.logs}/{job}/{run}.log"))
    log = read_log(inst, job, run, limit=2048)
    hwm = inst.sh(f"cat {inst.outputs}/{job}/{run}/runner-memory").split()
    detached_kb = int(hwm[1]) if len(hwm) == 3 else 0
    inst.sh(f"rm -f {inst.logs}/{job}/{run}.log")  # 1 GB, in the container's memory
    out.check(log_result(log) == "exited with 0" and "flood-done" in log, f"the detached run: {log[-300:]!r}")
    out.check(size > 10**9, f"the detached run's log has {size} bytes, not all of the 1 GB")
    out.check(0 < detached_kb < RUNNER_MEMORY_LIMIT_KB, f"runner memory after 1 GB: {detached_kb} kB")
    out.figures = {
        "runner_kb_stalled": stalled_kb,
        "runner_kb_after_1gb": detached_kb,
        "bytes_written_while_stalled": written,
    }
    return out


# --------------------------------------------------------------------------- faults: a full disk


@contextlib.contextmanager
def small_filesystems(inst: Installation, size: str = "1m") -> Iterator[None]:
    """A `size` tmpfs over the outputs and the logs directories (owned like them), unmounted afterwards."""
    gid = inst.sh(f"getent group {inst.group} | cut -d: -f3").strip()
    for path in (inst.outputs, inst.logs):
        inst.sh(f"mount -t tmpfs -o size={size},mode=2770,gid={gid} jobrunner-hostile-full {path}")
    try:
        yield
    finally:
        for path in (inst.outputs, inst.logs):
            inst.container.run(["umount", path], check=False)


def full_disk(inst: Installation) -> Outcome:
    """The outputs and logs directories full (1 MiB each): the client gets the whole transcript, the job's
    own error and a warning that the run log is incomplete, never a traceback; the run log keeps what
    fit; once space is freed the next run is whole again."""
    out = Outcome("full-disk")
    job = "hostile-fill"
    out.check(not wait_for_runs_to_end(inst), "runs of earlier cases did not end")
    with small_filesystems(inst):
        # 3 MB of data into a 1 MiB output directory, and a 2.4 MB transcript into a 1 MiB log directory.
        full = inst.jobctl("run", job, "--", "3000000", "40000")
        events = [
            json.loads(line)
            for line in inst.jobctl("--json", "run", job, "--", "10", "5").stdout.splitlines()
        ]
        logs = inst.sh(f"ls {inst.logs}/{job}").split()
        first_log = inst.sh(
            f"head -c 4000 {inst.logs}/{job}/{logs[0]}; echo; stat -c %s {inst.logs}/{job}/{logs[0]}"
        )
        said = (full.stdout + full.stderr).decode(errors="replace")
        out.check(full.returncode == 1, f"the job's own failure is its exit status: {full.returncode}")
        out.check("No space left on device" in full.stderr.decode() and "fill: could not write" in said,
                  f"the job's own error did not reach the client: {full.stderr[-500:]!r}")  # fmt: skip
        out.check(
            "jobctl: warning: the run log is incomplete: No space left on device" in said,
            f"no warning about the incomplete run log: {full.stderr[-500:]!r}",
        )
        out.check(TRACEBACK not in said, "a traceback reached the client")
        out.check(
            full.stdout.endswith(b"line 39999 of the transcript, padded to fill the run log\nfill-done\n"),
            f"the client did not get the whole transcript: {full.stdout[-200:]!r}",
        )
        # Not "\nline 0": the run log interleaves stdout and stderr as the runner reads them, and head's
        # error message ("head: ", then the rest: separate writes) may be cut by the transcript's start.
        out.check(
            first_log.startswith("# jobrunner run log")
            and "\n# ---- output\n" in first_log
            and "line 0 of the transcript, padded to fill the run log\n" in first_log,
            f"the run log did not keep what fit: {first_log!r}",
        )
        out.check(
            int(first_log.split()[-1]) > 512 * 1024,
            f"the run log kept too little: {first_log.split()[-1]} bytes",
        )
        final = events[-1] if events else {}
        out.check(
            final.get("event") == "exit"
            and final.get("warnings") == ["the run log is incomplete: No space left on device"],
            f"a run on the full disk: {final}",
        )
        # Space freed: the next run is complete again.
        inst.sh(f"rm -rf {inst.outputs}/{job}/* {inst.logs}/{job}/*")
        again = [
            json.loads(line)
            for line in inst.jobctl("--json", "run", job, "--", "1000", "10").stdout.splitlines()
        ]
        final = again[-1] if again else {}
        out.check(
            final.get("event") == "exit" and final.get("exit_code") == 0 and final.get("warnings") == [],
            f"the run after freeing space: {final}",
        )
        if final.get("log"):
            out.check(
                "\n# ---- end\n" in inst.sh(f"cat {final['log']}"),
                "the run after freeing space: no end section",
            )
    after = inst.jobctl("run", job, "--", "10", "1")
    out.check(after.returncode == 0, f"a run once the small file systems are gone: {completed(after)}")
    return out


# ------------------------------------------------------------------------- faults: credentials


def run_nothing_happened(inst: Installation, cursor: str, logs_before: set[str]) -> list[str]:
    """What shows that a run started since `cursor`: new run logs of e2e-hello, 'started' in the journal."""
    signs = sorted(set(inst.sh(f"ls {inst.logs}/e2e-hello 2>/dev/null || true").split()) - logs_before)
    journal = journal_since(inst, cursor, "-o", "cat", "-u", "job@*", "-u", "job-*@*").decode(
        errors="replace"
    )
    signs += [line for line in journal.splitlines() if re.search(r"^run \S+ of job e2e-hello started", line)]
    return signs


def credential_fault(inst: Installation, fault: str) -> Outcome:
    """The session's credential missing, corrupt, undecryptable (sealed for another name) or expired:
    the developer is told, nothing runs; restored afterwards with `jobrunner creds set`."""
    out = Outcome(f"credential-{fault}")
    path = f"{CREDSTORE}/{inst.credential}"
    out.check(not wait_for_runs_to_end(inst), "runs of earlier cases did not end")
    logs_before = set(inst.sh(f"ls {inst.logs}/e2e-hello 2>/dev/null || true").split())
    cursor = journal_cursor(inst)
    secret = inst.secret.encode()
    try:
        if fault == "missing":
            inst.sh(f"rm {path}")
        elif fault == "corrupt":
            inst.container.write_file(path, base64.b64encode(secrets.token_bytes(200)) + b"\n", mode=0o600)
        elif fault == "undecryptable":
            inst.container.run(["systemd-creds", "encrypt", "--name=another-name", "-", path], input=secret)
        elif fault == "expired":
            inst.container.run(
                ["systemd-creds", "encrypt", f"--name={inst.credential}", "--not-after=+1s", "-", path],
                input=secret,
            )
            time.sleep(1.5)
        result = inst.jobctl("run", "e2e-hello", "x")
        said = result.stderr.decode(errors="replace")
        other = inst.jobctl("run", "hostile-quick")  # a job without that credential
        units = wait_for_runs_to_end(inst)
        signs = run_nothing_happened(inst, cursor, logs_before)
        journal = journal_since(inst, cursor, "-o", "cat").decode(errors="replace")
    finally:
        store_credential(inst.container, inst.credential, inst.secret)
    out.check(not units and not signs, f"something ran: {signs} {units}")
    out.check(
        other.returncode == 0 and other.stdout == b"ok\n",
        f"a job without the broken credential: {completed(other)}",
    )
    out.check(result.stdout == b"", f"the job printed: {result.stdout!r}")
    out.check(inst.secret not in said + journal, "the key reached the client or the journal")
    if fault == "missing":
        out.check(
            result.returncode == 78
            and f"jobctl: error: credential: job 'e2e-hello' needs credential '{inst.credential}', "
            "but its encrypted file is missing"
            in said
            and f"jobrunner creds set {inst.credential}" in said,
            f"jobctl said: {result.returncode} {said!r}",
        )
    else:
        # systemd fails the job's unit before the runner starts (243/CREDENTIALS) and closes the job's
        # socket; jobctl asks the front door, which names the job and the credential.
        out.check(
            result.returncode == 78
            and "jobctl: error: credential: job 'e2e-hello' did not start: systemd could not load its "
            f"credential '{inst.credential}': corrupt, expired, or encrypted for another machine"
            in said
            and f"sudo jobrunner creds set {inst.credential}" in said,
            f"jobctl said: {result.returncode} {said!r}",
        )
        out.check("243/CREDENTIALS" in journal, "the journal does not say 243/CREDENTIALS")
    restored = inst.jobctl("run", "e2e-hello", "restored")
    out.check(restored.returncode == 0, f"after restoring the credential: {completed(restored)}")
    return out


# ------------------------------------------------------------------------ faults: jobs.toml in flight


def config_in_flight(inst: Installation) -> Outcome:
    """jobs.toml broken, then changed, while a run is in flight: it finishes as it started; new requests
    get a `config` error naming the file and the line, then run with the new configuration."""
    out = Outcome("config-in-flight")
    out.check(not wait_for_runs_to_end(inst), "runs of earlier cases did not end")
    original = inst.sh(f"cat {CONFIG}")
    previous = latest_run(inst, "hostile-version")
    thread, box = run_in_thread(lambda: completed(inst.jobctl("run", "hostile-version")))
    try:
        wait_for_new_run(inst, "hostile-version", previous, "started")  # and now sleeps 6 s
        broken_line = original.count("\n") + 2
        inst.container.write_file(CONFIG, original + "\n[jobs.broken\n")
        broken = inst.jobctl("run", "hostile-quick")
        assert VERSION in original
        inst.container.write_file(CONFIG, original.replace(VERSION, VERSION_2))
        overlapped = thread.is_alive()  # broken, then changed, while the first run was in flight
        changed = inst.jobctl("run", "hostile-version")
        thread.join()
    finally:
        write_jobs(inst.container, original)
    in_flight = box.get("result", {})
    out.check(overlapped, "the first run ended before the configuration changed: nothing was in flight")
    said = broken.stderr.decode(errors="replace")
    out.check(
        broken.returncode == 78 and f"jobctl: error: config: {CONFIG}: invalid TOML" in said
        and f"line {broken_line}" in said,
        f"a request with jobs.toml broken: {broken.returncode} {said!r}",
    )  # fmt: skip
    out.check(
        in_flight.get("rc") == 0 and in_flight.get("stdout") == "version 1\nstill version 1\n",
        f"the run in flight: {in_flight or box}",
    )
    out.check(
        changed.returncode == 0 and changed.stdout == b"version 2\n",
        f"a request after the change: {completed(changed)}",
    )
    return out


# ----------------------------------------------------------------------------------------- bad input

DEADLINE_ERROR = (
    "jobrunner: error: bad-request: no complete request line within 10 s "
    "(hint: send one line, ending in a newline)\n"
)


def runner_processes(inst: Installation) -> list[str]:
    return [
        line for line in inst.sh("ps -eo args").splitlines() if any(mark in line for mark in RUNNER_MARKS)
    ]


def slow_loris(inst: Installation, connections: int = 60, interval: float = 3.0) -> Outcome:
    """`connections` clients that send one byte every `interval` seconds, never a newline: each is closed at
    the request deadline with an error line (or, where job.socket limits connections per user, refused at
    once by systemd and counted by it), another developer is served meanwhile, nothing is left."""
    out = Outcome("slow-loris")
    out.check(not wait_for_runs_to_end(inst), "runs of earlier cases did not end")
    logs_before = set(inst.sh(f"ls {inst.logs}/e2e-hello 2>/dev/null || true").split())
    refused_before = int(socket_state(inst)["NRefused"])
    thread, box = run_in_thread(
        lambda: client(inst, "loris", str(connections), str(interval), "run e2e-hello slow")
    )
    time.sleep(interval + 1)
    during = inst.jobctl("run", "e2e-hello", "meanwhile", user=SECOND_DEVELOPER)
    thread.join()
    if "error" in box:
        raise box["error"]
    clients = box["result"]
    left = wait_for_runs_to_end(inst, timeout=10)
    lingering = runner_processes(inst)
    refused_by_systemd = int(socket_state(inst)["NRefused"]) - refused_before
    new_logs = set(inst.sh(f"ls {inst.logs}/e2e-hello").split()) - logs_before
    answered = [c for c in clients if c["reply"]]
    refused = [c for c in clients if not c["reply"] and c["closed_after"] is not None]
    closed = [c["closed_after"] for c in answered if c["closed_after"] is not None]
    wrong = [c for c in answered if c["reply"] != DEADLINE_ERROR]
    out.figures = {
        "connections": connections,
        "closed_at_deadline": len(answered) - len(wrong),
        "refused_by_systemd": len(refused),
        "closed_after_s": [round(min(closed), 1), round(max(closed), 1)] if closed else None,
        "bytes_sent_each": max(c["sent"] for c in clients),
    }
    out.check(
        len(answered) + len(refused) == connections,
        f"{connections - len(answered) - len(refused)} connections were never closed",
    )
    out.check(
        len(refused) == refused_by_systemd,
        f"{len(refused)} closed without a word, systemd refused {refused_by_systemd}",
    )
    out.check(not wrong, f"{len(wrong)} got another reply, e.g. {wrong[:2]}")
    # The deadline counts from when the runner starts reading: its start-up comes on top (60 runners
    # starting at once on 2 CPUs: up to 10 s).
    out.check(
        bool(closed) and min(closed) >= REQUEST_DEADLINE_S - 0.5 and max(closed) <= REQUEST_DEADLINE_S + 20,
        f"closed after {out.figures['closed_after_s']} s, not at the {REQUEST_DEADLINE_S:g} s deadline",
    )
    out.check(during.returncode == 0, f"another developer during the slow-loris: {completed(during)}")
    out.check(not left and not lingering, f"left behind: {left} {lingering}")
    out.check(len(new_logs) == 1, f"run logs created: {sorted(new_logs)} (only the other developer's run)")
    return out


STABLE_CODES = frozenset(
    {"bad-request", "unknown-job", "bad-arguments", "forbidden", "busy", "config", "credential", "internal"}
)
TEXT_ERROR = re.compile(r"jobrunner: error: ([a-z-]+): .+")
TEXT_EXIT = re.compile(r"jobrunner: (\S+) \(run \S+\) exited with (\d+) after \d+\.\d s")
LIST_LINE = re.compile(r"[a-z][a-z0-9_-]*(  .*)?")


def judge_fuzz_reply(case: dict[str, Any]) -> tuple[str, str]:  # noqa: PLR0911
    """(what the reply was, the problem or ""): an error, a run, a list, or nothing (early close)."""
    reply = Reply.of(case)
    if reply.timeout or reply.connect_error:
        return "none", f"no reply: {case!r}"[:300]
    if case["delivery"] == "early" or case["size"] == 0:
        # Closed at once (nobody reads a reply), or ended before its first byte: nothing was asked, and
        # nothing is answered (docs/protocol.md).
        return "none", f"a reply to a connection that sent nothing: {reply.raw[:300]!r}" if reply.raw else ""
    if reply.elapsed > REQUEST_DEADLINE_S + 10:
        return "slow", f"replied after {reply.elapsed:.1f} s"
    if TRACEBACK in reply.raw or '.py", line ' in reply.raw:
        return "traceback", "a traceback in the reply"
    request = base64.b64decode(case["request"])
    if request.lstrip()[:1] in (b"{", b"["):
        final = reply.final()
        if final is None:
            return "malformed", f"not exactly one final event: {reply.raw[:300]!r}"
        if final["event"] == "error":
            ok = final["code"] in STABLE_CODES and "\n" not in final["message"]
            return f"error:{final['code']}", "" if ok else f"error event: {final}"
        if final["event"] == "exit":
            return "run", "" if final["job"] in ("hostile-quick", "hostile-echo") else f"ran {final}"
        return "list", ""
    lines = reply.raw.splitlines()
    if not reply.raw.endswith("\n") or not lines:
        return "malformed", f"no final line: {reply.raw[-300:]!r}"
    if match := TEXT_ERROR.fullmatch(lines[-1]):
        ok = match[1] in STABLE_CODES and len(lines) == 1
        return f"error:{match[1]}", "" if ok else f"text error: {reply.raw[:300]!r}"
    if match := TEXT_EXIT.fullmatch(lines[-1]):
        return "run", "" if match[1] in ("hostile-quick", "hostile-echo") else f"ran {lines[-1]}"
    if b"list" in request and all(LIST_LINE.fullmatch(line) for line in lines):
        return "list", ""
    return "malformed", f"unexpected reply: {reply.raw[:300]!r}"


def fuzz_socket(inst: Installation, seed: int | None = None) -> Outcome:
    """Random and hostile requests on the installed socket, eight at a time: each gets one well-formed
    final answer within the deadline (an error with a stable code, or, for a mutation that happened to
    make a valid request, a harmless run or list), no traceback, no key; nothing is left afterwards."""
    out = Outcome("fuzz")
    seed = secrets.randbelow(2**32) if seed is None else seed
    out.check(not wait_for_runs_to_end(inst), "runs of earlier cases did not end")
    cursor = journal_cursor(inst)
    cases = client(inst, "fuzz", str(seed))
    left = wait_for_runs_to_end(inst, timeout=20)
    journal = journal_since(inst, cursor, "-o", "cat").decode(errors="replace")
    answers: dict[str, int] = {}
    findings = []
    for case in cases:
        answer, problem = judge_fuzz_reply(case)
        answers[answer] = answers.get(answer, 0) + 1
        if problem:
            findings.append(f"{case['category']}/{case['delivery']} {case['request'][:60]}: {problem}")
        leaks = leaked_forms(case["reply"].encode(), key_forms(inst.secret.encode()))
        if leaks:
            findings.append(f"{case['category']}: the key in the reply ({leaks})")
    if "internal error" in journal or TRACEBACK in journal:
        findings.append("the runner logged an internal error: " + journal[journal.find("internal") :][:500])
    if left or runner_processes(inst):
        findings.append(f"left behind: {left} {runner_processes(inst)}")
    out.figures = {"seed": seed, "cases": len(cases), "findings": len(findings), "answers": answers}
    out.problems += findings
    return out


# ----------------------------------------------------------------------------------------------- secrets


def key_forms(key: bytes) -> dict[str, bytes]:
    """How `key` could be recognised in output: as is, hex, base64 (each alignment, both alphabets) and
    URL-encoded; derived here, not from the runner's redact.py, so that a gap there fails here."""
    forms = {"plain": key, "hex": key.hex().encode(), "HEX": key.hex().upper().encode()}
    quoted = urllib.parse.quote(key, safe="").encode()
    forms["url"] = quoted
    forms["url-lower"] = re.sub(rb"%[0-9A-F]{2}", lambda m: m.group().lower(), quoted)
    for pad in range(3):
        # The characters of the encoding that depend on the key alone: where two encodings of it, with
        # different bytes around it, agree.
        a = base64.b64encode(b"\x00" * pad + key + b"\x00\x00")
        b = base64.b64encode(b"\xff" * pad + key + b"\xff\xff")
        same = bytes(x if x == y else 0 for x, y in zip(a, b, strict=True)).strip(b"\x00")
        forms[f"base64+{pad}"] = same
        forms[f"base64url+{pad}"] = same.replace(b"+", b"-").replace(b"/", b"_")
    return forms


WINDOW = 12  # a run of this many characters of a form counts as recognisable


def leaked_forms(data: bytes, forms: dict[str, bytes]) -> list[str]:
    """The forms of which any WINDOW-long piece occurs in `data`."""
    found = []
    for name, form in forms.items():
        if any(form[i : i + WINDOW] in data for i in range(max(1, len(form) - WINDOW + 1))):
            found.append(name)
    return found


def second_key() -> str:
    """A key whose URL encoding, hex and base64 all differ from it: / + ? & : and = need escaping."""
    h = secrets.token_hex
    return f"{h(4)}/{h(4)}+{h(4)}?{h(3)}&{h(3)}:{h(3)}={h(2)}"


@dataclass
class Leak:
    where: str
    forms: list[str]


def secrets_in_output(inst: Installation) -> Outcome:
    """A job prints its key every way issue 4 names (plainly, split across two writes, on stderr, from
    the environment, base64 and base64url at each alignment, hex, URL-encoded, in an exception's
    traceback, and last without a newline), through jobctl, jobctl --json, socat, and as an operator's
    `systemctl start`: nothing recognisable reaches the client, the run log or the journal."""
    out = Outcome("secrets")
    key = second_key()
    ct = inst.container
    ct.run(["jobrunner", "creds", "set", SECOND_CREDENTIAL], input=key.encode())
    try:
        cursor = journal_cursor(inst)
        forms = key_forms(key.encode()) | {
            f"api-key {k}": v for k, v in key_forms(inst.secret.encode()).items()
        }
        json_run = inst.jobctl("--json", "run", "hostile-leak")
        text_run = inst.jobctl("run", "hostile-leak")
        socat = ct.run(["socat", "-t", "30", "-", "UNIX-CONNECT:/run/job.sock"], user=inst.developer,
                       input=b"run hostile-leak\n", check=False)  # fmt: skip
        operator = ct.run(["systemctl", "start", "job@hostile-leak"], check=False)
        wait_for_runs_to_end(inst)
        events = [json.loads(line) for line in json_run.stdout.splitlines()]
        printed = Reply("\n".join(json.dumps(e) for e in events)).output()
        log = inst.sh(f"cat {events[-1]['log']}") if events and "log" in events[-1] else ""
        journal = journal_since(inst, cursor, "-o", "json")
    finally:
        ct.run(["jobrunner", "creds", "rm", SECOND_CREDENTIAL], check=False)
    places = {
        "jobctl --json": json_run.stdout + json_run.stderr,
        "jobctl --json, decoded": printed.encode(),
        "jobctl": text_run.stdout + text_run.stderr,
        "socat": socat.stdout + socat.stderr,
        "systemctl start": operator.stdout + operator.stderr,
        "run log": log.encode(),
        "journal": journal,
    }
    leaks = [Leak(where, found) for where, data in places.items() if (found := leaked_forms(data, forms))]
    out.figures = {"forms": len(forms), "places": len(places), "leaks": len(leaks)}
    out.check(not leaks, f"the key, recognisably: {leaks}")
    # The job did print all of it (the test is not vacuous), and the runner masked it.
    labels = (
        "plain",
        "split",
        "stderr",
        "env",
        "base64",
        "base64url",
        "hex",
        "HEX",
        "url",
        "urllower",
        "last",
    )
    for label in labels:
        out.check(f"{label}: " in printed, f"the job did not print its {label} line")
    masked = [line for line in printed.splitlines() if line.startswith(labels) and "***" not in line]
    out.check(not masked, f"lines the runner did not mask: {masked}")
    out.check(
        "RuntimeError: cannot authenticate with ***" in printed, "the exception's message is not masked"
    )
    out.check(printed.endswith("last: ***"), f"the last write, without a newline: {printed[-40:]!r}")
    out.check(json_run.returncode == text_run.returncode == 0, "the leaking job failed")
    out.check(operator.returncode == 0, f"systemctl start job@hostile-leak: {operator.stderr!r}")
    out.check(b"***" in journal, "the operator's run did not reach the journal (nothing to check there)")
    return out


def secrets_in_errors(inst: Installation) -> Outcome:
    """Error paths that could echo a key: jobs.toml quoting it (an unknown key, a workdir), a job that
    prints it and times out, the runner killed after it was printed, and requests that quote it (job
    name, argument, unknown field): none echoes it."""
    out = Outcome("secrets-in-errors")
    key = inst.secret
    forms = key_forms(key.encode())
    cursor = journal_cursor(inst)
    seen: dict[str, bytes] = {}

    def record(where: str, result: subprocess.CompletedProcess[bytes]) -> None:
        seen[where] = result.stdout + result.stderr

    bad_key = f'\n[jobs.hostile-badkey]\ncommand = ["/bin/true"]\n"{key}" = 1\n'
    with edited_config(inst, lambda text: text + bad_key):
        record("config: unknown key", inst.jobctl("run", "hostile-quick"))
    bad_workdir = f'\n[jobs.hostile-badworkdir]\ncommand = ["/bin/true"]\nworkdir = "{key}"\n'
    # Applied: the run must reach the job's own unit (which holds no key) and fail there, not be
    # answered by the front door because the job's units are not there yet.
    with edited_config(inst, lambda text: text + bad_workdir, apply=True):
        result = inst.jobctl("--json", "run", "hostile-badworkdir")
        record("config: workdir", result)
        events = [json.loads(line) for line in result.stdout.splitlines()]
        if events and events[-1].get("run_id"):
            seen["run log: not started"] = inst.sh(
                f"cat {inst.logs}/hostile-badworkdir/{events[-1]['run_id']}.log"
            ).encode()
    timed_out = inst.jobctl("--json", "run", "hostile-leak-timeout")
    record("timeout", timed_out)
    final = json.loads(timed_out.stdout.splitlines()[-1]) if timed_out.stdout else {}
    out.check(final.get("timed_out") is True, f"the leaking job did not time out: {final}")
    if final.get("log"):
        seen["run log: timeout"] = inst.sh(f"cat {final['log']}").encode()
    for where, request in {
        "request: job name": json.dumps({"op": "run", "job": key}),
        "request: text job name": f"run {key}",
        "request: argument": json.dumps({"op": "run", "job": "hostile-quick", "args": [key]}),
        "request: argument to a pattern": json.dumps({"op": "run", "job": "e2e-hello", "args": [key + "!"]}),
        "request: unknown field": json.dumps({"op": "run", "job": "hostile-quick", key: 1}),
        "request: unknown op": json.dumps({"op": key}),
        "request: text unknown op": key,
    }.items():
        answer = client(inst, "send", base64.b64encode(request.encode() + b"\n").decode())
        seen[where] = answer["reply"].encode()
        out.check(answer["reply"] != "", f"{where}: no reply")
    wait_for_runs_to_end(inst)
    seen["journal"] = journal_since(inst, cursor, "-o", "json")
    out.check("run log: not started" in seen, "the bad workdir's run never started: its error not reached")
    leaks = [Leak(where, found) for where, data in seen.items() if (found := leaked_forms(data, forms))]
    out.figures = {"paths": len(seen), "leaks": len(leaks)}
    out.check(not leaks, f"the key, recognisably: {leaks}")
    # Answered by hostile-quick's unit, which does not hold the key: the key is cut, not redacted.
    cut = f"{key[:3]!r}... ({len(key)} characters)".encode()
    out.check(cut in seen["config: unknown key"], f"config error: {seen['config: unknown key']!r}")
    return out


def short_key_refused(inst: Installation) -> Outcome:
    out = Outcome("short-key")
    name = "hostile-short"
    result = inst.container.run(["jobrunner", "creds", "set", name], input=b"1234567", check=False)
    said = result.stderr.decode(errors="replace")
    stored = inst.container.run(["test", "-e", f"{CREDSTORE}/{name}"], check=False).returncode == 0
    out.check(
        result.returncode == 65 and "too short: 7 bytes, at least 8" in said and "mangle" in said,
        f"jobrunner creds set with a 7-byte key: {result.returncode} {said!r}",
    )
    out.check(not stored, "the short key was stored")
    return out


# ------------------------------------------------------------------- resource limits (cgroup v1 only)

# The distros whose systemd boots on cgroup v1, where these containers can enforce TasksMax= and
# MemoryMax=: bookworm (252). Trixie's 257 does not, so its tests are not even parametrized for it (no
# skip): tests/vm/test_vm.py::test_a_fork_bomb_and_a_memory_hog_are_stopped_and_reported and
# ::test_doctor_says_the_firewall_and_the_limits_are_enforced prove the limits on 257 (and 252) in a VM.
CGROUP_V1_DISTROS = [distro for distro in selected_distros() if distro == "bookworm"]

LIMITS = {"tasks_max": 32, "memory_max": "128M"}  # given to install.sh in the limited container
BOMB = "bomb() { bomb | bomb & }; bomb; sleep 3600"
HOG = "import sys; chunks = []\nwhile True: chunks.append(bytearray(16 << 20)); sys.stdout.write('.'); sys.stdout.flush()"
LIMITED_JOBS = f"""
[jobs.hostile-bomb]
description = "A fork bomb"
command = ["/bin/sh", "-c", "{BOMB}"]
timeout = 5

[jobs.hostile-hog]
description = "Allocates memory until something stops it"
command = ["/usr/bin/python3", "-c", {toml_literal(HOG)}]
timeout = 30
"""
# Safety nets on the host, above the container: should TasksMax=/MemoryMax= fail, the bomb and the hog
# still stop here instead of taking the machine down.
CONTAINER_PIDS_MAX = 4096
CONTAINER_MEMORY_MAX = 4 << 30


def own_v1_cgroup(controller: str) -> Path | None:
    """This process's cgroup in the cgroup v1 hierarchy of `controller`, if the host mounts one."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            mount = Path("/sys/fs/cgroup") / controller
            return mount / path.lstrip("/") if (mount / "cgroup.procs").exists() else None
    return None


def limits_unavailable(distro: str) -> str | None:
    """Why the fork bomb and the memory hog cannot be contained here, or None."""
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    if not unified.exists():
        unified = Path("/sys/fs/cgroup/cgroup.controllers")
    cgroup2 = set(unified.read_text().split()) if unified.exists() else set()
    missing_v1 = [c for c in ("pids", "memory") if own_v1_cgroup(c) is None]
    if missing_v1:
        return (
            f"no cgroup v1 {' and '.join(missing_v1)} hierarchy on this host (cgroup2 controllers: "
            f"{' '.join(sorted(cgroup2)) or 'none'}), and the e2e containers get no cgroup2 controllers"
        )
    if distro != "bookworm":
        return (
            f"systemd 257 ({distro}) refuses to boot on cgroup v1, and this host binds the pids and memory "
            f"controllers to cgroup v1 (cgroup2 has only: {' '.join(sorted(cgroup2)) or 'none'}), so a "
            "cgroup2 container cannot enforce TasksMax= or MemoryMax=; bookworm (systemd 252) proves them"
        )
    return None


def _remove_cgroup_tree(path: Path) -> None:
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


@contextlib.contextmanager
def cgroup_v1_container(distro: str) -> Iterator[Container]:
    """A container booted on cgroup v1 (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=0) in pids and memory cgroups of
    its own (below ours, with the safety nets), whose controller hierarchies its systemd may write.

    container.py starts systemd-nspawn with a fixed environment; its Popen call is wrapped here, for
    this boot only, to change the hierarchy mode and to enter the v1 cgroups first. nspawn mounts v1
    controllers read-only; a bind remount makes them writable and `daemon-reexec` makes systemd use them.
    """
    created: list[Path] = []
    real_popen = subprocess.Popen

    def popen(argv: Any, *args: Any, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
        if isinstance(argv, list) and "systemd-nspawn" in argv:
            assert argv[:2] == ["sh", "-c"], f"container.py starts nspawn differently now: {argv[:3]}"
            name = next(a for a in argv if a.startswith("--machine=")).partition("=")[2]
            enter = []
            for controller, limit_file, limit in (
                ("pids", "pids.max", CONTAINER_PIDS_MAX),
                ("memory", "memory.limit_in_bytes", CONTAINER_MEMORY_MAX),
            ):
                base = own_v1_cgroup(controller)
                assert base is not None
                path = base / CGROUP_PARENT / name
                path.mkdir(parents=True)
                created.append(path)
                (path / limit_file).write_text(str(limit))
                enter.append(f'echo $$ > "{path}/cgroup.procs"')
            argv = [*argv[:2], " && ".join([*enter, argv[2]]), *argv[3:]]
            env = {**(env or {}), "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "0"}
        return real_popen(argv, *args, env=env, **kwargs)

    try:
        with mock.patch.object(subprocess, "Popen", popen):
            ct = Container.boot(distro, name="e2elimits", binds_ro={REPO: "/src"})
        try:
            for controller in ("pids", "memory"):
                ct.run(["mount", "-o", "remount,bind,rw", f"/sys/fs/cgroup/{controller}"])
            ct.run(["systemctl", "daemon-reexec"])
            ct.run(["systemctl", "is-system-running", "--wait"], check=False)
            yield ct
        finally:
            ct.stop()
    finally:
        for path in created:
            _remove_cgroup_tree(path)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # CGROUP_PARENT, when no other container uses it


def install(ct: Container, *options: str) -> Installation:
    """jobrunner installed as the session's `installed` is (conftest.py), with install.sh `options`."""
    add_users(ct)
    make_project(ct)
    copy_checkout(ct)
    result = run_install(ct, "--project", PROJECT, *options)
    ct.run(["usermod", "--append", "--groups", GROUP, DEVELOPER])
    write_jobs(ct, jobs_toml())
    secret = "demo-" + secrets.token_hex(16)
    store_credential(ct, CREDENTIAL, secret)
    return Installation(
        container=ct, project=PROJECT, outputs=f"{PROJECT}/outputs", logs=f"{PROJECT}/logs", group=GROUP,
        developer=DEVELOPER, outsider=OUTSIDER, secret=secret, credential=CREDENTIAL,
        install_output=result.stdout.decode(),
    )  # fmt: skip


def install_limited(ct: Container) -> Installation:
    """Installed with install.sh's --tasks-max and --memory-max, and a fork bomb and a memory hog."""
    inst = install(ct, "--tasks-max", str(LIMITS["tasks_max"]), "--memory-max", str(LIMITS["memory_max"]))
    write_jobs(ct, jobs_toml() + LIMITED_JOBS)
    return inst


def unit_limits_enforced(inst: Installation) -> str | None:
    """None when a job@ instance really gets pids.max and a memory limit; else what it got instead."""
    probe = inst.sh(
        "systemd-run --wait --pipe --quiet -p TasksMax=7 -p MemoryMax=50M sh -c "
        "'cat /sys/fs/cgroup/pids$(grep :pids: /proc/self/cgroup | cut -d: -f3)/pids.max "
        "/sys/fs/cgroup/memory$(grep :memory: /proc/self/cgroup | cut -d: -f3)/memory.limit_in_bytes' || true"
    )
    return (
        None
        if probe.split() == ["7", str(50 << 20)]
        else f"a probe unit with TasksMax=7 MemoryMax=50M got {probe!r}"
    )


def resource_limits(inst: Installation) -> Outcome:
    """A fork bomb stays within TasksMax=, a memory hog within MemoryMax=; both are stopped and the client
    is told; nothing is left, and the next run is served."""
    bomb = inst.jobctl("--json", "run", "hostile-bomb", timeout=120)
    bomb_events = [json.loads(line) for line in bomb.stdout.splitlines()]
    bomb_text = inst.jobctl("run", "hostile-bomb", timeout=120)
    hog = inst.jobctl("--json", "run", "hostile-hog", timeout=120)
    hog_events = [json.loads(line) for line in hog.stdout.splitlines()]
    hog_text = inst.jobctl("run", "hostile-hog", timeout=120)
    left = wait_for_runs_to_end(inst)
    processes = inst.sh("ps -eo args")
    after = inst.jobctl("run", "e2e-hello", "after")
    return judge_resource_limits(
        bomb_events=bomb_events, bomb_text=bomb_text, hog_events=hog_events, hog_text=hog_text, left=left,
        processes=processes, after=after,
    )  # fmt: skip


def judge_resource_limits(
    *,
    bomb_events: list[dict[str, Any]],
    bomb_text: subprocess.CompletedProcess[bytes],
    hog_events: list[dict[str, Any]],
    hog_text: subprocess.CompletedProcess[bytes],
    left: list[str],
    processes: str,
    after: subprocess.CompletedProcess[bytes],
) -> Outcome:
    """resource_limits' verdict on what it saw; also tests/vm's, on what the VM's guest.py saw."""
    out = Outcome("resource-limits")
    bomb_end = bomb_events[-1] if bomb_events else {}
    hog_end = hog_events[-1] if hog_events else {}
    bomb_said = "".join(e.get("text", "") for e in bomb_events if e["event"] == "output")
    out.figures = {"bomb": {k: bomb_end.get(k) for k in ("exit_code", "timed_out", "warnings")},
                   "hog": {k: hog_end.get(k) for k in ("exit_code", "signal", "warnings")}}  # fmt: skip
    out.check(
        bomb_end.get("event") == "exit" and bomb_end.get("timed_out") is True, f"the fork bomb: {bomb_end}"
    )
    out.check(
        "fork" in bomb_said.lower(),
        f"the job's own fork failures did not reach the client: {bomb_said[:300]!r}",
    )
    out.check(
        any(f"TasksMax={LIMITS['tasks_max']}" in w for w in bomb_end.get("warnings", [])),
        f"the client is not told the run hit its process limit: {bomb_end.get('warnings')}",
    )
    out.check(
        f"TasksMax={LIMITS['tasks_max']}".encode() in bomb_text.stderr, f"jobctl: {bomb_text.stderr[-300:]!r}"
    )
    out.check(hog_end.get("event") == "exit" and hog_end.get("signal") == 9, f"the memory hog: {hog_end}")
    out.check(
        any("MemoryMax=" in w for w in hog_end.get("warnings", [])),
        f"the client is not told the run hit its memory limit: {hog_end.get('warnings')}",
    )
    out.check(b"MemoryMax=" in hog_text.stderr, f"jobctl: {hog_text.stderr[-300:]!r}")
    out.check(not left and "bomb" not in processes, f"left behind: {left} {processes}")
    out.check(after.returncode == 0, f"the next run: {completed(after)}")
    return out


@pytest.fixture(scope="module")
def limited(installed: Installation) -> Iterator[Installation]:
    """jobrunner in a bookworm container where TasksMax= and MemoryMax= are enforced (cgroup v1)."""
    reason = limits_unavailable(installed.container.distro)
    if reason:
        pytest.skip(reason)
    with cgroup_v1_container(installed.container.distro) as ct:
        inst = install_limited(ct)
        reason = unit_limits_enforced(inst)
        if reason:
            pytest.skip(f"the cgroup v1 container does not enforce unit limits: {reason}")
        yield inst


# ----------------------------------------------------------------------------------------------- tests


def test_a_burst_of_500_connections_and_50_slow_runs(hostile: Installation) -> None:
    outcome = load_burst(hostile)
    assert outcome.problems == [], outcome.figures


@pytest.mark.parametrize("policy", ["reject", "queue", "parallel"])
def test_concurrency_policy_under_50_simultaneous_triggers(hostile: Installation, policy: str) -> None:
    outcome = concurrency_policy(hostile, policy)
    assert outcome.problems == [], outcome.figures


def test_one_user_at_the_limit_does_not_starve_another(hostile: Installation) -> None:
    outcome = per_user_limit(hostile)
    assert outcome.problems == [], outcome.figures


@pytest.mark.parametrize("scenario", [*STUBBORN, "stall"])
def test_nothing_of_a_run_survives(fault_runs: dict[str, FaultRun], scenario: str) -> None:
    """timeout, cancel, end: a job that ignores SIGTERM, forks grandchildren and double-forks a daemon.
    sigkill: its runner killed with SIGKILL mid-job. stall: a client that neither reads nor leaves."""
    outcome = check_fault_run(fault_runs[scenario])
    assert outcome.problems == [], outcome.figures


def test_a_client_that_leaves_or_stalls_costs_no_memory(hostile: Installation) -> None:
    outcome = client_stalls(hostile)
    assert outcome.problems == [], outcome.figures


def test_a_full_disk_is_reported_and_survived(hostile: Installation) -> None:
    outcome = full_disk(hostile)
    assert outcome.problems == [], outcome.figures


@pytest.mark.parametrize("fault", ["missing", "corrupt", "undecryptable", "expired"])
def test_a_broken_credential_runs_nothing(hostile: Installation, fault: str) -> None:
    outcome = credential_fault(hostile, fault)
    assert outcome.problems == [], outcome.figures


def test_jobs_toml_broken_or_changed_while_a_run_is_in_flight(hostile: Installation) -> None:
    outcome = config_in_flight(hostile)
    assert outcome.problems == [], outcome.figures


def test_slow_loris_connections_are_closed_at_the_deadline(hostile: Installation) -> None:
    outcome = slow_loris(hostile)
    assert outcome.problems == [], outcome.figures


def test_fuzzed_requests_on_the_installed_socket(hostile: Installation) -> None:
    outcome = fuzz_socket(hostile)
    assert outcome.problems == [], outcome.figures


def test_a_printed_key_is_never_recognisable(hostile: Installation) -> None:
    outcome = secrets_in_output(hostile)
    assert outcome.problems == [], outcome.figures


def test_no_error_path_echoes_the_key(hostile: Installation) -> None:
    outcome = secrets_in_errors(hostile)
    assert outcome.problems == [], outcome.figures


def test_a_short_key_is_refused(hostile: Installation) -> None:
    outcome = short_key_refused(hostile)
    assert outcome.problems == [], outcome.figures


@pytest.mark.parametrize("container", CGROUP_V1_DISTROS, indirect=True)  # trixie: tests/vm (above)
def test_a_fork_bomb_and_a_memory_hog_are_contained(limited: Installation) -> None:
    outcome = resource_limits(limited)
    assert outcome.problems == [], outcome.figures
