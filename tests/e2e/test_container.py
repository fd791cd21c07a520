"""Prove that the harness gives the product a real, working systemd of the right version.

Each test exercises something jobrunner depends on (encrypted credentials,
socket activation with Accept=yes and group-restricted sockets, DynamicUser=,
BPF-based sandboxing) or a promise of the harness itself (the cached rootfs
is never written, stop() leaves nothing behind).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .container import CGROUP_PARENT, EXPECTED_SYSTEMD, READY_MARKER, CgroupLayout, Container

pytestmark = pytest.mark.e2e


def sh(ct: Container, script: str) -> str:
    """Run a shell snippet as root inside; return its stdout."""
    return ct.run(["sh", "-euc", script]).stdout.decode()


def assert_running(ct: Container) -> None:
    state = ct.run(["systemctl", "is-system-running"], check=False).stdout.decode().strip()
    failed = ct.run(["systemctl", "--failed", "--plain", "--no-legend"], check=False).stdout.decode()
    assert state == "running", f"{state}; failed units:\n{failed}"


def test_pid1_is_systemd_of_expected_version(container: Container) -> None:
    assert Path(f"/proc/{container.leader}/comm").read_text().strip() == "systemd"
    assert sh(container, "cat /proc/1/comm").strip() == "systemd"
    first = sh(container, "systemctl --version").splitlines()[0]
    match = re.match(r"systemd (\d+) ", first)
    assert match, first
    assert int(match.group(1)) == EXPECTED_SYSTEMD[container.distro]
    assert sh(container, "systemd-detect-virt --container").strip() == "systemd-nspawn"
    # Not just "booted": nothing failed on the way (degraded would hide broken units).
    assert_running(container)


def test_encrypted_credential_reaches_dynamic_user_service(container: Container) -> None:
    secret = "s3cret-" + secrets.token_hex(8)
    container.run(["systemd-creds", "encrypt", "--name=demo", "-", "/root/demo.cred"], input=secret.encode())
    assert secret.encode() not in container.run(["cat", "/root/demo.cred"]).stdout
    out = container.run(
        [
            "systemd-run", "--wait", "--pipe", "--quiet",
            "-p", "DynamicUser=yes",
            "-p", "LoadCredentialEncrypted=demo:/root/demo.cred",
            "sh", "-c", 'cat "$CREDENTIALS_DIRECTORY/demo"; echo; id -u',
        ]
    ).stdout.decode().split()  # fmt: skip
    assert out[0] == secret
    assert int(out[1]) >= 61184, "DynamicUser= should run the service as a dynamic uid"


SOCKET_UNIT = """\
[Socket]
ListenStream=/run/t.sock
Accept=yes
SocketGroup=e2esock
SocketMode=0660
"""

SERVICE_UNIT = """\
[Service]
DynamicUser=yes
StandardInput=socket
StandardOutput=socket
ExecStart=/bin/sh -c 'echo "reply from uid $(id -u)"'
"""


@pytest.fixture
def group_socket(container: Container) -> str:
    """t.socket (Accept=yes, group e2esock, 0660) + t@.service; users e2emember and e2eoutsider."""
    container.write_file("/etc/systemd/system/t.socket", SOCKET_UNIT)
    container.write_file("/etc/systemd/system/t@.service", SERVICE_UNIT)
    sh(
        container,
        "getent group e2esock >/dev/null || groupadd e2esock\n"
        "id e2emember >/dev/null 2>&1 || useradd -m -G e2esock e2emember\n"
        "id e2eoutsider >/dev/null 2>&1 || useradd -m e2eoutsider\n"
        "systemctl daemon-reload\n"
        "systemctl restart t.socket\n",
    )
    return "/run/t.sock"


def test_socket_group_grants_access_to_members_only(container: Container, group_socket: str) -> None:
    assert sh(container, f"stat -c '%a %G %F' {group_socket}").strip() == "660 e2esock socket"
    connect = ["socat", "-T5", "-", f"UNIX-CONNECT:{group_socket}"]

    member = container.run(connect, user="e2emember")
    reply = member.stdout.decode()
    match = re.fullmatch(r"reply from uid (\d+)\n", reply)
    assert match, reply
    assert int(match.group(1)) != 0, "the per-connection service must not run as root"

    outsider = container.run(connect, user="e2eoutsider", check=False)
    assert outsider.returncode != 0
    assert outsider.stdout == b""
    assert b"Permission denied" in outsider.stderr


def test_run_applies_container_groups_env_and_input(container: Container, group_socket: str) -> None:
    # Group membership comes from the container's /etc/group (setpriv --init-groups).
    assert "e2esock" in container.run(["id", "-Gn"], user="e2emember").stdout.decode().split()
    assert "e2esock" not in container.run(["id", "-Gn"], user="e2eoutsider").stdout.decode().split()
    env = container.run(["sh", "-c", 'echo "$HOME $USER $(pwd) $FOO"'], user="e2emember", env={"FOO": "bar"})
    assert env.stdout.decode().split() == ["/home/e2emember", "e2emember", "/home/e2emember", "bar"]
    assert container.run(["cat"], input=b"\x00binary\xff").stdout == b"\x00binary\xff"
    failing = container.run(["sh", "-c", "echo oops >&2; exit 3"], check=False)
    assert (failing.returncode, failing.stderr) == (3, b"oops\n")
    with pytest.raises(subprocess.CalledProcessError, match="oops"):
        container.run(["sh", "-c", "echo oops >&2; exit 3"])
    with pytest.raises(subprocess.TimeoutExpired):
        container.run(["sleep", "30"], timeout=0.5)


def test_ip_address_deny_is_enforced(container: Container) -> None:
    # Only true because the harness lets systemd use bpf() inside nspawn.
    listen = "TCP-LISTEN:7777,bind=127.0.0.1,fork,reuseaddr"
    # socat exits 143 on SIGTERM: without SuccessExitStatus the stop would leave a failed unit.
    unit = ["systemd-run", "--quiet", "--unit=e2e-echo", "-p", "SuccessExitStatus=143"]
    container.run([*unit, "socat", listen, "SYSTEM:echo pong"])
    # Retry: the listener may not be bound yet.
    probe = (
        "for i in $(seq 20); do socat -T2 - TCP:127.0.0.1:7777 </dev/null && exit 0; sleep 0.1; done; exit 1"
    )
    # The same connection with and without the deny list: only the deny list tells them apart.
    connect = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect"]
    attempt = ["timeout", "5", "socat", "-", "TCP:127.0.0.1:7777"]
    try:
        container.run([*connect, "sh", "-c", probe])  # the listener is up
        allowed = container.run([*connect, *attempt], check=False)
        assert (allowed.returncode, allowed.stdout) == (0, b"pong\n"), allowed
        denied = container.run([*connect, "-p", "IPAddressDeny=any", *attempt], check=False)
        # Dropped by the BPF firewall: the connection hangs until `timeout` ends it (124), or connect()
        # fails with EPERM; any other failure (a missing listener, a typo) is not the deny list's.
        assert denied.stdout == b""
        assert denied.returncode == 124 or b"Operation not permitted" in denied.stderr, denied
    finally:
        container.run(["systemctl", "stop", "e2e-echo"], check=False)


def test_src_is_the_repository_read_only(container: Container) -> None:
    assert container.run(["cat", "/src/pyproject.toml"]).stdout.startswith(b"[build-system]")
    touch = container.run(["touch", "/src/e2e-should-not-exist"], check=False)
    assert touch.returncode != 0
    assert b"Read-only file system" in touch.stderr


def test_writes_land_in_overlay_not_in_cached_rootfs(container: Container, tmp_path: Path) -> None:
    token = secrets.token_hex(4)
    paths = [
        f"/etc/e2e-{token}",
        f"/usr/local/bin/e2e-{token}",
        f"/var/lib/e2e-{token}",
        f"/home/e2e-{token}",
    ]
    for path in paths:
        container.write_file(path, token, mode=0o755)
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_text("in a tree")
    container.copy_in(tmp_path / "tree", f"/opt/e2e-{token}")
    assert sh(container, f"cat /opt/e2e-{token}/sub/f") == "in a tree"
    assert sh(container, f"stat -c %a {paths[1]}").strip() == "755"
    for path in paths:
        assert not (container.rootfs / path.lstrip("/")).exists()
    marker = container.rootfs / READY_MARKER
    changed = subprocess.run(
        ["find", str(container.rootfs), "-newer", str(marker), "-print", "-quit"],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    assert changed == "", f"the cached rootfs was modified: {changed}"


def test_parallel_container_is_isolated_and_stop_leaves_nothing(container: Container) -> None:
    other = Container.boot(container.distro, name="e2eother")
    try:
        assert other.name != container.name
        other.write_file("/etc/only-in-other", "x")
        assert container.run(["test", "-e", "/etc/only-in-other"], check=False).returncode == 1
        assert sh(other, "hostname").strip() == other.name
        # Something left running in the background, detached from run()'s pipes;
        # a unique duration tells it apart from other sessions' sleeps.
        seconds = str(100000 + secrets.randbelow(900000))
        other.run(["sh", "-c", f"setsid sleep {seconds} </dev/null >/dev/null 2>&1 &"])
        assert _eventually(lambda: any(_cmdline(int(p)) == f"sleep\x00{seconds}\x00" for p in _pids()))
        nspawn_pid, leader = other.nspawn_pid, other.leader
    finally:
        other.stop()
    for pid in (nspawn_pid, leader):
        assert not _running(pid), f"pid {pid} survived stop()"
    assert not any(p.exists() for p in CgroupLayout.detect().dirs(f"{CGROUP_PARENT}/{other.name}"))
    assert not any(_running(int(p)) and _cmdline(int(p)) == f"sleep\x00{seconds}\x00" for p in _pids())
    # The session container is unaffected.
    assert_running(container)


def _eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"
