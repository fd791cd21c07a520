"""jobctl at the terminal (issue #14): the status line of a silent run, colour, the help texts, the `list`
table, and trying again when the runner is busy (a socket at its connection limit closes connections
without a word). Against the fake servers of test_jobctl.py and test_jobctl_direct.py; a terminal is a
BytesIO that says it is one, or a real pseudo-terminal where a process is needed."""

from __future__ import annotations

import argparse
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runner import service
from runner.config import parse_config
from runner.peer import Peer
from runner.protocol import Form, Reply
from tests.test_jobctl import (
    ACCEPTED,
    REPO,
    RUN_ID,
    FakeServer,
    clean_env,
    error_event,
    exit_event,
    line,
    output,
)
from tests.test_jobctl_direct import CLOSE_AT_ONCE, Server, request
from trigger import jobctl, terminal
from trigger.preconnect import EarlyConnection, job_socket

ERASE = b"\r\x1b[K"
STATUS = f"jobctl: build (run {RUN_ID}) running, "
NOT_STARTED = "job 'build' did not start: its socket is at its connection limit, or its unit failed"


class FakeTTY(io.BytesIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def screen(data: bytes) -> str:
    """What a terminal shows after `data`: ERASE empties the line the cursor is on."""
    lines = [""]
    for part in re.split(rb"(\r\x1b\[K|\n)", data):
        if part == ERASE:
            lines[-1] = ""
        elif part == b"\n":
            lines.append("")
        else:
            lines[-1] += part.decode()
    return "\n".join(lines)


def main_on(monkeypatch: pytest.MonkeyPatch, stdout: io.BytesIO, stderr: io.BytesIO, *argv: str) -> int:
    """jobctl.main(argv) writing to `stdout` and `stderr` (the same object: one terminal for both)."""
    for name, stream in (("stdout", stdout), ("stderr", stderr)):  # argparse writes text (usage)
        monkeypatch.setattr(sys, name, io.TextIOWrapper(stream, "utf-8", write_through=True))
    return jobctl.main(list(argv))


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "job.sock"


@pytest.fixture
def fast_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobctl, "TICK_S", 0.05)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(terminal.Backoff, "BASE_S", 0.001)
    monkeypatch.setattr(terminal.Backoff, "CAP_S", 0.01)


@pytest.fixture(autouse=True)
def no_colour_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")


# --- the status line ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("fast_tick")
def test_a_silent_run_shows_a_status_line_that_output_clears(
    monkeypatch: pytest.MonkeyPatch, sock: Path
) -> None:
    FakeServer(sock, [line(ACCEPTED), 0.3, output("stdout", b"hello\n"), 0.3, exit_event(0)])
    tty = FakeTTY()
    assert main_on(monkeypatch, tty, tty, "run", "--socket", str(sock), "build") == 0
    data = tty.getvalue()
    before, _, after = data.partition(b"hello\n")
    assert (STATUS + "0 s").encode() in before
    assert before.endswith(ERASE)  # erased before the output was written
    assert (STATUS + "0 s").encode() in after  # and drawn again once the job was quiet again
    assert data.endswith(ERASE)  # and erased at the end
    assert screen(data) == "hello\n"  # what stays on the screen: the output alone


@pytest.mark.usefixtures("fast_tick")
def test_the_status_line_is_never_drawn_over_an_unfinished_line(
    monkeypatch: pytest.MonkeyPatch, sock: Path
) -> None:
    FakeServer(sock, [line(ACCEPTED), output("stderr", b"Password: "), 0.3, exit_event(0)])
    tty = FakeTTY()
    assert main_on(monkeypatch, tty, tty, "run", "--socket", str(sock), "build") == 0
    assert tty.getvalue() == b"Password: "


