"""Adversarial fuzzing of the request path in-process (issue 4, "Bad input"): read_request_line and
parse_request against random, hostile and mutated requests.

What must hold for every input: it parses to a Request that the rest of the runner can trust (a job
name matching [a-z][a-z0-9_-]{0,63}, at most 1024 arguments that are valid str without NUL), or it
raises a RunnerError (never another exception, never a hang) whose message is short and whose
`Reply.error` is one well-formed line in both reply forms.

The hostile corpora below are shared with tests/integration/test_fuzz_socket.py and tests/fuzz/.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import threading
import time
import unicodedata
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from runner.errors import RunnerError
from runner.protocol import Form, NoRequest, Reply, Request, guess_form, parse_request, read_request_line

MAX_BYTES = 64 * 1024  # docs/protocol.md: at most 64 KiB including the newline
MAX_ARGS = 1024
# Our own copy of the documented rule (ASCII only), not runner.config.JOB_NAME_PATTERN: a looser
# pattern in the runner must fail here.
JOB_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}", re.ASCII)
STABLE_CODES = frozenset(
    {"bad-request", "unknown-job", "bad-arguments", "forbidden", "busy", "config", "credential", "internal"}
)
PARSE_CODES = frozenset({"bad-request", "unknown-job", "bad-arguments"})  # what the parser itself may say
MESSAGE_LIMIT = 300  # "a few hundred characters": quoted client input is cut to 80 (protocol._short)
ERROR_FIELDS = frozenset({"event", "code", "message", "hint", "run_id"})
LINE_BREAKING = frozenset({"Cc", "Zl", "Zp"})  # control characters, U+2028, U+2029: none in a final line
READ_DEADLINE_S = 0.5
HANG_MARGIN_S = 2.0  # a read still running this long after its deadline is hung
PARSE_TIME_LIMIT_S = 2.0

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

# ------------------------------------------------------------------------------------- hostile corpora

HOSTILE_NAMES = [
    "",
    "/",
    "..",
    ".",
    "../fail",
    "../../etc/passwd",
    "fail/..",
    "/bin/sh",
    "fail/",
    "fail ",
    " fail",
    "fa il",
    "fail\n",
    "fail\r",
    "fail\t",
    "fail\x00",
    "FAIL",
    "Fail",
    "-fail",
    "--",
    "0fail",
    "_fail",
    "fail.toml",
    "fail;id",
    "fail&&id",
    "$(id)",
    "`id`",
    "*",
    "~",
    "%2e%2e",
    "..%2f",
    "..\\fail",
    "f\u0430il",  # Cyrillic a
    "\u0435cho-args",  # Cyrillic ie
    "fa\u0456l",  # Ukrainian i
    "fa\u0131l",  # dotless i
    "\u03bfops",  # Greek omicron
    "\uff46\uff41\uff49\uff4c",  # fullwidth "fail"
    "\u212aill",  # KELVIN SIGN, which re.IGNORECASE would fold to "k"
    "\u017fleep",  # LONG S, which re.IGNORECASE would fold to "s"
    "fai\u0301l",  # combining acute accent
    "fail\u200b",  # zero-width space
    "fail\u202e",  # right-to-left override
    "fail\u2028",  # line separator
    "fail\x1b[31m",
    "f\u0663il",  # Arabic-Indic digit three (\d would match it)
    "a" * 64,  # the longest valid name
    "a" * 65,
    "x" * 5000,
]

LOOKALIKES = {
    "a": "\u0430\u0251\u03b1\uff41",
    "c": "\u0441\u03f2\uff43",
    "e": "\u0435\u03b5\uff45",
    "f": "\uff46",
    "g": "\u0261\uff47",
    "h": "\u04bb\uff48",
    "i": "\u0456\u0131\u0269\uff49",
    "k": "\u212a\u03ba\u043a\uff4b",
    "l": "\u04cf\u217c\uff4c",
    "o": "\u043e\u03bf\uff4f",
    "p": "\u0440\u03c1\uff50",
    "r": "\u0433\uff52",
    "s": "\u0455\ua731\u017f\uff53",
    "-": "\u2010\u2011\u2013\u2014\u2212\uff0d",
    "_": "\uff3f",
}

HOSTILE_ARGS = [
    "",
    " ",
    "--",
    "-",
    "--help",
    "-rf",
    "$(id)",
    "`id`",
    "; rm -rf /",
    "| cat /etc/passwd",
    "&& reboot",
    "> /tmp/x",
    "< /etc/shadow",
    "*",
    "?",
    "[a]",
    "~",
    "${HOME}",
    "$HOME",
    "'",
    '"',
    "\\",
    "#",
    "\n",
    "\r\n",
    "a\nb",
    "\t",
    "%s%n",
    "\\x41",
    "\x1b[31m",
    "\u202e",
    "\u2028",
    "\ufeff",
    "\U0001f642",
    "\ud800",  # a lone surrogate: no character, cannot reach argv as UTF-8
    "\x00",
    "a\x00b",
    "x" * 5000,
]

UNKNOWN_OPS = [
    "RUN",
    "Run",
    "run ",
    " run",
    "lis",
    "list ",
    "exec",
    "delete",
    "",
    "run\x00",
    "\uff52\uff55\uff4e",
]

INTERESTING_BYTES = [
    b"\x00",
    b"\n",
    b"\r",
    b"\r\n",
    b" ",
    b"\t",
    b"\x0b",
    b"'",
    b'"',
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xc0\x80",  # overlong NUL
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xe2\x82",  # a truncated sequence
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\\u0000",
    b"\\ud800",
]


def lookalike(name: str, position: int, choice: int) -> str:
    """`name` with one character swapped for a look-alike (or unchanged if none)."""
    candidates = [i for i, c in enumerate(name) if c in LOOKALIKES]
    if not candidates:
        return name
    i = candidates[position % len(candidates)]
    options = LOOKALIKES[name[i]]
    return name[:i] + options[choice % len(options)] + name[i + 1 :]


def mutate(data: bytes, operations: list[tuple[str, int, int]]) -> bytes:
    """Apply (kind, a, b) mutations: bit flips, truncation, duplication, insertion, deletion."""
    out = bytearray(data)
    for kind, a, b in operations:
        n = len(out)
        if kind == "flip" and n:
            out[a % n] ^= 1 << (b % 8)
        elif kind == "truncate":
            del out[a % (n + 1) :]
        elif kind == "duplicate" and n:
            start = a % n
            out[start:start] = out[start : start + 1 + b % (n - start)]
        elif kind == "insert":
            out[a % (n + 1) : a % (n + 1)] = INTERESTING_BYTES[b % len(INTERESTING_BYTES)]
        elif kind == "delete" and n:
            start = a % n
            del out[start : start + 1 + b % 8]
        elif kind == "repeat":
            out = out * (2 + b % 3)
    return bytes(out)


MUTATIONS = ("flip", "truncate", "duplicate", "insert", "delete", "repeat")

# ------------------------------------------------------------------------------------------ properties


def check_request(request: object, line: bytes) -> None:
    """A Request the rest of the runner may trust."""
    assert isinstance(request, Request), request
    assert request.form is guess_form(line), (request, line[:200])
    assert request.op in ("run", "list"), request
    assert type(request.detach) is bool, request
    assert isinstance(request.args, tuple), request
    if request.op == "list":
        assert request == Request(request.form, "list"), request
        return
    assert isinstance(request.job, str) and JOB_NAME.fullmatch(request.job), request.job
    assert len(request.args) <= MAX_ARGS, len(request.args)
    for arg in request.args:
        assert isinstance(arg, str), arg
        assert "\0" not in arg, f"a NUL character in argument {arg[:80]!r} (from {line[:200]!r})"
        arg.encode("utf-8")  # UnicodeEncodeError: a lone surrogate reached the job's argv
    if request.form is Form.TEXT:
        assert request.detach is False, request


def check_error_line(data: bytes, form: Form, code: str) -> None:
    """One well-formed final line: a JSON error event, or `jobrunner: error: CODE: ...`."""
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data[:300]
    assert b"\r" not in data, data[:300]
    body = data[:-1].decode("utf-8")  # strict: never invalid UTF-8 on the wire
    breaking = [c for c in body if unicodedata.category(c) in LINE_BREAKING]
    assert not breaking, f"control or line-breaking characters {breaking[:5]!r} in {body[:300]!r}"
    if form is Form.JSON:
        event = json.loads(body)
        assert isinstance(event, dict) and set(event) <= ERROR_FIELDS, event
        assert event["event"] == "error" and event["code"] == code, event
        assert isinstance(event["message"], str) and event["message"], event
        assert isinstance(event["hint"], str), event
    else:
        assert body.startswith(f"jobrunner: error: {code}: "), body[:300]


def check_error(error: RunnerError, line: bytes = b"") -> None:
    """A parse error: a stable code, a short message, one good line in either reply form."""
    assert error.code in PARSE_CODES, (error.code, error.message)
    assert error.exit_status != 0
    assert isinstance(error.message, str) and error.message, error
    assert len(error.message) <= MESSAGE_LIMIT, (
        f"{len(error.message)}-character message for {line[:120]!r}: {error.message[:400]!r}"
    )
    assert len(error.hint) <= MESSAGE_LIMIT, error.hint[:400]
    for form in Form:
        check_error_line(Reply(form).error(error.code, error.message, error.hint), form, error.code)


def parse_outcome(line: bytes) -> Request | RunnerError:
    """parse_request's answer, checked against every property; any other exception propagates."""
    started = time.monotonic()
    try:
        outcome: Request | RunnerError = parse_request(line)
    except RunnerError as e:
        outcome = e
    elapsed = time.monotonic() - started
    assert elapsed < PARSE_TIME_LIMIT_S, f"parse_request took {elapsed:.2f} s on {line[:120]!r}"
    if isinstance(outcome, RunnerError):
        check_error(outcome, line)
    else:
        check_request(outcome, line)
    return outcome


