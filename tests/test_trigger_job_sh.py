"""trigger/trigger_job.sh (socat and the text protocol) against a fake text-protocol server in a thread."""

import grp
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "trigger" / "trigger_job.sh"
RUN_ID = "20261128T154402-123456-3fa9"
SHELLS = [shell for shell in ("dash", "bash") if shutil.which(shell)]

pytestmark = pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")


def exited(code: int, name: str = "build") -> bytes:
    return f"jobrunner: {name} (run {RUN_ID}) exited with {code} after 0.2 s\n".encode()


Step = bytes | float  # bytes to send, or seconds to sleep


class TextServer:
    """Accepts one connection, reads the request line, sends ``script``, then closes; with
    ``filler`` it sends that until the client goes away, with ``until_closed`` it waits for that."""

    def __init__(
        self, path: Path, script: Sequence[Step] = (), *, until_closed: bool = False, filler: bytes = b""
    ) -> None:
        self.script = script
        self.until_closed = until_closed
        self.filler = filler
        self.request = b""
        self.client_closed = threading.Event()
        self.errors: list[BaseException] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(20)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(20)
                while not self.request.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    assert chunk, f"the client closed before a whole request line: {self.request!r}"
                    self.request += chunk
                self.play(conn)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.listener.close()

    def play(self, conn: socket.socket) -> None:
        try:
            for step in self.script:
                if isinstance(step, float):
                    time.sleep(step)
                else:
                    conn.sendall(step)
            while self.filler:
                conn.sendall(self.filler)
            if self.until_closed:
                # After the request socat half-closes (recv gives b""): that is not the client
                # going away. Writing is what notices a closed connection.
                while True:
                    time.sleep(0.05)
                    conn.sendall(b".")
        except (BrokenPipeError, ConnectionResetError):
            self.client_closed.set()

    def finish(self) -> None:
        self.thread.join(20)
        assert not self.thread.is_alive(), "the fake server is still running"
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "job.sock"


def trigger(
    *argv: str, shell: str = "dash", env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[bytes]:
    environment = {"PATH": os.environ["PATH"], **(env or {})}
    return subprocess.Popen(
        [shell, str(SCRIPT), *argv], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs
    )


def run(*argv: str, shell: str = "dash", env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    proc = trigger(*argv, shell=shell, env=env)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


@pytest.mark.parametrize("shell", SHELLS)
def test_arguments_are_quoted_for_shlex(sock: Path, shell: str) -> None:
    args = [
        "plain",
        "two words",
        "it's",
        "'",
        "''",
        "",
        "$HOME",
        "`id`",
        'a"b',
        "back\\slash",
        "*",
        "-n",
        "--",
    ]
    args += ["caf\u00e9", "tab\there", ";&|<>", "trailing\\"]
    server = TextServer(sock, [exited(0)])
    status, out, err = run("-s", str(sock), "build", *args, shell=shell)
    server.finish()
    assert (status, out, err) == (0, exited(0), b"")
    assert server.request.endswith(b"\n") and server.request.count(b"\n") == 1
    assert shlex.split(server.request.decode()) == ["run", "build", *args]
    assert server.request.startswith(b"run build 'plain' 'two words' 'it'\"'\"'s' ")


def test_unusual_job_name_is_quoted(sock: Path) -> None:
    server = TextServer(sock, [b"jobrunner: error: unknown-job: no job 'a b'\n"])
    status, _, _ = run("-s", str(sock), "a b", "x")
    server.finish()
    assert status == 64
    assert server.request == b"run 'a b' 'x'\n"


def test_output_streams_through_byte_for_byte_and_the_exit_code_is_kept(sock: Path) -> None:
    output = b"line one\n\x00\xff\xfe not UTF-8\r\nno newline at the end"
    reply: list[Step] = [output[:10], 0.05, output[10:], b"\n", 0.05, exited(3)[:15], 0.05, exited(3)[15:]]
    server = TextServer(sock, reply)
    status, out, err = run("-s", str(sock), "build")
    server.finish()
    assert (status, out, err) == (3, output + b"\n" + exited(3), b"")
    assert server.request == b"run build\n"


@pytest.mark.parametrize("code", [0, 1, 124, 137, 255])
def test_exit_codes_pass_through(sock: Path, code: int) -> None:
    TextServer(sock, [b"working\n", exited(code)])
    assert run("-s", str(sock), "build") == (code, b"working\n" + exited(code), b"")


def test_waits_for_a_slow_job_beyond_socats_default_timeout(sock: Path) -> None:
    TextServer(sock, [b"started\n", 1.5, exited(4)])
    assert run("-s", str(sock), "build")[0] == 4


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("bad-request", 64),
        ("unknown-job", 64),
        ("bad-arguments", 64),
        ("forbidden", 77),
        ("busy", 75),
        ("config", 78),
        ("credential", 78),
        ("internal", 70),
        ("from-the-future", 70),
    ],
)
def test_error_lines_map_to_exit_statuses(sock: Path, code: str, expected: int) -> None:
    line = f"jobrunner: error: {code}: it failed (hint: do this)\n".encode()
    TextServer(sock, [line])
    assert run("-s", str(sock), "build") == (expected, line, b"")


def test_error_line_after_output(sock: Path) -> None:
    TextServer(sock, [b"partial", b"\njobrunner: error: internal: the run broke\n"])
    assert run("-s", str(sock), "build")[:2] == (70, b"partial\njobrunner: error: internal: the run broke\n")


