"""The proxy of one API for one job connection: it adds the key to each request, outside the job's sandbox.

jobrunner-api-NAME.socket (Accept=yes) starts jobrunner-api-NAME@.service for each connection that a
job's runner opens (runner.endpoint); that unit alone loads the API's key (LoadCredentialEncrypted=).
This process:
1. learns from the kernel which unit connected (SO_PEERCRED, then that process's cgroup) and refuses
   any but a unit of a job that lists this API;
2. answers "+" and receives the job's TCP connection;
3. speaks HTTP/1.1 with the job (h11), as many requests as the job sends on that connection: each goes
   to the API's `url` plus the same path and query over TLS (http.client), with the API's header set to
   its value (replacing the job's own), and the answer streams back as it arrives, the key and its
   encoded forms redacted;
4. reports each request (method, path without its query, status, bytes, duration; never a header
   value) to the journal and to the runner, which writes it into the run log;
5. exits when the job closes the connection, or the runner its socket (the run is over).
Errors reach the job as plain-text 400, 431, 502 and 504 answers; the run goes on.
"""

from __future__ import annotations

import _socket
import json
import os
import sys
import threading
import time

from runner import journal
from runner.activation import take_connection
from runner.config import Api, load_config
from runner.credentials import UNAVAILABLE
from runner.errors import ActivationError
from runner.redact import Redactor, encoded_forms

TYPE_CHECKING = False
if TYPE_CHECKING:
    import http.client
    from collections.abc import Iterator, Sequence

    import h11

# Reads of the answer: at most this much at once (TLS hands over 16 KiB records; a larger read1 buffer
# is allocated and mapped afresh each time), gathered up to BATCH_SIZE while more has already arrived:
# the search for the key costs per call, and far more per byte on pieces under ~30 kB
# (bench/api.py: 0.12 of direct throughput with 16 KiB pieces, docs/performance.md).
READ_SIZE = 64 * 1024
BATCH_SIZE = 256 * 1024
MAX_HEADER_BYTES = 64 * 1024  # a request's head beyond this gets 431
CONNECT_TIMEOUT_S = 10.0
# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are not forwarded; Host and the
# framing are the proxy's own; Accept-Encoding is set to identity so that answers can be redacted.
NOT_FORWARDED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"accept-encoding",
        b"expect",
    }
)


