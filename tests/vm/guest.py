"""Runs inside the VM at boot (jobrunner-vm-test.service), as root; standard library only.

It does what a user and an operator would do, records what each step returned, writes it all as JSON
to /var/lib/jobrunner-vm/PHASE.json; the unit then powers the machine off (ExecStopPost=).
It judges nothing: the tests on the host (tests/vm/test_vm.py) do, each on its own part.

Its inputs: /root/jobrunner (a copy of the checkout, as a user's clone), /root/vm/jobs.toml and
/root/vm/project (the e2e tests' jobs and programs), and two strings that qemu hands over as firmware
config files (not on the disk): the phase and the credential's value.

- phase "tpm" (first boot, the machine's own TPM): install with install.sh (offline), store the key with
  `jobrunner creds set`, run a job that uses it, a fork bomb and a memory hog, jobs with an address list,
  `jobrunner doctor`, and probes of what systemd enforces with BPF here.
- phase "fresh-tpm" (the same disk, another TPM): try to decrypt the key, run the job that needs it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

FW_CFG = Path("/sys/firmware/qemu_fw_cfg/by_name/opt/jobrunner")
RESULTS = Path("/var/lib/jobrunner-vm")
CHECKOUT = "/root/jobrunner"
PROJECT = "/home/alice/project"
DEVELOPER = "alice"
CREDENTIAL = "api-key"
LIMITS = ("--tasks-max", "32", "--memory-max", "128M")  # as tests/e2e/test_hostile.py's LIMITS
NET_PORT = 48300
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def fw_cfg(name: str) -> str:
    subprocess.run(["modprobe", "qemu_fw_cfg"], check=False)
    return (FW_CFG / name / "raw").read_text()


def run(
    argv: list[str], *, user: str | None = None, input: bytes | None = None, timeout: float = 300
) -> dict[str, Any]:
    """Run argv (as root, or as `user` with a login's groups); what it returned, as text."""
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]
        env = {**ENV, "HOME": f"/home/{user}", "USER": user, "LOGNAME": user}
    else:
        env = {**ENV, "HOME": "/root"}
    started = time.monotonic()
    try:
        res = subprocess.run(
            argv, input=input, capture_output=True, timeout=timeout, env=env, cwd="/", check=False,
            stdin=None if input is not None else subprocess.DEVNULL,
        )  # fmt: skip
        rc, out, err = res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -1, e.stdout or b"", (e.stderr or b"") + b"\n[guest.py: timed out]"
    return {
        "argv": argv,
        "rc": rc,
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
        "seconds": round(time.monotonic() - started, 2),
    }


def sh(script: str, **kwargs: Any) -> dict[str, Any]:
    return run(["sh", "-c", script], **kwargs)


def settle() -> None:
    """Until no run of jobrunner-config.service (an edit of jobs.toml, applied) is queued or running."""
    sh("""for i in $(seq 600); do
    state=$(systemctl show -P ActiveState jobrunner-config.service)
    if [ "$state" != activating ] && ! systemctl list-jobs --no-legend | grep -q jobrunner-config; then exit 0; fi
    sleep 0.1
done""")  # fmt: skip


