"""job@.service's sandbox takes effect: each directive, checked where it acts, not only in the score.

One job (bin/e2e-probe, from tests/e2e/project) tries what the sandbox forbids and reports each attempt;
the same probe run by the developer outside the sandbox shows that the attempt is otherwise allowed,
so every assertion here fails if its directive stops working. What the README claims about writes,
/home, /tmp and capabilities is in test_security.py.

Not checked here, because this container cannot enforce them (no cgroup controllers): TasksMax= and
MemoryMax= (only that install.sh sets them, in test_install.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .conftest import Installation, gated_run

pytestmark = pytest.mark.e2e

PORT = 7791
LINK_LOCAL = "169.254.169.254"  # where clouds serve instance metadata (and the machine's credentials)
LINK_LOCAL_6 = "fe80::a9fe:a9fe"  # IPv6 link-local (fe80::/10): some clouds serve metadata there too
SYSV_KEY = 0x4A0B5E  # bin/e2e-probe's IPC_SYSV_KEY


@dataclass(frozen=True)
class Probe:
    inside: dict[str, Any]  # as a job
    outside: dict[str, Any]  # the developer running the same program directly


@pytest.fixture(scope="module")
def listener(installed: Installation) -> Iterator[list[str]]:
    """A TCP listener on loopback and on a link-local address, IPv4 and IPv6, all on this container's lo
    (it has a network of its own, --private-network)."""
    ct = installed.container
    ct.run(["ip", "address", "add", f"{LINK_LOCAL}/32", "dev", "lo"])
    ct.run(["ip", "-6", "address", "add", f"{LINK_LOCAL_6}/128", "dev", "lo", "nodad"])
    try:
        for unit, listen in (
            ("e2e-sandbox-listener", f"TCP4-LISTEN:{PORT}"),
            ("e2e-sandbox-listener6", f"TCP6-LISTEN:{PORT},ipv6only=1"),
        ):
            ct.run(
                ["systemd-run", "--quiet", f"--unit={unit}", "-p", "SuccessExitStatus=143",
                 "socat", f"{listen},fork,reuseaddr", "SYSTEM:true"],
            )  # fmt: skip
        addresses = [f"127.0.0.1:{PORT}", f"{LINK_LOCAL}:{PORT}", f"::1:{PORT}", f"{LINK_LOCAL_6}%lo:{PORT}"]
        for address in addresses:  # each one up, from outside any sandbox
            host, _, port = address.rpartition(":")
            ct.run(
                ["python3", "-c", "import socket, sys, time\n"
                 "for _ in range(100):\n"
                 "    try: socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close(); break\n"
                 "    except OSError: time.sleep(0.1)\n"
                 "else: sys.exit(1)", host, port],
            )  # fmt: skip
        yield addresses
    finally:
        ct.run(["systemctl", "stop", "e2e-sandbox-listener", "e2e-sandbox-listener6"], check=False)
        ct.run(["ip", "address", "del", f"{LINK_LOCAL}/32", "dev", "lo"], check=False)
        ct.run(["ip", "-6", "address", "del", f"{LINK_LOCAL_6}/128", "dev", "lo"], check=False)


@pytest.fixture(scope="module")
def probe(installed: Installation, listener: list[str]) -> Iterator[Probe]:
    ct = installed.container
    # A System V shared memory segment anyone may attach: a job in its own IPC namespace cannot see it.
    ct.run(
        ["python3", "-c", f"import ctypes; assert ctypes.CDLL(None).shmget({SYSV_KEY}, 4096, 0o1666) >= 0"]
    )
    scratch = installed.sh("mktemp -d", user=installed.developer).strip()
    try:
        result = installed.jobctl("run", "e2e-probe", *listener)
        assert result.returncode == 0, result.stderr
        inside = json.loads(result.stdout.decode().splitlines()[0])
        outside = json.loads(
            ct.run(
                [f"{installed.project}/bin/e2e-probe", *listener],
                user=installed.developer,
                env={"JOB_OUTPUT_DIR": scratch},
            ).stdout
        )
        yield Probe(inside, outside)
    finally:
        ct.run(["sh", "-c", f"ipcrm --shmem-key {SYSV_KEY}"], check=False)
        ct.run(["rm", "-rf", scratch], check=False)


def test_no_new_privileges_and_a_seccomp_filter(probe: Probe) -> None:
    assert (probe.inside["no_new_privs"], probe.inside["seccomp"]) == ("1", "2")
    assert (probe.outside["no_new_privs"], probe.outside["seccomp"]) == ("0", "0")


def test_system_call_filter_denies_resource_calls(probe: Probe) -> None:
    # ~@resources: setpriority() is refused even to lower one's own priority.
    assert probe.outside["nice"] == "ok"
    assert probe.inside["nice"] == "EPERM"


def test_lock_personality(probe: Probe) -> None:
    assert probe.outside["personality"] == "ok"
    assert probe.inside["personality"] == "EPERM"


def test_memory_deny_write_execute(probe: Probe) -> None:
    assert probe.outside["wx_memory"] == "ok"
    # 252 refuses the mmap() with its seccomp filter (EPERM); 257 uses the kernel's own
    # PR_SET_MDWE where there is one (Linux 6.3+), which answers EACCES.
    assert probe.inside["wx_memory"] in ("EPERM", "EACCES")


def test_restrict_namespaces(probe: Probe) -> None:
    assert probe.inside["user_namespace"] == "EPERM"
    if probe.outside["user_namespace"] != "ok":
        pytest.skip(
            f"this kernel refuses unprivileged user namespaces anyway ({probe.outside['user_namespace']})"
        )


def test_the_job_gets_only_the_environment_the_runner_builds(probe: Probe) -> None:
    # Nothing of the runner's own (the unit's PYTHONPATH= and GLIBC_TUNABLES=, NOTIFY_SOCKET,
    # LISTEN_FDS, INVOCATION_ID): the job's environment is built, not inherited.
    # The probe names no credential, so its unit loads none: no CREDENTIALS_DIRECTORY either.
    job = {"PATH", "LANG", "HOME", "JOB_NAME", "JOB_RUN_ID", "JOB_OUTPUT_DIR"}
    assert set(probe.inside["environment"]) == job
    assert "PATH" in probe.outside["environment"]  # the probe does report what it was given


def test_restrict_address_families(probe: Probe) -> None:
    assert probe.outside["netlink_socket"] == "ok"
    assert probe.inside["netlink_socket"] == "EAFNOSUPPORT"
    assert probe.inside["inet_socket"] == "ok"  # jobs talk TCP


def test_restrict_suid_sgid(probe: Probe) -> None:
    assert probe.outside["setuid_bit"] == "ok"
    assert probe.inside["setuid_bit"] == "EPERM"


def test_private_ipc(probe: Probe) -> None:
    assert probe.outside["sysv_shm"] == "ok"
    assert probe.inside["sysv_shm"] == "ENOENT"


def test_protect_proc_shows_only_the_jobs_own_processes(probe: Probe) -> None:
    assert probe.inside["process_owners"] == [probe.inside["uid"]]
    assert len(probe.outside["process_owners"]) > 1  # root's, at least


def test_proc_subset_hides_system_files(probe: Probe) -> None:
    assert probe.outside["proc_meminfo"] is True
    assert probe.inside["proc_meminfo"] is False


def test_private_devices(probe: Probe) -> None:
    assert "console" in probe.outside["devices"]
    # PrivateDevices=yes: only the pseudo devices, no console, no disks.
    assert "console" not in probe.inside["devices"]
    assert {"null", "zero", "urandom", "shm"} <= set(probe.inside["devices"])


def test_ip_allow_list_blocks_link_local_only(probe: Probe, listener: list[str]) -> None:
    loopback, link_local, loopback_6, link_local_6 = listener
    assert probe.outside["connect"] == {address: "ok" for address in listener}
    assert probe.inside["connect"][loopback] == "ok"
    assert probe.inside["connect"][loopback_6] == "ok"
    # The BPF firewall drops the packets: connect() times out (or fails with EPERM on some kernels).
    assert probe.inside["connect"][link_local] in ("ETIMEDOUT", "EPERM")
    assert probe.inside["connect"][link_local_6] in ("ETIMEDOUT", "EPERM")


def test_no_core_dumps(probe: Probe) -> None:
    assert probe.inside["core_limit"] == 0


def test_identity_is_a_dynamic_user_of_the_jobs_own_in_the_developer_group(
    probe: Probe, installed: Installation
) -> None:
    uid = probe.inside["uid"]
    assert 61184 <= uid <= 65519, uid  # DynamicUser= range
    gid = int(installed.sh(f"getent group {installed.group} | cut -d: -f3"))
    assert gid in probe.inside["groups"]  # SupplementaryGroups=, for outputs and logs
    assert probe.inside["umask"] == "0007"
    # User=job-e2e-probe: every run of the job gets the same uid (while any run holds it)...
    again = installed.jobctl("run", "e2e-probe")
    assert json.loads(again.stdout.decode().splitlines()[0])["uid"] == uid
    # ...and another job's run another one: it cannot trace, signal or read the first job's processes.
    with gated_run(installed):
        users = installed.sh("for i in $(seq 100); do ps -o user:32= -C sleep && break; sleep 0.1; done")
        assert set(users.split()) == {"job-e2e-gate"}
        assert int(installed.sh("id -u job-e2e-gate")) != uid


def test_lock_directory_is_the_jobs_and_no_one_elses(installed: Installation, probe: Probe) -> None:
    # tmpfiles.d: /run/jobrunner-locks, 3770 root:jobrunner-jobs, a group that only the jobs' units
    # have (SupplementaryGroups=): the concurrency locks are out of the developers' reach.
    installed.jobctl("run", "e2e-linger")  # concurrency "reject": it takes its lock
    assert installed.sh("stat -c '%a %U %G' /run/jobrunner-locks").split() == [
        "3770",
        "root",
        "jobrunner-jobs",
    ]
    locks = installed.sh("stat -c '%n %a %G' /run/jobrunner-locks/e2e-linger.lock").split()
    assert locks[1:] == ["660", "jobrunner-jobs"]
    listing = installed.container.run(["ls", "/run/jobrunner-locks"], user=installed.developer, check=False)
    assert listing.returncode != 0 and b"Permission denied" in listing.stderr


def test_the_runner_reaches_the_journal_and_systemd_from_the_sandbox(installed: Installation) -> None:
    # Structured entries (JOB_NAME=, RUN_ID=) need the journal's socket; a STATUS= line for
    # `systemctl status` needs NotifyAccess=main and the notify socket. Both are AF_UNIX, in a read-only /run.
    with gated_run(installed) as accepted:
        run_id = accepted["run_id"]
        status = installed.sh(
            "until systemctl show --property=StatusText 'job-e2e-gate@*.service' | grep -q running; "
            "do sleep 0.1; done; systemctl show --property=StatusText 'job-e2e-gate@*.service'"
        )
    assert f"running e2e-gate (run {run_id}) for {installed.developer}" in status, status
    installed.container.run(["journalctl", "--sync"])
    entries = installed.sh(f"journalctl --output=json --no-pager RUN_ID={run_id}")
    fields = [json.loads(line) for line in entries.splitlines()]
    assert fields and all(f["JOB_NAME"] == "e2e-gate" for f in fields), entries
    assert fields[0]["SYSLOG_IDENTIFIER"] == "jobrunner" and fields[0]["_SYSTEMD_UNIT"].startswith(
        "job-e2e-gate@"
    )
