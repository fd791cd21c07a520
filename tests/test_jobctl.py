"""jobctl against a fake server: a thread on a unix socket in tmp_path that checks the request line
and plays scripted reply bytes (docs/protocol.md)."""

import base64
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from trigger import jobctl

REPO = Path(__file__).resolve().parent.parent
RUN_ID = "20261128T154402-123456-3fa9"
ACCEPTED = {
    "event": "accepted",
    "job": "build",
    "run_id": RUN_ID,
    "output_dir": f"/var/lib/jobrunner/runs/build/{RUN_ID}",
    "log": f"/var/log/jobrunner/build/{RUN_ID}.log",
    "detach": False,
}
EXIT_FIELDS = {
    "job": "build",
    "run_id": RUN_ID,
    "signal": None,
    "timed_out": False,
    "cancelled": False,
    "duration_s": 1.25,
    "log": ACCEPTED["log"],
    "output_dir": ACCEPTED["output_dir"],
}


def line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


def output(stream: str, data: bytes) -> bytes:
    try:
        return line({"event": "output", "stream": stream, "text": data.decode("utf-8")})
    except UnicodeDecodeError:
        return line({"event": "output", "stream": stream, "base64": base64.b64encode(data).decode()})


def exit_event(code: int, **fields: Any) -> bytes:
    return line({"event": "exit", **EXIT_FIELDS, "exit_code": code, **fields})


def error_event(code: str, message: str = "it failed", hint: str = "", **fields: Any) -> bytes:
    return line({"event": "error", "code": code, "message": message, "hint": hint, **fields})


Step = bytes | float  # bytes to send, or seconds to sleep (so that the client sees separate recv()s)


class FakeServer:
    """Accepts one connection, reads the request line, sends ``script``, then either closes, or (with
    ``until_closed``) waits for the client to close, repeating ``filler`` meanwhile if given."""

    def __init__(
        self,
        path: Path,
        script: Sequence[Step] = (),
        *,
        until_closed: bool = False,
        filler: bytes = b"",
        read_bytes: int = 0,
    ) -> None:
        self.path = path
        self.script = script
        self.until_closed = until_closed
        self.filler = filler
        self.read_bytes = read_bytes
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
                if self.read_bytes:  # leave the rest unread: closing then resets the connection
                    self.request = conn.recv(self.read_bytes)
                    return
                self.request = self.read_request(conn)
                self.play(conn)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.listener.close()

    def read_request(self, conn: socket.socket) -> bytes:
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            assert chunk, f"the client closed before a whole request line: {data!r}"
            data += chunk
        return data

    def play(self, conn: socket.socket) -> None:
        try:
            for step in self.script:
                if isinstance(step, float):
                    time.sleep(step)
                else:
                    conn.sendall(step)
            if self.filler:
                while True:
                    conn.sendall(self.filler)
            if self.until_closed:
                while conn.recv(65536):
                    pass
                self.client_closed.set()
        except (BrokenPipeError, ConnectionResetError):
            self.client_closed.set()

    def request_json(self) -> Any:
        self.finish()
        return json.loads(self.request)

    def finish(self) -> None:
        self.thread.join(20)
        assert not self.thread.is_alive(), "the fake server is still running"
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "job.sock"


