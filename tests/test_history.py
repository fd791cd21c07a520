"""runner/history.py: `history`, `logs` and `status` from run logs written with runner.runs.RunLog."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import history
from runner.channel import ClientChannel
from runner.config import JOB_NAME, Config, parse_config
from runner.errors import (
    ConfigError,
    ForbiddenError,
    RequestError,
    RunnerError,
    UnknownJobError,
    UnknownRunError,
)
from runner.history import (
    END_MARK,
    FINISHED,
    RUNNING,
    UNFINISHED,
    Logs,
    parse_json,
    parse_text,
    run_started,
    sendable,
    valid_run_id,
)
from runner.peer import Peer
from runner.protocol import Form, Reply, Request, parse_request
from runner.runs import RunLog, new_run_id

# The tests' "now", taken afresh for each test (fresh_clock): runs of jobs with a 600 s timeout are
# "running" only until 660 s after they started, and a full suite reaches this module later than that.
NOW = time.time()
ME = Peer(pid=4242, uid=1000, gid=1000, groups=frozenset({1000}))  # not in the group root (gid 0)
ROOT = Peer(pid=1, uid=0, gid=0, groups=frozenset({0}))


def run_id_at(seconds_ago: float) -> str:
    return new_run_id(NOW - seconds_ago)


@pytest.fixture(autouse=True)
def fresh_clock() -> None:
    global NOW  # noqa: PLW0603 - one clock that run_id_at and the tests' Logs(...) share
    NOW = time.time()


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.delenv(history.LOGS_VIEW_ENV, raising=False)
    (tmp_path / "logs").mkdir()
    data = {
        "runner": {"project": str(tmp_path)},
        "jobs": {
            "build": {"command": ["/bin/true"], "timeout": 600},
            "deploy": {"command": ["/bin/true"]},
            "secret": {"command": ["/bin/true"], "allowed_groups": ["root"]},
        },
    }
    return parse_config(data, str(tmp_path / "jobs.toml"))


class FakeRun:
    """A run log as the runner writes it: the header, output, and (once finished) the end section."""

    def __init__(self, config: Config, job: str, run_id: str, uid: int = 1000, user: str = "alice") -> None:
        directory = Path(config.logs) / job
        directory.mkdir(exist_ok=True)
        self.path = directory / f"{run_id}.log"
        self.run_id = run_id
        self.log = RunLog(str(self.path))
        started = datetime.fromtimestamp(run_started(run_id), UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        self.log.header(
            {
                "job": job,
                "run": run_id,
                "started": started,
                "caller": f"uid={uid} ({user}) gid={uid} pid=4242",
                "args": [],
                "command": ["/bin/true"],
                "detach": False,
            }
        )

    def write(self, data: bytes) -> FakeRun:
        self.log.write(data)
        return self

    def finish(self, exit_code: int = 0, duration_s: float = 1.5, result: str = "") -> FakeRun:
        self.log.footer(
            {
                "finished": "2026-11-28T15:44:09.001Z",
                "result": result or f"exited with {exit_code}",
                "exit_code": exit_code,
                "duration_s": f"{duration_s:.3f}",
            }
        )
        self.log.close()
        return self

    def die(self) -> FakeRun:
        """The runner killed: the lock goes, the end section never comes."""
        self.log.close()
        return self


def make_run(config: Config, job: str, seconds_ago: float, **fields: object) -> FakeRun:
    return FakeRun(config, job, run_id_at(seconds_ago)).write(b"output\n").finish(**fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"history", Request(Form.TEXT, "history", limit=20)),
        (b"history build", Request(Form.TEXT, "history", "build", limit=20)),
        (b"history 5", Request(Form.TEXT, "history", limit=5)),
        (b"history build 1000", Request(Form.TEXT, "history", "build", limit=1000)),
        (b"status", Request(Form.TEXT, "status")),
        (
            b"logs 20261128T154402-123456-3fa9c0de",
            Request(Form.TEXT, "logs", run_id="20261128T154402-123456-3fa9c0de"),
        ),
        (
            b"logs 20261128T154402-123456-3fa9c0de follow",
            Request(Form.TEXT, "logs", run_id="20261128T154402-123456-3fa9c0de", follow=True),
        ),
        (b'{"op": "history"}', Request(Form.JSON, "history", limit=20)),
        (b'{"op": "history", "job": "build", "limit": 3}', Request(Form.JSON, "history", "build", limit=3)),
        (b'{"op": "status"}', Request(Form.JSON, "status")),
        (
            b'{"op": "logs", "run_id": "20261128T154402-123456-3fa9c0de", "follow": true}',
            Request(Form.JSON, "logs", run_id="20261128T154402-123456-3fa9c0de", follow=True),
        ),
    ],
)
def test_requests(line: bytes, expected: Request) -> None:
    assert parse_request(line) == expected


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"history build 5 6", RequestError),
        (b"history 5 build", RequestError),
        (b"history 0", RequestError),
        (b"history 1001", RequestError),
        (b"history Build", UnknownJobError),
        (b"status now", RequestError),
        (b"logs", RequestError),
        (b"logs 20261128T154402-123456-3fa9c0de tail", RequestError),
        (b"logs ../../etc/passwd", UnknownRunError),
        (b"logs 20261128T154402-123456-3FA9C0DE", UnknownRunError),
        (b'{"op": "history", "limit": true}', RequestError),
        (b'{"op": "history", "limit": "5"}', RequestError),
        (b'{"op": "history", "job": 5}', RequestError),
        (b'{"op": "history", "detach": false}', RequestError),
        (b'{"op": "status", "job": "build"}', RequestError),
        (b'{"op": "logs"}', RequestError),
        (b'{"op": "logs", "run_id": "20261128T154402-123456-3fa9c0de", "follow": 1}', RequestError),
        (b'{"op": "logs", "run_id": "x/../y"}', UnknownRunError),
        (b'{"op": "list", "limit": 5}', RequestError),  # list and run keep their fields
        (b'{"op": "run", "job": "build", "follow": true}', RequestError),
    ],
)
def test_bad_requests(line: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        parse_request(line)
    assert type(info.value) is error


def test_parsers_take_the_words_and_objects_protocol_hands_them() -> None:
    assert parse_text("history", ["build"]) == Request(Form.TEXT, "history", "build", limit=20)
    assert parse_json({"op": "status"}) == Request(Form.JSON, "status")


def test_run_ids_and_their_start_times() -> None:
    run_id = new_run_id(1_764_344_642.25)
    assert valid_run_id(run_id)
    assert run_started(run_id) == pytest.approx(1_764_344_642.25, abs=1e-5)
    assert run_started("19700101T000000-000000-00000000") == 0
    assert (
        run_started("20000229T235959-500000-00000000")
        == datetime(2000, 2, 29, 23, 59, 59, 500000, UTC).timestamp()
    )
    for bad in (
        "",
        "20261128T154402-123456-3fa9c0d",
        "20261128 154402-123456-3fa9c0de",
        "2026112xT154402-123456-3fa9c0de",
    ):
        assert not valid_run_id(bad)


# -------------------------------------------------------------------------------------------- history


def test_history_is_newest_first_over_every_visible_job_and_limited(config: Config) -> None:
    old = make_run(config, "build", 300, exit_code=3, duration_s=2.25)
    new = make_run(config, "deploy", 100)
    middle = make_run(config, "build", 200)
    make_run(config, "secret", 50)  # the caller may not run it

    records = Logs(config, ME).history("", 20)

    assert [r.run_id for r in records] == [new.run_id, middle.run_id, old.run_id]
    assert records[2].fields() == {
        "duration_s": 2.25,
        "exit_code": 3,
        "job": "build",
        "log": f"{config.logs}/build/{old.run_id}.log",
        "result": "exited with 3",
        "run_id": old.run_id,
        "started": datetime.fromtimestamp(run_started(old.run_id), UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "state": FINISHED,
        "uid": 1000,
        "user": "alice",
    }
    assert [r.run_id for r in Logs(config, ME).history("", 2)] == [new.run_id, middle.run_id]
    assert [r.run_id for r in Logs(config, ME).history("build", 1)] == [middle.run_id]
    assert [r.job for r in Logs(config, ROOT).history("", 20)] == ["secret", "deploy", "build", "build"]


def test_history_of_a_job_the_caller_may_not_run_or_that_does_not_exist(config: Config) -> None:
    make_run(config, "secret", 50)
    with pytest.raises(ForbiddenError):
        Logs(config, ME).history("secret", 20)
    with pytest.raises(UnknownJobError):
        Logs(config, ME).history("gone", 20)


def test_history_reads_only_the_newest_logs(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    for age in range(50):
        make_run(config, "build" if age % 2 else "deploy", 1000 + age)
    opened: list[str] = []
    real = history.RunLogFile.__init__

    def spy(self: history.RunLogFile, path: str) -> None:
        opened.append(path)
        real(self, path)

    monkeypatch.setattr(history.RunLogFile, "__init__", spy)
    assert len(Logs(config, ME).history("", 5)) == 5
    assert len(opened) == 5


def test_history_skips_what_is_not_a_run_log_of_that_job(config: Config) -> None:
    good = make_run(config, "build", 100)
    directory = Path(config.logs) / "build"
    (directory / "notes.txt").write_text("hello")
    (directory / f"{run_id_at(10)}.log").mkdir()  # not a file
    os.symlink(good.path, directory / f"{run_id_at(20)}.log")  # a link, even to a run log
    secret = make_run(config, "secret", 30)
    os.link(secret.path, directory / f"{run_id_at(40)}.log")  # another job's log, hard-linked in
    (Path(config.logs) / "deploy").write_text("a file where a directory should be")
    os.mkfifo(directory / f"{run_id_at(50)}.log")  # would block a reader that opened it blocking

    assert [r.run_id for r in Logs(config, ME).history("", 20)] == [good.run_id]


def test_the_front_door_reads_the_view_of_the_logs_it_is_given(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(config, "build", 100)
    view = tmp_path / "view"
    Path(config.logs).rename(view)
    monkeypatch.setenv(history.LOGS_VIEW_ENV, str(view))
    (record,) = Logs(config, ME).history("", 20)
    assert record.log == f"{config.logs}/build/{run.run_id}.log"  # where developers find it
    monkeypatch.setenv(history.LOGS_VIEW_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="missing"):
        Logs(config, ME)


def test_a_not_started_run_and_a_log_with_a_long_end_section(config: Config) -> None:
    not_started = FakeRun(config, "build", run_id_at(20))
    not_started.log.footer({"finished": "2026-11-28T15:44:09.001Z", "result": "not started: no such file"})
    not_started.log.close()
    long = FakeRun(config, "build", run_id_at(10)).write(b"y" * 100_000)
    long.log.footer(
        {"result": "exited with 0", "exit_code": 0, "duration_s": "1.000", "warnings": ["w" * 20_000]}
    )
    long.log.close()
    newest, oldest = Logs(config, ME).history("", 20)
    assert (oldest.state, oldest.exit_code, oldest.result) == (FINISHED, None, "not started: no such file")
    assert (newest.state, newest.exit_code, newest.duration_s) == (FINISHED, 0, 1.0)


# --------------------------------------------------------------------------------------------- status


def test_running_finished_unfinished(config: Config) -> None:
    running = FakeRun(config, "build", run_id_at(30)).write(b"working\n")
    crashed = FakeRun(config, "build", run_id_at(20)).write(b"about to die\n").die()
    done = make_run(config, "deploy", 10)
    # Its lock held, but started longer ago than the job's timeout (600 s) and the grace: no runner's.
    stale = FakeRun(config, "build", run_id_at(600 + history.GRACE_S + 5))
    hidden = FakeRun(config, "secret", run_id_at(5))
    try:
        records = {r.run_id: r for r in Logs(config, ME, NOW).history("", 20)}
        assert records[running.run_id].state == RUNNING
        assert records[running.run_id].duration_s == pytest.approx(30, abs=1)
        assert records[crashed.run_id].state == UNFINISHED
        assert records[done.run_id].state == FINISHED
        assert records[stale.run_id].state == UNFINISHED

        assert [r.run_id for r in Logs(config, ME, NOW).status()] == [running.run_id]
        assert [r.run_id for r in Logs(config, ROOT, NOW).status()] == [hidden.run_id, running.run_id]
    finally:
        running.die()
        stale.die()
        hidden.die()
    assert Logs(config, ME).status() == []


def test_status_looks_only_at_logs_newer_than_the_jobs_bound(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    for age in range(0, 4000, 100):  # build's bound: 600 s + grace; deploy's: 3600 s + grace
        make_run(config, "build", age)
        make_run(config, "deploy", age)
    opened: list[str] = []
    real = history.RunLogFile.__init__

    def spy(self: history.RunLogFile, path: str) -> None:
        opened.append(path)
        real(self, path)

    monkeypatch.setattr(history.RunLogFile, "__init__", spy)
    assert Logs(config, ME, NOW).status() == []
    assert len(opened) == len(range(0, 660, 100)) + len(range(0, 3660, 100))


def test_a_readers_test_of_the_lock_does_not_keep_the_runner_from_taking_it(config: Config) -> None:
    run = FakeRun(config, "build", run_id_at(1))
    assert run.log.marked
    reader = history.RunLogFile(str(run.path))
    assert reader.in_progress() and reader.in_progress()
    run.die()
    assert not reader.in_progress()
    reader.close()
    # A reader that holds a shared lock delays the mark of a new run, then the run goes on unmarked.
    path = Path(config.logs) / "build" / "blocked.log"
    fd = os.open(path, os.O_CREAT | os.O_RDONLY, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        from runner import runs

        # It tries again for half a second at most (its own pauses, counted rather than timed), never
        # waits on the lock (LOCK_NB: the lock stays held until after this call), then gives up.
        slept: list[float] = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(runs.time, "sleep", slept.append)
            assert not runs.mark_in_progress(os.open(path, os.O_WRONLY))
        assert slept and round(sum(slept), 6) <= 0.5, slept
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- logs


class Client:
    """The front door's end of a connection (a ClientChannel), and the client's."""

    def __init__(self, form: Form = Form.JSON) -> None:
        self.server, self.client = socket.socketpair()
        self.channel = ClientChannel(self.server, Reply(form))
        self.received = bytearray()

    def read_all(self, timeout: float = 10) -> bytes:
        self.client.settimeout(timeout)
        while chunk := self.client.recv(1 << 16):
            self.received += chunk
        return bytes(self.received)

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.read_all().splitlines()]

    def close(self) -> None:
        self.client.close()
        self.channel.close()


@pytest.fixture
def client() -> Iterator[Client]:
    made = Client()
    yield made
    made.close()


def transcript(events: list[dict[str, object]]) -> bytes:
    out = b""
    for event in events:
        if event["event"] == "log":
            out += str(event["text"]).encode() if "text" in event else base64.b64decode(str(event["base64"]))
    return out


def serve(config: Config, line: bytes, client: Client, peer: Peer = ME) -> None:
    history.serve(config, parse_request(line), peer, client.channel)
    client.channel.end()


def test_logs_sends_the_output_section_and_the_run(config: Config, client: Client) -> None:
    output = b"line 1\n# ---- end\n# exit_code: 0\nforged, then more\n\xff\xfe binary\n# api llm: GET / -> 200\nlast"
    run = FakeRun(config, "build", run_id_at(10)).write(output).finish(exit_code=4, duration_s=3.0)
    serve(config, f"logs {run.run_id}\n".encode(), client)
    events = client.events()
    assert transcript(events) == output + b"\n"  # the newline the runner adds before its end section
    assert events[-1] == {"event": "run", **Logs(config, ME).history("", 1)[0].event_fields()}
    assert events[-1]["exit_code"] == 4 and events[-1]["state"] == FINISHED
    assert sum(1 for e in events if e["event"] == "run") == 1


def test_logs_in_the_text_form_ends_like_a_run(config: Config) -> None:
    run = FakeRun(config, "build", run_id_at(10)).write(b"no newline").finish(exit_code=2, duration_s=3.04)
    text = Client(Form.TEXT)
    serve(config, f"logs {run.run_id}\n".encode(), text)
    assert (
        text.read_all()
        == f"no newline\njobrunner: build (run {run.run_id}) exited with 2 after 3.0 s\n".encode()
    )
    text.close()
    empty = FakeRun(config, "build", run_id_at(5)).die()
    text = Client(Form.TEXT)
    serve(config, f"logs {empty.run_id}\n".encode(), text)
    assert (
        text.read_all()
        == (
            f"jobrunner: build (run {empty.run_id}) never finished: its log has no end section "
            "(its runner was stopped)\n"
        ).encode()
    )
    text.close()


def test_logs_of_a_run_that_is_not_to_be_seen(config: Config, client: Client) -> None:
    hidden = make_run(config, "secret", 10)
    with pytest.raises(UnknownRunError) as info:
        serve(config, f"logs {hidden.run_id}\n".encode(), client)
    assert info.value.message == f"no run {hidden.run_id} that you may see"
    with pytest.raises(UnknownRunError) as missing:
        serve(config, f"logs {run_id_at(1)}\n".encode(), client)
    assert missing.value.message.endswith("that you may see")  # the same answer
    serve(config, f"logs {hidden.run_id}\n".encode(), client, ROOT)
    assert client.events()[-1]["job"] == "secret"


def test_logs_of_a_running_run_without_follow(config: Config, client: Client) -> None:
    run = FakeRun(config, "build", run_id_at(10)).write(b"so far\n# ---- e")
    try:
        serve(config, f'{{"op": "logs", "run_id": "{run.run_id}"}}\n'.encode(), client)
        events = client.events()
        assert transcript(events) == b"so far\n"  # what may become the end section is held back
        assert (events[-1]["event"], events[-1]["state"], events[-1]["exit_code"]) == ("run", RUNNING, None)
    finally:
        run.die()


def test_follow_streams_until_the_run_ends(config: Config, client: Client) -> None:
    run = FakeRun(config, "build", run_id_at(1)).write(b"first\n")
    pieces = [
        b"second ",
        "caf\u00e9 ".encode()[:-2],
        "caf\u00e9 ".encode()[-2:] + b"\n",
        b"# ---- end\n",
        b"not the end\n",
    ]

    def job() -> None:
        for piece in pieces:
            time.sleep(0.3)
            run.write(piece)
        time.sleep(0.3)
        run.finish(exit_code=7)

    writer = threading.Thread(target=job)
    writer.start()
    started = time.monotonic()
    serve(config, f'{{"op": "logs", "run_id": "{run.run_id}", "follow": true}}\n'.encode(), client)
    writer.join()
    events = client.events()
    assert time.monotonic() - started >= 1.5
    assert transcript(events) == b"first\n" + b"".join(pieces)
    assert all("text" in e for e in events if e["event"] == "log")  # no character was cut in two
    assert len([e for e in events if e["event"] == "log"]) >= 4  # as it came, not at the end
    assert (events[-1]["state"], events[-1]["exit_code"]) == (FINISHED, 7)


def test_follow_ends_when_the_runner_dies_or_the_bound_passes(config: Config, client: Client) -> None:
    run = FakeRun(config, "build", run_id_at(1)).write(b"then killed\n")
    threading.Timer(0.5, run.die).start()
    serve(config, f"logs {run.run_id} follow\n".encode(), client)
    events = client.events()
    assert transcript(events) == b"then killed\n"
    assert events[-1]["state"] == UNFINISHED

    late = FakeRun(config, "build", run_id_at(600 + history.GRACE_S - 0.5)).write(b"still going\n")
    try:
        other = Client()
        started = time.monotonic()
        serve(config, f"logs {late.run_id} follow\n".encode(), other)
        # Ends at the run's bound (0.5 s away), not when the run ends (never, here): 30 s of margin.
        assert time.monotonic() - started < 30
        assert other.events()[-1]["state"] == UNFINISHED
        other.close()
    finally:
        late.die()


def test_follow_ends_when_the_client_leaves(config: Config) -> None:
    run = FakeRun(config, "build", run_id_at(1)).write(b"x\n")
    leaving = Client()
    try:
        threading.Timer(0.5, leaving.client.close).start()
        started = time.monotonic()
        history.serve(config, parse_request(f"logs {run.run_id} follow".encode()), ME, leaving.channel)
        # Ends when the client leaves (0.5 s), not when the run ends (never, here): 30 s of margin.
        assert time.monotonic() - started < 30
        assert leaving.channel.gone
    finally:
        run.die()
        leaving.channel.close()


def test_a_client_that_half_closes_keeps_following(config: Config, client: Client) -> None:
    run = FakeRun(config, "build", run_id_at(1)).write(b"x\n")
    client.client.shutdown(socket.SHUT_WR)  # what socat does at the end of its input
    threading.Timer(0.5, lambda: run.write(b"y\n").finish()).start()
    serve(config, f"logs {run.run_id} follow\n".encode(), client)
    events = client.events()
    assert transcript(events) == b"x\ny\n" and events[-1]["state"] == FINISHED


@pytest.mark.parametrize(
    ("data", "at_line_start", "window", "count"),
    [
        (b"plain\n", True, 0, 6),
        (b"a\n# ---- end\nfields", True, 0, 2),
        (b"# ---- end\n", True, 0, 0),
        (b"# ---- end\n", False, 0, 11),  # not at a line start: output
        (b"a\n# ---- e", True, 0, 2),  # may become one
        (b"a\n# ---- ended\n", True, 0, 15),
        (b"a\n# ---- end\nb\n# ---- end\nc", True, 0, 15),  # the last one counts
        (b"a\n# ---- end\nmore", True, 5, 17),  # too far back to be the end section
        (b"a\n# ---- end\n# finished", True, 0, 2),
        ("caf\u00e9".encode()[:-1], True, 0, 3),
        (b"#", True, 0, 0),
        (b"#", False, 0, 1),
        (b"", True, 0, 0),
    ],
)
def test_sendable(data: bytes, at_line_start: bool, window: int, count: int) -> None:
    assert sendable(data, at_line_start, window) == count
    assert END_MARK == b"# ---- end\n"


# ------------------------------------------------------------------------------------------- replies


def test_text_tables(config: Config) -> None:
    run = make_run(config, "build", 10, exit_code=1, duration_s=65.25)
    text = Client(Form.TEXT)
    serve(config, b"history\n", text)
    lines = text.read_all().decode().splitlines()
    text.close()
    assert lines[0].split() == ["RUN", "JOB", "USER", "STARTED", "(UTC)", "DURATION", "EXIT"]
    assert lines[1].split()[:3] == [run.run_id, "build", "alice"]
    assert lines[1].split()[-3:] == ["65.2", "s", "1"]
    empty = Client(Form.TEXT)
    serve(config, b"status\n", empty)
    assert empty.read_all() == b""
    empty.close()


def test_json_runs_event(config: Config, client: Client) -> None:
    make_run(config, "build", 10)
    serve(config, b'{"op": "history", "limit": 1}\n', client)
    (event,) = client.events()
    assert event["event"] == "runs"
    assert isinstance(event["runs"], list) and len(event["runs"]) == 1
    assert list(event["runs"][0]) == [
        "job", "run_id", "user", "uid", "started", "state", "exit_code", "duration_s", "result", "log",
    ]  # fmt: skip


# ------------------------------------------------------------------------------------ who pays for it


def test_only_these_requests_import_the_module() -> None:
    from tests.test_imports import imported_by

    others = imported_by(
        """\
        import runner.__main__, runner.activation, runner.service
        from runner import protocol
        protocol.parse_request(b"run x")
        protocol.parse_request(b'{"op": "list"}')
        """
    )
    assert "runner.service" in others and "runner.history" not in others
    assert "runner.history" in imported_by("from runner import protocol\nprotocol.parse_request(b'status')")


def test_jobctl_run_does_not_import_the_client_side() -> None:
    from tests.test_imports import imported_by

    code = """\
        from trigger import jobctl
        for argv in ({argv}):
            ns = jobctl.parse_arguments(jobctl.build_parser(), argv)
            jobctl.encode_request(ns)
            jobctl.make_session(ns, jobctl.Terminal(None, None), None)
        """
    assert "trigger.runs" not in imported_by(code.format(argv="['run', 'x'], ['list']"))
    assert "trigger.runs" in imported_by(code.format(argv="['logs', '-f', 'x'],"))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["history", "logs", "status"]),
    st.lists(st.text(max_size=40) | st.sampled_from(["follow", "5", "build", run_id_at(0)]), max_size=3),
)
def test_any_text_request_parses_or_fails_cleanly(op: str, words: list[str]) -> None:
    line = " ".join([op, *words]).encode("utf-8", "surrogatepass")
    try:
        request = parse_request(line)
    except RunnerError as e:
        assert e.code in ("bad-request", "unknown-job", "unknown-run")
        return
    assert request.op == op
    assert request.run_id == "" or valid_run_id(request.run_id)
    assert request.job == "" or JOB_NAME.fullmatch(request.job)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["history", "logs", "status"]),
    st.dictionaries(
        st.sampled_from(["job", "limit", "run_id", "follow", "detach", "x"]),
        st.none()
        | st.booleans()
        | st.integers()
        | st.text(max_size=40)
        | st.lists(st.integers(), max_size=2),
        max_size=4,
    ),
)
def test_any_json_request_parses_or_fails_cleanly(op: str, fields: dict[str, object]) -> None:
    line = json.dumps({"op": op, **fields}).encode()
    try:
        request = parse_request(line)
    except RunnerError as e:
        assert e.code in ("bad-request", "unknown-job", "unknown-run")
        return
    assert request.op == op and set(fields) <= history.FIELDS[op]
    assert 1 <= request.limit <= history.MAX_LIMIT or op != "history"
