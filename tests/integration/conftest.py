"""Integration fixtures: the real runner, started once per connection by `systemd-socket-activate --accept`.

No container and no systemd as PID 1: this proves the per-connection protocol, the job supervision and
the client. What needs real systemd (sandbox, credentials, DynamicUser) is proven in tests/e2e.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOBS_DIR = Path(__file__).parent / "jobs"


class Runner:
    """A socket served by the runner, with its project, configuration and credentials in tmp_path."""

    def __init__(self, tmp_path: Path, secret: str) -> None:
        self.root = tmp_path
        self.secret = secret
        self.project = tmp_path / "project"
        self.socket = tmp_path / "job.sock"
        self.config = tmp_path / "jobs.toml"
        self.credentials = tmp_path / "credentials"
        self.activator_log = tmp_path / "activator.log"
        self.statuses = tmp_path / "exit-statuses"  # the jobs' runners
        self.front_door_statuses = tmp_path / "front-door-statuses"
        self.job_sockets = tmp_path / "job"  # where jobctl looks for a job's own socket, beside job.sock
        shutil.copytree(JOBS_DIR, self.project / "bin")
        self.credentials.mkdir()
        (self.credentials / "api-key").write_text(secret + "\n")
        self.config.write_text(
            (JOBS_DIR.parent / "jobs.toml").read_text().replace("@PROJECT@", str(self.project))
        )
        self._processes: list[tuple[Path, subprocess.Popen[bytes]]] = []

    @property
    def outputs(self) -> Path:
        return self.project / "outputs"

    @property
    def logs(self) -> Path:
        return self.project / "logs"

    def start(self) -> None:
        """The front door on `socket`, and each job's own socket in `job_sockets`, as job.socket and the
        generated job-NAME.socket units do it (runner.units)."""
        self.job_sockets.mkdir()
        self._activate(self.socket, self.front_door_statuses, "--front-door")
        for job in tomllib.loads(self.config.read_text())["jobs"]:
            self._activate(self.job_sockets / f"{job}.sock", self.statuses, job)
        deadline = time.monotonic() + 10
        for path, process in self._processes:
            while not _listening(path):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(
                        f"systemd-socket-activate did not start: {self.activator_log.read_text()}"
                    )
                time.sleep(0.02)

    def _activate(self, path: Path, statuses: Path, *runner_args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen(
            [
                "systemd-socket-activate",
                "--accept",
                "--listen",
                str(path),
                "-E",
                f"JOBRUNNER_CONFIG={self.config}",
                "-E",
                f"JOBRUNNER_JOB_SOCKETS={self.job_sockets}",
                "-E",
                f"JOBRUNNER_FRONT_DOOR_USER={getpass.getuser()}",
                *(
                    ("-E", f"CREDENTIALS_DIRECTORY={self.credentials}")
                    if runner_args[0] != "--front-door"
                    else ()
                ),
                "-E",
                f"PYTHONPATH={REPO}",
                "-E",
                "LANG=C.UTF-8",
                sys.executable,
                str(Path(__file__).parent / "record_exit.py"),
                str(statuses),
                *runner_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.activator_log.open("ab"),
            env=env,
            start_new_session=True,
        )
        self._processes.append((path, process))

    def activator_pids(self) -> set[int]:
        return {process.pid for _, process in self._processes}

    def stop(self) -> None:
        for _, process in self._processes:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    # --- clients

    def connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(self.socket))
        return conn

    def request(self, line: bytes, timeout: float = 30) -> bytes:
        """Send raw bytes, read the whole reply until the server closes."""
        with self.connect() as conn:
            conn.settimeout(timeout)
            conn.sendall(line)
            return read_all(conn)

    def jobctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "trigger", "--socket", str(self.socket), *args],
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=False,
        )

    def runners_alive(self) -> list[int]:
        """The runners (the activators' children, as record_exit.py) that have not exited yet."""
        activators = self.activator_pids()
        alive = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) in activators and state != "Z":  # a zombie has exited (and written its status)
                alive.append(int(entry.name))
        return alive

    def wait_until_served(self) -> None:
        """Until every connection made so far has been served and its runner has exited: one more
        connection, to the front door, is accepted after every earlier one there (an activator accepts
        in order and forks before it accepts the next), then no runner may be left."""
        reply = self.request(b"list\n")
        assert b"hello" in reply, reply  # served: the list of jobs
        wait_for(lambda: not self.runners_alive(), 60, "every runner to exit")

    def exit_statuses(self, count: int = 1, *, front_door: bool = False) -> list[int]:
        """The exit statuses of the jobs' runner processes (or the front door's) so far, once at least
        `count` have exited."""
        path = self.front_door_statuses if front_door else self.statuses
        wait_for(lambda: path.exists() and len(path.read_text().split()) >= count, 10, "runners")
        return [int(code) for code in path.read_text().split()]


def _listening(path: Path) -> bool:
    """Whether a unix socket at `path` accepts connections yet (bind() creates the file before listen())."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON
            return True
    return False


def read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def make_secret() -> str:
    # Made at run time: a literal key in the repository would itself be a leak pattern.
    return "it-" + os.urandom(12).hex()


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate is not installed (apt-get install systemd)")
    server = Runner(tmp_path, make_secret())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_for(predicate: object, timeout: float = 10, what: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
