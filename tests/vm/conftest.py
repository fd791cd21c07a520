"""VM fixtures: per distro, one image, two boots (its own TPM, then a fresh one), shared by the session.

Select distros with ``JOBRUNNER_VM_DISTROS=bookworm,trixie`` (the default: both). Missing prerequisites
(root, debootstrap, qemu, swtpm, OVMF, e2fsprogs) skip these tests, except under CI (``CI=true``) or
``JOBRUNNER_E2E_REQUIRE=1``, where they fail, as the e2e tests do (tests/e2e/conftest.py).

``vm`` boots the distro's image twice (see machine.py and guest.py) and hands the tests what the guest
recorded: nothing runs in the VM during a test. The work directory (the disk, the TPM states, the
console logs) is under the cache directory, and removed afterwards unless ``JOBRUNNER_VM_KEEP=1``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import DEMO_PROJECT, TEST_PROJECT, jobs_toml
from tests.e2e.test_hostile import LIMITED_JOBS

from . import machine

REPO = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).parent / "guest.py"
RESULTS = "/var/lib/jobrunner-vm"

# The guest's own jobs, besides the e2e tests' (conftest.py) and the fork bomb and memory hog
# (test_hostile.py): a connect with a short timeout to two addresses, with and without an address list.
NET_PROBE = """import socket
for address in ("127.0.0.1", "127.0.0.2"):
    try:
        with socket.create_connection((address, 48300), timeout=3) as s:
            print(address, "reached:", s.recv(100).decode().strip())
    except OSError as e:
        print(address, "not reached:", type(e).__name__, e)
"""
VM_JOBS = f"""
[jobs.vm-net-listed]
description = "Tries 127.0.0.1 (on its list) and 127.0.0.2 (not)"
command = ["/usr/bin/python3", "-c", '''{NET_PROBE}''']
network = ["127.0.0.1"]

[jobs.vm-net-any]
description = "Tries the same two addresses without a list"
command = ["/usr/bin/python3", "-c", '''{NET_PROBE}''']

[jobs.vm-quick]
description = "Needs no credential"
command = ["/bin/echo", "ok"]
"""
UNIT = """[Unit]
Description=jobrunner's VM tests (tests/vm/guest.py), then power off
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 /root/vm/guest.py
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=1200
# Whether guest.py succeeded or not (SuccessAction= never fired for this oneshot on 252).
ExecStopPost=/usr/bin/systemctl --no-block poweroff

[Install]
WantedBy=multi-user.target
"""


def selected_distros() -> list[str]:
    raw = os.environ.get("JOBRUNNER_VM_DISTROS", ",".join(machine.DISTROS))
    chosen = [d.strip() for d in raw.split(",") if d.strip()]
    unknown = sorted(set(chosen) - set(machine.DISTROS))
    if unknown:
        raise pytest.UsageError(
            f"JOBRUNNER_VM_DISTROS: unknown distro(s) {unknown}, expected {machine.DISTROS}"
        )
    return chosen


def _required() -> bool:
    flag = os.environ.get("JOBRUNNER_E2E_REQUIRE", os.environ.get("CI", ""))
    return flag.lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class VmRun:
    """What the guest recorded in its two boots of one distro's image."""

    distro: str
    secret: str
    first: dict[str, Any]  # guest.py's phase "tpm": the machine's own TPM
    fresh: dict[str, Any]  # phase "fresh-tpm": the same disk, another TPM
    disk_has_secret: bool  # the secret's bytes anywhere on the disk after both boots
    seconds: dict[str, float]  # image, first boot, second boot


def payload(work: Path) -> Path:
    """The session's files laid over the cached tree: the checkout, guest.py, its jobs and its unit."""
    top = work / "payload"
    root = top / "root"
    root.mkdir(parents=True)
    root.chmod(0o700)
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".*_cache", ".venv", "*.egg-info", ".hypothesis")
    shutil.copytree(REPO, root / "jobrunner", ignore=ignore, symlinks=True)  # as a user's clone
    (root / "vm").mkdir()
    shutil.copy(GUEST, root / "vm/guest.py")
    (root / "vm/jobs.toml").write_text(jobs_toml() + LIMITED_JOBS + VM_JOBS)
    for source in (DEMO_PROJECT, TEST_PROJECT):
        if source.is_dir():
            shutil.copytree(source, root / "vm/project", dirs_exist_ok=True, ignore=ignore)
    units = top / "etc/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True)
    (units / "jobrunner-vm-test.service").write_text(UNIT)
    (units / "multi-user.target.wants/jobrunner-vm-test.service").symlink_to("../jobrunner-vm-test.service")
    for path in [top, *top.rglob("*")]:
        if not path.is_symlink():
            os.chown(path, 0, 0)
    return top