class ProxyError(Exception):
    """An upstream failure to answer the job with: status, reason phrase, plain text."""

    def __init__(self, status: int, reason: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.reason = reason
        self.text = text


def main() -> None:
    """Entry point of jobrunner-api-NAME@.service: `python3 -c "...; main()" NAME`."""
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        control = take_connection()
    except ActivationError as e:
        sys.stderr.write(
            f"jobrunner-api: {e.message}\njobrunner-api: hint: the proxy of an API is started by systemd"
            f" (jobrunner-api-NAME.socket) for a job's connection, not by hand\n"
        )
        sys.exit(e.exit_status)
    try:
        api, job, run_id, key = _prepare(control, name)
    except ProxyError as e:
        journal.log(f"API {name}: refused a connection: {e.text}", journal.PRIORITY_WARNING, API_NAME=name)
        _send_line(control, b"-" + e.text.encode())
        return
    _send_line(control, b"+")
    client = _receive_connection(control)
    if client is None:
        return
    # An answer goes out in several writes (head, pieces of the body): without TCP_NODELAY each one
    # after the first waits for the job's delayed ACK, ~40 ms a request (bench/api.py).
    client.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    _exit_when_closed(control)  # the run is over: nothing of ours outlives it
    Proxy(api, key, client, Reporter(control, api.name, job, run_id)).serve()


def _prepare(control: _socket.socket, name: str) -> tuple[Api, str, str, bytes]:
    config = load_config()
    api = config.apis.get(name)
    if api is None:
        raise ProxyError(502, "Bad Gateway", f"no API {name!r} in {config.path}")
    hello = _read_line(control)
    parts = hello.split(b" ")
    if len(parts) != 4 or b" ".join(parts[:2]) != b"jobrunner-api 1":
        raise ProxyError(400, "Bad Request", "not a jobrunner runner")
    job = job_of_peer(control)
    if job is None or job not in config.jobs or name not in config.jobs[job].apis:
        raise ProxyError(403, "Forbidden", f"only the jobs that list API '{name}' may use it")
    return api, job, parts[3].decode("ascii", "replace"), _load_key(api)


def _load_key(api: Api) -> bytes:
    directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
    try:
        with open(os.path.join(directory, api.credential), "rb") as f:
            key = f.read()
    except OSError:
        key = UNAVAILABLE
    key = key.rstrip(b"\r\n")
    if key == UNAVAILABLE or not key:
        raise ProxyError(
            502,
            "Bad Gateway",
            f"the key of API '{api.name}' (credential {api.credential!r}) is not stored: "
            f"an administrator stores it with: jobrunner creds set {api.credential}",
        )
    return key


def job_of_peer(control: _socket.socket) -> str | None:
    """The job whose unit the connecting process runs in, from its cgroup (which it cannot change)."""
    creds = control.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    pid = int.from_bytes(creds[:4], sys.byteorder)
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            return job_of_cgroup(f.read())
    except OSError:
        return None


def job_of_cgroup(text: str) -> str | None:
    """`job-NAME@N-PID-UID.service` (a socket run) or `job@NAME.service` (an operator's) -> NAME: a
    system unit only (in /system.slice, or a slice of its own there), never a unit of some user's own
    service manager (/user.slice/user-UID.slice/user@UID.service/...), which could take any name."""
    for line in text.splitlines():
        parts = line.split(":", 2)[-1].strip("/").split("/")
        if parts[0] != "system.slice" or len(parts) not in (2, 3):
            continue
        if len(parts) == 3 and not (parts[1].startswith("system-") and parts[1].endswith(".slice")):
            continue
        unit = parts[-1]
        if unit.startswith("job@") and unit.endswith(".service"):
            return unit[len("job@") : -len(".service")] or None
        if unit.startswith("job-") and "@" in unit and unit.endswith(".service"):
            return unit[len("job-") : unit.index("@")] or None
    return None


def _read_line(control: _socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        piece = control.recv(512)
        if not piece or len(data) > 4096:
            raise ProxyError(400, "Bad Request", "no handshake")
        data += piece
    return data.rstrip(b"\n")


def _send_line(control: _socket.socket, line: bytes) -> None:
    try:
        control.sendall(line.replace(b"\n", b" ") + b"\n")
    except OSError:
        pass


def _receive_connection(control: _socket.socket) -> _socket.socket | None:
    _, ancillary, _, _ = control.recvmsg(1, _socket.CMSG_SPACE(4))
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS and len(data) >= 4:
            return _socket.socket(fileno=int.from_bytes(data[:4], sys.byteorder, signed=True))
    return None


def _exit_when_closed(control: _socket.socket) -> None:
    def wait() -> None:
        try:
            while control.recv(512):
                pass
        except OSError:
            pass
        os._exit(0)

    threading.Thread(target=wait, daemon=True).start()


class Reporter:
    """Each request's record: to the journal, and to the runner for the run log."""

    def __init__(self, control: _socket.socket, api: str, job: str, run_id: str) -> None:
        self.control = control
        self.api = api
        self.job = job
        self.run_id = run_id

    def report(self, record: dict[str, object]) -> None:
        journal.log(
            f"API {self.api}: job {self.job} run {self.run_id}: {record['method']} {record['path']} -> "
            f"{record['status']}, {record['bytes']} bytes, {record['duration_ms']} ms"
            + (f" ({record['error']})" if record.get("error") else ""),
            API_NAME=self.api,
            JOB_NAME=self.job,
            JOB_RUN_ID=self.run_id,
            HTTP_METHOD=record["method"],
            HTTP_PATH=record["path"],
            HTTP_STATUS=record["status"],
            HTTP_BYTES=record["bytes"],
            DURATION_MS=record["duration_ms"],
        )
        try:
            self.control.sendall(json.dumps(record).encode() + b"\n")
        except OSError:
            pass


class Proxy:
    """HTTP/1.1 with the job on one connection; one upstream connection, kept alive, reused."""

    def __init__(self, api: Api, key: bytes, client: _socket.socket, reporter: Reporter) -> None:
        import h11

        self.h11 = h11
        self.api = api
        self.client = client
        self.reporter = reporter
        self.header_value = api.value.replace("{credential}", key.decode("utf-8", "surrogateescape"))
        # The key and its encoded forms only: every form of the header's value ("Bearer KEY": plain, hex,
        # base64, URL-encoded) contains one of them, and each form searched for costs every answer.
        # Security over speed: each form is one more pass over every byte of every answer. On a 2-CPU
        # host a 100 MB answer comes through at 0.34 of direct with the forms (6 strings), 0.45 with the
        # key alone, 0.54 with no redaction at all (bench/api_redaction.py, docs/performance.md): an
        # API that echoes the key base64-encoded must not hand it to the job, so the forms stay.
        self.redactor = Redactor({key} | encoded_forms(key))
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.upstream = Upstream(api)
        self.status: int | None = None  # of the answer being sent

    def serve(self) -> None:
        h11 = self.h11
        try:
            while True:
                event = self._next_event()
                if isinstance(event, h11.Request):
                    self._handle(event)
                elif isinstance(event, h11.ConnectionClosed):
                    return
                if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                    return
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint
            reason = "Request Header Fields Too Large" if status == 431 else "Bad Request"
            self._answer_error(ProxyError(status, reason, f"malformed request: {e}"))
        except (OSError, h11.LocalProtocolError):
            pass  # the job went away mid-answer, or an answer broke off: the connection is done
        finally:
            self.upstream.close()
            self.client.close()

    # --- the job's side

    def _next_event(self) -> object:
        h11 = self.h11
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                self._send(h11.InformationalResponse(status_code=100, headers=[]))
            self.conn.receive_data(self.client.recv(65536))

    def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.client.sendall(data)

    def _send_data(self, data: bytes) -> None:
        """A piece of the answer's body, framed by h11 without copying it (sendmsg gathers the pieces)."""
        pieces = self.conn.send_with_data_passthrough(self.h11.Data(data=data))
        if pieces is None:
            return
        sent = self.client.sendmsg(pieces)
        total = sum(len(piece) for piece in pieces)
        if sent < total:  # the socket took part of it: the rest as one buffer (rare: it blocks anyway)
            self.client.sendall(memoryview(b"".join(pieces))[sent:])

    def _body(self) -> Iterator[bytes]:
        h11 = self.h11
        while True:
            event = self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise h11.RemoteProtocolError("request body ended early", error_status_hint=400)

    # --- one request

    def _handle(self, request: h11.Request) -> None:
        started = time.monotonic()
        self.status = None
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        path = self.redactor.redact_text(target.split("?", 1)[0])
        record: dict[str, object] = {"method": method, "path": path, "status": None, "bytes": 0}
        try:
            if not target.startswith("/"):
                raise ProxyError(400, "Bad Request", "the request target must be a path (origin-form)")
            if len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers) > MAX_HEADER_BYTES:
                # h11 applies its limit only while a head is incomplete: one that arrived whole is here.
                raise ProxyError(
                    431,
                    "Request Header Fields Too Large",
                    f"the request's head is over {MAX_HEADER_BYTES} bytes",
                )
            record["status"], record["bytes"] = self._forward(request, target)
        except ProxyError as e:
            self._drain_body()
            record["status"], record["error"] = e.status, e.text
            self._answer_error(e)
        except OSError as e:
            # The answer had begun (its status went to the job): the connection is closed mid-body.
            record["status"], record["error"] = self.status, f"cut off: {_reason(e)}"
            raise
        finally:
            record["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
            self.reporter.report(record)

    def _forward(self, request: h11.Request, target: str) -> tuple[int, int]:
        h11 = self.h11
        headers = self._request_headers(request)
        has_body = any(name in (b"content-length", b"transfer-encoding") for name, _ in request.headers)
        length = next((v for n, v in request.headers if n == b"content-length"), None)
        if length is not None:
            headers.append(("Content-Length", length.decode("ascii")))
        body = self._body() if has_body else None
        response = self.upstream.send(request.method.decode("ascii"), target, headers, body)
        if has_body and self.conn.their_state is h11.SEND_BODY:
            self._drain_body()  # the upstream answered without reading it all
        self._send(
            h11.Response(
                status_code=response.status,
                headers=self._response_headers(response, request.method),
                reason=response.reason.encode("latin-1", "replace"),
            )
        )
        self.status = response.status  # for the record, should the answer break off
        sent = self._stream(response)
        self._send(h11.EndOfMessage())
        return response.status, sent

    def _request_headers(self, request: h11.Request) -> list[tuple[str, str]]:
        received = request.headers
        raw = received.raw_items()  # the names as the job wrote them (h11 lowers them)
        own = self.api.header.lower().encode("ascii")
        dropped = NOT_FORWARDED | {own} | _connection_tokens(received)
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in raw
            if name.lower() not in dropped
        ]
        headers += [
            ("Host", self.upstream.host_header),
            ("Accept-Encoding", "identity"),
            (self.api.header, self.header_value),
        ]
        return headers

    def _response_headers(
        self, response: http.client.HTTPResponse, method: bytes
    ) -> list[tuple[bytes, bytes]]:
        headers = []
        keep_length = method == b"HEAD" or response.status in (204, 304)
        received = [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in response.getheaders()
        ]
        # Hop-by-hop, as for requests: those RFC 9110 names, and those the answer's Connection names.
        hop_by_hop = (NOT_FORWARDED - {b"content-length"}) | _connection_tokens(received)
        for name, value in response.getheaders():
            lower = name.lower().encode("latin-1")
            if lower in hop_by_hop or (lower == b"content-length" and not keep_length):
                continue  # the length changes when the key is redacted: h11 frames the body itself
            headers.append((name.encode("latin-1"), self.redactor.redact(value.encode("latin-1"))))
        return headers

    def _stream(self, response: http.client.HTTPResponse) -> int:
        """The answer's body, piece by piece as it arrives (chunked bodies, server-sent events)."""
        import http.client

        h11 = self.h11
        stream = self.redactor.stream()
        sent = 0
        while True:
            try:
                piece = self._read_batch(response)
            except TimeoutError:
                raise OSError("the upstream stopped sending") from None
            except http.client.HTTPException as e:  # a chunked answer that broke off, or its framing
                raise OSError(f"the upstream's answer broke off: {_reason(e)}") from None
            if not piece:
                break
            data = stream.feed(piece)
            if data:
                self._send_data(data)
                sent += len(data)
        if response.length:  # read1 ends a Content-Length answer at EOF, short of its length, silently
            raise OSError(f"the upstream's answer broke off {response.length} bytes short of its length")
        rest = stream.flush()
        if rest:
            self._send(h11.Data(data=rest))
            sent += len(rest)
        # Read to its end, the answer must still be closed for http.client to send the next request on
        # the same connection (read1 leaves it open once a Content-Length is used up).
        response.close()
        return sent

    def _read_batch(self, response: http.client.HTTPResponse) -> bytes:
        """What has arrived of the answer: one read, which waits, then more while more is there at once
        (never waiting for it: a stream's pieces go to the job as they come)."""
        pieces = [response.read1(READ_SIZE)]
        size = len(pieces[0])
        while pieces[-1] and size < BATCH_SIZE and self.upstream.readable_now():
            pieces.append(response.read1(READ_SIZE))
            size += len(pieces[-1])
        return b"".join(pieces)

    def _drain_body(self) -> None:
        h11 = self.h11
        try:
            while self.conn.their_state is h11.SEND_BODY:
                self._next_event()
        except (h11.RemoteProtocolError, OSError):
            pass

    def _answer_error(self, error: ProxyError) -> None:
        h11 = self.h11
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # the answer had begun: the connection is closed instead
        body = f"jobrunner: {self.redactor.redact_text(error.text)}\n".encode()
        try:
            self._send(
                h11.Response(
                    status_code=error.status,
                    reason=error.reason.encode(),
                    headers=[
                        (b"Content-Type", b"text/plain; charset=utf-8"),
                        (b"Content-Length", str(len(body)).encode()),
                        # After a request it could not read, nothing on the connection can be trusted.
                        *([(b"Connection", b"close")] if error.status in (400, 431) else []),
                    ],
                )
            )
            self._send(h11.Data(data=body))
            self._send(h11.EndOfMessage())
        except (OSError, h11.LocalProtocolError):
            pass


def _connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> set[bytes]:
    """Headers that the job's Connection header names: hop-by-hop too."""
    return {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
        if token.strip()
    }


class Upstream:
    """The one connection to the API's server, over TLS (http.client), reopened when it closes."""

    def __init__(self, api: Api) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(api.url)
        self.api = api
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.base_path = parts.path.rstrip("/")
        default_port = parts.port is None or parts.port == (443 if self.https else 80)
        self.host_header = parts.netloc.rsplit("@", 1)[-1] if not default_port else self.host
        self.connection: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        import http.client

        if self.connection is None:
            if self.https:
                import ssl

                context = ssl.create_default_context(cafile=self.api.ca)
                self.connection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=CONNECT_TIMEOUT_S, context=context
                )
            else:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT_S)
        return self.connection

    def send(
        self, method: str, target: str, headers: list[tuple[str, str]], body: Iterator[bytes] | None
    ) -> http.client.HTTPResponse:
        import http.client
        import ssl

        where = f"{self.host}:{self.port}"
        for attempt in (1, 2):
            connection = self._connect()
            try:
                if connection.sock is None:
                    connection.connect()
                connection.sock.settimeout(self.api.timeout_s)
                connection.request(method, self.base_path + target, body=body, headers=_joined(headers))
                return connection.getresponse()
            except ssl.SSLCertVerificationError as e:
                self.close()
                raise ProxyError(
                    502, "Bad Gateway", f"the certificate of {where} is not valid: {e.verify_message}"
                ) from None
            except TimeoutError:
                self.close()
                raise ProxyError(
                    504, "Gateway Timeout", f"{where} did not answer within {self.api.timeout_s:g} s"
                ) from None
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                # A kept-alive connection the server had closed: once more on a new one, if nothing of
                # the request's body was consumed.
                self.close()
                if attempt == 2 or body is not None:
                    raise ProxyError(502, "Bad Gateway", f"{where} closed the connection: {e}") from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise ProxyError(502, "Bad Gateway", f"cannot reach {where}: {_reason(e)}") from None
        raise AssertionError("unreachable")

    def readable_now(self) -> bool:
        """Whether the connection has data that a read gets without waiting (TLS's own buffer first)."""
        sock = self.connection.sock if self.connection is not None else None
        if sock is None:
            return False
        pending = getattr(sock, "pending", None)
        if pending is not None and pending() > 0:
            return True
        import select

        return bool(select.select([sock], [], [], 0)[0])

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def _joined(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Headers as http.client takes them (a mapping): repeated ones joined as RFC 9110 5.3 allows.
    With Host and Accept-Encoding in it, http.client adds neither; with a body and no Content-Length,
    it sends the body chunked."""
    joined: dict[str, str] = {}
    names: dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in names:
            separator = "; " if lower == "cookie" else ", "
            joined[names[lower]] += separator + value
        else:
            names[lower] = name
            joined[name] = value
    return joined


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