# ------------------------------------------------------------------------------------------ strategies

valid_names = st.from_regex(JOB_NAME, fullmatch=True)
lookalike_names = st.builds(
    lookalike,
    st.sampled_from(["fail", "echo-args", "list", "hello", "slow-queue", "big"]) | valid_names,
    st.integers(0, 63),
    st.integers(0, 7),
)
hostile_names = st.sampled_from(HOSTILE_NAMES) | lookalike_names | st.text(max_size=70)
names = valid_names | hostile_names
good_arg_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
args_items = st.sampled_from(HOSTILE_ARGS) | st.text(max_size=40) | good_arg_text
arg_lists = st.lists(args_items, max_size=8) | st.integers(1020, 1030).map(lambda n: ["a"] * n)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
unknown_keys = (
    st.text(max_size=10) | st.text(min_size=80, max_size=120) | st.sampled_from(["Op", "job ", "argv", "env"])
).filter(lambda k: k not in ("op", "job", "args", "detach"))


@st.composite
def json_objects(draw: st.DrawFn) -> object:
    """A JSON request, each field absent, right, hostile or of a wrong type; sometimes not an object."""
    if draw(st.integers(0, 19)) == 0:
        return draw(json_values)
    obj: dict[str, object] = {}
    if draw(st.integers(0, 9)):
        obj["op"] = draw(
            st.sampled_from(["run", "run", "run", "list"]) | st.sampled_from(UNKNOWN_OPS) | json_values
        )
    if draw(st.integers(0, 9)):
        obj["job"] = draw(names | json_values)
    if draw(st.booleans()):
        obj["args"] = draw(arg_lists | json_values | st.lists(args_items | json_scalars, max_size=4))
    if draw(st.booleans()):
        obj["detach"] = draw(st.booleans() | json_values)
    if draw(st.integers(0, 5)) == 0:
        obj.update(draw(st.dictionaries(unknown_keys, json_values, min_size=1, max_size=2)))
    return obj