@pytest.mark.usefixtures("fast_tick")
def test_the_status_line_stays_on_one_line_of_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(terminal, "width_of", lambda stream: 30)
    tty = FakeTTY()
    status = terminal.StatusLine(tty, tty, "build", RUN_ID)
    status.tick()
    drawn = tty.getvalue()
    assert drawn.startswith(ERASE)
    assert drawn[len(ERASE) :].decode() == "jobctl: build (run 20261128T\u2026"  # 29 columns
    status.clear()
    assert screen(tty.getvalue()) == ""


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "0 s"), (12.9, "12 s"), (125, "2 min 5 s"), (3725, "1 h 2 min")]
)
def test_elapsed_time(seconds: float, text: str) -> None:
    assert terminal.duration(seconds) == text


@pytest.mark.usefixtures("fast_tick")
@pytest.mark.parametrize(
    ("end", "status", "last_line"),
    [
        pytest.param(exit_event(137, signal=9), 137, "jobctl: job 'build' was killed by SIGKILL", id="note"),
        pytest.param(exit_event(0, warnings=["w"]), 0, "jobctl: warning: w", id="warning"),
        pytest.param(
            error_event("internal", "it broke", run_id=RUN_ID), 70, "jobctl: error: internal: ", id="error"
        ),
        pytest.param(b"", 255, "jobctl: hint: run ", id="lost"),
    ],
)
def test_the_status_line_is_erased_before_jobctls_own_lines(
    monkeypatch: pytest.MonkeyPatch, sock: Path, end: bytes, status: int, last_line: str
) -> None:
    FakeServer(sock, [line(ACCEPTED), 0.3, end])
    tty = FakeTTY()
    monkeypatch.setenv("NO_COLOR", "1")
    assert main_on(monkeypatch, tty, tty, "run", "--socket", str(sock), "build") == status
    data = tty.getvalue()
    assert STATUS.encode() in data
    shown = screen(data)
    assert STATUS not in shown
    assert shown.endswith("\n")
    assert shown.splitlines()[-1].startswith(last_line)


@pytest.mark.usefixtures("fast_tick")
@pytest.mark.parametrize("how", ["stderr-not-a-terminal", "json", "detach", "dumb-terminal"])
def test_no_status_line(monkeypatch: pytest.MonkeyPatch, sock: Path, how: str) -> None:
    if how == "dumb-terminal":
        monkeypatch.setenv("TERM", "dumb")
    accepted = line({**ACCEPTED, "detach": how == "detach"})
    FakeServer(sock, [accepted, 0.3, output("stdout", b"x\n"), 0.3, exit_event(0)], until_closed=True)
    stdout = FakeTTY()
    stderr = io.BytesIO() if how == "stderr-not-a-terminal" else stdout
    options = {"json": ["--json"], "detach": ["--detach"]}.get(how, [])
    assert main_on(monkeypatch, stdout, stderr, "run", *options, "--socket", str(sock), "build") == 0
    assert b"running" not in stdout.getvalue() + stderr.getvalue()
    assert ERASE not in stdout.getvalue() + stderr.getvalue()


def read_until(fd: int, needle: bytes, timeout: float = 20) -> bytes:
    """What the terminal's other end `fd` reads until `needle` (or its end, or `timeout`)."""
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: no process has the terminal open any more
            break
        if not chunk:
            break
        data += chunk
    return data


def test_ctrl_c_erases_the_status_line_on_a_real_terminal(sock: Path) -> None:
    server = FakeServer(sock, [line(ACCEPTED)], until_closed=True)
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trigger", "run", "--socket", str(sock), "build"],
            cwd=REPO,
            env={k: v for k, v in clean_env().items() if k != "NO_COLOR"},
            stdin=subprocess.DEVNULL,
            stdout=secondary,
            stderr=secondary,
        )
        os.close(secondary)
        seen = read_until(primary, b"running, 1 s")
        assert f"{STATUS}1 s".encode() in seen
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
        seen += read_until(primary, b"never-printed", timeout=1)
    finally:
        os.close(primary)
    server.finish()
    assert server.client_closed.is_set()
    text = screen(seen.replace(b"\r\n", b"\n"))
    assert text == "jobctl: SIGINT: closed the connection, which cancels the run\n"


