"""runner/protocol.py against docs/protocol.md: requests in, reply framing out."""

from __future__ import annotations

import base64
import json
import shlex
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import ArgumentsError, RequestError, RunnerError, UnknownJobError
from runner.protocol import (
    ExitReport,
    Form,
    NoRequest,
    Reply,
    Request,
    guess_form,
    parse_request,
    read_request_line,
)

KIB_64 = 64 * 1024  # docs/protocol.md: at most 64 KiB including the newline
EXIT_FIELDS = {
    "event",
    "job",
    "run_id",
    "exit_code",
    "signal",
    "timed_out",
    "cancelled",
    "duration_s",
    "log",
    "output_dir",
    "warnings",
}


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server, client): the runner's end and the client's end of one connection."""
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def send_later(
    sock: socket.socket, parts: list[bytes], delay_s: float, *, close: bool = False
) -> threading.Thread:
    def run() -> None:
        for part in parts:
            time.sleep(delay_s)
            sock.sendall(part)
        if close:
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def lines(data: bytes) -> list[bytes]:
    """JSON Lines as a client splits them: on b"\\n" only."""
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def report(**changes: object) -> ExitReport:
    fields: dict[str, object] = {
        "job": "build",
        "run_id": "20261128T154402-123456-3fa9",
        "exit_code": 0,
        "signal": None,
        "timed_out": False,
        "cancelled": False,
        "duration_s": 1.25,
        "log": "/var/log/jobrunner/build/20261128T154402-123456-3fa9.log",
        "output_dir": "/srv/project/outputs/build/20261128T154402-123456-3fa9",
    }
    fields.update(changes)
    return ExitReport(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- text requests


def test_text_run_without_arguments() -> None:
    assert parse_request(b"run build") == Request(Form.TEXT, "run", "build", (), False)


def test_text_list() -> None:
    assert parse_request(b"list") == Request(Form.TEXT, "list")
    assert parse_request(b"  list  ").op == "list"


def test_text_arguments_are_split_with_shell_quoting() -> None:
    request = parse_request(b"run build 'two words' \"double quoted\" back\\ slash '' x")

    assert request.args == ("two words", "double quoted", "back slash", "", "x")


@pytest.mark.parametrize(
    "args",
    [
        ["$(touch /tmp/pwned)", "`id`", "; rm -rf /", "a|b", "&&", ">", "<x", "*", "?", "~", "$HOME"],
        ["--", "--force", "-rf"],
        ["héllo", "日本語", "emoji 🙂", "\uff46\uff55\uff4c\uff4c"],
        ["#not-a-comment", "a#b", "'single'", '"double"', "back\\slash", "tab\there"],
    ],
)
def test_text_arguments_reach_the_job_verbatim(args: list[str]) -> None:
    line = f"run build {shlex.join(args)}".encode()

    request = parse_request(line)

    assert request == Request(Form.TEXT, "run", "build", tuple(args), False)


def test_unquoted_shell_metacharacters_are_just_characters() -> None:
    request = parse_request(b"run build a;b c|d $HOME e&f -- #x")

    assert request.args == ("a;b", "c|d", "$HOME", "e&f", "--", "#x")


# ---------------------------------------------------------------------------------------- JSON requests


def test_json_run_with_every_field() -> None:
    line = json.dumps(
        {"op": "run", "job": "build", "args": ["two words", "--", "$(id)", "日本"], "detach": True}
    ).encode()

    assert parse_request(line) == Request(
        Form.JSON, "run", "build", ("two words", "--", "$(id)", "日本"), True
    )


def test_json_defaults_args_and_detach() -> None:
    assert parse_request(b'{"op": "run", "job": "build"}') == Request(Form.JSON, "run", "build", (), False)


def test_json_list_and_leading_blanks() -> None:
    assert parse_request(b'  \t{"op": "list"}') == Request(Form.JSON, "list")


def test_json_unicode_escapes_are_decoded() -> None:
    request = parse_request(b'{"op": "run", "job": "build", "args": ["caf\\u00e9", "\\ud83d\\ude42"]}')

    assert request.args == ("café", "🙂")


def test_exactly_1024_arguments_are_accepted() -> None:
    args = [str(i) for i in range(1024)]

    assert len(parse_request(json.dumps({"op": "run", "job": "x", "args": args}).encode()).args) == 1024
    assert len(parse_request(("run x " + " ".join(args)).encode()).args) == 1024


@pytest.mark.parametrize(
    ("data", "form"),
    [
        (b'{"op": "list"}', Form.JSON),
        (b'  {"op"', Form.JSON),
        (b"[1, 2]", Form.JSON),
        (b"run build", Form.TEXT),
        (b'"{"', Form.TEXT),
        (b"", Form.TEXT),
    ],
)
def test_guess_form(data: bytes, form: Form) -> None:
    assert guess_form(data) is form


# ---------------------------------------------------------------------------------------- bad requests

BAD_REQUESTS = [
    # malformed or unexpected JSON
    b'{"op": "run", "job": ',
    b'{"op": "run", "job": "x",}',
    b"{op: run}",
    b"[" * 100_000,
    b'{"a":' * 100_000,
    b'{"a":[' * 50_000,
    b'["op", "run"]',
    b"[]",
    b'{"op": 1' + b"0" * 5000 + b"}",
    # unknown op or field
    b"{}",
    b'{"op": "delete"}',
    b'{"op": null}',
    b'{"op": ["run"]}',
    b'{"op": "run", "job": "x", "extra": 1}',
    b'{"op": "list", "verbose": true}',
    # wrong types
    b'{"op": "run"}',
    b'{"op": "run", "job": 5}',
    b'{"op": "run", "job": null}',
    b'{"op": "run", "job": "x", "args": "a b"}',
    b'{"op": "run", "job": "x", "args": [1]}',
    b'{"op": "run", "job": "x", "args": [["a"]]}',
    b'{"op": "run", "job": "x", "args": {"a": "b"}}',
    b'{"op": "run", "job": "x", "detach": "yes"}',
    b'{"op": "run", "job": "x", "detach": 1}',
    b'{"op": "run", "job": "x", "detach": null}',
    # not UTF-8, NUL
    b"run build \xff",
    b"run build \xc3",
    b'{"op": "run", "job": "build", "args": ["\xe9"]}',
    b"run build a\x00b",
    b'{"op": "run", "job": "build\x00"}',
    # text mistakes
    b"",
    b"   ",
    b"\t",
    b"run",
    b"list extra",
    b"frobnicate build",
    b"RUN build",
    b"run build 'unclosed",
    b'run build "unclosed',
    b"run build trailing\\",
]


@pytest.mark.parametrize("line", BAD_REQUESTS, ids=lambda b: repr(b[:40]))
def test_bad_request(line: bytes) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(line)

    assert type(info.value) is RequestError
    assert info.value.code == "bad-request"
    assert info.value.exit_status == 64


@pytest.mark.parametrize("escape", [b"\\ud800", b"\\udcff", b"a\\udfffb"])
def test_json_string_with_a_lone_surrogate_is_a_bad_request(escape: bytes) -> None:
    # "\ud800" is valid JSON syntax but no Unicode character, so the request is not UTF-8 text. Let through,
    # \ud800 makes the run fail later as `internal` (the run log header cannot encode it) and \udc80-\udcff
    # reach the job's argv as raw non-UTF-8 bytes (surrogateescape). It must be refused here.
    with pytest.raises(RequestError):
        parse_request(b'{"op": "run", "job": "build", "args": ["' + escape + b'"]}')


BAD_JOB_NAMES = [
    "a/b",
    "/etc/passwd",
    "..",
    "../build",
    "build/..",
    ".",
    "a b",
    " build",
    "build ",
    "Build",
    "BUILD",
    "d\u0435ploy",  # Cyrillic ie
    "\uff42uild",  # fullwidth b
    "bu\u0131ld",  # dotless i
    "build\n",
    "build\t",
    "",
    "-build",
    "_build",
    "1build",
    "b" * 65,
    "build;id",
    "build$",
    "bu\u200bild",  # zero-width space
]


@pytest.mark.parametrize("name", BAD_JOB_NAMES, ids=repr)
def test_bad_job_name_in_json_is_an_unknown_job(name: str) -> None:
    line = json.dumps({"op": "run", "job": name}).encode()

    with pytest.raises(UnknownJobError) as info:
        parse_request(line)

    assert info.value.code == "unknown-job"
    assert info.value.exit_status == 64


@pytest.mark.parametrize(
    "name", ["a/b", "..", "../build", "Build", "d\u0435ploy", "\uff42uild", "'a b'", "1build"]
)
def test_bad_job_name_in_text_is_an_unknown_job(name: str) -> None:
    with pytest.raises(UnknownJobError):
        parse_request(f"run {name}".encode())


def test_error_message_does_not_echo_a_huge_job_name() -> None:
    line = json.dumps({"op": "run", "job": "x" * 60_000}).encode()

    with pytest.raises(UnknownJobError) as info:
        parse_request(line)

    assert len(info.value.message) < 200


def test_error_message_does_not_echo_a_huge_unknown_field() -> None:
    line = json.dumps({"op": "run", "job": "x", "f" * 60_000: 1}).encode()

    with pytest.raises(RequestError) as info:
        parse_request(line)

    assert len(info.value.message) < 200


@pytest.mark.parametrize("form", ["json", "text"])
def test_more_than_1024_arguments_is_bad_arguments(form: str) -> None:
    args = ["a"] * 1025
    line = (
        json.dumps({"op": "run", "job": "build", "args": args}).encode()
        if form == "json"
        else ("run build " + " ".join(args)).encode()
    )

    with pytest.raises(ArgumentsError) as info:
        parse_request(line)

    assert info.value.code == "bad-arguments"
    assert info.value.exit_status == 64


# ------------------------------------------------------------------------------------ read_request_line


def test_read_line_split_across_sends(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    sender = send_later(client, [b"run bu", b"ild a", b"rg\nextra"], 0.03)
    received = bytearray()

    line = read_request_line(server, received, deadline_s=5)

    sender.join()
    assert line == b"run build arg"
    assert received.startswith(b"run build arg\n")


def test_read_line_crlf(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b'{"op": "list"}\r\n')

    assert read_request_line(server, bytearray(), deadline_s=5) == b'{"op": "list"}'


def test_read_line_without_newline_then_half_close(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"run build x")
    client.shutdown(socket.SHUT_WR)

    assert read_request_line(server, bytearray(), deadline_s=5) == b"run build x"


def test_read_line_without_newline_half_closed_later(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    sender = send_later(client, [b"li", b"st"], 0.03, close=True)

    assert read_request_line(server, bytearray(), deadline_s=5) == b"list"
    sender.join()


def test_a_64_kib_line_including_its_newline_is_accepted(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    request = b"run build " + b"a" * (KIB_64 - len(b"run build ") - 1) + b"\n"
    assert len(request) == KIB_64
    sender = send_later(client, [request], 0)

    line = read_request_line(server, bytearray(), deadline_s=5)

    sender.join()
    assert line == request[:-1]


def test_a_line_one_byte_over_64_kib_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    request = b"run build " + b"a" * (KIB_64 - len(b"run build ")) + b"\n"
    assert len(request) == KIB_64 + 1
    sender = send_later(client, [request], 0)

    with pytest.raises(RequestError) as info:
        read_request_line(server, bytearray(), deadline_s=5)

    sender.join()
    assert "longer" in info.value.message


def test_an_endless_line_is_refused_without_waiting_for_the_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.setblocking(False)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            try:
                client.send(b"x" * 8192)
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                return

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        with pytest.raises(RequestError) as info:
            read_request_line(server, bytearray(), deadline_s=60)
    finally:
        stop.set()
        thread.join()
    # Refused for its length as the bytes came, not at the deadline (60 s), which says otherwise.
    assert "longer than" in info.value.message, info.value.message


def test_nothing_sent_within_the_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    started = time.monotonic()

    with pytest.raises(RequestError) as info:
        read_request_line(server, bytearray(), deadline_s=0.2)

    elapsed = time.monotonic() - started
    # Not before the deadline; and at it, not never (a reader without one would wait for ever: 30 s
    # leaves a busy machine its margin).
    assert 0.2 <= elapsed < 30
    assert "0.2 s" in info.value.message
    assert info.value.hint


def test_the_deadline_holds_for_a_client_that_trickles(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    # A byte every 0.05 s for a minute, no newline: a reader whose clock each byte restarted would read
    # until the sender stops. Ours gives up at its deadline while bytes are still coming.
    message = b"run build " + b"x" * 1190
    trickling, stop = threading.Event(), threading.Event()

    def trickle() -> None:
        trickling.set()
        for byte in message[1:]:
            if stop.wait(0.05):
                return
            client.send(bytes([byte]))
        trickling.clear()  # the sender ran out: the reader waited for all of it

    client.send(message[:1])  # the first byte is there when the reader starts, whatever the load
    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    trickling.wait()
    received = bytearray()
    try:
        with pytest.raises(RequestError) as info:
            read_request_line(server, received, deadline_s=0.3)
        assert trickling.is_set(), "the reader waited until the client stopped sending"
    finally:
        stop.set()
        sender.join()
    assert "within 0.3 s" in info.value.message
    assert received.startswith(b"r")  # what arrived is kept, to pick the reply's form


def test_partial_json_before_the_deadline_is_kept_for_the_reply_form(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.sendall(b'  {"op": "ru')
    received = bytearray()

    with pytest.raises(RequestError):
        read_request_line(server, received, deadline_s=0.2)

    assert bytes(received) == b'  {"op": "ru'
    assert guess_form(bytes(received)) is Form.JSON


@pytest.mark.parametrize("end", ["close", "half-close"])
def test_client_closing_without_sending_anything_asked_nothing(
    pair: tuple[socket.socket, socket.socket], end: str
) -> None:
    # A probe, or jobctl's early connection when it had nothing to ask (trigger/preconnect.py).
    server, client = pair
    if end == "close":
        client.close()
    else:
        client.shutdown(socket.SHUT_WR)

    with pytest.raises(NoRequest):
        read_request_line(server, bytearray(), deadline_s=5)


def test_a_lone_newline_is_still_an_empty_request(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"\n")
    client.close()

    with pytest.raises(RequestError) as info:
        read_request_line(server, bytearray(), deadline_s=5)

    assert "empty" in info.value.message


def test_client_closing_with_a_partial_json_request(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b'{"op": "ru')
    client.close()
    received = bytearray()

    line = read_request_line(server, received, deadline_s=5)

    with pytest.raises(RequestError):
        parse_request(line)
    assert guess_form(bytes(received)) is Form.JSON


def test_client_resetting_the_connection(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    server.sendall(b"unread")  # closing a unix socket with unread data resets the connection
    client.close()

    with pytest.raises(RequestError) as info:
        read_request_line(server, bytearray(), deadline_s=5)

    assert "closed" in info.value.message


def test_an_empty_line(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"\r\nrun build\n")

    with pytest.raises(RequestError) as info:
        read_request_line(server, bytearray(), deadline_s=5)

    assert "empty" in info.value.message


# ------------------------------------------------------------------------------------------- JSON replies


def test_json_events_parse_back_with_their_fields() -> None:
    reply = Reply(Form.JSON)

    accepted = json.loads(reply.accepted("build", "RID", "/out/build/RID", "/log/build/RID.log", True))
    output = json.loads(reply.output("stderr", "héllo\n".encode()))
    exit_event = json.loads(reply.exit(report(exit_code=3, signal=None, duration_s=1.23456)))
    jobs = json.loads(reply.jobs([{"name": "build", "description": "Build it", "args": True}]))

    assert accepted == {
        "event": "accepted",
        "job": "build",
        "run_id": "RID",
        "output_dir": "/out/build/RID",
        "log": "/log/build/RID.log",
        "detach": True,
    }
    assert output == {"event": "output", "stream": "stderr", "text": "héllo\n"}
    assert set(exit_event) == EXIT_FIELDS
    assert exit_event["event"] == "exit"
    assert exit_event["exit_code"] == 3
    assert exit_event["signal"] is None
    assert exit_event["timed_out"] is False
    assert exit_event["cancelled"] is False
    assert exit_event["warnings"] == []
    assert isinstance(exit_event["duration_s"], float)
    assert exit_event["duration_s"] == pytest.approx(1.23456, abs=0.001)
    assert jobs == {"event": "jobs", "jobs": [{"name": "build", "description": "Build it", "args": True}]}


def test_json_exit_after_a_signal_and_a_timeout() -> None:
    event = json.loads(Reply(Form.JSON).exit(report(exit_code=124, signal=9, timed_out=True)))

    assert (event["exit_code"], event["signal"], event["timed_out"]) == (124, 9, True)


def test_every_json_event_is_one_line() -> None:
    reply = Reply(Form.JSON)
    events = [
        reply.accepted("b", "r", "o\nx", "l\ny", False),
        reply.output("stdout", b"a\nb\r\nc\n"),
        reply.output("stdout", b"\xff\n\xfe\n"),
        reply.exit(report(job="b", log="a\nb")),
        reply.error("internal", "two\nlines", "hint\nline"),
    ]

    for event in events:
        assert len(lines(event)) == 1
        json.loads(event)


def test_json_error_with_and_without_run_id() -> None:
    reply = Reply(Form.JSON)

    with_run = json.loads(reply.error("internal", "it broke", "see the journal", "RID"))
    without = json.loads(reply.error("busy", "job 'x' is already running", ""))

    assert with_run == {
        "event": "error",
        "code": "internal",
        "message": "it broke",
        "hint": "see the journal",
        "run_id": "RID",
    }
    assert without == {"event": "error", "code": "busy", "message": "job 'x' is already running", "hint": ""}


OUTPUT_PIECES = [b"a", b" ", b"\n", b"\r", b"\t", b'"', b"\\", b"\x00", b"\x1b", b"\x7f", b"/", b"<"]
OUTPUT_PIECES += ["é".encode(), "€".encode(), "\u2028".encode(), "😀".encode(), b"\xff", b"\xc3"]


@settings(max_examples=500, deadline=None, database=None)
@given(st.lists(st.sampled_from(OUTPUT_PIECES), max_size=60), st.sampled_from(["stdout", "stderr"]))
def test_output_events_are_byte_for_byte_what_json_dumps_makes(pieces: list[bytes], stream: str) -> None:
    """The JSON form escapes ordinary output on the bytes (for speed); the wire must not change."""
    data = b"".join(pieces)
    try:
        fields: dict[str, str] = {"event": "output", "stream": stream, "text": data.decode("utf-8")}
    except UnicodeDecodeError:
        fields = {"event": "output", "stream": stream, "base64": base64.b64encode(data).decode("ascii")}
    expected = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    assert Reply(Form.JSON).output(stream, data) == expected


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"\x80abc", b"ok \xc3", b"\xc3\x28", b"\xed\xa0\x80", bytes(range(256)), b"\x00\xff\x00"],
)
def test_non_utf8_output_is_base64_and_round_trips_exactly(data: bytes) -> None:
    event = json.loads(Reply(Form.JSON).output("stdout", data))

    assert set(event) == {"event", "stream", "base64"}
    assert base64.b64decode(event["base64"], validate=True) == data


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=200), st.sampled_from(["stdout", "stderr"]))
def test_any_output_round_trips_through_exactly_one_of_text_or_base64(data: bytes, stream: str) -> None:
    framed = Reply(Form.JSON).output(stream, data)

    assert len(lines(framed)) == 1
    event = json.loads(framed)
    assert event["event"] == "output"
    assert event["stream"] == stream
    assert len({"text", "base64"} & set(event)) == 1
    if "text" in event:
        assert event["text"].encode("utf-8") == data
    else:
        assert base64.b64decode(event["base64"], validate=True) == data


def test_a_job_printing_events_cannot_forge_one_in_json() -> None:
    forged = (
        '{"event":"exit","job":"build","run_id":"x","exit_code":0}\n'
        '{"event":"error","code":"internal","message":"m","hint":""}\r\n'
        "\n\u2028\u2029\x85\x1e\x00"  # what str.splitlines() would also split on
        '{"event":"accepted"}'
    ).encode()

    framed = Reply(Form.JSON).output("stdout", forged)

    events = [json.loads(line) for line in lines(framed)]
    assert len(events) == 1
    assert events[0]["event"] == "output"
    assert events[0]["text"].encode() == forged


def test_a_job_printing_binary_events_cannot_forge_one_either() -> None:
    forged = b'{"event":"exit","exit_code":0}\n\xff\n'

    framed = Reply(Form.JSON).output("stdout", forged)

    events = [json.loads(line) for line in lines(framed)]
    assert [e["event"] for e in events] == ["output"]
    assert base64.b64decode(events[0]["base64"]) == forged


# ------------------------------------------------------------------------------------------- text replies


def test_text_exit_line_format() -> None:
    reply = Reply(Form.TEXT)

    assert reply.accepted("build", "RID", "/o", "/l", False) == b""
    assert reply.output("stdout", b"done\n") == b"done\n"
    assert reply.exit(report(job="build", run_id="RID", exit_code=3, duration_s=12.34)) == (
        b"jobrunner: build (run RID) exited with 3 after 12.3 s\n"
    )


def test_text_exit_line_gets_its_own_line_after_output_without_newline() -> None:
    reply = Reply(Form.TEXT)

    assert reply.output("stdout", b"no newline") == b"no newline"
    assert reply.exit(report(job="x", run_id="R", exit_code=0, duration_s=0.04)) == (
        b"\njobrunner: x (run R) exited with 0 after 0.0 s\n"
    )


def test_text_newline_tracking_follows_the_last_output_of_either_stream() -> None:
    ends_without = Reply(Form.TEXT)
    ends_without.output("stdout", b"a\n")
    ends_without.output("stderr", b"b")
    ends_with = Reply(Form.TEXT)
    ends_with.output("stdout", b"a")
    ends_with.output("stderr", b"b\n")

    assert ends_without.exit(report(job="x", run_id="R", exit_code=1, duration_s=2.0)).startswith(
        b"\njobrunner:"
    )
    assert ends_with.exit(report(job="x", run_id="R", exit_code=1, duration_s=2.0)).startswith(b"jobrunner:")


def test_text_output_is_raw_bytes() -> None:
    data = b"\xff\x00binary\r\n"

    assert Reply(Form.TEXT).output("stdout", data) == data


def test_text_error_line_with_and_without_hint() -> None:
    with_hint = Reply(Form.TEXT).error("busy", "job 'x' is already running", "wait for it")
    without = Reply(Form.TEXT).error("unknown-job", "no job named 'y'", "")

    assert with_hint == b"jobrunner: error: busy: job 'x' is already running (hint: wait for it)\n"
    assert without == b"jobrunner: error: unknown-job: no job named 'y'\n"


def test_text_error_after_partial_output_starts_on_a_new_line() -> None:
    reply = Reply(Form.TEXT)
    reply.output("stdout", b"half a line")

    assert reply.error("internal", "m", "") == b"\njobrunner: error: internal: m\n"


def test_text_list_pads_names() -> None:
    text = Reply(Form.TEXT).jobs(
        [
            {"name": "build", "description": "Build it", "args": True},
            {"name": "db-migrate", "description": "Migrate", "args": False},
            {"name": "x", "description": "", "args": False},
        ]
    )

    assert text == b"build       Build it\ndb-migrate  Migrate\nx\n"
    assert Reply(Form.TEXT).jobs([]) == b""


# --------------------------------------------------------------------------- error codes (the contract)


@pytest.mark.parametrize(
    ("error", "code", "status"),
    [
        (RequestError, "bad-request", 64),
        (UnknownJobError, "unknown-job", 64),
        (ArgumentsError, "bad-arguments", 64),
    ],
)
def test_request_error_codes_match_the_contract(error: type[RunnerError], code: str, status: int) -> None:
    e = error("m", "h")

    assert (e.code, e.exit_status, e.message, e.hint, e.run_id) == (code, status, "m", "h", None)


def test_reply_bytes_are_utf8() -> None:
    event = Reply(Form.JSON).output("stdout", "naïve ✓".encode())

    assert "naïve ✓".encode() in event  # not \\u-escaped: JSON Lines in UTF-8


def test_exit_warnings_come_before_the_final_text_line_and_in_the_json_event() -> None:
    warned = report(exit_code=0, signal=None, duration_s=1.0)
    warned = type(warned)(
        **{**{f: getattr(warned, f) for f in warned.__slots__}, "warnings": ("log incomplete",)}
    )
    text = Reply(Form.TEXT).exit(warned).decode()
    assert text.splitlines()[0] == "jobrunner: warning: log incomplete"
    assert text.splitlines()[1].startswith("jobrunner: ")
    assert json.loads(Reply(Form.JSON).exit(warned))["warnings"] == ["log incomplete"]
