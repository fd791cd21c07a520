"""One sandbox per job, under real systemd (252 and 257): each job's units, generated from jobs.toml,
load that job's credentials and no other, and apply its own network and limits, for socket runs
(direct and through the front door) and operators' starts alike.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator

import pytest

from .conftest import (
    Installation,
    copy_checkout,
    exposure,
    jobs_toml,
    operator_start,
    run_install,
    write_jobs,
)
from .container import Container

pytestmark = pytest.mark.e2e

SOCKET = "/run/job.sock"
OTHER = "e2e-other-key"  # a second credential, which only e2e-other uses
EXPIRING = "e2e-expiring"
PORT = 48213  # a TCP listener on the container's loopback (the host of every job)

UNIT_JOBS = f"""
[jobs.e2e-nocreds]
description = "Shows the credentials it finds"
command = ["/bin/sh", "-c", 'echo "dir=${{CREDENTIALS_DIRECTORY-unset}}"; ls /run/credentials; cat /proc/self/cgroup; env']

[jobs.e2e-onecred]
description = "Lists its credentials directory"
command = ["/bin/sh", "-c", 'ls "$CREDENTIALS_DIRECTORY"']
credentials = ["api-key"]

[jobs.e2e-other]
description = "Uses the other key"
command = ["/bin/sh", "-c", 'ls "$CREDENTIALS_DIRECTORY"']
credentials = ["{OTHER}"]

[jobs.e2e-expired]
description = "Uses a key that has expired"
command = ["/bin/true"]
credentials = ["{EXPIRING}"]

[jobs.e2e-offline]
description = "The probe, with no network"
command = ["bin/e2e-probe"]
args = "[0-9.:]+"
network = "none"

[jobs.e2e-listed]
description = "The probe, allowed 127.0.0.1 only"
command = ["bin/e2e-probe"]
args = "[0-9.:]+"
network = ["127.0.0.1"]
tasks_max = 7
memory_max = "300M"
jit = true
"""


@pytest.fixture(scope="module")
def units(installed: Installation) -> Iterator[Installation]:
    """The tests' jobs and a second credential, and one that has expired; all removed afterwards."""
    ct = installed.container
    ct.run(["jobrunner", "creds", "set", OTHER], input=b"other-" + secrets.token_hex(16).encode())
    # Expired one second after it was sealed (systemd-creds --not-after=, since 252).
    ct.run(
        ["sh", "-c", f"printf %s expiring-{secrets.token_hex(8)} | systemd-creds encrypt --name={EXPIRING} "
         f"--not-after=+1s - /etc/credstore.encrypted/{EXPIRING}"],
    )  # fmt: skip
    write_jobs(ct, jobs_toml() + UNIT_JOBS)
    ct.run(["systemd-run", "--unit=e2e-listener", "--collect", "socat",
            f"TCP-LISTEN:{PORT},bind=0.0.0.0,fork,reuseaddr", "EXEC:/bin/true"])  # fmt: skip
    # Past the expiring credential's not-after (systemd-creds refuses it from then on), and the listener up.
    ct.run(
        ["sh", "-c", f"until ! systemd-creds decrypt --name={EXPIRING} /etc/credstore.encrypted/{EXPIRING} - "
         f">/dev/null 2>&1; do sleep 0.1; done; until socat -T1 /dev/null TCP:127.0.0.1:{PORT}; do sleep 0.1; done"],
        timeout=60,
    )  # fmt: skip
    try:
        yield installed
    finally:
        ct.run(["systemctl", "stop", "e2e-listener"], check=False)
        write_jobs(ct, jobs_toml())
        ct.run(["rm", "-f", f"/etc/credstore.encrypted/{OTHER}", f"/etc/credstore.encrypted/{EXPIRING}"])


def socat(ct: Container, request: str, user: str = "alice") -> str:
    out = ct.run(["socat", "-t", "60", "-", f"UNIX-CONNECT:{SOCKET}"], user=user, input=request.encode())
    return out.stdout.decode()