def test_a_run_without_a_terminal_does_not_import_the_terminal_module(sock: Path) -> None:
    # CI: output to pipes and files; trigger.terminal is for people (and errors, lists, retries)
    FakeServer(sock, [line(ACCEPTED), output("stdout", b"ok\n"), exit_event(0)])
    code = (
        "import sys; from trigger import jobctl; "
        f"status = jobctl.main(['run', '--socket', {str(sock)!r}, 'build']); "
        "print(status, 'trigger.terminal' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, check=False, timeout=30
    )
    assert (proc.stdout, proc.stderr) == (b"ok\n0 False\n", b"")


# --- colour -------------------------------------------------------------------------------------------

COLOURED = (
    b"jobctl: \x1b[31merror:\x1b[0m it failed\n"  # red
    b"jobctl: \x1b[2mhint:\x1b[0m try this\n"  # dim
)
PLAIN = b"jobctl: error: it failed\njobctl: hint: try this\n"


@pytest.mark.parametrize(
    ("no_color", "is_tty", "plain", "expected"),
    [
        (None, True, False, COLOURED),
        ("", True, False, COLOURED),  # NO_COLOR: only a value that is not empty counts
        ("1", True, False, PLAIN),
        ("false", True, False, PLAIN),  # any value
        (None, False, False, PLAIN),  # not a terminal
        (None, True, True, PLAIN),  # --json
        ("dumb", True, False, PLAIN),  # (not NO_COLOR:) TERM=dumb
    ],
)
def test_errors_in_colour_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, no_color: str | None, is_tty: bool, plain: bool, expected: bytes
) -> None:
    if no_color == "dumb":
        monkeypatch.setenv("TERM", "dumb")
    elif no_color is not None:
        monkeypatch.setenv("NO_COLOR", no_color)
    stderr = FakeTTY() if is_tty else io.BytesIO()
    term = jobctl.Terminal(io.BytesIO(), stderr)
    term.plain = plain
    term.report(jobctl.ClientError("it failed", "try this"))
    assert stderr.getvalue() == expected


def test_json_errors_are_never_coloured(monkeypatch: pytest.MonkeyPatch, sock: Path) -> None:
    tty = FakeTTY()
    assert main_on(monkeypatch, tty, tty, "--json", "run", "--socket", str(sock), "build") == 69
    assert tty.getvalue().startswith(b"jobctl: error: ")
    tty = FakeTTY()
    assert main_on(monkeypatch, tty, tty, "--json", "run") == 64  # a usage error
    assert b"\x1b[" not in tty.getvalue()
    tty = FakeTTY()
    assert main_on(monkeypatch, tty, tty, "run") == 64
    assert b"jobctl: \x1b[31merror:\x1b[0m " in tty.getvalue()


# --- the list table -----------------------------------------------------------------------------------

JOBS = [
    {
        "name": "backup",
        "description": "Back up the database to the bucket, then check that the copy reads back",
        "args": False,
        "concurrency": "reject",
        "timeout_s": 3600.0,
        "network": ["192.0.2.10", "2001:db8::/32"],
    },
    {
        "name": "deploy-production",
        "description": "Deploy a branch\nto production",
        "args": True,
        "concurrency": "queue",
        "timeout_s": 90,
        "network": "any",
    },
    {
        "name": "x",
        "description": "",
        "args": False,
        "concurrency": "parallel",
        "timeout_s": 1.5,
        "network": "none",
    },
]
TABLE = (
    "NAME               ARGS  CONCURRENCY  TIMEOUT  NETWORK        DESCRIPTION\n"
    "backup             no    reject       1h       192.0.2.10 +1  Back up the database to the bucket, then check that the copy reads back\n"
    "deploy-production  yes   queue        90s      any            Deploy a branch to production\n"
    "x                  no    parallel     1.5s     none\n"
)


def test_list_prints_an_aligned_table_and_whole_descriptions_to_a_pipe(
    capsysbinary: pytest.CaptureFixture[bytes], sock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "60")  # not a terminal: the width does not matter
    FakeServer(sock, [line({"event": "jobs", "jobs": JOBS})])
    assert jobctl.main(["list", "--socket", str(sock)]) == 0
    out, err = capsysbinary.readouterr()
    assert (out.decode(), err) == (TABLE, b"")


