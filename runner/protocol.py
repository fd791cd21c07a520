"""The wire protocol (docs/protocol.md): reading and parsing the request line, framing the reply.

A request is one line, text (`run NAME ARGS...`, `list`) or JSON. The reply's format follows the
request's: raw output plus one final `jobrunner:` line, or JSON Lines events.
"""

from __future__ import annotations

import base64
import enum
import json
import shlex
import socket
import time
from dataclasses import asdict, dataclass, field

from runner.config import JOB_NAME_PATTERN
from runner.errors import ArgumentsError, RequestError, UnknownJobError

MAX_REQUEST_BYTES = 64 * 1024
REQUEST_DEADLINE_S = 10.0
MAX_ARGUMENTS = 1024
JSON_FIELDS = frozenset({"op", "job", "args", "detach"})


class Form(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class Request:
    form: Form
    op: str  # "run" or "list"
    job: str = ""
    args: tuple[str, ...] = field(default=())
    detach: bool = False


def read_request_line(conn: socket.socket, data: bytearray, deadline_s: float = REQUEST_DEADLINE_S) -> bytes:
    """Read up to the first newline, within the deadline and the size limit; raise RequestError otherwise.

    `data` collects what arrived, so that a caller can still tell a JSON client from a text one when the
    request fails to arrive whole.
    """
    give_up_at = time.monotonic() + deadline_s
    while b"\n" not in data:
        remaining = give_up_at - time.monotonic()
        if remaining <= 0:
            raise RequestError(
                f"no complete request line within {deadline_s:g} s", "send one line, ending in a newline"
            )
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(MAX_REQUEST_BYTES + 1 - len(data))
        except TimeoutError:
            continue
        except ConnectionError:
            raise RequestError("the client closed the connection before sending a request", "") from None
        if not chunk:
            break  # the client half-closed: what it sent is the request, newline or not
        data += chunk
        if len(data) > MAX_REQUEST_BYTES and b"\n" not in data[:MAX_REQUEST_BYTES]:
            raise RequestError(f"request line longer than {MAX_REQUEST_BYTES} bytes", "")
    line, _, _ = bytes(data).partition(b"\n")
    if not line.strip():
        raise RequestError("empty request", "send 'list' or 'run NAME [ARG ...]'")
    return line.removesuffix(b"\r")


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
    if op == "list" and not rest:
        return Request(Form.TEXT, "list")
    if op == "run" and rest:
        return _run_request(Form.TEXT, rest[0], rest[1:], detach=False)
    if op == "run":
        raise RequestError("'run' needs a job name", "send 'run NAME [ARG ...]'")
    raise RequestError(f"unknown request {op!r}", "send 'list' or 'run NAME [ARG ...]'")


def _parse_json(text: str) -> Request:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"malformed JSON request: {_short(str(e))}", "") from None
    if not isinstance(obj, dict):
        raise RequestError("a JSON request must be an object", '{"op": "run", "job": "NAME", "args": []}')
    unknown = set(obj) - JSON_FIELDS
    if unknown:
        raise RequestError(
            f"unknown field {_short(sorted(unknown)[0])!r}", f"fields: {', '.join(sorted(JSON_FIELDS))}"
        )
    op = obj.get("op")
    if op == "list":
        return Request(Form.JSON, "list")
    if op != "run":
        raise RequestError(f"unknown op {_short(repr(op))}", 'use "run" or "list"')
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
    if not JOB_NAME_PATTERN.fullmatch(job):
        raise UnknownJobError(
            f"no job named {_short(repr(job))}", "job names match [a-z][a-z0-9_-]{0,63}; try 'list'"
        )
    if len(args) > MAX_ARGUMENTS:
        raise ArgumentsError(f"too many arguments ({len(args)}; at most {MAX_ARGUMENTS})", "")
    return Request(form, "run", job, tuple(args), detach)


def _is_unicode(text: str) -> bool:
    # json accepts "\ud800" escapes, which are no characters: they cannot reach argv as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(text: str, limit: int = 80) -> str:
    # Error messages quote the client's input: keep them short so a huge request is not echoed back whole.
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class ExitReport:
    """The final `exit` event's fields (docs/protocol.md)."""

    job: str
    run_id: str
    exit_code: int
    signal: int | None
    timed_out: bool
    cancelled: bool
    duration_s: float
    log: str
    output_dir: str
    warnings: tuple[str, ...] = ()  # e.g. the run log could not be written whole


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
            return _event(event="output", stream=stream, text=data.decode("utf-8"))
        except UnicodeDecodeError:
            return _event(event="output", stream=stream, base64=base64.b64encode(data).decode("ascii"))

    def exit(self, report: ExitReport) -> bytes:
        if self.form is Form.TEXT:
            warnings = "".join(f"jobrunner: warning: {w}\n" for w in report.warnings)
            return self._final_line(
                f"{warnings}jobrunner: {report.job} (run {report.run_id}) exited with {report.exit_code} "
                f"after {report.duration_s:.1f} s"
            )
        fields = {"event": "exit", **asdict(report)}
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


def _event(**fields: object) -> bytes:
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