def probe(units: Installation, job: str, *addresses: str) -> dict[str, object]:
    res = units.jobctl("run", job, "--", *addresses)
    assert res.returncode == 0, res.stderr
    result: dict[str, object] = json.loads(res.stdout)
    return result


def test_a_job_without_credentials_finds_none(units: Installation) -> None:
    for out in (
        units.jobctl("run", "e2e-nocreds").stdout.decode(),
        socat(units.container, "run e2e-nocreds\n"),
    ):
        assert "dir=unset" in out, out
        unit = re.search(r"(job-e2e-nocreds@[^/\s]+\.service)", out)
        assert unit, out
        listing = out.split("dir=unset\n", 1)[1].split("0::", 1)[0]
        assert unit.group(1) not in listing  # no credentials directory of its own under /run/credentials
        assert units.secret not in out and "CREDENTIALS_DIRECTORY" not in out


def test_a_job_finds_exactly_its_own_credential(units: Installation) -> None:
    # Two credentials are stored (api-key and the other key); each job sees the one it names.
    assert units.jobctl("run", "e2e-onecred").stdout.decode().split() == ["api-key"]
    assert socat(units.container, "run e2e-other\n").splitlines()[0] == OTHER
    # The operator's start gets the job's own unit too: the same credentials, no other.
    ct = units.container
    for job, expected in (("e2e-onecred", "api-key"), ("e2e-other", OTHER), ("e2e-nocreds", "dir=unset")):
        lines = operator_start(ct, job)[1].splitlines()
        assert expected in lines, lines
        names = {"api-key", OTHER} - {expected}
        assert not names & set(lines), lines


def test_an_expired_credential_breaks_only_the_jobs_that_use_it(units: Installation) -> None:
    res = units.jobctl("run", "e2e-expired")
    assert res.returncode == 78, res
    err = res.stderr.decode()
    assert "e2e-expired" in err and EXPIRING in err and "jobrunner creds set" in err
    reply = socat(units.container, "run e2e-expired\n")
    assert reply.startswith("jobrunner: error: credential: job 'e2e-expired' did not start"), reply
    # Every other job, and list, keep working.
    assert units.jobctl("run", "e2e-fail").returncode == 3
    assert units.jobctl("run", "e2e-onecred").returncode == 0
    listed = units.jobctl("list")
    assert listed.returncode == 0 and b"e2e-expired" in listed.stdout


def test_network_none_cannot_reach_the_hosts_loopback(units: Installation) -> None:
    address = f"127.0.0.1:{PORT}"
    assert probe(units, "e2e-probe", address)["connect"] == {address: "ok"}  # the default job can
    offline = probe(units, "e2e-offline", address)
    assert offline["inet_socket"] == "EAFNOSUPPORT"  # RestrictAddressFamilies=AF_UNIX
    assert offline["connect"] != {address: "ok"}


def test_an_address_list_allows_those_addresses_and_no_other(units: Installation) -> None:
    listed = probe(units, "e2e-listed", f"127.0.0.1:{PORT}", f"127.0.0.2:{PORT}")
    # A blocked address: its packets are dropped (cgroup BPF), so the connection times out.
    assert listed["connect"][f"127.0.0.1:{PORT}"] == "ok"
    assert listed["connect"][f"127.0.0.2:{PORT}"] in ("ETIMEDOUT", "EPERM"), listed
    # The default job reaches both (loopback is not link-local).
    both = probe(units, "e2e-probe", f"127.0.0.1:{PORT}", f"127.0.0.2:{PORT}")
    assert both["connect"] == {f"127.0.0.1:{PORT}": "ok", f"127.0.0.2:{PORT}": "ok"}