@pytest.mark.parametrize("columns", [100, 80, 40])
def test_list_cuts_descriptions_to_the_terminals_width(
    monkeypatch: pytest.MonkeyPatch, sock: Path, columns: int
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    FakeServer(sock, [line({"event": "jobs", "jobs": JOBS})])
    stdout, stderr = FakeTTY(), io.BytesIO()
    assert main_on(monkeypatch, stdout, stderr, "list", "--socket", str(sock)) == 0
    assert stderr.getvalue() == b""
    text = stdout.getvalue().decode()
    header, *rows = text.removeprefix("\x1b[1m").splitlines()
    assert header.startswith("NAME               ARGS  CONCURRENCY  TIMEOUT  NETWORK        DESCRIP")
    assert header.endswith("\x1b[0m")  # bold
    start = len("backup             no    reject       1h       192.0.2.10 +1  ")
    room = max(columns - start, terminal.MIN_DESCRIPTION)  # however narrow, 10 characters are left
    assert all(len(row) <= max(columns, start + room) for row in rows)
    assert rows[0] == TABLE.splitlines()[1][: start + room - 1] + "\u2026"
    assert rows[0].index("Back up") == start  # still aligned
    deploy = TABLE.splitlines()[2]
    assert rows[1] == (deploy if len(deploy) <= columns else deploy[: start + room - 1] + "\u2026")
    assert rows[2] == TABLE.splitlines()[3]


def test_the_lists_heading_is_bold_only_on_a_terminal_without_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert jobctl.format_jobs(JOBS, None, bold=True).startswith("\x1b[1mNAME ")
    for stdout, no_color in ((FakeTTY(), "1"), (io.BytesIO(), None)):
        if no_color:
            monkeypatch.setenv("NO_COLOR", no_color)
        term = jobctl.Terminal(stdout, io.BytesIO())
        session = jobctl.Session(jobctl.parse_arguments(jobctl.build_parser(), ["list"]), term)
        assert session.on_jobs({"event": "jobs", "jobs": JOBS}) == 0
        assert stdout.getvalue().decode() == TABLE


def test_list_json_is_unchanged(capsysbinary: pytest.CaptureFixture[bytes], sock: Path) -> None:
    reply = line({"event": "jobs", "jobs": JOBS})
    FakeServer(sock, [reply])
    assert jobctl.main(["--json", "list", "--socket", str(sock)]) == 0
    assert capsysbinary.readouterr() == (reply, b"")


def test_fields_the_table_does_not_understand_are_dashes() -> None:
    jobs = [
        {"name": "a", "description": None, "args": "yes", "concurrency": 3, "timeout_s": True, "network": {}},
        {"name": "b\x1b[31m", "description": "\x07bell", "timeout_s": -1, "network": []},
    ]
    assert jobctl.format_jobs(jobs) == (
        "NAME    ARGS  CONCURRENCY  TIMEOUT  NETWORK  DESCRIPTION\n"
        "a       -     -            -        -\n"
        "b?[31m  -     -            -        -        ?bell\n"
    )


def test_the_server_lists_what_the_table_shows() -> None:
    config = parse_config(
        {
            "runner": {"project": "/p"},
            "jobs": {
                "build": {"command": ["b"], "description": "Builds", "args": "[a-z]+"},
                "deploy": {
                    "command": ["d"],
                    "concurrency": "queue",
                    "timeout": 90,
                    "network": ["192.0.2.10", "2001:db8::/32"],
                },
                "offline": {"command": ["o"], "concurrency": "parallel", "network": "none"},
            },
        },
        "/etc/jobrunner/jobs.toml",
    )
    peer = Peer(pid=1, uid=os.getuid(), gid=os.getgid(), groups=frozenset())
    jobs = service._visible_jobs(config, peer)
    assert jobs == [
        {"name": "build", "description": "Builds", "args": True, "concurrency": "reject", "timeout_s": 3600.0,
         "network": "any"},
        {"name": "deploy", "description": "", "args": False, "concurrency": "queue", "timeout_s": 90.0,
         "network": ["192.0.2.10/32", "2001:db8::/32"]},
        {"name": "offline", "description": "", "args": False, "concurrency": "parallel", "timeout_s": 3600.0,
         "network": "none"},
    ]  # fmt: skip
    assert json.loads(Reply(Form.JSON).jobs(jobs)) == {"event": "jobs", "jobs": jobs}
    # the text form (socat) is as it was: names and descriptions
    assert Reply(Form.TEXT).jobs(jobs) == b"build    Builds\ndeploy\noffline\n"


# --- help ---------------------------------------------------------------------------------------------


def commands() -> dict[str, Any]:
    """jobctl's commands and their parsers, as the parser has them (every command, present and future)."""
    parser = jobctl.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in action._choices_actions}
    return {name: (sub, helps.get(name)) for name, sub in action.choices.items()}


