"""The wire protocol (docs/protocol.md): reading and parsing the request line, framing the reply.

A request is one line, text (`run NAME ARGS...`, `list`) or JSON. The reply's format follows the
request's: raw output plus one final `jobrunner:` line, or JSON Lines events.
"""

from __future__ import annotations

import _socket
import binascii
import enum
import shlex
import time

from runner.config import JOB_NAME
from runner.errors import ArgumentsError, RequestError, UnknownJobError, quoted
from runner.value import Value

MAX_REQUEST_BYTES = 64 * 1024
REQUEST_DEADLINE_S = 10.0
MAX_ARGUMENTS = 1024
JSON_FIELDS = frozenset({"op", "job", "args", "detach"})
# Requests about runs rather than for one, answered by the front door from the run logs: runner.history
# parses and serves them (imported only for them).
HISTORY_OPS = frozenset({"history", "logs", "status"})


class Form(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


class Request(Value):
    __slots__ = ("args", "detach", "follow", "form", "job", "limit", "op", "run_id")

    def __init__(
        self,
        form: Form,
        op: str,
        job: str = "",
        args: tuple[str, ...] = (),
        detach: bool = False,
        *,
        limit: int = 0,
        run_id: str = "",
        follow: bool = False,
    ) -> None:
        self.form = form
        self.op = op  # "run" or "list", or one of HISTORY_OPS
        self.job = job  # for `history`: "" for every job the caller may see
        self.args = args
        self.detach = detach
        self.limit = limit  # `history`: how many runs at most
        self.run_id = run_id  # `logs`
        self.follow = follow  # `logs`: until the run ends


class NoRequest(Exception):
    """The client closed the connection before sending a single byte: it asked nothing, and nothing is
    answered. A probe does that, and so does jobctl, which connects before it knows its request (to let
    the runner start meanwhile, trigger/preconnect.py) and may then have none (--help, a usage error)."""


def read_request_line(
    conn: _socket.socket,
    data: bytearray,
    deadline_s: float = REQUEST_DEADLINE_S,
    started: float | None = None,
) -> bytes:
    """Read up to the first newline, within the deadline and the size limit; raise RequestError otherwise,
    and NoRequest when the connection ends before its first byte.

    `data` collects what arrived (and may hold what arrived before: runner.handoff's first read), so that
    a caller can still tell a JSON client from a text one when the request fails to arrive whole.
    `started`: when the deadline began (time.monotonic()), if before this call.
    """
    give_up_at = (time.monotonic() if started is None else started) + deadline_s
    while b"\n" not in data:
        remaining = give_up_at - time.monotonic()
        if remaining <= 0:
            raise deadline_error(deadline_s)
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(MAX_REQUEST_BYTES + 1 - len(data))
        except TimeoutError:
            continue
        except ConnectionError:
            raise closed_early_error() from None
        if not chunk:
            if not data:
                raise NoRequest
            break  # the client half-closed: what it sent is the request, newline or not
        data += chunk
        if len(data) > MAX_REQUEST_BYTES and b"\n" not in data[:MAX_REQUEST_BYTES]:
            raise RequestError(f"request line longer than {MAX_REQUEST_BYTES} bytes", "")
    line, _, _ = bytes(data).partition(b"\n")
    if not line.strip():
        raise RequestError("empty request", "send 'list' or 'run NAME [ARG ...]'")
    return line.removesuffix(b"\r")


def deadline_error(deadline_s: float = REQUEST_DEADLINE_S) -> RequestError:
    return RequestError(
        f"no complete request line within {deadline_s:g} s", "send one line, ending in a newline"
    )


def closed_early_error() -> RequestError:
    return RequestError("the client closed the connection before sending a request", "")


def guess_form(data: bytes) -> Form:
    """The reply format for a request (even one that failed to arrive whole)."""
    return Form.JSON if data.lstrip()[:1] in (b"{", b"[") else Form.TEXT


def parse_request(line: bytes) -> Request:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("request is not valid UTF-8", "") from None
    if "\0" in text:
        raise RequestError("request contains a NUL character", "")
    if guess_form(line) is Form.JSON:
        return _parse_json(text)
    return _parse_text(text)


def _parse_text(text: str) -> Request:
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise RequestError(f"cannot split request: {e}", "quote arguments like a shell would") from None
    if not words:
        raise RequestError("empty request", "send 'list' or 'run NAME [ARG ...]'")
    op, *rest = words
    if op in HISTORY_OPS:
        from runner import history

        return history.parse_text(op, rest)
    if op == "list" and not rest:
        return Request(Form.TEXT, "list")
    if op == "run" and rest:
        return _run_request(Form.TEXT, rest[0], rest[1:], detach=False)
    if op == "run":
        raise RequestError("'run' needs a job name", "send 'run NAME [ARG ...]'")
    raise RequestError(f"unknown request {quoted(op)}", "send 'list' or 'run NAME [ARG ...]'")


def _parse_json(text: str) -> Request:
    import json  # JSON clients only: a text request (`socat`) does without it (~1 ms)

    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"malformed JSON request: {_short(str(e))}", "") from None
    if not isinstance(obj, dict):
        raise RequestError("a JSON request must be an object", '{"op": "run", "job": "NAME", "args": []}')
    if isinstance(obj.get("op"), str) and obj["op"] in HISTORY_OPS:
        from runner import history

        return history.parse_json(obj)
    unknown = set(obj) - JSON_FIELDS
    if unknown:
        raise RequestError(
            f"unknown field {quoted(str(sorted(unknown)[0]))}", f"fields: {', '.join(sorted(JSON_FIELDS))}"
        )
    op = obj.get("op")
    if op == "list":
        return Request(Form.JSON, "list")
    if op != "run":
        raise RequestError(f"unknown op {quoted(str(op))}", 'use "run" or "list"')
    job, args, detach = obj.get("job"), obj.get("args", []), obj.get("detach", False)
    if not isinstance(job, str):
        raise RequestError('"job" must be a string', "")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise RequestError('"args" must be a list of strings', "")
    if not isinstance(detach, bool):
        raise RequestError('"detach" must be true or false', "")
    if not all(_is_unicode(s) for s in (job, *args)):
        raise RequestError("request contains an invalid \\u escape (a lone surrogate)", "send UTF-8 text")
    return _run_request(Form.JSON, job, args, detach=detach)