def jobctl_main(capsys: pytest.CaptureFixture[bytes], *argv: str) -> tuple[int, bytes, bytes]:
    status = jobctl.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def spawn(*argv: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOBCTL_SOCKET", None)
    return subprocess.Popen(
        [sys.executable, "-m", "trigger", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


# --- run ----------------------------------------------------------------------------------------------


def test_run_streams_output_as_raw_bytes_and_exits_0(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path
) -> None:
    server = FakeServer(
        sock,
        [
            line(ACCEPTED),
            output("stdout", b"hello \xc3\xa9\n"),
            output("stderr", b"warning\n"),
            output("stdout", b"\xff\xfe\x00binary"),
            exit_event(0),
        ],
    )
    status, out, err = jobctl_main(
        capsysbinary, "run", "--socket", str(sock), "build", "a b", "--", "-x", "--"
    )
    assert server.request_json() == {
        "op": "run",
        "job": "build",
        "args": ["a b", "-x", "--"],
        "detach": False,
    }
    assert server.request.endswith(b"}\n") and server.request.count(b"\n") == 1
    assert (status, out, err) == (0, b"hello \xc3\xa9\n\xff\xfe\x00binary", b"warning\n")


@pytest.mark.parametrize("code", [1, 2, 3, 42, 64, 255])
def test_run_exits_with_the_jobs_exit_code(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path, code: int
) -> None:
    FakeServer(sock, [line(ACCEPTED), output("stderr", b"failed\n"), exit_event(code)])
    assert jobctl_main(capsysbinary, "run", "--socket", str(sock), "build") == (code, b"", b"failed\n")


def test_killed_job_exits_128_plus_signal_with_a_note(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path
) -> None:
    FakeServer(sock, [line(ACCEPTED), exit_event(137, signal=9)])
    status, out, err = jobctl_main(capsysbinary, "run", "--socket", str(sock), "build")
    assert (status, out) == (137, b"")
    assert (
        err == f"jobctl: job 'build' was killed by SIGKILL (run {RUN_ID}, log {ACCEPTED['log']})\n".encode()
    )


def test_timed_out_job_exits_124_with_a_note(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    FakeServer(sock, [line(ACCEPTED), exit_event(124, timed_out=True)])
    status, _, err = jobctl_main(capsysbinary, "run", "--socket", str(sock), "build")
    assert status == 124
    assert err.startswith(b"jobctl: job 'build' timed out and was stopped (run ")


def chop(data: bytes, cuts: Sequence[int]) -> list[Step]:
    """``data`` sent in pieces cut at ``cuts``, with pauses so that each arrives in its own recv()."""
    steps: list[Step] = []
    start = 0
    for cut in sorted(cuts):
        steps += [data[start:cut], 0.02]
        start = cut
    return [*steps, data[start:]]


def test_event_lines_split_across_sends(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    escaped = output("stdout", "caf\u00e9 \u2603\n".encode())  # json.dumps escapes: cut inside an escape
    raw = b'{"event": "output", "stream": "stderr", "text": "\xc3\xa9\\n"}\n'  # raw UTF-8 in the JSON
    reply = line(ACCEPTED) + escaped + raw + exit_event(5)
    start = len(line(ACCEPTED))
    cuts = [
        *range(1, 40),
        start + escaped.index(b"\\u00e9") + 3,
        start + len(escaped) + raw.index(b"\xc3") + 1,
    ]
    cuts += [len(reply) - 10]
    FakeServer(sock, chop(reply, cuts))
    status, out, err = jobctl_main(capsysbinary, "run", "--socket", str(sock), "build")
    assert (status, out, err) == (5, "caf\u00e9 \u2603\n".encode(), "\u00e9\n".encode())


def test_last_line_without_newline(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    FakeServer(sock, [line(ACCEPTED), output("stdout", b"x"), exit_event(7).rstrip(b"\n")])
    assert jobctl_main(capsysbinary, "run", "--socket", str(sock), "build") == (7, b"x", b"")


def test_unknown_events_and_fields_are_ignored(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path
) -> None:
    FakeServer(
        sock,
        [
            line({**ACCEPTED, "new_field": [1, 2]}),
            line({"event": "progress", "percent": 50}),
            line({"event": "output", "stream": "stdout", "text": "ok\n", "seq": 1}),
            line({"event": "output", "stream": "status", "text": "a future stream\n"}),
            exit_event(0, cpu_s=0.5),
        ],
    )
    assert jobctl_main(capsysbinary, "run", "--socket", str(sock), "build") == (0, b"ok\n", b"")


def peak_memory_kib(pid: int) -> int:
    """VmHWM: the process's peak resident memory since its exec (unlike ru_maxrss, which keeps
    what the forked child inherited from pytest); 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(row.split()[1]) for row in status.splitlines() if row.startswith("VmHWM:")), 0)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read peak memory")
def test_huge_output_streams_with_flat_memory(sock: Path) -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB, not UTF-8: base64 events
    count = 3 * 1024  # 192 MiB
    server = FakeServer(sock, [line(ACCEPTED), *([output("stdout", chunk)] * count), exit_event(0)])
    proc = spawn("run", "--socket", str(sock), "big")
    assert proc.stdout is not None and proc.stderr is not None
    received, peak = 0, 0
    while data := proc.stdout.read(len(chunk)):
        assert data == chunk[: len(data)], f"wrong bytes at offset {received}"
        received += len(data)
        peak = max(peak, peak_memory_kib(proc.pid))  # monotonic: the last reading is nearly the peak
    assert proc.wait(10) == 0, proc.stderr.read()
    server.finish()
    assert received == count * len(chunk)
    assert 0 < peak < 48 * 1024, f"jobctl's memory grew to {peak} KiB for {received} bytes of output"


# --- errors -------------------------------------------------------------------------------------------


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
        ("a-code-from-the-future", 70),
    ],
)
def test_error_codes_map_to_exit_statuses(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path, code: str, expected: int
) -> None:
    FakeServer(sock, [error_event(code, "job 'build' said no", "try this")])
    status, out, err = jobctl_main(capsysbinary, "run", "--socket", str(sock), "build")
    assert (status, out) == (expected, b"")
    assert err == f"jobctl: error: {code}: job 'build' said no\njobctl: hint: try this\n".encode()


def test_error_after_the_run_started_names_the_run(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path
) -> None:
    FakeServer(
        sock,
        [line(ACCEPTED), output("stdout", b"partial\n"), error_event("internal", "it broke", run_id=RUN_ID)],
    )
    status, out, err = jobctl_main(capsysbinary, "run", "--socket", str(sock), "build")
    assert (status, out, err) == (
        70,
        b"partial\n",
        f"jobctl: error: internal: it broke (run {RUN_ID})\n".encode(),
    )


def test_missing_socket_exits_69_with_a_hint(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    status, out, err = jobctl_main(capsysbinary, "run", "--socket", str(sock), "build")
    assert (status, out) == (69, b"")
    assert (
        err
        == (
            f"jobctl: error: {sock} does not exist\n"
            "jobctl: hint: is job.socket running? sudo systemctl enable --now job.socket\n"
        ).encode()
    )


def test_refused_connection_exits_69(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(sock))  # bound, never listening: what a stopped job.socket leaves behind
        status, _, err = jobctl_main(capsysbinary, "list", "--socket", str(sock))
    assert status == 69
    assert err.startswith(
        f"jobctl: error: nothing is listening on {sock}\njobctl: hint: is job.socket".encode()
    )


def python_for_nobody() -> str | None:
    """An interpreter (3.11+) that the unprivileged user can run: ours may live under /root."""
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if candidate is None:
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info >= (3, 11)"],
                **as_nobody(),
                capture_output=True,
                check=False,
                cwd="/",
            )
        except OSError:  # e.g. EACCES: it lives under /root
            continue
        if probe.returncode == 0:
            return candidate
    return None


def as_nobody() -> dict[str, Any]:
    """subprocess arguments to run as nobody: user= alone would keep root's group and groups."""
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory outside tmp_path (which is 0700 root) that another user can enter."""
    path = Path(tempfile.mkdtemp(prefix="jobctl-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run jobctl as another user")
def test_permission_denied_exits_77_with_the_sockets_group(shared_dir: Path) -> None:
    python = python_for_nobody()
    if python is None:
        pytest.skip("no Python 3.11+ interpreter that user 'nobody' can run")
    group = grp.getgrgid(0).gr_name
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        path = shared_dir / "job.sock"
        listener.bind(str(path))
        listener.listen(1)
        os.chown(path, 0, 0)
        path.chmod(0o660)
        proc = subprocess.run(
            [python, "-m", "trigger", "run", "--socket", str(path), "build"],
            **as_nobody(),
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
            capture_output=True,
            check=False,
            timeout=30,
        )
    assert proc.returncode == 77, proc.stderr
    assert (
        proc.stderr
        == (
            f"jobctl: error: permission denied connecting to {path}\n"
            "jobctl: hint: you need to be in the group that owns the socket: "
            f"sudo usermod -aG {group} $USER, then log in again\n"
        ).encode()
    )


@pytest.mark.parametrize(
    "script",
    [
        pytest.param([], id="closed-at-once"),
        pytest.param([line(ACCEPTED), output("stdout", b"half")], id="closed-mid-run"),
        pytest.param([line(ACCEPTED), b'{"event": "exit", "exit_co'], id="closed-mid-line"),
    ],
)
def test_connection_lost_before_the_final_event_exits_255(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path, script: list[Step]
) -> None:
    FakeServer(sock, script)
    # --no-retry: closed at once is a run that never started, which jobctl would try again
    # (tests/test_jobctl_terminal.py)
    status, _, err = jobctl_main(capsysbinary, "run", "--no-retry", "--socket", str(sock), "build")
    assert status == 255
    assert err.startswith(
        b"jobctl: error: the connection to the job runner was lost before the final event\n"
    )
    if script:
        assert f"jobctl: hint: run {RUN_ID} was cancelled or is still running".encode() in err


def test_connection_reset_exits_255(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    server = FakeServer(sock, read_bytes=5)  # closes with the rest of the request unread: ECONNRESET
    status, _, err = jobctl_main(capsysbinary, "run", "--no-retry", "--socket", str(sock), "build")
    server.finish()
    assert status == 255
    assert b"lost before the final event" in err


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"this is not json\n", b"not JSON"),
        (b"\xff\xfe{}\n", b"not JSON"),
        (b"[1, 2]\n", b"not an object"),
        (b'{"no": "event"}\n', b"not an object"),
        (exit_event(0).replace(b'"exit_code": 0', b'"exit_code": "0"'), b"exit_code '0'"),
        (exit_event(0).replace(b'"exit_code": 0', b'"exit_code": 256'), b"exit_code 256"),
        (exit_event(0).replace(b'"exit_code": 0', b'"exit_code": true'), b"exit_code True"),
        (line({"event": "jobs", "jobs": []}), b"an unexpected 'jobs' event in reply to 'run'"),
        (line({"event": "output", "stream": "stdout", "base64": "!!!"}), b"base64 does not decode"),
        (line({"event": "output", "stream": "stdout", "text": "a", "base64": "YQ=="}), b"exactly one"),
        (line({"event": "error", "code": 7, "message": "m"}), b"error code 7"),
        pytest.param(b"x" * (17 * 1024 * 1024), b"a line longer than", id="line-too-long"),
    ],
)
def test_malformed_replies_exit_70(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path, reply: bytes, reason: bytes
) -> None:
    FakeServer(sock, [reply])
    status, out, err = jobctl_main(capsysbinary, "run", "--socket", str(sock), "build")
    assert (status, out) == (70, b"")
    assert err.startswith(b"jobctl: error: malformed reply from the server: ")
    assert reason in err


# --- --json, --detach, list ---------------------------------------------------------------------------


def test_json_prints_events_exactly_as_received(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path
) -> None:
    events = [
        line(ACCEPTED),
        b'{"event":"output","stream":"stdout","text":"caf\\u00e9\\n"}\n',
        b'{ "event" : "progress" , "percent": 50 }\n',
        output("stderr", b"\xff"),
        b'{"event": "exit", "exit_code": 3, "job": "build"}',  # no final newline either
    ]
    FakeServer(sock, [*events[:2], 0.05, *events[2:]])
    status, out, err = jobctl_main(capsysbinary, "--json", "run", "--socket", str(sock), "build")
    assert (status, out, err) == (3, b"".join(events), b"")


def test_json_error_event_is_passed_through_and_mapped(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path
) -> None:
    FakeServer(sock, [error_event("busy", "build is running", "wait")])
    status, out, err = jobctl_main(capsysbinary, "run", "--json", "--socket", str(sock), "build")
    assert (status, out, err) == (75, error_event("busy", "build is running", "wait"), b"")


def test_detach_prints_where_the_run_is_and_exits_0(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path
) -> None:
    server = FakeServer(sock, [line({**ACCEPTED, "detach": True})], until_closed=True)
    status, out, err = jobctl_main(capsysbinary, "run", "--detach", "--socket", str(sock), "build", "x")
    assert server.request_json() == {"op": "run", "job": "build", "args": ["x"], "detach": True}
    assert server.client_closed.is_set()
    assert (status, err) == (0, b"")
    assert out == (
        f"run_id: {RUN_ID}\noutput_dir: {ACCEPTED['output_dir']}\nlog: {ACCEPTED['log']}\n".encode()
    )


def test_detach_with_json_prints_the_accepted_event(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path
) -> None:
    FakeServer(sock, [line({**ACCEPTED, "detach": True})], until_closed=True)
    status, out, _ = jobctl_main(capsysbinary, "run", "--detach", "--json", "--socket", str(sock), "build")
    assert (status, out) == (0, line({**ACCEPTED, "detach": True}))


def test_detach_error_is_mapped(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    FakeServer(sock, [error_event("forbidden", "not for you")])
    status, out, _ = jobctl_main(capsysbinary, "run", "--detach", "--socket", str(sock), "build")
    assert (status, out) == (77, b"")


def test_list_renders_an_aligned_table(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    jobs = [
        {"name": "backup", "description": "Back up the database", "args": False},
        {"name": "deploy", "description": "Deploy a branch\nto production", "args": True},
        {"name": "x", "description": "", "args": False},
    ]
    server = FakeServer(sock, [line({"event": "jobs", "jobs": jobs})])
    status, out, err = jobctl_main(capsysbinary, "list", "--socket", str(sock))
    assert server.request_json() == {"op": "list"}
    assert (status, err) == (0, b"")
    # the columns of fields that no job has (a server older than them) are left out
    assert out == (
        b"NAME    ARGS  DESCRIPTION\n"
        b"backup  no    Back up the database\n"
        b"deploy  yes   Deploy a branch to production\n"
        b"x       no\n"
    )


def test_list_without_jobs(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    FakeServer(sock, [line({"event": "jobs", "jobs": []})])
    assert jobctl_main(capsysbinary, "list", "--socket", str(sock)) == (
        0,
        b"",
        b"jobctl: there are no jobs you may run\n",
    )


def test_list_rejects_an_exit_event(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    FakeServer(sock, [exit_event(0)])
    status, _, err = jobctl_main(capsysbinary, "list", "--socket", str(sock))
    assert status == 70
    assert b"an unexpected 'exit' event in reply to 'list'" in err


def test_list_json(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    reply = line({"event": "jobs", "jobs": [{"name": "a", "description": "b", "args": False}]})
    FakeServer(sock, [reply])
    assert jobctl_main(capsysbinary, "--json", "list", "--socket", str(sock)) == (0, reply, b"")


# --- the command line ---------------------------------------------------------------------------------


def test_socket_from_the_environment_and_the_option(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_sock, option_sock = tmp_path / "env.sock", tmp_path / "option.sock"
    monkeypatch.setenv("JOBCTL_SOCKET", str(env_sock))
    FakeServer(env_sock, [exit_event(11)])
    assert jobctl_main(capsysbinary, "run", "build")[0] == 11
    FakeServer(option_sock, [exit_event(12)])
    assert jobctl_main(capsysbinary, "--socket", str(option_sock), "run", "build")[0] == 12


@pytest.mark.parametrize(
    ("argv", "json_mode", "args"),
    [
        (["--json", "run", "x", "a"], True, ["a"]),
        (["run", "--json", "x", "a"], True, ["a"]),
        (["run", "x", "a", "--json"], True, ["a"]),
        (["run", "x", "--", "--json", "-", "--", "-5"], False, ["--json", "-", "--", "-5"]),
        (["run", "x", "-5", "a b"], False, ["-5", "a b"]),
    ],
)
def test_options_go_anywhere_before_double_dash(argv: list[str], json_mode: bool, args: list[str]) -> None:
    ns = jobctl.parse_arguments(jobctl.build_parser(), argv)
    assert (ns.name, ns.json, ns.args) == ("x", json_mode, args)


def test_default_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBCTL_SOCKET", raising=False)
    ns = jobctl.parse_arguments(jobctl.build_parser(), ["list"])
    assert ns.socket == "/run/job.sock"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["run"],
        ["frobnicate"],
        ["run", "build", "a", "--bogus"],
        ["list", "extra"],
        ["list", "--", "extra"],
        ["--socket"],
        ["run", "build", "\udcff"],  # not UTF-8 (a surrogate-escaped byte from argv)
    ],
)
def test_usage_errors_exit_64(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path, argv: list[str]
) -> None:
    status, out, err = jobctl_main(
        capsysbinary, *argv[:1], *(["--socket", str(sock)] if argv else []), *argv[1:]
    )
    assert (status, out) == (64, b"")
    assert b"jobctl: error: " in err
    assert not sock.exists()


def test_debug_shows_the_request(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    FakeServer(sock, [exit_event(0)])
    status, _, err = jobctl_main(capsysbinary, "--debug", "run", "--socket", str(sock), "build", "x")
    assert status == 0
    assert err.startswith(b'jobctl: debug: sending b\'{"op": "run", "job": "build", "args": ["x"]')


def test_too_long_request_is_a_usage_error(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    status, _, err = jobctl_main(capsysbinary, "run", "--socket", str(sock), "build", "a" * 70000)
    assert status == 64
    assert b"the server takes at most 65536" in err


def test_help_lists_every_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert jobctl.main(["--help"]) == 0
    text = capsys.readouterr().out
    for status in (
        "64",
        "69",
        "70",
        "74",
        "75",
        "77",
        "78",
        "129",
        "130",
        "141",
        "143",
        "255",
        "JOBCTL_SOCKET",
    ):
        assert f"  {status} " in text or f" {status} " in text, status
    assert jobctl.main(["run", "--help"]) == 0
    assert "--detach" in capsys.readouterr().out


def test_startup_does_not_import_what_it_does_not_need() -> None:
    code = (
        "import sys; before = set(sys.modules); import trigger.jobctl as j; "
        "j.parse_arguments(j.build_parser(), ['run', 'x']); print(*set(sys.modules) - before)"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO)},
    )
    imported = set(proc.stdout.split())
    assert "trigger.jobctl" in imported
    assert not imported & {"base64", "grp", "traceback", "typing", "subprocess", "asyncio", "logging"}
    # socket: _socket is enough; shutil: argparse's formatter imports it unless given a width; signal:
    # _signal is enough (signal builds three enum classes).
    assert not imported & {"socket", "selectors", "shutil", "contextlib", "signal"}


def test_terminal_width_honours_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "123")
    assert jobctl.terminal_width() == 123


@pytest.mark.parametrize("columns", [None, "", "0", "-5", "wide"])
def test_terminal_width_is_80_when_stdout_is_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, columns: str | None
) -> None:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    with open(tmp_path / "out", "w") as not_a_terminal:
        monkeypatch.setattr(sys, "__stdout__", not_a_terminal)
        assert jobctl.terminal_width() == 80
    monkeypatch.setattr(sys, "__stdout__", not_a_terminal)  # closed: fileno() raises ValueError
    assert jobctl.terminal_width() == 80
    monkeypatch.setattr(sys, "__stdout__", None)  # pythonw, or stdout closed at start
    assert jobctl.terminal_width() == 80


def test_terminal_width_is_the_terminals(monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl
    import struct
    import termios

    monkeypatch.delenv("COLUMNS", raising=False)
    primary, secondary = os.openpty()
    try:
        fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 97, 0, 0))
        with open(secondary, "w", closefd=False) as terminal:
            monkeypatch.setattr(sys, "__stdout__", terminal)
            assert jobctl.terminal_width() == 97
            fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
            assert jobctl.terminal_width() == 80  # a terminal that does not know its size
    finally:
        os.close(primary)
        os.close(secondary)


@pytest.mark.parametrize(("columns", "width"), [("60", 58), ("120", 118)])
def test_help_is_wrapped_to_the_terminal_width(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: str, width: int
) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    assert jobctl.main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    options = text[text.index("positional arguments:") : text.index("examples:")]  # not the raw texts
    assert max(len(row) for row in options.splitlines()) <= width
    # wrapped to the width: the start of --json's help fits on one line at 118 columns, not at 58
    one_line = "--json         print the server's events exactly as received (JSON Lines)" in text
    assert one_line == (width > 80)


def clean_env() -> dict[str, str]:
    """The environment without PYTHONUNBUFFERED and the like: stdout buffered as for a user."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTHON")}
    env.pop("JOBCTL_SOCKET", None)
    return {**env, "PYTHONPATH": str(REPO)}


def python_c(code: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    """`python3 -c CODE` in the repository, with clean_env() plus `env`."""
    return subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, env={**clean_env(), **env}, capture_output=True
    )


def test_run_exits_with_mains_status_without_teardown_and_flushed() -> None:
    code = (
        "import atexit, sys; from trigger import jobctl; "
        "atexit.register(lambda: sys.stderr.write('teardown\\n')); "
        "jobctl.main = lambda **_: (sys.stdout.write('buffered, no newline'), sys.stderr.write('err'), 7)[-1]; "
        "jobctl.run()"
    )
    proc = python_c(code)
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, b"buffered, no newline", b"err")


def test_building_the_parser_looks_for_no_message_catalogs() -> None:
    code = (
        "import gettext; calls = []; find = gettext.find; "
        "gettext.find = lambda *a, **k: calls.append(a) or find(*a, **k); "
        "from trigger import jobctl; jobctl.parse_arguments(jobctl.build_parser(), ['run', 'x']); "
        "print(len(calls))"
    )
    proc = python_c(code, LANGUAGE="de:fr", LANG="de_DE.UTF-8")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"0\n", b"")


def test_python_m_trigger_imports_without_collections_and_run_turns_the_collector_back_on() -> None:
    code = (
        "import gc, sys; import trigger.__main__; from trigger import jobctl; "
        "sys.stdout.write(f'{gc.isenabled()} '); "
        "jobctl.main = lambda **_: (sys.stdout.write(f'{gc.isenabled()}'), 0)[-1]; "
        "jobctl.run()"
    )
    proc = python_c(code)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"False True", b"")


def test_command_exits_with_the_jobs_status(sock: Path) -> None:
    server = FakeServer(
        sock, [line(ACCEPTED), output("stdout", b"out"), output("stderr", b"err"), exit_event(3)]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "trigger", "run", "--socket", str(sock), "build"],
        check=False,
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        timeout=20,
    )
    server.finish()
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, b"out", b"err")