def encode_json(obj: object, ascii_only: bool, pad: str) -> bytes:
    # surrogatepass: a lone surrogate written raw is invalid UTF-8, which the runner must refuse.
    return (pad + json.dumps(obj, ensure_ascii=ascii_only)).encode("utf-8", "surrogatepass")


json_lines = st.builds(encode_json, json_objects(), st.booleans(), st.sampled_from(["", " ", "\t ", "\x0b"]))
text_words = st.builds(
    lambda op, name, args, cut: [op, name, *args][:cut],
    st.sampled_from(["run", "run", "run", "list"]) | st.sampled_from(UNKNOWN_OPS) | st.text(max_size=8),
    names,
    arg_lists,
    st.integers(0, 2000),
)
text_lines = st.builds(
    lambda words, quote: (shlex.join(words) if quote else " ".join(words)).encode("utf-8", "surrogatepass"),
    text_words,
    st.booleans(),
)
valid_requests = (
    st.builds(
        lambda job, args: json.dumps({"op": "run", "job": job, "args": args}).encode(),
        st.sampled_from(["fail", "echo-args"]) | valid_names,
        st.lists(good_arg_text, max_size=4),
    )
    | st.builds(
        lambda job, args: f"run {shlex.join([job, *args])}".encode(),
        st.sampled_from(["fail", "echo-args"]) | valid_names,
        st.lists(good_arg_text, max_size=4),
    )
    | st.sampled_from([b'{"op": "list"}', b"list", b'{"op":"run","job":"fail","detach":true}'])
)
mutated_requests = st.builds(
    mutate,
    valid_requests,
    st.lists(
        st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 1 << 16), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
)


