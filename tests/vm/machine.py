"""Boot a whole Debian machine under qemu, with a TPM2 (swtpm), for what a container cannot show.

A container shares the host's kernel: on this host its cgroup v2 tree has no pids or memory
controller, and it has no TPM. A qemu guest has its own kernel (unified cgroup hierarchy, every
controller, cgroup BPF) and, with swtpm and UEFI firmware, a TPM2 that systemd-creds uses.

The machine is not driven from outside while it runs: a unit at boot (``jobrunner-vm-test.service``)
runs ``guest.py``, which writes its results into the disk image and powers the machine off; the host
reads them back with ``debugfs`` (no mount). Each boot is one call of ``boot()``.

- ``build_rootfs(distro)``: debootstrap, once, cached in ``/var/cache/jobrunner-vm/DISTRO`` (override
  with ``JOBRUNNER_VM_CACHE``) with a kernel, an initramfs, and everything install.sh needs (the guest
  has no network).
- ``make_disk(distro, payload, disk)``: that tree plus ``payload`` (files for this session) as an ext4
  image, made by ``mkfs.ext4 -d`` from a read-only overlay mount of the two (no copy).
- ``Tpm(state_dir)``: swtpm on a unix socket; a new state directory is another machine's TPM.
- ``boot(...)``: qemu (TCG: ``/dev/kvm`` on this machine class is unusable) until the guest powers off.

CLI::

    python3 -m tests.vm.machine build bookworm|trixie
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.e2e.container import DISTROS, EXPECTED_SYSTEMD, _flock, _remove_tree, host_mirror

__all__ = ["DISTROS", "EXPECTED_SYSTEMD", "Tpm", "boot", "build_rootfs", "make_disk", "read_file"]

PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "libnss-systemd",
    "kmod",
    "linux-image-amd64",
    "initramfs-tools",
    # install.sh's dependencies (APT_PACKAGES there): the guest has no network, so they are here, and
    # install.sh must find them and not call apt-get.
    "python3",
    "python3-systemd",
    "python3-sdnotify",
    "python3-h11",
    "procps",
    "util-linux",
    "iproute2",
)
# What systemd dlopen()s to talk to a TPM2 (systemd-creds), under each release's package names.
TPM_LIBRARIES = {
    "bookworm": ("libtss2-esys-3.0.2-0", "libtss2-rc0", "libtss2-mu0", "libtss2-tcti-device0"),
    "trixie": (
        "libtss2-esys-3.0.2-0t64",
        "libtss2-rc0t64",
        "libtss2-mu-4.0.1-0t64",
        "libtss2-tcti-device0t64",
    ),
}
MASKED_UNITS = (
    "getty.target",
    "getty@.service",
    "serial-getty@.service",
    "systemd-networkd-wait-online.service",
    "systemd-firstboot.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "systemd-pstore.service",
)
RECIPE_VERSION = 1
DEFAULT_CACHE = Path("/var/cache/jobrunner-vm")
READY_MARKER = ".jobrunner-vm-ready"
OVMF = Path("/usr/share/ovmf/OVMF.fd")
TOOLS = ("debootstrap", "qemu-system-x86_64", "swtpm", "mkfs.ext4", "debugfs")
KERNEL_CMDLINE = (
    "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 panic=-1 "
    "systemd.mask=serial-getty@ttyS0.service"
)
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class MachineError(RuntimeError):
    """The image could not be built, or the machine did not boot and power off."""


def _log(msg: str) -> None:
    print(f"[vm] {msg}", file=sys.stderr, flush=True)


def missing_prerequisite() -> str | None:
    """Why this host cannot run the VM tests, or None."""
    if os.geteuid() != 0:
        return "the VM tests need root (debootstrap, mount, swtpm)"
    missing = [tool for tool in TOOLS if shutil.which(tool, path=ROOT_PATH) is None]
    if not OVMF.exists():
        missing.append(f"{OVMF} (package ovmf)")
    if missing:
        return f"the VM tests need {', '.join(missing)} (run .ci/install-deps)"
    return None


# --------------------------------------------------------------------------- #
# rootfs
# --------------------------------------------------------------------------- #


def cache_root() -> Path:
    return Path(os.environ.get("JOBRUNNER_VM_CACHE") or DEFAULT_CACHE)


def _recipe_hash(distro: str) -> str:
    recipe = json.dumps([RECIPE_VERSION, PACKAGES, TPM_LIBRARIES[distro], MASKED_UNITS])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def _is_ready(root: Path, distro: str) -> bool:
    try:
        info = json.loads((root / READY_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(info.get("recipe") == _recipe_hash(distro))


def build_rootfs(distro: str) -> Path:
    """Build (once; cached) and return the guest's root tree for ``distro``."""
    if distro not in DISTROS:
        raise ValueError(f"unknown distro {distro!r}, expected one of {DISTROS}")
    base = cache_root()
    base.mkdir(parents=True, exist_ok=True)
    root = base / distro
    with _flock(base / f"{distro}.lock", fcntl.LOCK_EX):
        if _is_ready(root, distro):
            return root
        _remove_tree(root)  # stale or incomplete: unmounts what a killed debootstrap left mounted first
        started = time.monotonic()
        _debootstrap(distro, root, base / f"debs-{distro}")
        _prepare(root)
        info = {
            "distro": distro,
            "recipe": _recipe_hash(distro),
            "seconds": round(time.monotonic() - started),
        }
        (root / READY_MARKER).write_text(json.dumps(info) + "\n")
        _log(f"built {distro} in {info['seconds']}s at {root}")
    return root


