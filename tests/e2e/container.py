"""Boot a real systemd inside a Debian container, for end-to-end tests and demos.

The rootfs is built once per distro with debootstrap into a cache directory and
never modified afterwards: every container boots it with
``systemd-nspawn --volatile=overlay``, so all writes (installers writing /etc,
/usr, /var, /home) land in a tmpfs that vanishes at power-off.

Commands run inside through ``nsenter`` into the container's PID 1, so no
network, ssh or machined is needed.  Each container lives in its own cgroup
subtree on the host (``<unified>/jobrunner-e2e/<name>``), which both keeps
parallel containers from sharing a cgroup root and lets ``stop()`` kill every
process that belongs to it with one write to ``cgroup.kill``.

CLI::

    python3 -m tests.e2e.container build bookworm|trixie
    python3 -m tests.e2e.container shell bookworm [--bind-ro HOST:CONTAINER ...] [--leader-file F]
    python3 -m tests.e2e.container run bookworm [--bind-ro ...] -- CMD ARGS...
    python3 -m tests.e2e.container reap
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

DISTROS = ("bookworm", "trixie")
# The systemd major version each distro ships; tests assert against it.
EXPECTED_SYSTEMD = {"bookworm": 252, "trixie": 257}

PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    # Resolves DynamicUser= names (nsswitch "systemd"), as on a normal Debian host.
    "libnss-systemd",
    "python3",
    "python3-systemd",
    "python3-sdnotify",
    # The API proxy's HTTP parser (runner/apiproxy.py), as install.sh installs it.
    "python3-h11",
    # The README's example of a job calling its API with curl (tests/e2e/test_apis.py).
    "curl",
    # docs/ci.md's post-receive hook (tests/e2e/test_ci_recipes.py).
    "git",
    "socat",
    "procps",
    "util-linux",
    "iproute2",
)

# Units that only slow the boot down, wait for hardware/network that a container
# does not have, or fire at random times during a test.  Masked in the rootfs.
MASKED_UNITS = (
    "getty.target",
    "console-getty.service",
    "container-getty@.service",
    "getty@.service",
    "serial-getty@.service",
    "getty-static.service",
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

# Bump when the way the rootfs is prepared changes: cached trees are rebuilt.
RECIPE_VERSION = 2

DEFAULT_CACHE = Path("/var/cache/jobrunner-e2e")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
READY_MARKER = ".jobrunner-e2e-ready"
CGROUP_PARENT = "jobrunner-e2e"

# Host path -> path inside the container.
BindMap = Mapping[str, str] | Mapping[Path, str]

ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_PATH = "/usr/local/bin:/usr/bin:/bin"


class ContainerError(RuntimeError):
    """The container could not be built, booted or stopped."""


class CommandError(subprocess.CalledProcessError):
    """A command inside the container failed; str() shows its output."""

    def __str__(self) -> str:
        out = _tail(self.stdout)
        err = _tail(self.stderr)
        return f"{super().__str__()}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"


def _tail(data: bytes | str | None, limit: int = 4000) -> str:
    if data is None:
        return ""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text[-limit:]


def _log(msg: str) -> None:
    # stderr so that pytest -s and the CLI show progress without mixing with output.
    print(f"[e2e] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- #
# rootfs
# --------------------------------------------------------------------------- #


def cache_root() -> Path:
    return Path(os.environ.get("JOBRUNNER_E2E_CACHE") or DEFAULT_CACHE)


def rootfs_path(distro: str) -> Path:
    return cache_root() / distro


def _check_distro(distro: str) -> None:
    if distro not in DISTROS:
        raise ValueError(f"unknown distro {distro!r}, expected one of {DISTROS}")


def _recipe_hash() -> str:
    # Any change to what goes into the tree invalidates the cache.
    recipe = json.dumps([RECIPE_VERSION, PACKAGES, MASKED_UNITS])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def _apt_source_uris() -> Iterator[tuple[str, list[str]]]:
    """Yield (uri, suites) from the host's one-line and deb822 apt sources."""
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    yield words[1], [words[2]]
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields = dict(re.findall(r"^([\w-]+):[ \t]*(.*)$", stanza, re.MULTILINE))
            if "deb" in fields.get("Types", "").split():
                for uri in fields.get("URIs", "").split():
                    yield uri, fields.get("Suites", "").split()