@st.composite
def nested_json(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(1, 3000) | st.sampled_from([990, 1000, 1010, 20_000, 60_000]))
    shape = draw(st.sampled_from(["list", "dict", "op", "job", "args", "unclosed"]))
    if shape == "list":
        return b"[" * depth + b"]" * depth
    if shape == "dict":
        return b'{"a":' * depth + b"1" + b"}" * depth
    if shape == "unclosed":
        return b"[" * depth
    inner = b"[" * depth + b'"x"' + b"]" * depth
    return b'{"op": "run", "job": "fail", "' + shape.encode() + b'": ' + inner + b"}"


@st.composite
def huge_lines(draw: st.DrawFn) -> bytes:
    size = draw(st.integers(MAX_BYTES - 4, MAX_BYTES + 4) | st.integers(1, 3 * MAX_BYTES))
    filler = draw(st.sampled_from([b"a", b"a ", b" ", b"\x00", b"\xff", b"{", b"[", b"\r", b"'", b"\\"]))
    prefix = draw(st.sampled_from([b"", b"run echo-args ", b'{"op": "run", "job": "echo-args", "args": ["']))
    data = bytearray((prefix + filler * size)[: max(size, len(prefix))])
    if draw(st.booleans()):
        at = draw(
            st.sampled_from([MAX_BYTES - 2, MAX_BYTES - 1, MAX_BYTES, MAX_BYTES + 1]) | st.integers(0, size)
        )
        data[min(at, len(data) - 1)] = ord("\n")
    return bytes(data)


small_requests = (
    st.binary(max_size=300)
    | json_lines
    | text_lines
    | mutated_requests
    | st.builds(
        lambda b, c: b.replace(b"\n", b"") + c, st.binary(max_size=100), st.sampled_from(INTERESTING_BYTES)
    )
)
any_requests = small_requests | nested_json()

# ------------------------------------------------------------------------------------------ parse_request


@FUZZ
@given(any_requests)
@example(b"\xff\xfe")
@example(b"run fail \x00")
@example(b'{"op": "run", "job": "echo-args", "args": ["a\\u0000b"]}')
@example(b'{"op": "run", "job": "echo-args", "args": ["\\ud800"]}')
@example(b'{"op": 1' + b"0" * 5000 + b"}")
@example(b'{"op": "run", "' + "\U000e0001".encode() * 100 + b'": 1}')
def test_any_input_parses_to_a_trustworthy_request_or_a_clean_error(line: bytes) -> None:
    parse_outcome(line)


@FUZZ
@given(huge_lines())
def test_huge_lines_parse_or_fail_cleanly(line: bytes) -> None:
    parse_outcome(line)


def expected_json(obj: object) -> Request | set[str]:
    """Our model of docs/protocol.md for a decoded JSON request: the Request, or the codes that may be
    given (the runner may report any one of the rules a request breaks)."""
    if not isinstance(obj, dict):
        return {"bad-request"}
    codes = {"bad-request"} if set(obj) - {"op", "job", "args", "detach"} else set()
    op = obj.get("op")
    if op == "list" and isinstance(op, str):
        return codes or Request(Form.JSON, "list")
    if op != "run" or not isinstance(op, str):
        return codes | {"bad-request"}
    job, args, detach = obj.get("job"), obj.get("args", []), obj.get("detach", False)
    codes |= run_violations(job, args, detach)
    if codes:
        return codes
    assert isinstance(job, str) and isinstance(args, list) and isinstance(detach, bool)
    return Request(Form.JSON, "run", job, tuple(args), detach)


