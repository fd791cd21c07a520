"""The security claims of README.md, proven against the installed product under real systemd.

A developer (in the socket's group) can use the key through jobs but cannot read it by any of the
obvious routes, and a job is boxed in: it writes only outputs and logs, sees no other home, has a
private /tmp and no capabilities. Each test fails if the claim it names breaks.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Installation, operator_start, write_jobs

pytestmark = pytest.mark.e2e

SECURITY_JOBS = """
[jobs.sec-hold]
description = "Holds the key until it is killed (for the tests that try to steal it; 10 minutes at most)"
command = ["/bin/sh", "-c", "echo $$ > \\"$JOB_OUTPUT_DIR/pid\\"; echo holding; exec sleep 600"]
credentials = ["{credential}"]
env = {{ API_KEY = "credential:{credential}" }}
concurrency = "parallel"

[jobs.sec-leak]
description = "Prints the key in plain ways: the runner must redact it"
command = ["/bin/sh", "-c", "cat \\"$CREDENTIALS_DIRECTORY/{credential}\\"; echo \\"env: $API_KEY\\" >&2"]
credentials = ["{credential}"]
env = {{ API_KEY = "credential:{credential}" }}

[jobs.sec-probe]
description = "Reports what the sandbox lets a job do"
command = ["/bin/sh", "-c", '''
{writes}
echo "home: $(ls -A /home | tr '\\n' ' ')"
echo "developer-home: $(ls -A /home/{developer} | tr '\\n' ' ')"
echo "tmp-before: $(ls -A /tmp | tr '\\n' ' ')"
echo "var-tmp-before: $(ls -A /var/tmp | tr '\\n' ' ')"
touch "/tmp/probe-$JOB_RUN_ID"
grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status | tr '\\t' ' '
echo "uid: $(id -u) groups: $(id -G)"
echo "run: $JOB_RUN_ID"
''']
"""


# Directories that the job's identity could write without the sandbox (test_a_job_writes_only_...):
# one every user may write, one its group may, and one in the project that its group may.
WORLD_WRITABLE = "/srv/e2e-sec-world"
GROUP_WRITABLE = "/srv/e2e-sec-group"
PROJECT_SHARED = "e2e-sec-shared"  # in the project

# Each write the probe tries, as the job and outside the sandbox (one shell script for both). Files
# carry the run's id, so that the two runs and the runs of different tests never meet.
WRITES = """
for path in /etc/probe /usr/probe /root/probe "$HOME/../probe" {project}/probe /home/{developer}/probe \\
            /var/cache/jobrunner/jobs.toml.marshal /var/tmp/probe-$JOB_RUN_ID /dev/shm/probe-$JOB_RUN_ID \\
            /run/lock/probe-$JOB_RUN_ID {world}/probe-$JOB_RUN_ID {group}/probe-$JOB_RUN_ID \\
            {project}/{shared}/probe-$JOB_RUN_ID "$JOB_OUTPUT_DIR/probe" {logs}/probe-$JOB_RUN_ID; do
    if touch "$path" 2>/dev/null; then echo "write-ok $path"; else echo "write-denied $path"; fi
done
"""


def writes(inst: Installation) -> str:
    return WRITES.format(
        project=inst.project,
        developer=inst.developer,
        logs=inst.logs,
        world=WORLD_WRITABLE,
        group=GROUP_WRITABLE,
        shared=PROJECT_SHARED,
    )


@pytest.fixture(scope="module")
def secured(installed: Installation) -> Iterator[Installation]:
    """The tests' jobs added to jobs.toml, and the directories above; all gone afterwards."""
    ct = installed.container
    original = ct.run(["cat", "/etc/jobrunner/jobs.toml"]).stdout.decode()
    config = SECURITY_JOBS.format(
        credential=installed.credential,
        project=installed.project,
        developer=installed.developer,
        writes=writes(installed),  # a TOML literal string: the backslashes stay as they are
    )
    shared = f"{installed.project}/{PROJECT_SHARED}"
    installed.sh(
        f"install -d -m 1777 {WORLD_WRITABLE}; install -d -m 2770 -g {installed.group} {GROUP_WRITABLE}\n"
        f"install -d -m 2770 -o {installed.developer} -g {installed.group} {shared}"
    )
    write_jobs(ct, original + config)
    try:
        yield installed
    finally:
        write_jobs(ct, original)
        installed.sh(
            f"rm -rf {WORLD_WRITABLE} {GROUP_WRITABLE} {shared} {installed.logs}/probe-* /dev/shm/probe-* "
            f"/run/lock/probe-* /home/{installed.developer}/private-notes"
        )