def _debootstrap(distro: str, root: Path, debs: Path) -> None:
    debs.mkdir(parents=True, exist_ok=True)
    unsafe_io = root / "etc/dpkg/dpkg.cfg.d/jobrunner-vm-unsafe-io"
    unsafe_io.parent.mkdir(parents=True)
    unsafe_io.write_text("force-unsafe-io\n")  # a throwaway tree: no fsync per file
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES + TPM_LIBRARIES[distro])}",
        f"--cache-dir={debs}",
        distro,
        str(root),
        host_mirror(),
    ]
    log = root.parent / f"{distro}.debootstrap.log"
    _log(f"running {shlex.join(argv)} (log: {log})")
    log.unlink(missing_ok=True)
    # In a session of its own and killed with qemu and swtpm (_kill_all): it runs in a thread while
    # another distro's machine boots (tests/vm/conftest.py), and a stopped session must not wait for it.
    proc = _spawn(argv, log, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    proc.wait()
    _LIVE.discard(proc)
    if proc.returncode != 0:
        raise MachineError(
            f"debootstrap {distro} failed (log: {log}):\n{log.read_text(errors='replace')[-3000:]}"
        )
    unsafe_io.unlink()


def _prepare(root: Path) -> None:
    etc = root / "etc"
    (etc / "machine-id").write_text(secrets.token_hex(16) + "\n")  # no first-boot work at every boot
    (etc / "hostname").write_text("jobrunner-vm\n")
    (etc / "fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    for unit in MASKED_UNITS:
        link = etc / "systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (root / "var/log/journal").mkdir(exist_ok=True)  # a persistent journal: on the disk the tests search
    # No network in the guest, and no package lists: apt-get install cannot work there, so an install.sh
    # that needed it would fail.
    for junk in (root / "var/cache/apt/archives").glob("*.deb"):
        junk.unlink()
    for junk in (root / "var/lib/apt/lists").glob("*_*"):
        junk.unlink()


def kernel_and_initrd(root: Path) -> tuple[Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise MachineError(f"no kernel or initramfs in {root}/boot")
    return kernels[-1], initrds[-1]


# --------------------------------------------------------------------------- #
# disk
# --------------------------------------------------------------------------- #


def make_disk(root: Path, payload: Path, disk: Path, size: str = "4G") -> None:
    """An ext4 image of ``root`` with ``payload`` laid over it (payload's files win)."""
    merged = Path(tempfile.mkdtemp(prefix="jobrunner-vm-merged-"))
    try:
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={payload}:{root}", str(merged)],
            check=True,
        )
        try:
            subprocess.run(
                ["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(merged), str(disk), size],
                check=True,
                capture_output=True,
            )
        finally:
            subprocess.run(["umount", str(merged)], check=True)
    finally:
        merged.rmdir()


def read_file(disk: Path, path: str) -> bytes:
    """A file of the (powered-off) guest's disk; MachineError when it is not there."""
    res = subprocess.run(["debugfs", "-R", f"cat {path}", str(disk)], capture_output=True, check=False)
    if res.returncode != 0 or b"File not found" in res.stderr:
        raise MachineError(f"{path} is not on {disk}: {res.stderr.decode(errors='replace')[-500:]}")
    return res.stdout


# --------------------------------------------------------------------------- #
# processes: swtpm and qemu, killed whatever happens
# --------------------------------------------------------------------------- #

_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_all() -> None:
    for proc in list(_LIVE):
        _kill(proc)
    # What a killed debootstrap leaves mounted in its tree (/proc): the next build removes the tree.
    prefix = str(cache_root().resolve()) + "/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mountpoint in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=False)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: qemu or swtpm and nothing else
    proc.wait()
    _LIVE.discard(proc)


def _spawn(argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else {"PATH": ROOT_PATH},
        )
    _LIVE.add(proc)
    return proc


class Tpm:
    """swtpm serving a TPM2 on ``state/swtpm.sock``; a fresh ``state`` directory is a TPM never seen."""

    def __init__(self, state: Path) -> None:
        state.mkdir(parents=True, exist_ok=True)
        self.state = state
        self.socket = state / "swtpm.sock"
        self.socket.unlink(missing_ok=True)
        self._proc = _spawn(
            [
                "swtpm", "socket", "--tpm2",
                "--tpmstate", f"dir={state}",
                "--ctrl", f"type=unixio,path={self.socket}",
                "--flags", "startup-clear",
            ],
            state.parent / f"{state.name}.log",
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise MachineError(f"swtpm did not start (log: {state.parent / f'{state.name}.log'})")
            time.sleep(0.05)

    def qemu_args(self) -> list[str]:
        return [
            "-chardev", f"socket,id=chrtpm,path={self.socket}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-tis,tpmdev=tpm0",
        ]  # fmt: skip

    def stop(self) -> None:
        _kill(self._proc)

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def boot(
    root: Path,
    disk: Path,
    console: Path,
    *,
    tpm: Tpm | None,
    strings: Mapping[str, str],
    timeout: float = 900,
) -> float:
    """Boot ``disk`` with ``root``'s kernel until the guest powers off; return the seconds it took.

    ``strings`` reach the guest as qemu firmware config files, /sys/firmware/qemu_fw_cfg/by_name/
    opt/jobrunner/NAME/raw: not on the disk, not on the kernel command line (which the journal keeps).
    """
    kernel, initrd = kernel_and_initrd(root)
    argv = [
        "qemu-system-x86_64",
        "-accel", "tcg", "-cpu", "max", "-machine", "q35", "-smp", "2", "-m", "2048",
        # UEFI: under SeaBIOS systemd sees no firmware TPM support and seals with the host key only.
        "-bios", str(OVMF),
        "-display", "none", "-monitor", "none", "-serial", f"file:{console}",
        "-nic", "none", "-no-reboot",
        "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", KERNEL_CMDLINE,
        *(a for n, v in strings.items() for a in ("-fw_cfg", f"name=opt/jobrunner/{n},string={v}")),
        *(tpm.qemu_args() if tpm else []),
    ]  # fmt: skip
    started = time.monotonic()
    proc = _spawn(argv, console.with_suffix(".qemu.log"))
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise MachineError(f"the guest did not power off within {timeout:.0f}s\n{_tail(console)}") from None
    finally:
        _kill(proc)
    if proc.returncode != 0:
        qemu_log = console.with_suffix(".qemu.log").read_text(errors="replace")[-2000:]
        raise MachineError(f"qemu exited with {proc.returncode}: {qemu_log}\n{_tail(console)}")
    return time.monotonic() - started


def _tail(console: Path) -> str:
    try:
        return "--- console ---\n" + console.read_text(errors="replace")[-5000:]
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.vm.machine", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="debootstrap (cached) the guests' trees")
    build.add_argument("distro", nargs="+", choices=DISTROS)
    args = parser.parse_args(argv)
    for distro in args.distro:
        started = time.monotonic()
        print(f"{distro}: {build_rootfs(distro)} ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