def job_units() -> list[str]:
    out = sh("systemctl list-units --no-legend --plain 'job@*.service' 'job-*@*.service'")["stdout"]
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_for_runs_to_end(timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while (units := job_units()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return units


def journal_cursor() -> str:
    out = sh("journalctl -n 0 --show-cursor --no-pager")["stdout"]
    return out.strip().rpartition("cursor: ")[2]


def journal_since(cursor: str) -> str:
    sh("journalctl --sync")
    return str(sh(f"journalctl --no-pager -o cat --after-cursor='{cursor}'")["stdout"])


def run_logs() -> dict[str, str]:
    """Every run log, by path relative to the logs directory."""
    logs = Path(PROJECT) / "logs"
    return {
        str(p.relative_to(logs)): p.read_text(errors="replace")
        for p in sorted(logs.rglob("*"))
        if p.is_file()
    }


def key_header(path: str) -> str:
    """The first 16 bytes of an encrypted credential, as hex: the key that sealed it."""
    try:
        head = b"".join(Path(path).read_bytes()[:256].split())[:24]
        return base64.b64decode(head)[:16].hex()
    except (OSError, ValueError):
        return ""


# ---------------------------------------------------------------------------------------------- phases


def listeners() -> None:
    """Two TCP listeners the jobs' address lists are tried against: 127.0.0.1 and 127.0.0.2."""

    def serve(address: str) -> None:
        server = socket.create_server((address, NET_PORT))
        while True:
            conn, _ = server.accept()
            conn.sendall(f"hello from {address}\n".encode())
            conn.close()

    for address in ("127.0.0.1", "127.0.0.2"):
        threading.Thread(target=serve, args=(address,), daemon=True).start()


def first_boot(secret: str, r: dict[str, Any]) -> None:
    r["systemd"] = run(["systemctl", "--version"])
    r["has_tpm2"] = run(["systemd-creds", "has-tpm2"])
    r["cgroup_controllers"] = Path("/sys/fs/cgroup/cgroup.controllers").read_text()
    # As a stock Debian 12 sets it (procps's protect-links.conf; on 13 linux-sysctl-defaults, which a
    # minimal system lacks): O_CREAT on another user's file in a sticky directory others can write fails.
    Path("/proc/sys/fs/protected_regular").write_text("2\n")
    r["protected_regular"] = Path("/proc/sys/fs/protected_regular").read_text().strip()
    r["lsm"] = (
        Path("/sys/kernel/security/lsm").read_text() if Path("/sys/kernel/security/lsm").exists() else ""
    )
    # As a user would: users, a project, then ./install.sh from the checkout.
    for user in (DEVELOPER, "mallory"):
        run(["useradd", "--create-home", user])
    sh(
        f"mkdir -p {PROJECT} && cp -a /root/vm/project/. {PROJECT}/ && chown -R {DEVELOPER}: /home/{DEVELOPER}"
    )
    r["install"] = sh(f"cd {CHECKOUT} && ./install.sh --project {PROJECT} {' '.join(LIMITS)}", timeout=600)
    run(["usermod", "--append", "--groups", "jobrunner", DEVELOPER])
    Path("/etc/jobrunner/jobs.toml").write_text(Path("/root/vm/jobs.toml").read_text())
    r["check"] = run(["jobrunner", "check"])
    settle()

    # 1. The key, bound to the TPM2 and the host key; a job uses it.
    r["creds_set"] = run(["jobrunner", "creds", "set", CREDENTIAL], input=secret.encode())
    r["creds_list"] = run(["jobrunner", "creds", "list"])
    r["key_header"] = key_header(f"/etc/credstore.encrypted/{CREDENTIAL}")
    r["hello"] = run(["jobctl", "run", "e2e-hello", "vm"], user=DEVELOPER)

    # 3. A fork bomb and a memory hog (tests/e2e/test_hostile.py's resource_limits, the same steps).
    bomb = run(["jobctl", "--json", "run", "hostile-bomb"], user=DEVELOPER, timeout=120)
    bomb_text = run(["jobctl", "run", "hostile-bomb"], user=DEVELOPER, timeout=120)
    hog = run(["jobctl", "--json", "run", "hostile-hog"], user=DEVELOPER, timeout=120)
    hog_text = run(["jobctl", "run", "hostile-hog"], user=DEVELOPER, timeout=120)
    # Again: whether the report of the kill wins a race with systemd (OOMPolicy=) shows only over runs.
    hogs = [run(["jobctl", "--json", "run", "hostile-hog"], user=DEVELOPER, timeout=120) for _ in range(4)]
    left = wait_for_runs_to_end()
    processes = run(["ps", "-eo", "args"])["stdout"]
    after = run(["jobctl", "run", "e2e-hello", "after"], user=DEVELOPER)
    r["limits"] = {"bomb": bomb, "bomb_text": bomb_text, "hog": hog, "hog_text": hog_text, "hogs": hogs,
                   "left": left, "processes": processes, "after": after}  # fmt: skip

    # 4. A job's address list: 127.0.0.1 is on it, 127.0.0.2 is not; a job without a list reaches both.
    listeners()
    r["net_listed"] = run(["jobctl", "run", "vm-net-listed"], user=DEVELOPER)
    r["net_any"] = run(["jobctl", "run", "vm-net-any"], user=DEVELOPER)
    r["doctor"] = run(["jobrunner", "doctor", "--json"], timeout=300)

    # 5. What needs BPF: the jobs' units as generated, and whether this kernel and systemd enforce
    # RestrictFileSystems= (the BPF LSM) and SocketBindDeny= (cgroup BPF) at all.
    r["unit_hello"] = run(["systemctl", "cat", "job-e2e-hello@.service"])
    r["restrict_fs"] = run(["systemd-run", "--wait", "--pipe", "--quiet", "-p", "RestrictFileSystems=~tmpfs",
                            "ls", "/dev/shm", "/run/systemd"])  # fmt: skip
    r["socket_bind"] = run(["systemd-run", "--wait", "--pipe", "--quiet", "-p", "SocketBindDeny=any",
                            "python3", "-c", "import socket; socket.create_server(('127.0.0.1', 48301)); print('bound')"])  # fmt: skip
    r["device_policy"] = run(["systemd-run", "--wait", "--pipe", "--quiet", "-p", "DevicePolicy=closed",
                              "head", "-c", "1", "/dev/vda"])  # fmt: skip


def fresh_tpm_boot(secret: str, r: dict[str, Any]) -> None:
    r["has_tpm2"] = run(["systemd-creds", "has-tpm2"])
    r["creds_list"] = run(["jobrunner", "creds", "list"])
    r["key_header"] = key_header(f"/etc/credstore.encrypted/{CREDENTIAL}")
    r["decrypt"] = run(["systemd-creds", "decrypt", f"--name={CREDENTIAL}",
                        f"/etc/credstore.encrypted/{CREDENTIAL}", "-"])  # fmt: skip
    logs_before = run_logs()
    cursor = journal_cursor()
    r["hello"] = run(["jobctl", "run", "e2e-hello", "fresh"], user=DEVELOPER)
    r["quick"] = run(["jobctl", "run", "vm-quick"], user=DEVELOPER)
    r["left"] = wait_for_runs_to_end()
    r["logs_before"] = sorted(logs_before)
    r["logs_after"] = run_logs()
    r["journal"] = journal_since(cursor)
    r["doctor"] = run(["jobrunner", "doctor", "--json"], timeout=300)


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    phase = fw_cfg("phase")
    secret = fw_cfg("secret")
    r: dict[str, Any] = {"phase": phase}
    started = time.monotonic()
    try:
        {"tpm": first_boot, "fresh-tpm": fresh_tpm_boot}[phase](secret, r)
    except Exception:
        r["error"] = traceback.format_exc()
    sh("journalctl --sync")
    r["journal_boot"] = sh("journalctl -b --no-pager -o cat")["stdout"]
    r["failed_units"] = sh("systemctl --failed --no-legend --plain")["stdout"]
    r["seconds"] = round(time.monotonic() - started, 1)
    tmp = RESULTS / f"{phase}.json.tmp"
    tmp.write_text(json.dumps(r, indent=1))
    tmp.rename(RESULTS / f"{phase}.json")
    os.sync()
    print(f"jobrunner-vm: {phase} done in {r['seconds']}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