def run_violations(job: object, args: object, detach: object) -> set[str]:
    """The codes for each rule a JSON `run` request's fields break."""
    codes = set()
    if not isinstance(job, str) or not isinstance(detach, bool) or not is_unicode(job):
        codes.add("bad-request")
    if isinstance(job, str) and not JOB_NAME.fullmatch(job):
        codes.add("unknown-job")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        codes.add("bad-request")
    if isinstance(args, list):
        if len(args) > MAX_ARGS:
            codes.add("bad-arguments")
        if any(isinstance(a, str) and "\0" in a for a in args):
            codes |= {"bad-request", "bad-arguments"}  # either is right: a NUL cannot reach argv
        if any(isinstance(a, str) and not is_unicode(a) for a in args):
            codes.add("bad-request")
    return codes


def expected_text(words: list[str]) -> Request | set[str]:
    """Our model for a text request made with shlex.join(words)."""
    if not all(is_unicode(w) for w in words) or any("\0" in w for w in words):
        return {"bad-request"}
    if words == ["list"]:
        return Request(Form.TEXT, "list")
    if not words or words[0] != "run" or len(words) < 2:
        return {"bad-request"}
    name, args = words[1], words[2:]
    codes = set()
    if not JOB_NAME.fullmatch(name):
        codes.add("unknown-job")
    if len(args) > MAX_ARGS:
        codes.add("bad-arguments")
    return codes or Request(Form.TEXT, "run", name, tuple(args), False)