def as_developer(inst: Installation, command: str) -> tuple[int, bytes]:
    result = inst.container.run(["sh", "-c", command], user=inst.developer, check=False)
    return result.returncode, result.stdout + result.stderr


def as_root(inst: Installation, command: str) -> tuple[int, bytes]:
    result = inst.container.run(["sh", "-c", command], check=False)
    return result.returncode, result.stdout + result.stderr


def wait_until_no_unit(inst: Installation, job: str) -> None:
    """Until systemd has let go of every unit of `job`'s runs (a run's end, then its unit's stop)."""
    inst.container.run(
        ["sh", "-c", f"until [ -z \"$(systemctl list-units --all --plain --no-legend 'job-{job}@*')\" ]; "
         "do sleep 0.1; done"],
        timeout=60,
    )  # fmt: skip


def start_holding_job(inst: Installation) -> int:
    """Start sec-hold, detached, as the developer; return the job's pid in the container."""
    started = inst.jobctl("--json", "run", "--detach", "sec-hold")
    assert started.returncode == 0, started.stderr
    accepted = json.loads(started.stdout.splitlines()[0])
    pid_file = f"{accepted['output_dir']}/pid"
    inst.container.run(["sh", "-c", f"until [ -s {pid_file} ]; do sleep 0.05; done"], timeout=60)
    return int(inst.container.run(["cat", pid_file]).stdout)


@pytest.fixture
def holding(secured: Installation) -> Iterator[int]:
    """A run of sec-hold (its pid), stopped afterwards."""
    pid = start_holding_job(secured)
    try:
        yield pid
    finally:
        secured.container.run(["kill", str(pid)], check=False)
        wait_until_no_unit(secured, "sec-hold")


def test_developer_cannot_read_the_encrypted_store_or_the_host_key(secured: Installation) -> None:
    for path in (f"/etc/credstore.encrypted/{secured.credential}", "/var/lib/systemd/credential.secret"):
        status, output = as_developer(secured, f"cat {path}")
        assert status != 0 and b"Permission denied" in output, (path, output)
    # As root, both exist: the denial above is the permission, not a missing file.
    secured.container.run(["test", "-s", f"/etc/credstore.encrypted/{secured.credential}"])
    secured.container.run(["test", "-s", "/var/lib/systemd/credential.secret"])


def environment_in_memory(inst: Installation, pid: int) -> tuple[int, int]:
    """Where the process keeps its environment (env_start, env_end of /proc/PID/stat, which only
    those who may trace it see), in memory that /proc/PID/maps shows mapped."""
    fields = inst.sh(f"cat /proc/{pid}/stat").rsplit(")", 1)[1].split()
    start, end = int(fields[47]), int(fields[48])  # fields 50 and 51; the first after ")" is field 3
    mapped = [
        (int(low, 16), int(high, 16))
        for low, high in (
            line.split()[0].split("-") for line in inst.sh(f"cat /proc/{pid}/maps").splitlines()
        )
    ]
    assert 0 < start < end and any(low <= start and end <= high for low, high in mapped), (start, end)
    return start, end