def test_socket_from_the_environment(sock: Path) -> None:
    TextServer(sock, [exited(9)])
    assert run("build", env={"JOBCTL_SOCKET": str(sock)})[0] == 9


def test_socket_path_with_socat_special_characters(tmp_path: Path) -> None:
    directory = tmp_path / "a,b:c d!'x"
    directory.mkdir()
    TextServer(directory / "job.sock", [exited(6)])
    assert run("-s", str(directory / "job.sock"), "build")[0] == 6


def test_missing_socket_exits_69_with_a_hint(sock: Path) -> None:
    status, out, err = run("-s", str(sock), "build")
    assert (status, out) == (69, b"")
    assert (
        err
        == (
            f"trigger_job.sh: error: {sock} does not exist\n"
            "trigger_job.sh: hint: is job.socket running? sudo systemctl enable --now job.socket\n"
        ).encode()
    )


def test_refused_connection_exits_69(sock: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(sock))
        status, _, err = run("-s", str(sock), "build")
    assert status == 69
    assert err.startswith(f"trigger_job.sh: error: nothing is listening on {sock}\n".encode())


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory outside tmp_path (which is 0700 root) that another user can enter."""
    path = Path(tempfile.mkdtemp(prefix="trigger-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the script as another user")
def test_permission_denied_exits_77(shared_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(0).gr_name
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        path = shared_dir / "job.sock"
        listener.bind(str(path))
        listener.listen(1)
        os.chown(path, 0, 0)
        path.chmod(0o660)
        proc = subprocess.run(
            ["dash", str(SCRIPT), "-s", str(path), "build"],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],  # not root's groups
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            check=False,
            timeout=30,
        )
    assert proc.returncode == 77, proc.stderr
    assert (
        proc.stderr
        == (
            f"trigger_job.sh: error: permission denied connecting to {path}\n"
            "trigger_job.sh: hint: you need to be in the group that owns the socket: "
            f"sudo usermod -aG {group} $USER, then log in again\n"
        ).encode()
    )


@pytest.mark.parametrize(
    "script",
    [
        pytest.param([], id="closed-at-once"),
        pytest.param([b"some output\n"], id="closed-mid-run"),
        pytest.param([b"some output\njobrunner: build (run "], id="closed-mid-last-line"),
    ],
)
def test_connection_lost_exits_255(sock: Path, script: list[Step]) -> None:
    TextServer(sock, script)
    status, out, err = run("-s", str(sock), "build")
    assert (status, out) == (255, b"".join(step for step in script if isinstance(step, bytes)))
    assert err.startswith(b"trigger_job.sh: error: the connection was lost before the server's last line")


def test_huge_output_streams_through(sock: Path) -> None:
    chunk = (bytes(range(11, 256)) + bytes(range(11))) * 4096  # 1 MiB, ending with a newline
    count = 64
    TextServer(sock, [*([chunk] * count), exited(0)])
    proc = trigger("-s", str(sock), "build")
    assert proc.stdout is not None
    received = 0
    tail = b""
    while data := proc.stdout.read(1 << 20):
        received += len(data)
        tail = (tail + data)[-200:]
    assert proc.wait(30) == 0
    assert received == count * len(chunk) + len(exited(0))
    assert tail.endswith(chunk[-50:] + exited(0))


@pytest.mark.parametrize(
    ("signum", "expected"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_signal_closes_the_connection(sock: Path, signum: int, expected: int) -> None:
    server = TextServer(sock, [b"started\n"], until_closed=True)
    proc = trigger("-s", str(sock), "build")
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signum)  # to the script alone: it must stop socat itself
    assert proc.wait(10) == expected
    server.finish()
    assert server.client_closed.is_set()
    assert proc.stderr is not None
    name = signal.Signals(signum).name
    assert (
        proc.stderr.read()
        == f"trigger_job.sh: {name}: closed the connection, which cancels the run\n".encode()
    )


def test_closed_stdout_cancels_with_141(sock: Path) -> None:
    server = TextServer(sock, filler=b"y\n" * 4096)
    proc = trigger("-s", str(sock), "yes")
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(6) == b"y\ny\ny\n"
    proc.stdout.close()  # what `| head` does
    assert proc.wait(10) == 141
    server.finish()
    assert server.client_closed.is_set()
    assert proc.stderr.read() == b""


@pytest.mark.parametrize(
    "argv",
    [[], ["-s"], ["-x", "build"], ["build", "two\nlines"], [""]],
)
def test_usage_errors_exit_64(sock: Path, argv: list[str]) -> None:
    status, out, err = run(*argv, env={"JOBCTL_SOCKET": str(sock)})
    assert (status, out) == (64, b"")
    assert err


def test_help(sock: Path) -> None:
    status, out, _ = run("-h")
    assert status == 0
    assert out.startswith(b"usage: trigger_job.sh [-s SOCKET] NAME [ARG ...]\n")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean() -> None:
    proc = subprocess.run(
        ["shellcheck", "-s", "sh", str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout


def test_no_temporary_files_are_left(sock: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    TextServer(sock, [exited(0)])
    assert run("-s", str(sock), "build", env={"TMPDIR": str(scratch)})[0] == 0
    assert list(scratch.iterdir()) == []