def help_text(*argv: str) -> str:
    """`python3 -m trigger ARGV --help` as a new user runs it, in an 80-column terminal."""
    proc = subprocess.run(
        [sys.executable, "-m", "trigger", *argv, "--help"],
        cwd=REPO,
        env={**clean_env(), "COLUMNS": "80"},
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert (proc.returncode, proc.stderr) == (0, b""), argv
    return proc.stdout.decode()


def test_every_help_text_is_clean() -> None:
    found = commands()
    assert {"run", "list"} <= set(found)
    texts = {"jobctl": help_text(), **{name: help_text(name) for name in found}}
    for name, text in texts.items():
        assert not re.search(r"\bNone\b", text), f"{name} --help says None:\n{text}"
        too_long = [row for row in text.splitlines() if len(row) > 80]
        assert not too_long, f"{name} --help has lines over 80 columns: {too_long}"
        assert "  --no-retry" in text, name
    main_help = texts["jobctl"]
    listed = main_help[main_help.index("commands:") : main_help.index("examples:")]
    for name, (parser, summary) in found.items():
        assert summary and summary.strip(), f"command {name} has no help in 'jobctl --help'"
        described = rf"^    {name}(?: +|\n +){re.escape(summary.split()[0])}"  # long names: next line
        assert re.search(described, listed, re.MULTILINE), name
        assert parser.description and parser.description.strip(), f"command {name} has no description"
        assert texts[name].startswith(f"usage: jobctl {name} ")


# --- trying again when the runner is busy -------------------------------------------------------------


@pytest.fixture
def main(tmp_path: Path) -> Path:
    return tmp_path / "job.sock"


@pytest.fixture
def direct(main: Path) -> Path:
    return Path(job_socket(str(main), "build"))


def run(capsysbinary: pytest.CaptureFixture[bytes], main: Path, *options: str) -> tuple[int, bytes, bytes]:
    status = jobctl.main(["run", *options, "--socket", str(main), "build"])
    out, err = capsysbinary.readouterr()
    return status, out, err


@pytest.mark.usefixtures("fast_retries")
def test_a_run_closed_without_a_reply_is_tried_again_until_it_is_answered(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path
) -> None:
    front = Server(main, b"", CLOSE_AT_ONCE, b"", line(ACCEPTED) + output("stdout", b"hi\n") + exit_event(0))
    assert run(capsysbinary, main) == (0, b"hi\n", b"")  # not a terminal: nothing said
    assert front.finish() == [request(), b"", request(), request()]


@pytest.mark.usefixtures("fast_retries")
def test_the_main_socket_is_asked_why_once_then_the_jobs_socket_is_tried_again(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path
) -> None:
    own = Server(direct, b"", CLOSE_AT_ONCE, exit_event(0))
    front = Server(main, error_event("busy", NOT_STARTED, "try again"))
    assert run(capsysbinary, main) == (0, b"", b"")
    assert own.finish() == [request(), b"", request()]
    assert front.finish() == [request()]


@pytest.mark.usefixtures("fast_retries")
def test_the_main_socket_is_asked_why_once_even_when_it_said_nothing(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path
) -> None:
    own = Server(direct, b"", b"", CLOSE_AT_ONCE, exit_event(0))
    front = Server(main, b"")  # at its limit too
    assert run(capsysbinary, main) == (0, b"", b"")
    assert own.finish() == [request(), request(), b"", request()]
    assert front.finish() == [request()]


@pytest.mark.usefixtures("fast_retries")
def test_list_is_tried_again_too(capsysbinary: pytest.CaptureFixture[bytes], main: Path) -> None:
    front = Server(main, b"", line({"event": "jobs", "jobs": [{"name": "a"}]}))
    assert jobctl.main(["list", "--socket", str(main)]) == 0
    assert capsysbinary.readouterr() == (b"NAME  DESCRIPTION\na\n", b"")
    assert len(front.finish()) == 2


@pytest.mark.usefixtures("fast_retries")
@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(line(ACCEPTED), id="accepted"),
        pytest.param(line(ACCEPTED)[:10], id="a-byte"),
        pytest.param(error_event("busy", "job 'build' is already running", "wait"), id="busy-running"),
        pytest.param(error_event("busy", "you already have 8 runs in progress", ""), id="busy-per-user"),
        pytest.param(
            error_event("credential", "job 'build' did not start: systemd could not load"), id="credential"
        ),
        pytest.param(error_event("busy", NOT_STARTED, run_id=RUN_ID), id="busy-with-a-run-id"),
    ],
)
def test_never_tried_again_once_a_reply_has_begun(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, reply: bytes
) -> None:
    front = Server(main, reply, exit_event(0))
    status, _, _ = run(capsysbinary, main)
    assert status in (255, 75, 78)
    assert front.finish() == [request()]  # a run that may have started is never started twice