def _run_request(form: Form, job: str, args: list[str], *, detach: bool) -> Request:
    if not JOB_NAME.fullmatch(job):
        raise UnknownJobError(
            f"no job named {quoted(job)}", f"job names match {JOB_NAME.pattern}; try 'list'"
        )
    if len(args) > MAX_ARGUMENTS:
        raise ArgumentsError(f"too many arguments ({len(args)}; at most {MAX_ARGUMENTS})", "")
    if any("\0" in arg for arg in args):  # a JSON "\u0000" escape: argv cannot carry it
        raise ArgumentsError("an argument contains a NUL character", "")
    return Request(form, "run", job, tuple(args), detach)


def _is_unicode(text: str) -> bool:
    # json accepts "\ud800" escapes, which are no characters: they cannot reach argv as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(text: str, limit: int = 80) -> str:
    # Error messages quote the client's input: keep them short so a huge request is not echoed back
    # whole. Shorten the repr(), not the text before it: escapes can make a repr ten times longer.
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------------------------- replies


class ExitReport(Value):
    """The final `exit` event's fields (docs/protocol.md), in the event's order."""

    __slots__ = (
        "cancelled",
        "duration_s",
        "exit_code",
        "job",
        "log",
        "output_dir",
        "run_id",
        "signal",
        "timed_out",
        "warnings",
    )

    def __init__(  # noqa: PLR0917 - the event's fields, as keywords everywhere it is built
        self,
        job: str,
        run_id: str,
        exit_code: int,
        signal: int | None,
        timed_out: bool,
        cancelled: bool,
        duration_s: float,
        log: str,
        output_dir: str,
        warnings: tuple[str, ...] = (),  # e.g. the run log could not be written whole
    ) -> None:
        self.job = job
        self.run_id = run_id
        self.exit_code = exit_code
        self.signal = signal
        self.timed_out = timed_out
        self.cancelled = cancelled
        self.duration_s = duration_s
        self.log = log
        self.output_dir = output_dir
        self.warnings = warnings