def results(disk: Path, phase: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(machine.read_file(disk, f"{RESULTS}/{phase}.json"))
    return found


def on_disk(disk: Path, needle: str) -> bool:
    """Whether these bytes are anywhere on the (sparse, 4 GB) image."""
    res = subprocess.run(
        ["grep", "-c", "-a", "-F", "-e", needle, str(disk)], capture_output=True, check=False
    )
    if res.returncode not in (0, 1):
        raise machine.MachineError(f"grep {disk}: {res.stderr.decode(errors='replace')}")
    return res.returncode == 0


class _Build(threading.Thread):
    """One distro's debootstrap in the background. A daemon thread: a stopped session does not wait for
    it; machine.py's atexit handler kills debootstrap instead."""

    def __init__(self, distro: str) -> None:
        super().__init__(name=f"vm-build-{distro}", daemon=True)
        self.distro = distro
        self.root: Path | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.root = machine.build_rootfs(self.distro)
        except BaseException as e:
            self.error = e

    def result(self) -> Path:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.root is not None
        return self.root


_BUILDS: dict[str, _Build] = {}


def rootfs(distro: str) -> Path:
    """The distro's tree. The first call starts building every selected distro's at once (debootstrap
    mostly waits on the network and dpkg), so that the next boots without waiting for its own."""
    if not _BUILDS:
        for name in selected_distros():
            _BUILDS[name] = _Build(name)
    return _BUILDS[distro].result()


# Per distro, what the stage's time went on: printed at the end of the session (pytest_terminal_summary).
TIMES: dict[str, dict[str, float]] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for distro, seconds in TIMES.items():
        parts = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
        terminalreporter.write_line(f"tests/vm {distro}: {parts}")


def boot_twice(distro: str, work: Path) -> VmRun:
    seconds = TIMES.setdefault(distro, {})
    started = time.monotonic()
    root = rootfs(distro)  # waits for debootstrap when the tree is not cached yet
    seconds["tree"] = time.monotonic() - started
    disk = work / "disk.raw"
    machine.make_disk(root, payload(work), disk)
    shutil.rmtree(work / "payload")
    seconds["image"] = time.monotonic() - started - seconds["tree"]
    secret = "vm-" + secrets.token_hex(16)
    with machine.Tpm(work / "tpm") as tpm:
        seconds["first"] = machine.boot(
            root, disk, work / "console-tpm.log", tpm=tpm, strings={"phase": "tpm", "secret": secret}
        )
    first = results(disk, "tpm")
    # Another machine's TPM: a state directory it has never used.
    with machine.Tpm(work / "fresh-tpm") as tpm:
        seconds["fresh"] = machine.boot(
            root,
            disk,
            work / "console-fresh-tpm.log",
            tpm=tpm,
            strings={"phase": "fresh-tpm", "secret": secret},
        )
    fresh = results(disk, "fresh-tpm")
    run = VmRun(distro, secret, first, fresh, on_disk(disk, secret), dict(seconds))
    seconds["total"] = time.monotonic() - started
    return run


@pytest.fixture(scope="session", params=selected_distros())
def vm(request: pytest.FixtureRequest) -> Iterator[VmRun]:
    """``request.param``'s image, booted with its TPM and then with a fresh one: what the guest saw."""
    reason = machine.missing_prerequisite()
    if reason is not None:
        if _required():
            pytest.fail(f"{reason} [CI/JOBRUNNER_E2E_REQUIRE set, so not skipping]")
        pytest.skip(reason)
    # SIGTERM (a CI timeout) becomes KeyboardInterrupt: the teardown below still kills qemu and swtpm.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    base = machine.cache_root() / "runs"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{request.param}-", dir=base))
    try:
        yield boot_twice(request.param, work)
    except BaseException:
        machine._kill_all()  # SIGTERM or Ctrl-C while booting: qemu, swtpm, and any debootstrap
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not os.environ.get("JOBRUNNER_VM_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