def test_developer_cannot_read_a_running_jobs_credentials_environment_or_memory(
    secured: Installation, holding: int
) -> None:
    pid, secret = holding, secured.secret.encode()
    start, end = environment_in_memory(secured, pid)
    attempts = {
        "credential directory": f"cat /run/credentials/job-sec-hold@*.service/{secured.credential}",
        "environ": f"cat /proc/{pid}/environ",
        # The key is in the environment (API_KEY), so in memory: read it where it is mapped.
        "memory": (
            f'python3 -c \'import sys; f = open("/proc/{pid}/mem", "rb", 0); f.seek({start}); '
            f"sys.stdout.buffer.write(f.read({end - start}))'"
        ),
        # PTRACE_SEIZE: attaches without stopping the job.
        "ptrace": (
            "python3 -c 'import ctypes,sys; libc=ctypes.CDLL(None, use_errno=True); "
            f"r=libc.ptrace(0x4206, {pid}, 0, 0); sys.exit(0 if r == 0 else 1)'"
        ),
    }
    for what, command in attempts.items():
        # The same command as root works, and finds the key: what the developer is denied is the key.
        status, output = as_root(secured, command)
        assert status == 0, f"root could not read the job's {what}: {output[-300:]!r}"
        assert what == "ptrace" or secret in output, what
        status, output = as_developer(secured, command)
        assert status != 0, f"developer could read the job's {what}: {output[:200]!r}"
        assert secret not in output


def test_printed_keys_are_redacted_in_the_stream_the_run_log_and_the_journal(secured: Installation) -> None:
    ct = secured.container
    result = secured.jobctl("--json", "run", "sec-leak")
    assert result.returncode == 0, result.stderr
    assert secured.secret.encode() not in result.stdout + result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    printed = "".join(e.get("text", "") for e in events if e["event"] == "output")
    assert "***" in printed and "env: ***" in printed
    log = ct.run(["cat", events[-1]["log"]]).stdout
    assert b"***" in log and secured.secret.encode() not in log
    # A socket run's output goes to its client and its run log, not to the journal; an operator's
    # `systemctl start job@NAME` writes it there: redacted too.
    operator = operator_start(ct, "sec-leak")[1]
    assert "env: ***" in operator and "exited with 0" in operator, operator
    journal = ct.run(["journalctl", "-o", "json", "--no-pager", "-u", "job-*@*", "-u", "job@*"]).stdout
    assert journal and secured.secret.encode() not in journal


def test_running_the_app_or_the_runner_directly_fails_clearly(secured: Installation) -> None:
    status, output = as_developer(secured, f"cd {shlex.quote(secured.project)} && bin/hello")
    assert status != 0 and b"jobctl run hello" in output
    status, output = as_developer(secured, "PYTHONPATH=/usr/local/lib/jobrunner python3 -m runner hello")
    assert status == 78 and b"jobctl run NAME" in output and b"Traceback" not in output


def report_of(text: str) -> dict[str, list[str]]:
    report: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        report.setdefault(key.rstrip(":"), []).append(value)
    return report


def probe(inst: Installation) -> dict[str, list[str]]:
    result = inst.jobctl("run", "sec-probe")
    assert result.returncode == 0, result.stderr
    return report_of(result.stdout.decode())