def host_mirror() -> str:
    """The Debian mirror the host's apt uses, so we hit the same (maybe local) mirror."""
    override = os.environ.get("JOBRUNNER_E2E_MIRROR")
    if override:
        return override
    known = {*DISTROS, "bullseye", "forky", "sid", "stable", "testing", "unstable"}
    for uri, suites in _apt_source_uris():
        # The main archive: a plain Debian suite name ("bookworm", not
        # "bookworm-security"), so third-party and security repositories are skipped.
        if known & set(suites) and uri.startswith(("http://", "https://")) and "security" not in uri:
            return uri.rstrip("/")
    return DEFAULT_MIRROR


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, mode)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_ready(root: Path) -> bool:
    marker = root / READY_MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return bool(info.get("recipe") == _recipe_hash())


def build_rootfs(distro: str) -> Path:
    """Build (once) and return the cached rootfs for ``distro``.

    Safe to call from several processes at once: one builds, the others wait on
    the lock and then find the ready marker.
    """
    _check_distro(distro)
    base = cache_root()
    base.mkdir(parents=True, exist_ok=True)
    root = base / distro
    lock = base / f"{distro}.lock"
    # Fast path under a shared lock, so a process that has a container running
    # on this tree (holding LOCK_SH) can call us again without deadlocking.
    with _flock(lock, fcntl.LOCK_SH):
        if _is_ready(root):
            return root
    with _flock(lock, fcntl.LOCK_EX):
        if _is_ready(root):
            return root
        _remove_tree(root)
        started = time.monotonic()
        _debootstrap(distro, root, base / f"debs-{distro}")
        _prepare_for_boot(root)
        _write_marker(root, distro, time.monotonic() - started)
        _log(f"built {distro} rootfs in {time.monotonic() - started:.0f}s at {root}")
    return root


def _remove_tree(root: Path) -> None:
    """Remove a half-built tree, first unmounting whatever a killed debootstrap left."""
    if not root.exists():
        return
    _log(f"removing stale or incomplete rootfs {root}")
    prefix = str(root.resolve()) + "/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mountpoint in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=False)
    shutil.rmtree(root)


UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/jobrunner-e2e-unsafe-io"