def test_operator_starts_get_the_jobs_profile(units: Installation) -> None:
    ct = units.container
    for unit in ("job@e2e-listed.service", "job-e2e-listed@x.service"):
        props = ct.run(
            ["systemctl", "show", "-p", "TasksMax", "-p", "MemoryMax", "-p", "MemoryDenyWriteExecute",
             "-p", "IPAddressAllow", unit],
        ).stdout.decode()  # fmt: skip
        assert "TasksMax=7" in props and "MemoryMax=314572800" in props, props
        assert "MemoryDenyWriteExecute=no" in props and "IPAddressAllow=127.0.0.1/32" in props, props
    props = ct.run(["systemctl", "show", "-p", "PrivateNetwork", "job@e2e-offline.service"]).stdout.decode()
    assert "PrivateNetwork=yes" in props
    # And it behaves so: an operator's run of the offline probe cannot make an inet socket.
    ct.run(["systemctl", "start", "job@e2e-offline.service"])
    journal = ct.run(["journalctl", "-u", "job@e2e-offline.service", "-o", "cat", "--no-pager"]).stdout
    assert b'"inet_socket": "EAFNOSUPPORT"' in journal


def test_security_scores(units: Installation) -> None:
    ct = units.container

    # The generated units verify clean (from the generator's directory, where systemd-analyze finds them).
    units_of = [f"{prefix}{job}{suffix}" for job in ("e2e-offline", "e2e-listed", "e2e-onecred")
                for prefix, suffix in (("job-", ".socket"), ("job-", "@x.service"), ("job@", ".service"))]  # fmt: skip
    verified = ct.run(["sh", "-c", 'cd /run/systemd/generator && systemd-analyze verify "$@"', "sh", *units_of],
                      check=False)  # fmt: skip
    assert (verified.returncode, verified.stdout, verified.stderr) == (0, b"", b""), verified
    assert exposure(ct, "job-e2e-offline@x.service") <= 0.6
    assert exposure(ct, "job-e2e-probe@x.service") <= 1.2
    assert exposure(ct, "job@x.service") <= 0.6  # the front door


def test_units_follow_jobs_toml(units: Installation) -> None:
    ct = units.container

    def unit_files(pattern: str) -> list[str]:
        out = ct.run(["systemctl", "list-unit-files", "--no-legend", pattern], check=False).stdout.decode()
        return sorted(line.split()[0] for line in out.splitlines() if line.strip())

    assert unit_files("*e2e-nocreds*") == [
        "job-e2e-nocreds.socket",
        "job-e2e-nocreds@.service",
        "job@e2e-nocreds.service",
    ]
    # Added through jobrunner-config.path alone (no manual reload): wait for the event, its socket.
    ct.run(["sh", "-c", "cat >> /etc/jobrunner/jobs.toml"],
           input=b'\n[jobs.e2e-temp]\ncommand = ["/bin/echo", "temp"]\n')  # fmt: skip
    ct.run(
        [
            "sh",
            "-c",
            "for i in $(seq 300); do [ -S /run/job/e2e-temp.sock ] && exit 0; sleep 0.1; done; exit 1",
        ]
    )
    assert units.jobctl("run", "e2e-temp").stdout == b"temp\n"
    # Removed: its units and its socket are gone.
    text = ct.run(["cat", "/etc/jobrunner/jobs.toml"]).stdout.decode().split("\n[jobs.e2e-temp]")[0]
    write_jobs(ct, text + "\n")
    assert unit_files("*e2e-temp*") == []
    assert ct.run(["test", "-e", "/run/job/e2e-temp.sock"], check=False).returncode != 0
    active = ct.run(["systemctl", "list-units", "--all", "--no-legend", "*e2e-temp*"]).stdout.decode()
    assert active.strip() == ""


