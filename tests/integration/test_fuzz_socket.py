"""Adversarial fuzzing of the live socket (issue 4, "Bad input"): ~300 random and mutated requests, some
sent slowly, some never finished, some from clients that leave early, eight at a time.

Every reply must be exactly one well-formed final event (a stable error code, or a legitimate reply when a
mutation happened to make a valid request for a harmless job), within the 10 s request deadline plus a
margin, with no traceback and no secret in it; every runner's exit status must match its reply (non-zero
for errors); afterwards no runner or job process is left and a normal `run fail` is still served.

The seed is random per run and printed in the failure message: reproduce with JOBRUNNER_FUZZ_SEED=N.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import select
import shlex
import socket
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runner.errors import RunnerError
from runner.protocol import Form, NoRequest, guess_form, parse_request
from tests.integration.conftest import Runner, wait_for
from tests.test_fuzz_protocol import (
    HOSTILE_ARGS,
    HOSTILE_NAMES,
    INTERESTING_BYTES,
    MESSAGE_LIMIT,
    MUTATIONS,
    STABLE_CODES,
    UNKNOWN_OPS,
    VALID_HOSTILE_ARGS,
    check_error_line,
    expected_read,
    lookalike,
    mutate,
)

pytestmark = pytest.mark.integration

CASES = 300
LORIS = 6  # of the CASES: clients that dribble bytes and never finish the line
CONCURRENCY = 8
MAX_BYTES = 64 * 1024
REQUEST_DEADLINE_S = 10.0
REPLY_DEADLINE_S = REQUEST_DEADLINE_S + 5.0  # the deadline, the runner's start-up and a loaded machine
HARMLESS_JOBS = frozenset({"fail", "echo-args"})  # plus `list`
CONFIGURED_JOBS = frozenset(
    tomllib.loads((Path(__file__).parent / "jobs.toml").read_text().replace("@PROJECT@", "/p"))["jobs"]
)
EXIT_STATUS = {  # runner/__main__.py --help, docs/protocol.md
    "bad-request": 64,
    "unknown-job": 64,
    "bad-arguments": 64,
    "busy": 75,
    "forbidden": 77,
    "config": 78,
    "credential": 78,
    "internal": 70,
}
TRACEBACK_MARKERS = (b"Traceback (most recent call last)", b'.py", line ')
TEXT_EXIT = re.compile(rb"jobrunner: (\S+) \(run (\S+)\) exited with (\d+) after \d+\.\d s")
WRONG_VALUES: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    1e308,
    "",
    "run",
    [],
    ["fail"],
    {},
    {"a": 1},
    [1],
]


@dataclass
class Expect:
    """What the runner must answer: an error with one of `codes`, the job list, or a run of `job`."""

    outcome: str  # "error", "jobs", "run" or "nothing" (no reply: no request arrived)
    forms: frozenset[Form]
    codes: frozenset[str] = frozenset()
    job: str = ""
    args: tuple[str, ...] = ()
    detach: bool = False


@dataclass
class Case:
    index: int
    category: str
    delivery: str  # line, half-close, slow, early-close, abandon, loris
    payload: bytes  # what the client sends (all of it, unless the delivery says otherwise)
    expect: Expect
    reply: bytes = b""
    elapsed_s: float = 0.0
    status: int | None = None  # the runner's exit status this reply implies (None: cannot tell)
    answer: str = "none"  # what the reply was: error:CODE, jobs, exit
    reset: bool = False  # the reply ended in ECONNRESET rather than end-of-file
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        shown = self.payload[:120]
        more = f"... ({len(self.payload)} bytes)" if len(self.payload) > 120 else ""
        return f"case {self.index} [{self.category}, {self.delivery}] {shown!r}{more}"


# ------------------------------------------------------------------------------------------ the model


def expect_for(sent: bytes, closed: bool) -> Expect | None:
    """docs/protocol.md plus tests/integration/jobs.toml, for what the runner received (None: the request
    would run a job that is not harmless, so the generator tries again)."""
    line = expected_read(sent, closed)
    if not isinstance(line, bytes):
        return expect_without_a_line(sent, line is NoRequest)
    forms = frozenset({guess_form(line)})
    try:
        request = parse_request(line)
    except RunnerError as e:
        return Expect("error", forms, frozenset({e.code}))
    if request.op == "list":
        return Expect("jobs", forms)
    if request.job in CONFIGURED_JOBS and request.job not in HARMLESS_JOBS:
        return None
    if request.job not in CONFIGURED_JOBS:
        code = "unknown-job"
    elif (request.job == "fail" and request.args) or any("\0" in a for a in request.args):
        code = "bad-arguments"
    else:
        return Expect("run", forms, frozenset({"busy"}), request.job, request.args, request.detach)
    return Expect("error", forms, frozenset({code}))


def expect_without_a_line(sent: bytes, nothing_sent: bool) -> Expect:
    if nothing_sent:  # the connection ended before its first byte: nothing asked, nothing answered
        return Expect("nothing", frozenset(Form))
    first = sent[:MAX_BYTES].partition(b"\n")[0]
    forms = frozenset({guess_form(sent)}) if first.strip() else frozenset(Form)
    return Expect("error", forms, frozenset({"bad-request"}))


# ------------------------------------------------------------------------------------------ generation


def random_text(rng: random.Random, size: int) -> str:
    ranges = [(0x20, 0x7E), (0x01, 0x1F), (0xA0, 0x2FF), (0x400, 0x4FF), (0x2000, 0x206F), (0x1F600, 0x1F64F)]
    chars = []
    for _ in range(size):
        low, high = rng.choice(ranges)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


def valid_arg(rng: random.Random, for_text: bool) -> str:
    arg = rng.choice(VALID_HOSTILE_ARGS) if rng.random() < 0.5 else random_text(rng, rng.randint(0, 20))
    return arg.replace("\n", " ") if for_text else arg  # a newline would end a text request


def encode_json(rng: random.Random, obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def valid_request(rng: random.Random) -> bytes:
    kind = rng.choice(["list", "fail", "echo-args", "echo-args", "echo-args"])
    as_json = rng.random() < 0.5
    if kind == "list":
        return b'{"op": "list"}' if as_json else b"list"
    args = [] if kind == "fail" else [valid_arg(rng, not as_json) for _ in range(rng.randint(0, 5))]
    if not as_json:
        return ("run " + shlex.join([kind, *args])).encode()
    obj: dict[str, object] = {"op": "run", "job": kind, "args": args}
    if rng.random() < 0.2:
        obj["detach"] = rng.random() < 0.5
    return encode_json(rng, obj)


def hostile_name(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        name = rng.choice(HOSTILE_NAMES)
    else:
        name = lookalike(rng.choice(["fail", "echo-args", "list"]), rng.randrange(64), rng.randrange(8))
    if rng.random() < 0.5:
        return encode_json(rng, {"op": "run", "job": name})
    text = shlex.join(["run", name]) if rng.random() < 0.5 else f"run {name}"
    return text.encode("utf-8", "surrogatepass")


def hostile_args(rng: random.Random) -> bytes:
    job = rng.choice(["echo-args", "echo-args", "fail"])
    args = [rng.choice(HOSTILE_ARGS) for _ in range(rng.randint(1, 6))]
    if rng.random() < 0.5:
        return encode_json(rng, {"op": "run", "job": job, "args": args})
    words = ["run", job, *args]
    text = shlex.join(words) if rng.random() < 0.7 else " ".join(words)
    return text.encode("utf-8", "surrogatepass")


def wrong_type(rng: random.Random) -> bytes:
    obj: dict[str, object] = {"op": "run", "job": "echo-args", "args": ["a"], "detach": False}
    key = rng.choice(list(obj))
    obj[key] = rng.choice([*WRONG_VALUES, "abc", ["a", 2], {"0": "a"}, [["a"]]])
    return encode_json(rng, obj)


def unknown_op_or_field(rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        return rng.choice(UNKNOWN_OPS).encode("utf-8") + b" fail"
    obj: dict[str, object] = {"op": rng.choice([*UNKNOWN_OPS, "run", "list"]), "job": "fail"}
    if rng.random() < 0.5:
        obj[rng.choice(["Op", "job ", "argv", "env", "cwd", "user", random_text(rng, 6)])] = 1
    return encode_json(rng, obj)


def nested(rng: random.Random) -> bytes:
    depth = rng.choice([10, 999, 1000, 1001, 5000, 30_000])
    inner = b"[" * depth + b"1" + b"]" * depth
    where = rng.choice(["top", "op", "job", "args", "detach", "unknown", "dict"])
    if where == "top":
        return inner
    if where == "dict":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"op": "run", "job": "fail", "' + where.encode() + b'": ' + inner + b"}"


def huge(rng: random.Random) -> bytes:
    size = rng.choice([MAX_BYTES - 2, MAX_BYTES - 1, MAX_BYTES, MAX_BYTES + 1, MAX_BYTES + 100, 200_000])
    prefix = rng.choice([b"", b"run echo-args ", b"run ", b'{"op": "run", "job": "echo-args", "args": ["'])
    filler = rng.choice([b"a", b"a ", b"{", b"\xff", b"\x00", b" "])
    line = (prefix + filler * size)[:size]
    if prefix.startswith(b"{") and rng.random() < 0.5:
        line = line[: size - 3] + b'"]}'
    return line + b"\n"  # the newline is byte size+1: a line of MAX_BYTES - 1 is the longest allowed


def long_word(rng: random.Random) -> bytes:
    """A long op, job name or field name: an error may quote it, but never whole."""
    size = rng.choice([100, 1000, 30_000, MAX_BYTES // 4 - 100])
    word = (
        rng.choice(["a", "\U000e0001", "\x1b", "e\u0301"]) * size
        if rng.random() < 0.5
        else random_text(rng, size)
    )
    where = rng.choice(["text-op", "text-job", "json-op", "json-job", "json-field"])
    if where == "text-op":
        return shlex.join([word, "fail"]).encode()
    if where == "text-job":
        return shlex.join(["run", word]).encode()
    obj: dict[str, object] = {"op": "run", "job": "fail"}
    if where == "json-field":
        obj[word] = 1
    else:
        obj[where.removeprefix("json-")] = word
    return encode_json(rng, obj)


def many_args(rng: random.Random) -> bytes:
    count = rng.choice([1024, 1025, 2000, 100_000])
    if rng.random() < 0.5:
        return encode_json(rng, {"op": "run", "job": "echo-args", "args": ["a"] * count})
    return ("run echo-args " + " ".join(["a"] * count)).encode()


def with_inserted(rng: random.Random, extras: list[bytes]) -> bytes:
    data = bytearray(valid_request(rng))
    for _ in range(rng.randint(1, 3)):
        at = rng.randint(0, len(data))
        data[at:at] = rng.choice(extras)
    return bytes(data)


def mutated(rng: random.Random) -> bytes:
    operations = [
        (rng.choice(MUTATIONS), rng.randrange(1 << 16), rng.randrange(256)) for _ in range(rng.randint(1, 4))
    ]
    return mutate(valid_request(rng), operations)


GENERATORS: dict[str, tuple[int, Callable[[random.Random], bytes]]] = {
    "random-bytes": (3, lambda rng: rng.randbytes(rng.randint(0, 300))),
    "valid": (3, valid_request),
    "mutated": (6, mutated),
    "hostile-name": (3, hostile_name),
    "hostile-args": (3, hostile_args),
    "wrong-type": (2, wrong_type),
    "unknown": (2, unknown_op_or_field),
    "nested": (1, nested),
    "huge": (1, huge),
    "many-args": (1, many_args),
    "long-word": (1, long_word),
    "nul": (1, lambda rng: with_inserted(rng, [b"\x00", b"\\u0000"])),
    "invalid-utf8": (1, lambda rng: with_inserted(rng, [b for b in INTERESTING_BYTES if b[:1] >= b"\x80"])),
}


# Every run sends these too, so that each category of docs/protocol.md's bad input is covered whatever the seed.
FIXED: list[tuple[str, bytes]] = [
    ("random-bytes", bytes(range(256))),
    ("huge", b"run echo-args " + b"a" * (MAX_BYTES - 15)),  # the longest line allowed: it runs
    ("huge", b"run echo-args " + b"a" * (MAX_BYTES - 14)),  # one byte more: refused
    ("huge", b"x" * (MAX_BYTES - 1)),
    ("long-word", b"x" * 5000 + b" fail"),
    ("long-word", json.dumps({"op": "run", "\x1b" * 200: 1}).encode()),
    ("nul", b"run fail \x00"),
    ("nul", b'{"op": "run", "job": "echo-args", "args": ["a\\u0000b"]}'),
    ("invalid-utf8", b'{"op": "run", "job": "\xc0\x80"}'),
    ("nested", b"[" * 60_000),
    ("nested", b'{"op": "run", "job": "fail", "args": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("many-args", json.dumps({"op": "run", "job": "echo-args", "args": ["a"] * 100_000}).encode()),
    ("many-args", ("run echo-args " + " ".join(["a"] * 1025)).encode()),
    ("wrong-type", b'{"op": "run", "job": ["fail"]}'),
    ("unknown", b'{"op": "exec", "job": "fail"}'),
    ("unknown", b'{"op": "run", "job": "fail", "cwd": "/"}'),
    ("hostile-name", "run f\u0430il".encode()),
    ("hostile-name", "run \uff46\uff41\uff49\uff4c".encode()),
    ("hostile-name", b'{"op": "run", "job": "../../bin/sh"}'),
    ("hostile-args", shlex.join(["run", "echo-args", "$(id)", "`id`", ";", "--", "|", "*"]).encode()),
    ("hostile-args", json.dumps({"op": "run", "job": "echo-args", "args": ["a\nb", "--", "\r\n"]}).encode()),
]


def make_case(rng: random.Random, index: int, loris: bool) -> Case:
    if LORIS <= index < LORIS + len(FIXED):
        category, payload = FIXED[index - LORIS]
        expect = expect_for(payload + b"\n", closed=False)
        assert expect is not None
        return Case(index, category, "line", payload + b"\n", expect)
    while True:
        category = rng.choices(list(GENERATORS), [weight for weight, _ in GENERATORS.values()])[0]
        payload = GENERATORS[category][1](rng)
        if loris:
            payload = payload.replace(b"\n", b"").lstrip() or b"x"
            payload = (payload * (1 + 20 // len(payload)))[:40]  # enough bytes to outlast the deadline
            expect = Expect("error", frozenset({guess_form(payload)}), frozenset({"bad-request"}))
            return Case(index, category, "loris", payload, expect)
        roll = rng.random()
        delivery = "line"
        if roll < 0.10:
            delivery = "half-close"
        elif roll < 0.16:
            delivery = "slow"
        elif roll < 0.20:
            delivery = "early-close"
            payload = payload[: rng.randint(0, len(payload))]
        elif roll < 0.24:
            delivery = "abandon"
        if delivery in ("line", "slow", "abandon") and not payload.endswith(b"\n"):
            payload += rng.choice([b"\n", b"\n", b"\r\n"])
        closed = delivery in ("half-close", "early-close", "abandon")
        expect = expect_for(payload, closed)
        if expect is not None:
            return Case(index, category, delivery, payload, expect)


# ------------------------------------------------------------------------------------------ the clients


def send_all(conn: socket.socket, data: bytes) -> None:
    try:
        conn.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the runner stopped reading (too long): its reply is still there to read


def serve(runner: Runner, case: Case, rng: random.Random) -> None:
    started = time.monotonic()
    try:
        with runner.connect() as conn:
            talk(conn, case, rng)
    except OSError as e:
        case.problems.append(f"the client failed: {e!r}")
    case.elapsed_s = time.monotonic() - started


def talk(conn: socket.socket, case: Case, rng: random.Random) -> None:
    conn.settimeout(REPLY_DEADLINE_S + 10)
    if case.delivery in ("early-close", "abandon"):
        send_all(conn, case.payload)
        return  # and close without reading
    if case.delivery == "slow":
        position = 0
        while position < len(case.payload):
            size = rng.randint(1, max(1, len(case.payload) // 4))
            send_all(conn, case.payload[position : position + size])
            position += size
            time.sleep(rng.uniform(0.05, 0.4))
    elif case.delivery == "loris":
        for byte in case.payload:
            if select.select([conn], [], [], rng.uniform(1.0, 2.5))[0]:
                break  # the runner gave up on us: read its reply
            send_all(conn, bytes([byte]))
    else:
        send_all(conn, case.payload)
    if case.delivery == "half-close":
        conn.shutdown(socket.SHUT_WR)
    chunks = []
    try:
        while chunk := conn.recv(1 << 20):
            chunks.append(chunk)
    except ConnectionResetError:
        # The runner closed with bytes of ours unread (it drains for 1 s only): the reply came first.
        case.reset = True
    case.reply = b"".join(chunks)


# ------------------------------------------------------------------------------------------ the checks


def check_leaks(case: Case, secret: str) -> None:
    for marker in TRACEBACK_MARKERS:
        if marker in case.reply:
            case.problems.append(f"traceback text {marker!r} in the reply: {case.reply[:500]!r}")
    secret_bytes = secret.encode()
    for form in (secret_bytes, secret_bytes.hex().encode(), base64.b64encode(secret_bytes)):
        if form in case.reply:
            case.problems.append("the secret is in the reply")


def check_reply(case: Case) -> None:
    reply, expect, problems = case.reply, case.expect, case.problems
    if case.elapsed_s > REPLY_DEADLINE_S:
        problems.append(f"the reply took {case.elapsed_s:.1f} s")
    if case.delivery in ("early-close", "abandon"):
        # Nobody reads the reply; the status still follows from the request (a run: cannot tell).
        if expect.outcome == "error":
            case.status = EXIT_STATUS[min(expect.codes)]
        else:
            case.status = 0 if expect.outcome in ("jobs", "nothing") else None
        return
    if expect.outcome == "nothing":
        case.status = 0
        if reply:
            problems.append(f"a reply to a connection that sent nothing: {reply[:300]!r}")
        return
    sent_more = len(case.payload) > MAX_BYTES + 1 or bool(case.payload.partition(b"\n")[2])
    if case.reset and not sent_more:
        problems.append("the connection was reset, though the client sent nothing after its request")
    if case.delivery == "loris" and not case.elapsed_s >= REQUEST_DEADLINE_S - 0.5:
        problems.append(f"a slow-loris client was dropped after {case.elapsed_s:.1f} s, before the deadline")
    if not reply.endswith(b"\n"):
        problems.append(f"the reply does not end with a newline: {reply[-300:]!r}")
        return
    # A text run's output may look like anything; a JSON reply's last line is always an event.
    form = Form.JSON if reply[:-1].rpartition(b"\n")[2].startswith(b'{"event":') else Form.TEXT
    if form not in expect.forms:
        problems.append(f"a {form} reply to a request expecting {set(expect.forms)}: {reply[:300]!r}")
        return
    if form is Form.JSON:
        check_json_reply(case)
    else:
        check_text_reply(case)


def check_error(case: Case, final_line: bytes, form: Form, code: str) -> None:
    allowed = case.expect.codes if case.expect.outcome in ("error", "run") else frozenset()
    if code not in STABLE_CODES or code not in allowed:
        case.problems.append(
            f"error code {code!r}, expected {case.expect.outcome} {set(allowed)}: {final_line[:300]!r}"
        )
    try:
        check_error_line(final_line, form, code)
    except (AssertionError, ValueError) as e:
        case.problems.append(f"malformed error line: {e!s:.300}")
        return
    if form is Form.JSON:
        message, limit = str(json.loads(final_line)["message"]), MESSAGE_LIMIT
    else:  # the whole line: prefix, message and hint
        message, limit = final_line.decode(), MESSAGE_LIMIT + 200
    if len(message) > limit:
        case.problems.append(
            f"a {len(message)}-character error message echoes the request: {message[:150]!r}..."
        )
    case.status = EXIT_STATUS.get(code)
    case.answer = f"error:{code}"


def check_json_reply(case: Case) -> None:
    lines = case.reply[:-1].split(b"\n")
    try:
        events = [json.loads(line) for line in lines]
    except ValueError:
        case.problems.append(f"a reply line is not JSON: {case.reply[:300]!r}")
        return
    finals = [i for i, e in enumerate(events) if e.get("event") in ("exit", "error", "jobs")]
    if finals != [len(events) - 1]:
        case.problems.append(f"not exactly one final event, at the end: {[e.get('event') for e in events]}")
        return
    final, expect = events[-1], case.expect
    if final["event"] == "error":
        check_error(case, lines[-1] + b"\n", Form.JSON, str(final.get("code")))
    elif final["event"] == "jobs" and expect.outcome == "jobs" and len(events) == 1:
        names = {j.get("name") for j in final["jobs"]}
        if not names or not names <= CONFIGURED_JOBS:
            case.problems.append(f"odd job list: {sorted(map(str, names))}")
        case.status, case.answer = 0, "jobs"
    elif final["event"] == "exit" and expect.outcome == "run":
        check_json_run(case, events)
    else:
        case.problems.append(f"a {final['event']} reply, expected {expect.outcome}: {case.reply[:300]!r}")


def check_json_run(case: Case, events: list[dict[str, object]]) -> None:
    expect, final = case.expect, events[-1]
    accepted, outputs = events[0], events[1:-1]
    if accepted.get("event") != "accepted" or accepted.get("run_id") != final.get("run_id"):
        case.problems.append(f"a run without its accepted event: {events[:2]}")
    if final.get("job") != expect.job or accepted.get("detach") is not expect.detach:
        case.problems.append(f"ran {final.get('job')} (detach {accepted.get('detach')}), expected {expect}")
    if any(e.get("event") != "output" for e in outputs) or (expect.detach and outputs):
        case.problems.append(f"unexpected events in a run: {[e.get('event') for e in events]}")
    streams: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    for e in outputs:
        text = e.get("text")
        data = text.encode() if isinstance(text, str) else base64.b64decode(str(e.get("base64")))
        streams[str(e.get("stream"))] += data
    exit_code = final.get("exit_code")
    check_run_result(case, exit_code if isinstance(exit_code, int) else -1, streams, expect.detach)
    if final.get("timed_out") or final.get("cancelled") or final.get("signal") is not None:
        case.problems.append(f"the run did not end normally: {final}")


def check_text_reply(case: Case) -> None:
    reply, expect = case.reply, case.expect
    body, newline, last = reply[:-1].rpartition(b"\n")
    output = body + newline  # everything before the final line
    if last.startswith(b"jobrunner: error: "):
        if output:
            case.problems.append(f"output before a text error line: {reply[:300]!r}")
        code = last[len(b"jobrunner: error: ") :].partition(b":")[0].decode("utf-8", "replace")
        check_error(case, last + b"\n", Form.TEXT, code)
    elif expect.outcome == "jobs":
        names = {line.split(b" ")[0].decode("utf-8", "replace") for line in reply.splitlines()}
        if not names or not names <= CONFIGURED_JOBS:
            case.problems.append(f"odd job list: {reply[:300]!r}")
        case.status, case.answer = 0, "jobs"
    elif expect.outcome == "run" and (match := TEXT_EXIT.fullmatch(last)):
        if match[1].decode() != expect.job:
            case.problems.append(f"ran {match[1]!r}, expected {expect.job}")
        check_run_result(case, int(match[3]), {"stdout": output, "stderr": output}, detach=False)
    else:
        case.problems.append(f"a text reply that is not a {expect.outcome} reply: {reply[:300]!r}")


def check_run_result(case: Case, exit_code: int, streams: dict[str, bytes], detach: bool) -> None:
    expect = case.expect
    if expect.job == "fail":
        wanted_code, stream, output = 3, "stderr", b"failing\n"
    else:  # echo-args: printf '%s\n' ARGS..., one line per argument, verbatim: nothing ran a shell
        wanted_code, stream = 0, "stdout"
        output = b"".join(a.encode() + b"\n" for a in expect.args) or b"\n"
    if exit_code != wanted_code:
        case.problems.append(f"{expect.job} exited with {exit_code}, expected {wanted_code}")
    if not detach and streams[stream] != output:
        case.problems.append(f"{expect.job} printed {streams[stream][:200]!r}, expected {output[:200]!r}")
    case.status, case.answer = exit_code, "exit"


def leftover_processes(root: Path, activators: set[int]) -> list[str]:
    """Processes (other than the activators and us) whose command line or environment names `root`."""
    needle, found = str(root).encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in {*activators, os.getpid()}:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if needle in cmdline or needle in environ:
            found.append(f"{entry.name}: {cmdline.replace(bytes(1), b' ')[:200]!r}")
    return found


def job_statuses(runner: Runner) -> list[str]:
    return runner.statuses.read_text().split() if runner.statuses.exists() else []


def read_statuses(runner: Runner, count: int) -> list[str]:
    """One exit status per connection, `count` of them once they are there: the front door's, or for a
    connection it handed over (it exits 0 then), the status of the job's runner that served it."""

    def statuses(path: Path) -> list[str]:
        return path.read_text().split() if path.exists() else []

    try:
        wait_for(lambda: len(statuses(runner.front_door_statuses)) >= count, 15)
    except AssertionError:
        pass  # reported by the caller, with what there is
    front_door, jobs = statuses(runner.front_door_statuses), statuses(runner.statuses)
    handed_over = min(len(jobs), front_door.count("0"))
    for _ in range(handed_over):
        front_door.remove("0")
    return front_door + jobs