def test_help_is_flushed_and_its_write_errors_are_exit_statuses() -> None:
    help_command = [sys.executable, "-m", "trigger", "--help"]
    proc = subprocess.run(help_command, check=False, cwd=REPO, env=clean_env(), capture_output=True)
    assert proc.returncode == 0
    assert proc.stdout.startswith(b"usage: jobctl ")
    assert proc.stdout.endswith(b"no colour (https://no-color.org)\n")
    assert proc.stderr == b""
    # stdout closed before the help is written: 141 and silence, as for a run (not Python's 120)
    read, write = os.pipe()
    os.close(read)
    with subprocess.Popen(
        help_command, cwd=REPO, env=clean_env(), stdout=write, stderr=subprocess.PIPE
    ) as closed:
        os.close(write)
        assert closed.stderr is not None
        assert (closed.wait(10), closed.stderr.read()) == (141, b"")
    if os.path.exists("/dev/full"):
        with open("/dev/full", "wb") as full:
            proc = subprocess.run(
                help_command, check=False, cwd=REPO, env=clean_env(), stdout=full, stderr=subprocess.PIPE
            )
        assert (proc.returncode, proc.stderr) == (
            74,
            b"jobctl: error: cannot write to stdout: No space left on device\n",
        )


# --- signals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "expected"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_signal_closes_the_connection_and_exits_128_plus_n(sock: Path, signum: int, expected: int) -> None:
    server = FakeServer(sock, [line(ACCEPTED), output("stdout", b"started\n")], until_closed=True)
    proc = spawn("run", "--socket", str(sock), "build")
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signum)
    assert proc.wait(10) == expected
    server.finish()
    assert server.client_closed.is_set()
    err = proc.stderr.read()
    assert (
        err
        == f"jobctl: {signal.Signals(signum).name}: closed the connection, which cancels the run\n".encode()
    )