def test_many_runs_over_five_jobs_leave_nothing_behind(units: Installation) -> None:
    ct = units.container
    jobs = ["e2e-nocreds", "e2e-onecred", "e2e-other", "e2e-hello", "e2e-fail"]
    script = " ".join(
        f"( for i in $(seq 40); do jobctl run {job} >/dev/null 2>&1; echo $? >> /tmp/e2e-statuses; done ) &"
        for job in jobs
    )
    ct.run(["rm", "-f", "/tmp/e2e-statuses"])
    ct.run(["su", "alice", "-s", "/bin/sh", "-c", f"{script} wait"], timeout=600)
    statuses = ct.run(["cat", "/tmp/e2e-statuses"]).stdout.decode().split()
    assert len(statuses) == 200 and set(statuses) <= {"0", "3"}, statuses
    ct.run(
        [
            "sh",
            "-c",
            "for i in $(seq 100); do [ -z \"$(systemctl list-units --all --no-legend 'job-*@*.service' 'job@*.service')\" ] && exit 0; sleep 0.1; done; exit 1",
        ]
    )
    assert ct.run(["sh", "-c", "ls /run/credentials | grep '^job' || true"]).stdout == b""
    assert ct.run(["sh", "-c", "pgrep -u jobrunner-job || true"]).stdout == b""


def test_upgrade_from_one_unit_for_every_job(units: Installation) -> None:
    # What the layout before one unit per job left: a credential drop-in of job@.service that loaded the
    # key into every run. Installing again converges: the drop-in is gone, the credential stays, and a
    # job that does not name it does not get it.
    ct = units.container
    legacy = "/etc/systemd/system/job@.service.d/50-credential-api-key.conf"

    def credentials_of_an_operators_run() -> str:
        """The $CREDENTIALS_DIRECTORY of e2e-nocreds (which names no credential) when an operator starts
        it: its unit, job@e2e-nocreds.service, is one the drop-in reaches (a socket run's
        job-e2e-nocreds@... never was). systemd sets it only when it loads a credential into the unit,
        and fails the start (243/CREDENTIALS) when one does not decrypt."""
        journal = operator_start(ct, "e2e-nocreds")[1]
        (line,) = [line for line in journal.splitlines() if line.startswith("dir=")]  # the job ran
        return line.removeprefix("dir=")

    ct.write_file(legacy, "[Service]\nLoadCredentialEncrypted=api-key:/etc/credstore.encrypted/api-key\n")
    ct.run(["systemctl", "daemon-reload"])
    try:
        # The old layout in effect: the key is decrypted for a job that does not name it.
        assert credentials_of_an_operators_run() == "/run/credentials/job@e2e-nocreds.service"
        copy_checkout(ct)
        out = run_install(ct, "--project", units.project).stdout.decode()
        assert f"removed {legacy}" in out
        assert ct.run(["test", "-e", legacy], check=False).returncode != 0
        assert credentials_of_an_operators_run() == "unset"
    finally:
        ct.run(["rm", "-f", legacy])  # whatever install.sh left, for the tests after this one
        ct.run(["systemctl", "daemon-reload"])
    assert ct.run(["test", "-e", "/etc/credstore.encrypted/api-key"], check=False).returncode == 0
    probed = json.loads(units.jobctl("run", "e2e-probe").stdout)
    assert "CREDENTIALS_DIRECTORY" not in probed["environment"]
    ok = units.jobctl("run", "e2e-hello", "--", "upgraded")
    assert ok.returncode == 0 and b"hello upgraded" in ok.stdout  # and the key it names still decrypts


def test_a_new_group_reaches_the_jobs_sockets(units: Installation) -> None:
    # install.sh --group: the jobs' sockets link job.socket's drop-in, and are made again with it.
    ct = units.container
    ct.run(["groupadd", "-f", "e2e-devs"])
    try:
        run_install(ct, "--project", units.project, "--group", "e2e-devs")
        for path in ("/run/job.sock", "/run/job/e2e-nocreds.sock"):
            assert ct.run(["stat", "-c", "%G %a", path]).stdout.decode().split() == ["e2e-devs", "660"], path
    finally:
        run_install(ct, "--project", units.project)
    assert ct.run(["stat", "-c", "%G", "/run/job/e2e-nocreds.sock"]).stdout.decode().strip() == "jobrunner"
    assert units.jobctl("run", "e2e-fail").returncode == 3