def is_unicode(text: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


VALID_HOSTILE_ARGS = [a for a in HOSTILE_ARGS if is_unicode(a) and "\0" not in a]


def check_against_model(line: bytes, expected: Request | set[str]) -> None:
    outcome = parse_outcome(line)
    if isinstance(expected, Request):
        assert outcome == expected, f"{line[:200]!r}: expected {expected}, got {outcome!r}"
    else:
        assert isinstance(outcome, RunnerError), (
            f"{line[:200]!r} was accepted as {outcome}: expected {expected}"
        )
        assert outcome.code in expected, (
            f"{line[:200]!r}: {outcome.code} ({outcome.message}), expected {expected}"
        )


@FUZZ
@given(json_objects(), st.booleans())
@example({"op": "run", "job": "echo-args", "args": ["a\x00b"]}, True)
@example({"op": "run", "job": "fail", "args": "abc"}, True)
@example({"op": "run", "job": "fail", "detach": 0}, True)
@example({"op": "list", "job": 5}, True)
@example({"op": "list", "job": "fail", "x": 1}, True)
def test_json_requests_follow_the_documented_rules(obj: object, ascii_only: bool) -> None:
    line = encode_json(obj, ascii_only, "")
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        check_against_model(line, {"bad-request"})
        return
    check_against_model(line, expected_json(obj))


@FUZZ
@given(text_words)
@example(["run", "echo-args", "$(id)", "--", "; rm -rf /", "a\nb"])
@example(["run", "f\u0430il"])
@example(["run", "fail", "\x00"])
@example(["run"])
@example([])
def test_text_requests_follow_the_documented_rules(words: list[str]) -> None:
    check_against_model(shlex.join(words).encode("utf-8", "surrogatepass"), expected_text(words))


@FUZZ
@given(
    valid_names,
    st.lists(good_arg_text, max_size=10),
    st.sampled_from([None, False, True]),
    st.booleans(),
    st.sampled_from(["", " ", "\t"]),
)
def test_a_valid_json_request_round_trips(
    job: str, args: list[str], detach: bool | None, ascii_only: bool, pad: str
) -> None:
    obj: dict[str, object] = {"job": job, "op": "run", "args": args}
    if detach is not None:
        obj["detach"] = detach
    assert parse_request(encode_json(obj, ascii_only, pad)) == Request(
        Form.JSON, "run", job, tuple(args), bool(detach)
    )


@FUZZ
@given(valid_names, st.lists(good_arg_text | st.sampled_from(VALID_HOSTILE_ARGS), max_size=10))
def test_a_valid_text_request_round_trips(job: str, args: list[str]) -> None:
    line = shlex.join(["run", job, *args]).encode()
    assert parse_request(line) == Request(Form.TEXT, "run", job, tuple(args), False)


@pytest.mark.parametrize(
    "line",
    [
        json.dumps({"op": "run", "job": "echo-args", "args": ["a"] * 100_000}).encode(),
        ("run echo-args " + " ".join(["a"] * 100_000)).encode(),
        ("run echo-args " + " ".join(["';'"] * 100_000)).encode(),
        json.dumps({"op": "run", "job": "echo-args", "args": [""] * (MAX_ARGS + 1)}).encode(),
    ],
    ids=["json-100000", "text-100000", "text-100000-quoted", "json-1025"],
)
def test_too_many_arguments_are_refused(line: bytes) -> None:
    outcome = parse_outcome(line)
    assert isinstance(outcome, RunnerError) and outcome.code == "bad-arguments", outcome


QUOTED = ["x", "\x00", "\x1b", "\U000e0001", "e\u0301"]


@pytest.mark.parametrize("char", QUOTED, ids=[f"U+{ord(c[0]):04X}" for c in QUOTED])
@pytest.mark.parametrize(
    "make",
    [
        lambda s: json.dumps({"op": "run", "job": s}),
        lambda s: json.dumps({"op": s}),
        lambda s: json.dumps({"op": "run", "job": "fail", s: 1}),
        lambda s: json.dumps({"op": "run", "job": "echo-args", "args": ["a"] * 2000, s: 1}),
        lambda s: f"run {shlex.quote(s)}",
        lambda s: f"{shlex.quote(s)} fail",
    ],
    ids=["json-job", "json-op", "json-unknown-field", "json-unknown-field-many-args", "text-job", "text-op"],
)
def test_error_messages_stay_short_whatever_is_quoted(make: Callable[[str], str], char: str) -> None:
    # A long run of characters that repr() may write as up to 10 characters each (\U000e0001).
    line = make(char * 3000).encode()
    outcome = parse_outcome(line)  # checks the message length
    assert isinstance(outcome, RunnerError)


@pytest.mark.parametrize("depth", [1, 100, 999, 1000, 1001, 5000, 30_000])
@pytest.mark.parametrize("where", ["top", "op", "job", "args", "detach", "unknown"])
def test_deeply_nested_json_is_a_clean_error(depth: int, where: str) -> None:
    nested = "[" * depth + "1" + "]" * depth
    line = nested if where == "top" else f'{{"op": "run", "job": "fail", "{where}": {nested}}}'
    outcome = parse_outcome(line.encode())
    assert isinstance(outcome, RunnerError) and outcome.code == "bad-request", outcome


# ------------------------------------------------------------------------------------- read_request_line


def expected_read(sent: bytes, closed: bool) -> bytes | type[NoRequest] | None:
    """Our model of the request line read from `sent` (None: RequestError; NoRequest: nothing sent)."""
    if not sent and closed:
        return NoRequest
    if b"\n" in sent[:MAX_BYTES]:
        line = sent.partition(b"\n")[0]
    elif len(sent) > MAX_BYTES or not closed:
        return None  # too long, or never terminated: the deadline
    else:
        line = sent
    return line.removesuffix(b"\r") if line.strip() else None


def feed(
    sock: socket.socket, payload: bytes, sizes: list[int], pause_s: float, ending: str
) -> threading.Thread:
    """Send `payload` from a thread, in chunks of the given sizes (cycled), then end as asked."""
    step_floor = max(1, len(payload) // 300)  # keep a 64 KiB payload to a few hundred sends

    def run() -> None:
        try:
            position, k = 0, 0
            while position < len(payload):
                size = max(sizes[k % len(sizes)], step_floor)
                sock.sendall(payload[position : position + size])
                position, k = position + size, k + 1
                if pause_s:
                    time.sleep(pause_s)
            if ending == "half-close":
                sock.shutdown(socket.SHUT_WR)
            elif ending == "close":
                sock.close()
        except OSError:
            pass  # the reader gave up (too long) and closed its end

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def read_over_socketpair(
    payload: bytes, sizes: list[int], pause_s: float, ending: str, deadline_s: float
) -> tuple[bytes | RunnerError | NoRequest, bytes, float]:
    """read_request_line on the server end of a socketpair while a thread feeds the client end. A read
    that has not returned well after its deadline fails the test instead of hanging it."""
    server, client = socket.socketpair()
    data = bytearray()
    outcome: list[bytes | BaseException] = []

    def read() -> None:
        try:
            outcome.append(read_request_line(server, data, deadline_s=deadline_s))
        except BaseException as e:  # handed to the test's thread below
            outcome.append(e)

    sender = feed(client, payload, sizes, pause_s, ending)
    reader = threading.Thread(target=read, daemon=True)
    started = time.monotonic()
    reader.start()
    reader.join(deadline_s + HANG_MARGIN_S)
    elapsed = time.monotonic() - started
    hung = reader.is_alive()
    if hung:
        server.shutdown(socket.SHUT_RDWR)  # wakes a recv() that would block forever
        reader.join(5)
    server.close()  # unblocks a sender still pushing a huge payload
    sender.join(10)
    client.close()
    assert not hung, f"read_request_line had not returned {elapsed:.1f} s into a {deadline_s} s deadline"
    assert not sender.is_alive(), "the sender never finished"
    result = outcome[0]
    if isinstance(result, BaseException) and not isinstance(result, RunnerError | NoRequest):
        raise result  # any other exception is a failure of its own
    return result, bytes(data), elapsed


@FUZZ
@given(
    small_requests | huge_lines(),
    st.lists(st.integers(1, 70_000) | st.integers(1, 8), min_size=1, max_size=6),
    st.sampled_from([0.0, 0.0, 0.0, 0.0005]),
    st.sampled_from(["newline", "crlf", "half-close", "close"]),
)
@example(b"list", [1], 0.0, "half-close")
@example(b"a" * (MAX_BYTES - 1), [4096], 0.0, "newline")
@example(b"a" * MAX_BYTES, [4096], 0.0, "newline")
@example(b"a" * MAX_BYTES, [4096], 0.0, "close")
@example(b"a" * (MAX_BYTES + 1), [MAX_BYTES + 1], 0.0, "close")
@example(b"\r", [1], 0.0, "newline")
@example(b"", [1], 0.0, "close")
def test_read_request_line_returns_the_first_line_or_a_clean_error(
    payload: bytes, sizes: list[int], pause_s: float, ending: str
) -> None:
    sent = payload + {"newline": b"\n", "crlf": b"\r\n"}.get(ending, b"")
    result, received, elapsed = read_over_socketpair(sent, sizes, pause_s, ending, READ_DEADLINE_S)
    expected = expected_read(sent, closed=ending in ("half-close", "close"))
    context = f"{len(sent)} bytes {sent[:80]!r}..., chunks {sizes}, {ending}: got {result!r:.200}"
    if expected is None:
        assert isinstance(result, RunnerError), context
        assert result.code == "bad-request", context
        check_error(result, sent)
    elif expected is NoRequest:
        assert isinstance(result, NoRequest), context
    else:
        assert result == expected, context
        parse_outcome(expected)
    assert sent.startswith(received), context  # `data` holds what arrived, nothing else
    assert len(received) <= MAX_BYTES + 1, context  # never reads more than the limit allows
    assert elapsed < READ_DEADLINE_S + 1.0, f"{elapsed:.2f} s: {context}"


@settings(
    FUZZ, max_examples=12, phases=[Phase.explicit, Phase.generate]
)  # each example takes 0.25 s: no shrinking
@given(
    st.binary(max_size=2000).map(lambda b: b.replace(b"\n", b"")),
    st.lists(st.integers(1, 64), min_size=1, max_size=4),
    st.sampled_from([0.0, 0.002, 0.05]),
)
def test_an_unterminated_request_on_an_open_connection_ends_at_the_deadline(
    payload: bytes, sizes: list[int], pause_s: float
) -> None:
    # A slow-loris dribbling bytes faster than any per-recv timeout: the deadline is for the whole line.
    deadline_s = 0.25
    trickle = payload + b"x" * (0 if pause_s == 0 else 400)
    result, _, elapsed = read_over_socketpair(trickle, sizes, pause_s, "open", deadline_s)
    assert isinstance(result, RunnerError) and result.code == "bad-request", result
    check_error(result, payload)
    assert deadline_s - 0.05 <= elapsed < deadline_s + 0.5, elapsed