# ------------------------------------------------------------------------------------------ the test


def test_fuzzed_requests_on_the_live_socket(runner: Runner) -> None:
    seed = int(os.environ.get("JOBRUNNER_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    cases = [make_case(rng, i, loris=i < LORIS) for i in range(CASES)]
    client_rngs = [random.Random(rng.random()) for _ in cases]
    started = time.monotonic()

    lorises = [threading.Thread(target=serve, args=(runner, c, client_rngs[c.index])) for c in cases[:LORIS]]
    for thread in lorises:
        thread.start()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for future in [pool.submit(serve, runner, c, client_rngs[c.index]) for c in cases[LORIS:]]:
            future.result()
    for thread in lorises:
        thread.join(REPLY_DEADLINE_S + 30)
    fuzz_s = time.monotonic() - started

    for case in cases:
        check_leaks(case, runner.secret)
        check_reply(case)
    problems = [f"{case.describe()}: {p}" for case in cases for p in case.problems]

    # First every runner gone (a job's runner may exit after its client had the reply), then statuses.
    activators = runner.activator_pids()
    try:
        wait_for(lambda: not leftover_processes(runner.root, activators), 10)
    except AssertionError:
        problems.append(f"processes left behind: {leftover_processes(runner.root, activators)}")
    statuses = read_statuses(runner, len(cases))
    if len(statuses) != len(cases) or not all(s.isdigit() for s in statuses):
        problems.append(f"{len(cases)} connections, runner statuses {Counter(statuses)}")
    else:
        actual = Counter(int(s) for s in statuses)
        determined = Counter(c.status for c in cases if c.status is not None)
        missing = determined - actual
        if missing or actual.total() - determined.total() != sum(c.status is None for c in cases):
            problems.append(
                f"runner exit statuses {dict(actual)} do not match the replies {dict(determined)}"
            )

    before = len(job_statuses(runner))  # every runner has exited by now (no process is left)
    after = runner.request(b"run fail\n", timeout=REPLY_DEADLINE_S)
    if not (after.startswith(b"failing\n") and TEXT_EXIT.fullmatch((after.splitlines() or [b""])[-1])):
        problems.append(f"a normal `run fail` afterwards got {after[:300]!r}")
    else:
        # The client has its reply before the job's runner exits: wait for that runner's status.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: len(job_statuses(runner)) > before, 15)
        if (last := job_statuses(runner)[before:]) != ["3"]:
            problems.append(f"the normal `run fail` afterwards exited with {last}")

    summary = (
        f"seed {seed} (reproduce: JOBRUNNER_FUZZ_SEED={seed}): {len(cases)} cases in {fuzz_s:.1f} s, "
        f"{dict(Counter(c.category for c in cases))}, deliveries {dict(Counter(c.delivery for c in cases))}, "
        f"replies {dict(Counter(c.answer for c in cases))}"
    )
    print(summary)
    shown = "\n".join(problems[:40]) + (f"\n... and {len(problems) - 40} more" if len(problems) > 40 else "")
    assert not problems, f"{summary}\n{len(problems)} problems:\n{shown}"