@pytest.mark.usefixtures("fast_retries")
def test_no_retry_fails_at_once(capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path) -> None:
    own = Server(direct, b"", exit_event(0))
    front = Server(main, error_event("busy", NOT_STARTED, "try again"), exit_event(0))
    status, out, err = run(capsysbinary, main, "--no-retry")
    assert (status, out) == (75, b"")
    assert err == f"jobctl: error: busy: {NOT_STARTED}\njobctl: hint: try again\n".encode()
    assert (own.finish(), front.finish()) == ([request()], [request()])
    other = main.with_name("other.sock")
    front = Server(other, b"", exit_event(0))
    assert jobctl.main(["list", "--no-retry", "--socket", str(other)]) == 255
    assert len(front.finish()) == 1


@pytest.mark.usefixtures("fast_retries")
def test_tries_end_with_the_last_failure(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(terminal.Backoff, "BUDGET_S", 0.3)
    front = Server(main, *[b""] * 1000)
    status, _, err = run(capsysbinary, main)
    tries = len(front.finish())
    assert status == 255
    assert 3 < tries < 1000
    assert err == (
        b"jobctl: error: the connection to the job runner was lost before the final event\n"
        + f"jobctl: hint: jobctl tried {tries} times in 0 s; the server closed the connection without a "
        f"reply: {main} may be at its connection limit (try again); ".encode()
        + b"the server's side is in the journal: journalctl -u 'job@*'\n"
    )


@pytest.mark.usefixtures("fast_retries")
@pytest.mark.parametrize("json_mode", [False, True])
def test_tries_end_with_the_main_sockets_word(
    capsysbinary: pytest.CaptureFixture[bytes],
    main: Path,
    direct: Path,
    monkeypatch: pytest.MonkeyPatch,
    json_mode: bool,
) -> None:
    monkeypatch.setattr(terminal.Backoff, "BUDGET_S", 0.2)
    refusal = error_event("busy", NOT_STARTED, "try again")
    own = Server(direct, *[b""] * 1000)
    front = Server(main, refusal)
    status, out, err = run(capsysbinary, main, *(["--json"] if json_mode else []))
    assert status == 75
    if json_mode:
        assert (out, err) == (refusal, b"")  # the one final event, once
    else:
        assert (out, err) == (b"", f"jobctl: error: busy: {NOT_STARTED}\njobctl: hint: try again\n".encode())
    assert len(own.finish()) > 2
    assert front.finish() == [request(detach=False)]


@pytest.mark.usefixtures("fast_retries")
@pytest.mark.parametrize("json_mode", [False, True])
def test_retrying_is_said_once_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, main: Path, json_mode: bool
) -> None:
    front = Server(main, b"", b"", b"", exit_event(0))
    tty = FakeTTY()
    options = ["--json"] if json_mode else []
    assert main_on(monkeypatch, tty, tty, *options, "run", "--socket", str(main), "build") == 0
    said = b"" if json_mode else "jobctl: the runner is busy, retrying\u2026\n".encode()
    assert tty.getvalue() == said + (exit_event(0) if json_mode else b"")
    assert len(front.finish()) == 4