def _debootstrap(distro: str, root: Path, debs: Path) -> None:
    debs.mkdir(parents=True, exist_ok=True)
    # dpkg fsyncs every file it unpacks; a throwaway tree does not need that
    # (~25% faster).  Removed again in _prepare_for_boot().
    unsafe_io = root / UNSAFE_IO
    unsafe_io.parent.mkdir(parents=True)
    unsafe_io.write_text("force-unsafe-io\n")
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        f"--cache-dir={debs}",
        distro,
        str(root),
        host_mirror(),
    ]
    log = root.parent / f"{distro}.debootstrap.log"
    _log(f"running {shlex.join(argv)} (log: {log})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with log.open("wb") as out:
        res = subprocess.run(
            argv, check=False, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    if res.returncode != 0:
        inner = root / "debootstrap" / "debootstrap.log"
        detail = inner.read_text(errors="replace")[-4000:] if inner.exists() else ""
        raise ContainerError(f"debootstrap {distro} failed:\n{_tail(log.read_bytes())}\n{detail}")


def _prepare_for_boot(root: Path) -> None:
    (root / UNSAFE_IO).unlink()
    etc = root / "etc"
    # One fixed machine-id per tree: an empty one would make every boot a "first
    # boot" (presets applied, ConditionFirstBoot units run), which is slower.
    machine_id = etc / "machine-id"
    if not machine_id.read_text().strip():
        machine_id.write_text(secrets.token_hex(16) + "\n")
    dbus_id = root / "var/lib/dbus/machine-id"
    dbus_id.unlink(missing_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    # debootstrap copies the host's hostname; without the file systemd keeps the
    # hostname nspawn sets, i.e. the (unique) machine name.
    (etc / "hostname").unlink(missing_ok=True)
    units = etc / "systemd/system"
    for unit in MASKED_UNITS:
        _symlink_force(units / unit, "/dev/null")
    _symlink_force(units / "default.target", "/lib/systemd/system/multi-user.target")
    # The container has no network (--private-network): make apt's config honest
    # and drop the downloaded lists/debs so the cached tree stays small.
    (etc / "apt/sources.list").write_text(f"deb {host_mirror()} {_suite_of(root)} main\n")
    for junk in (root / "var/cache/apt/archives").glob("*.deb"):
        junk.unlink()
    for junk in (root / "var/lib/apt/lists").glob("*_*"):
        junk.unlink()


def _symlink_force(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def _suite_of(root: Path) -> str:
    text = (root / "etc/os-release").read_text()
    match = re.search(r"^VERSION_CODENAME=(\S+)", text, re.MULTILINE)
    return match.group(1) if match else "stable"


def _write_marker(root: Path, distro: str, seconds: float) -> None:
    version = subprocess.run(
        ["chroot", str(root), "systemctl", "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    info = {
        "distro": distro,
        "recipe": _recipe_hash(),
        "mirror": host_mirror(),
        "systemd": version,
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Written last: its presence is what makes the tree "ready".
    tmp = root / (READY_MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    tmp.rename(root / READY_MARKER)


# --------------------------------------------------------------------------- #
# cgroups
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class CgroupLayout:
    """Where the cgroup2 tree is on this host, and the legacy name=systemd one if hybrid."""

    unified: Path
    legacy_systemd: Path | None

    @staticmethod
    def detect() -> CgroupLayout:
        base = Path("/sys/fs/cgroup")
        if (base / "cgroup.controllers").exists():
            return CgroupLayout(base, None)
        if (base / "unified/cgroup.controllers").exists():
            legacy = base / "systemd"
            return CgroupLayout(base / "unified", legacy if legacy.is_dir() else None)
        # systemd 256+ (trixie) cannot boot without a cgroup2 hierarchy.
        raise ContainerError("no cgroup2 hierarchy mounted on the host")

    def dirs(self, rel: str) -> list[Path]:
        out = [self.unified / rel]
        if self.legacy_systemd is not None:
            out.append(self.legacy_systemd / rel)
        return out


def _kill_cgroup(path: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process in a cgroup2 subtree, wait until empty, remove it."""
    if not path.is_dir():
        return
    kill = path / "cgroup.kill"
    deadline = time.monotonic() + timeout
    while _populated(path) and time.monotonic() < deadline:
        if kill.exists():
            kill.write_text("1")
        else:  # cgroup1 or pre-5.14 kernels: kill what we can see, until nothing is left.
            _kill_listed(path)
        time.sleep(0.05)
    _rmdir_tree(path)


def _kill_listed(path: Path) -> None:
    for procs in path.rglob("cgroup.procs"):
        for pid in procs.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _populated(path: Path) -> bool:
    events = path / "cgroup.events"
    if events.exists():
        return "populated 1" in events.read_text()
    return any(p.read_text().strip() for p in path.rglob("cgroup.procs"))


def _rmdir_tree(path: Path) -> None:
    # cgroupfs directories can only be removed leaves-first, and only with rmdir.
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def reap_stale() -> list[str]:
    """Kill containers left behind by test processes that died without stop()."""
    reaped: list[str] = []
    layout = CgroupLayout.detect()
    parent = layout.unified / CGROUP_PARENT
    if not parent.is_dir():
        return reaped
    for group in parent.iterdir():
        owner = _owner_pid(group.name)
        if group.is_dir() and owner is not None and not _alive(owner):
            _log(f"reaping stale container {group.name} (owner pid {owner} is gone)")
            for path in layout.dirs(f"{CGROUP_PARENT}/{group.name}"):
                _kill_cgroup(path)
            _cleanup_nspawn_leftovers(group.name)
            reaped.append(group.name)
    return reaped


def _alive(pid: int) -> bool:
    # A zombie counts as dead: PID 1 on this VM does not always reap orphans.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _owner_pid(name: str) -> int | None:
    # Names are NAME-DISTRO-OWNERPID-RANDOM, see Container.boot().
    parts = name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _cleanup_nspawn_leftovers(name: str) -> None:
    # Left behind when nspawn is killed rather than powered off.  (/run is not a
    # tmpfs on this VM, so nspawn also logs "Attempted to remove disk file system
    # under /run/systemd/nspawn/propagate/NAME": harmless.)
    propagate = Path("/run/systemd/nspawn/propagate") / name
    with contextlib.suppress(OSError):
        shutil.rmtree(propagate)


# --------------------------------------------------------------------------- #
# Container
# --------------------------------------------------------------------------- #

_LIVE: set[Container] = set()


@atexit.register
def _stop_all() -> None:
    # Last line of defence when a test session aborts before its fixtures finish.
    for container in list(_LIVE):
        container.stop()


@dataclass(eq=False)
class Container:
    """A booted systemd container.  Use ``Container.boot()``, preferably in ``with``."""

    name: str
    distro: str
    rootfs: Path
    leader: int
    console_log: Path
    _nspawn: subprocess.Popen[bytes] = field(repr=False)
    _layout: CgroupLayout = field(repr=False)
    _lock_fd: int = field(repr=False)
    _stopped: bool = field(default=False, repr=False)
    # Console logs are kept only when booting failed (or JOBRUNNER_E2E_KEEP_LOGS=1).
    _keep_log: bool = field(
        default_factory=lambda: bool(os.environ.get("JOBRUNNER_E2E_KEEP_LOGS")), repr=False
    )

    # ----- lifecycle -------------------------------------------------------- #

    @classmethod
    def boot(
        cls,
        distro: str,
        name: str = "jre2e",
        binds_ro: BindMap | None = None,
        *,
        timeout: float = 120.0,
        nspawn_args: Sequence[str] = (),
    ) -> Container:
        """Build (cached) and boot ``distro``; return once systemd finished booting.

        ``nspawn_args`` are appended to the systemd-nspawn command line.
        """
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", name):
            # It becomes the machine name and hostname (max 64 chars with the suffix).
            raise ValueError(f"container name {name!r}: use 1-32 of [a-z0-9-], starting with a letter")
        rootfs = build_rootfs(distro)
        reap_stale()
        # Unique per boot, and carries our PID so reap_stale() can tell when we are gone.
        unique = f"{name}-{distro}-{os.getpid()}-{secrets.token_hex(3)}"
        layout = CgroupLayout.detect()
        console_log = Path(tempfile.gettempdir()) / f"jobrunner-e2e-{unique}.log"
        lock_fd = _hold_shared_lock(distro, rootfs)
        started = time.monotonic()
        try:
            proc = _spawn_nspawn(unique, rootfs, layout, binds_ro or {}, console_log, extra=nspawn_args)
        except BaseException:
            os.close(lock_fd)
            for path in layout.dirs(f"{CGROUP_PARENT}/{unique}"):
                _rmdir_tree(path)
            raise
        container = cls(unique, distro, rootfs, 0, console_log, proc, layout, lock_fd)
        _LIVE.add(container)
        try:
            container.leader = container._find_leader(started + timeout)
            container._wait_booted(started + timeout)
        except BaseException:
            container._keep_log = True
            container.stop()
            raise
        _log(f"booted {unique} (leader pid {container.leader}) in {time.monotonic() - started:.1f}s")
        return container

    def __enter__(self) -> Container:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> None:
        """Power off cleanly; whatever is still alive after ``timeout`` is SIGKILLed."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._poweroff(timeout)
        finally:
            # Whatever happened above, nothing of ours may survive.
            for path in self._layout.dirs(self._cgroup_rel):
                _kill_cgroup(path)
            with contextlib.suppress(ProcessLookupError):
                self._nspawn.kill()
            self._nspawn.wait()
            _cleanup_nspawn_leftovers(self.name)
            if not self._keep_log:
                self.console_log.unlink(missing_ok=True)
            os.close(self._lock_fd)
            _LIVE.discard(self)

    def _poweroff(self, timeout: float) -> None:
        if self._nspawn.poll() is not None or self.leader <= 0:
            return
        # SIGRTMIN+4 is systemd's "poweroff" signal: no helper process needed.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.leader, signal.SIGRTMIN + 4)
        try:
            self._nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            _log(f"{self.name} did not power off within {timeout:.0f}s, killing it")

    @property
    def nspawn_pid(self) -> int:
        """Host PID of the systemd-nspawn process supervising the container."""
        return self._nspawn.pid

    @property
    def _cgroup_rel(self) -> str:
        return f"{CGROUP_PARENT}/{self.name}"

    def _find_leader(self, deadline: float) -> int:
        """The host PID of the container's PID 1: nspawn's child whose innermost PID is 1."""
        while time.monotonic() < deadline:
            self._check_alive()
            for pid in _children(self._nspawn.pid):
                # Only once it has exec'ed systemd: before that, nspawn is still
                # setting up its mounts and nsenter would land half-way.
                if _innermost_pid(pid) == 1 and _exe_name(pid) == "systemd":
                    return pid
            time.sleep(0.02)
        raise ContainerError(f"{self.name}: container PID 1 did not appear\n{self._console_tail()}")

    def _wait_booted(self, deadline: float) -> None:
        while True:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ContainerError(f"{self.name}: boot timed out\n{self._console_tail()}")
            res = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left)
            state = res.stdout.decode().strip()
            if state == "running":
                return
            if state == "degraded":
                self._report_failed_units()
                return
            if state in ("maintenance", "stopping"):
                raise ContainerError(f"{self.name}: system is {state}\n{self._console_tail()}")
            # "offline"/empty: PID 1 has not opened its private socket yet.
            time.sleep(0.1)

    def _report_failed_units(self) -> None:
        failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False)
        _log(f"{self.name} booted degraded; failed units:\n{failed.stdout.decode()}")

    def _check_alive(self) -> None:
        if self._nspawn.poll() is not None:
            raise ContainerError(
                f"{self.name}: systemd-nspawn exited with {self._nspawn.returncode}\n{self._console_tail()}"
            )

    def _console_tail(self) -> str:
        try:
            return "--- console ---\n" + self.console_log.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    # ----- commands --------------------------------------------------------- #

    def run(
        self,
        argv: Sequence[str],
        *,
        user: str | None = None,
        input: bytes | None = None,
        check: bool = True,
        timeout: float = 120,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside the container (as root, or as ``user`` with its groups)."""
        if self._stopped:
            raise ContainerError(f"{self.name} is stopped")
        cmd = self._command(list(argv), user, env or {})
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Own process group: on timeout we kill nsenter *and* the child it forked.
            start_new_session=True,
            env={"PATH": ROOT_PATH},
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = _kill_and_drain(proc)
            raise subprocess.TimeoutExpired(list(argv), timeout, out, err) from None
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, list(argv), out, err)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def _command(self, argv: list[str], user: str | None, env: Mapping[str, str]) -> list[str]:
        # The wrapper moves itself into the container's cgroup subtree first, so
        # that stop() also kills anything a command left running in the background.
        exec_cg = self._layout.unified / self._cgroup_rel / "exec" / "cgroup.procs"
        wrapper = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(exec_cg)]
        nsenter = ["nsenter", "--all", f"--target={self.leader}", "--root", "--wd"]
        if user is None or user == "root":
            ident: list[str] = []
            base_env = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "PATH": ROOT_PATH}
            cwd = "/root"
        else:
            uid, gid, home = self._lookup_user(user)
            # setpriv --init-groups applies the supplementary groups from the
            # container's /etc/group (what a login would give the user).
            ident = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--"]
            base_env = {"HOME": home, "USER": user, "LOGNAME": user, "PATH": USER_PATH}
            cwd = home if self.path(home).is_dir() else "/"
        full_env = {**base_env, "LANG": "C.UTF-8", **env}
        env_cmd = ["env", "-i", "-C", cwd, *(f"{k}={v}" for k, v in full_env.items())]
        return [*wrapper, *nsenter, "--", *ident, *env_cmd, *argv]

    def _lookup_user(self, user: str) -> tuple[int, int, str]:
        # Read the container's passwd from the host: no extra process per run().
        passwd = self.path("/etc/passwd").read_text()
        for line in passwd.splitlines():
            fields = line.split(":")
            if fields[0] == user and len(fields) >= 6:
                return int(fields[2]), int(fields[3]), fields[5]
        # Not in the file (e.g. an NSS-only user): ask inside.
        res = self.run(["getent", "passwd", user], check=False)
        fields = res.stdout.decode().strip().split(":")
        if res.returncode != 0 or len(fields) < 6:
            raise ContainerError(f"{self.name}: no such user {user!r}")
        return int(fields[2]), int(fields[3]), fields[5]

    def path(self, container_path: str) -> Path:
        """Host path of a regular file inside the container, for *reading* only.

        Goes through /proc/PID/root, where an absolute symlink inside the
        container would resolve on the host: do not write through it, use
        copy_in()/write_file() instead.
        """
        return Path(f"/proc/{self.leader}/root") / container_path.lstrip("/")

    def copy_in(self, host_path: str | Path, container_path: str) -> None:
        """Copy a file (keeping its mode) or a directory tree into the container, owned by root."""
        src = Path(host_path)
        if src.is_file():
            self.write_file(container_path, src.read_bytes(), mode=src.stat().st_mode & 0o7777)
            return
        if not src.is_dir():
            raise FileNotFoundError(src)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(src, arcname=".", filter=_root_owned)
        script = 'mkdir -p "$1" && tar -x -C "$1" --no-same-owner'
        self.run(["sh", "-c", script, "sh", container_path], input=buf.getvalue())

    def write_file(self, container_path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Create or replace a file inside the container."""
        payload = data.encode() if isinstance(data, str) else data
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"'
        self.run(["sh", "-c", script, "sh", container_path, f"{mode:o}"], input=payload)

    def nsenter_hint(self) -> str:
        """A command line a human can paste to get a shell inside."""
        return f"nsenter --all --target={self.leader} --root --wd -- bash -l"


def _kill_and_drain(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """Kill a timed-out command; return what it printed so far."""
    # Own process group: this kills nsenter *and* the child it forked inside.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        # Something inside still holds our pipes (e.g. a `systemd-run --pipe`
        # service, which lives in the container's own cgroup): give up on it.
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return b"", b""
    return out, err


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _hold_shared_lock(distro: str, rootfs: Path) -> int:
    # Held while the container runs, so a concurrent rebuild (recipe change in
    # another checkout) cannot delete the tree under a booted overlay.
    fd = os.open(cache_root() / f"{distro}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    if not _is_ready(rootfs):
        os.close(fd)
        raise ContainerError(f"{rootfs} was removed while we were booting it")
    return fd


def _spawn_nspawn(
    name: str,
    rootfs: Path,
    layout: CgroupLayout,
    binds_ro: BindMap,
    console_log: Path,
    *,
    extra: Sequence[str],
) -> subprocess.Popen[bytes]:
    rel = f"{CGROUP_PARENT}/{name}"
    for path in layout.dirs(rel):
        path.mkdir(parents=True)
    (layout.unified / rel / "exec").mkdir()
    # nspawn without a host systemd (--keep-unit) puts the container below its
    # *own* cgroup ("payload"/"supervisor"), so enter our private subtree first;
    # otherwise every container would share <cgroup root>/payload.
    enter = " && ".join(f'echo $$ > "{p}/cgroup.procs"' for p in layout.dirs(rel))
    argv = [
        "sh", "-c", f'{enter} && exec "$@"', "sh",
        "systemd-nspawn",
        f"--directory={rootfs}",
        f"--machine={name}",
        "--boot",
        "--volatile=overlay",
        "--register=no",
        "--keep-unit",
        "--private-network",
        "--link-journal=no",
        "--console=read-only",
        # nspawn's seccomp filter blocks bpf(): without it systemd inside silently
        # skips IPAddressDeny=, SocketBindDeny=, RestrictNetworkInterfaces= and
        # BPF DevicePolicy=, which a real host enforces.
        "--system-call-filter=bpf",
        *(f"--bind-ro={Path(h).resolve()}:{c}" for h, c in binds_ro.items()),
        *extra,
    ]  # fmt: skip
    env = {
        "PATH": ROOT_PATH,
        # The host is hybrid (cgroup1 + cgroup2); systemd 257 needs pure cgroup2.
        "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
    }
    with console_log.open("wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out.extend(int(c) for c in task.read_text().split())
    return out


def _exe_name(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def _innermost_pid(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return None


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def _parse_binds(specs: Sequence[str]) -> dict[str, str]:
    binds: dict[str, str] = {}
    for spec in specs:
        host, sep, inside = spec.partition(":")
        binds[host] = inside if sep else host
    return binds


def _cmd_build(args: argparse.Namespace) -> int:
    for distro in args.distro:
        started = time.monotonic()
        root = build_rootfs(distro)
        print(f"{distro}: {root} ({time.monotonic() - started:.1f}s)")
    return 0


def _cmd_shell(args: argparse.Namespace) -> int:
    with Container.boot(args.distro, binds_ro=_parse_binds(args.bind_ro), nspawn_args=args.nspawn_arg) as ct:
        if args.leader_file:
            # For scripts: `nsenter --all --target=$(cat FILE) --root --wd -- CMD`.
            Path(args.leader_file).write_text(f"{ct.leader}\n")
        print(f"container {ct.name} is up; leader pid {ct.leader}")
        print(f"enter it with:\n  {ct.nsenter_hint()}")
        print("press Enter (or Ctrl-C, or send SIGTERM) to power it off", flush=True)
        with contextlib.suppress(KeyboardInterrupt, EOFError):
            if sys.stdin.isatty():
                input()
            else:  # e.g. started in the background by a demo script
                signal.pause()
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    argv = [a for a in args.argv if a != "--"] if args.argv[:1] == ["--"] else args.argv
    with Container.boot(args.distro, binds_ro=_parse_binds(args.bind_ro), nspawn_args=args.nspawn_arg) as ct:
        res = ct.run(argv, user=args.user, check=False, timeout=args.timeout)
        sys.stdout.buffer.write(res.stdout)
        sys.stderr.buffer.write(res.stderr)
        return res.returncode


def _cmd_reap(_args: argparse.Namespace) -> int:
    for name in reap_stale():
        print(f"reaped {name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.e2e.container", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="debootstrap (cached) rootfs trees")
    build.add_argument("distro", nargs="+", choices=DISTROS)
    build.set_defaults(func=_cmd_build)
    for cmd, func, helptext in (
        ("shell", _cmd_shell, "boot a container and wait; prints how to nsenter"),
        ("run", _cmd_run, "boot a container, run one command inside, power off"),
    ):
        p = sub.add_parser(cmd, help=helptext)
        p.add_argument("distro", choices=DISTROS)
        p.add_argument("--bind-ro", action="append", default=[], metavar="HOST[:CONTAINER]")
        p.add_argument("--nspawn-arg", action="append", default=[], help="extra systemd-nspawn option")
        p.set_defaults(func=func)
        if cmd == "shell":
            p.add_argument("--leader-file", help="write the container's PID 1 (host pid) here once booted")
        if cmd == "run":
            p.add_argument("--user", default=None)
            p.add_argument("--timeout", type=float, default=600)
            p.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("reap", help="kill containers whose test process died").set_defaults(func=_cmd_reap)
    args = parser.parse_args(argv)
    # SIGTERM (CI stopping us) must unwind through the `with` blocks like Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if os.geteuid() != 0:
        parser.error("must run as root")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