class Reply:
    """Frames events for one request form. Every method returns the bytes to send."""

    def __init__(self, form: Form) -> None:
        self.form = form
        self._needs_newline = False  # text form: did the last output byte miss its newline?

    def accepted(self, job: str, run_id: str, output_dir: str, log: str, detach: bool) -> bytes:
        if self.form is Form.TEXT:
            return b""
        return _event(event="accepted", job=job, run_id=run_id, output_dir=output_dir, log=log, detach=detach)

    def output(self, stream: str, data: bytes) -> bytes:
        if self.form is Form.TEXT:
            self._needs_newline = not data.endswith(b"\n")
            return data
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            # base64.b64encode() is this call; the base64 module (and struct) would be one more import.
            encoded = binascii.b2a_base64(data, newline=False).decode("ascii")
            return _event(event="output", stream=stream, base64=encoded)
        if len(data.translate(None, RARE_ESCAPES)) == len(data):
            return _text_output_event(stream, data)
        return _event(event="output", stream=stream, text=text)

    def exit(self, report: ExitReport) -> bytes:
        if self.form is Form.TEXT:
            warnings = "".join(f"jobrunner: warning: {w}\n" for w in report.warnings)
            return self._final_line(
                f"{warnings}jobrunner: {report.job} (run {report.run_id}) exited with {report.exit_code} "
                f"after {report.duration_s:.1f} s"
            )
        fields = {"event": "exit", **report.fields()}
        fields["duration_s"] = round(report.duration_s, 3)
        fields["warnings"] = list(report.warnings)
        return _event(**fields)

    def error(self, code: str, message: str, hint: str, run_id: str | None = None) -> bytes:
        if self.form is Form.TEXT:
            return self._final_line(
                f"jobrunner: error: {code}: {message}" + (f" (hint: {hint})" if hint else "")
            )
        extra = {"run_id": run_id} if run_id else {}
        return _event(event="error", code=code, message=message, hint=hint, **extra)

    def jobs(self, jobs: list[dict[str, object]]) -> bytes:
        if self.form is Form.JSON:
            return _event(event="jobs", jobs=jobs)
        width = max((len(str(j["name"])) for j in jobs), default=0)
        lines = [f"{j['name']!s:<{width}}  {j['description']}".rstrip() for j in jobs]
        return "".join(line + "\n" for line in lines).encode()

    def _final_line(self, line: str) -> bytes:
        prefix = "\n" if self._needs_newline else ""
        return f"{prefix}{line}\n".encode()


# The characters JSON escapes that ordinary output hardly ever holds: controls other than \n, \r, \t.
RARE_ESCAPES = bytes(c for c in range(0x20) if c not in b"\n\r\t")
COMMON_ESCAPES = ((b"\\", b"\\\\"), (b'"', b'\\"'), (b"\n", b"\\n"), (b"\r", b"\\r"), (b"\t", b"\\t"))


def _text_output_event(stream: str, data: bytes) -> bytes:
    """`_event(event="output", stream=stream, text=data.decode())`, byte for byte, for valid UTF-8 without
    RARE_ESCAPES. The JSON form's cost per byte is this event: json.dumps() walks the text character by
    character (~400 MB/s), where bytes.replace() runs at memory speed; so the few escapes that output
    does contain are done on the bytes, and `stream` ("stdout" or "stderr") needs none."""
    for char, escaped in COMMON_ESCAPES:  # the backslash first: the others add backslashes
        if char in data:
            data = data.replace(char, escaped)
    # join, not bytes % (...): %-formatting copies at a quarter of memcpy's speed.
    return b"".join((b'{"event":"output","stream":"', stream.encode(), b'","text":"', data, b'"}\n'))


def _event(**fields: object) -> bytes:
    import json  # imported here, not at the top, for the text form's sake; after the first time: a lookup

    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