@pytest.mark.usefixtures("fast_retries")
def test_debug_says_each_try(capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path) -> None:
    own = Server(direct, b"", b"", exit_event(0))
    front = Server(main, error_event("busy", NOT_STARTED, "try again"))
    status, _, err = run(capsysbinary, main, "--debug")
    assert status == 0
    said = [row for row in err.decode().splitlines() if "trying again" in row]
    assert len(said) == 2
    assert said[0].startswith(f"jobctl: debug: the main socket says: busy: {NOT_STARTED}: trying again in ")
    assert said[0].endswith(" s (try 2)")
    assert said[1].startswith("jobctl: debug: the connection was closed without a reply: trying again in ")
    assert said[1].endswith(" s (try 3)")
    assert (len(own.finish()), len(front.finish())) == (3, 1)


def test_a_connection_made_at_start_up_too_long_ago_is_not_used(
    capsysbinary: pytest.CaptureFixture[bytes], main: Path, direct: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # jobctl starved of CPU for seconds after it connected: the server may have given up waiting
    monkeypatch.setenv("JOBCTL_SOCKET", str(main))
    own = Server(direct, b"", exit_event(0))  # the first for the early connection, which asks nothing
    early = EarlyConnection.guess(["run", "build"], str(main))
    assert early is not None and early.path == str(direct)
    early.made -= jobctl.EARLY_MAX_AGE_S + 1
    assert jobctl.main(["--debug", "run", "build"], early) == 0
    err = capsysbinary.readouterr().err.decode()
    assert err.startswith("jobctl: debug: not using the connection made 6.0 s ago, at start-up\n")
    assert own.finish() == [b"", request()]  # the early one closed unused, then a new one


def test_the_runners_not_started_errors_are_told_apart() -> None:
    config = parse_config(
        {
            "runner": {"project": "/p"},
            "jobs": {"build": {"command": ["b"]}, "keyed": {"command": ["k"], "credentials": ["api-key"]}},
        },
        "/etc/jobrunner/jobs.toml",
    )
    session = jobctl.Session(
        jobctl.parse_arguments(jobctl.build_parser(), ["run", "build"]),
        jobctl.Terminal(io.BytesIO(), io.BytesIO()),
    )
    busy = service._not_started(config.jobs["build"])
    assert busy.code == "busy"
    assert session.not_started(
        {"event": "error", "code": busy.code, "message": busy.message, "hint": busy.hint}
    )
    keyed = service._not_started(config.jobs["keyed"])  # a key that does not decrypt looks the same
    assert keyed.code == "credential"
    assert not session.not_started({"event": "error", "code": keyed.code, "message": keyed.message})


def test_the_waits_grow_at_random_and_end() -> None:
    backoff = terminal.Backoff()
    waits = [backoff.next_wait() for _ in range(12)]
    ceilings = [min(2.0, 0.1 * 2**n) for n in range(12)]
    assert all(w is not None and 0 <= w < c for w, c in zip(waits, ceilings, strict=True))
    assert len(set(waits)) == 12  # jitter
    backoff.started -= backoff.BUDGET_S
    assert all(backoff.next_wait() is None for _ in range(5))  # the next wait would end past 30 s
    assert backoff.retries == 12