def test_closed_stdout_cancels_quietly_with_141(sock: Path) -> None:
    server = FakeServer(sock, [line(ACCEPTED)], filler=output("stdout", b"y\n" * 1000))
    proc = spawn("run", "--socket", str(sock), "yes")
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10) == b"y\ny\ny\ny\ny\n"
    proc.stdout.close()  # what `| head` does
    assert proc.wait(10) == 141
    server.finish()
    assert server.client_closed.is_set()
    assert proc.stderr.read() == b""


def test_ignored_sigint_stays_ignored(sock: Path) -> None:
    """`jobctl run x &` in a script ignores SIGINT: jobctl must not start cancelling on it."""
    server = FakeServer(sock, [line(ACCEPTED), output("stdout", b"started\n"), 0.5, exit_event(0)])
    proc = spawn(
        "run", "--socket", str(sock), "build", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    server.finish()


def test_run_prints_the_servers_warnings_on_stderr(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path
) -> None:
    warning = "the run log is incomplete: No space left on device"
    FakeServer(sock, [line(ACCEPTED), output("stdout", b"done\n"), exit_event(0, warnings=[warning])])
    status, out, err = jobctl_main(capsysbinary, "run", "--socket", str(sock), "build")
    assert (status, out) == (0, b"done\n")
    assert err == f"jobctl: warning: {warning}\n".encode()