def test_a_job_writes_only_its_outputs_and_logs(secured: Installation) -> None:
    report = probe(secured)
    run = report["run"][0]
    # The same writes outside the sandbox, by the job's identity: a user of its own (no passwd entry:
    # its uid is another dynamic one) with the job's groups.
    ct = secured.container
    scratch = secured.sh("mktemp -d").strip()
    # The developer's home may be closed to others (0700, trixie's default): the job reaches the project
    # through its unit's bind mount, and the identity outside needs a way in to try the same directory.
    home = f"/home/{secured.developer}"
    home_mode = secured.sh(f"stat -c %a {home}").strip()
    try:
        ct.run(["chmod", "0777", scratch])
        ct.run(["chmod", "o+x", home])
        outside = report_of(
            ct.run(
                ["setpriv", "--reuid=61999", "--regid=61999", f"--groups={secured.group},jobrunner-jobs",
                 "env", "HOME=/tmp", "JOB_RUN_ID=outside", f"JOB_OUTPUT_DIR={scratch}", "sh", "-c", writes(secured)]
            ).stdout.decode()
        )  # fmt: skip
    finally:
        ct.run(["chmod", home_mode, home])
        secured.sh(f"rm -rf {scratch} /var/tmp/probe-outside /dev/shm/probe-outside /run/lock/probe-outside")

    def named(paths: list[str], run_id: str, output_dir: str) -> set[str]:
        """The paths with the run's id as RUN and its output directory as OUTPUT, to compare the runs."""
        return {path.replace(output_dir, "OUTPUT").replace(run_id, "RUN") for path in paths}

    inside = {
        status: named(report[status], run, f"{secured.outputs}/sec-probe/{run}")
        for status in ("write-ok", "write-denied")
    }
    # Its own output directory and the logs, and /var/tmp and /dev/shm, which PrivateTmp= and
    # PrivateDevices= make private to the run (checked below).
    assert inside["write-ok"] == {
        "OUTPUT/probe",
        f"{secured.logs}/probe-RUN",
        "/var/tmp/probe-RUN",
        "/dev/shm/probe-RUN",
    }, report
    # Outside the sandbox the same identity writes more: every directory others may write, its group's
    # in the project and elsewhere. Those the sandbox refuses (ProtectSystem=strict, the project read-only).
    refused_by_the_sandbox = inside["write-denied"] & named(outside["write-ok"], "outside", scratch)
    assert refused_by_the_sandbox >= {
        "/run/lock/probe-RUN",  # the host's, which every user may write
        f"{WORLD_WRITABLE}/probe-RUN",
        f"{GROUP_WRITABLE}/probe-RUN",
        f"{secured.project}/{PROJECT_SHARED}/probe-RUN",
    }, (report, outside)
    # ... and not the parsed copy of jobs.toml that connections trust (runner/config_cache.py).
    assert "/var/cache/jobrunner/jobs.toml.marshal" in report["write-denied"]
    # That /var/tmp and /dev/shm are the run's own: the host's have no probe.
    for path in (f"/var/tmp/probe-{run}", f"/dev/shm/probe-{run}"):
        assert ct.run(["test", "-e", path], check=False).returncode != 0, path


def test_a_job_sees_no_home_but_the_project(secured: Installation) -> None:
    report = probe(secured)
    assert report["home"] == [f"{secured.developer} "]  # not mallory's, not anyone else's
    assert report["developer-home"] == [f"{secured.project.rsplit('/', 1)[1]} "]
    # Outside the sandbox the developer's home holds more than the project (removed by `secured`).
    secured.container.run(["touch", f"/home/{secured.developer}/private-notes"])
    assert probe(secured)["developer-home"] == report["developer-home"]


def private_directories(inst: Installation, job: str) -> str:
    """The directories systemd made on the host for PrivateTmp= of `job`'s runs (/tmp and /var/tmp)."""
    return inst.sh(
        f"ls -d /tmp/systemd-private-*-job-{job}@* /var/tmp/systemd-private-*-job-{job}@* 2>/dev/null || true"
    )


def test_a_job_has_a_private_tmp_and_var_tmp_gone_after_the_run(secured: Installation, holding: int) -> None:
    # While a run lasts, its /tmp and /var/tmp are directories of systemd's on the host ...
    assert len(private_directories(secured, "sec-hold").split()) == 2
    first = probe(secured)
    second = probe(secured)
    for name in ("tmp-before", "var-tmp-before"):
        # The first run's files are gone for the second, which sees only what it wrote itself.
        assert f"probe-{first['run'][0]}" not in second[name][0], (name, second)
    assert "probe-" not in first["tmp-before"][0]
    assert first["var-tmp-before"][0].split() == [f"probe-{first['run'][0]}"]
    host_tmp = secured.sh("ls -A /tmp /var/tmp")
    assert "probe-" not in host_tmp
    # ... and once a run is over, systemd has removed both.
    wait_until_no_unit(secured, "sec-probe")
    assert private_directories(secured, "sec-probe") == ""


def test_a_job_has_no_capabilities(secured: Installation) -> None:
    report = probe(secured)
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert report[name] == ["0000000000000000"], (name, report[name])
    uid = int(report["uid"][0].split()[0])
    assert uid != 0 and 61184 <= uid <= 65519  # a DynamicUser= uid, not root, not a real user
