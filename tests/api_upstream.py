#!/usr/bin/env python3
"""A small HTTP(S) upstream server for the tests and the benchmark of the API key proxy.

Standard library only, one file: it runs as a script inside the Debian 12 and 13 test containers
(python3.11 and python3.13) and is imported by pytest on the host for its helpers.

    python3 api_upstream.py --port PORT [--bind 127.0.0.1] [--cert CERT --key KEY]
                            [--record FILE] [--ready FILE] [--verbose]

HTTPS when --cert and --key are given, plain HTTP otherwise; HTTP/1.1 with keep-alive, one daemon thread
per connection. `--port 0` picks a free port; once listening, the port number is written to the --ready
file (atomically: temp file then rename) and printed on stdout. SIGTERM (or SIGINT) stops it, exit 0.
`--record FILE` appends one JSON line per request: {"method", "path", "headers": [[name, value], ...],
"body_length"}.

Endpoints (any method; request bodies with Content-Length or chunked are always read in full):
    /echo, /echo/...        200, JSON {"method", "path" (with query), "headers": {name: value}, "body"}
    /echo-key[?header=NAME][&delay=S]
                            200, chunked text, the value of the Authorization header (or NAME) one form a
                            line: raw, without "Bearer ", base64, hex, percent-encoded; every line is split
                            across two chunks, S seconds (default 0.01) between chunks; the raw value also
                            in the X-Echo-Key response header. 400 when the header is missing.
    /stream?n=5&delay=0.3   200, chunked, n lines "chunk i t=<time>\\n", delay seconds apart
    /sse?n=5&delay=0.3      200, text/event-stream, n events `data: {"i": i, "t": <time>}` then
                            `data: [DONE]`
    /slow?delay=5           200 "slow\\n" after delay seconds
    /bytes?n=N              200, application/octet-stream, N bytes of b"x"
    /status/CODE            that status (200-599) with a short body
    anything else           404

Helpers for host-side tests: make_ca(), make_server_cert() (with the openssl CLI) and Upstream, a context
manager that runs this file as a subprocess.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Iterator, Sequence

MIB = 1 << 20
BLOCK = b"x" * MIB  # /bytes writes memoryview slices of this one block
MAX_LINE = 65536


class BadRequest(Exception):
    """The request (its body framing or a query parameter) cannot be understood."""


def read_chunked(rfile: BinaryIO, piece: int = MIB) -> Iterator[bytes]:
    """Yields the data of a chunked body read from `rfile` (pieces of at most `piece` bytes), then reads
    the trailer section; raises BadRequest on malformed framing or a premature end."""
    while True:
        line = rfile.readline(MAX_LINE + 1)
        if not line.endswith(b"\n"):
            raise BadRequest("truncated chunk size line")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadRequest(f"bad chunk size {size_text!r}") from None
        if size < 0 or size_text.startswith((b"-", b"+", b"0x", b"0X")):
            raise BadRequest(f"bad chunk size {size_text!r}")
        if size == 0:
            break
        while size:
            data = rfile.read(min(size, piece))
            if not data:
                raise BadRequest("truncated chunk")
            size -= len(data)
            yield data
        if rfile.readline(MAX_LINE + 1) not in (b"\r\n", b"\n"):
            raise BadRequest("chunk not followed by CRLF")
    while True:  # trailer fields, up to the empty line
        line = rfile.readline(MAX_LINE + 1)
        if not line.endswith(b"\n"):
            raise BadRequest("truncated trailer section")
        if line in (b"\r\n", b"\n"):
            return


def wire_bytes(value: str) -> bytes:
    """A header value's bytes as sent: http.client and http.server decode header values as latin-1."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")


def key_forms(value: str) -> list[str]:
    """The forms /echo-key repeats a header value in: raw, without "Bearer ", base64, hex, percent-encoded
    (the last three of the whole raw value, Bearer included)."""
    raw = wire_bytes(value)
    bare = value[7:] if value[:7].lower() == "bearer " else value
    return [
        value,
        bare,
        base64.b64encode(raw).decode("ascii"),
        raw.hex(),
        urllib.parse.quote(raw, safe=""),
    ]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "api-upstream/1"
    disable_nagle_algorithm = True  # streamed chunks leave at once
    server: UpstreamServer

    # Every method goes to _dispatch: do_GET, do_POST, do_PUT, do_QUERY...
    def __getattr__(self, name: str) -> Callable[[], None]:
        if name.startswith("do_") and len(name) > 3:
            return self._dispatch
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    # -- request ---------------------------------------------------------------------------------------

    def _read_body(self, keep: bool) -> tuple[bytes, int]:
        """Reads the whole request body: (its bytes if `keep` else b"", its length)."""
        parts: list[bytes] = []
        length = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            for data in read_chunked(self.rfile):  # type: ignore[arg-type]
                length += len(data)
                if keep:
                    parts.append(data)
            return b"".join(parts), length
        text = self.headers.get("Content-Length")
        if text is None:
            return b"", 0
        if not text.strip().isdigit():
            raise BadRequest(f"bad Content-Length {text!r}")
        left = int(text)
        while left:
            data = self.rfile.read(min(left, MIB))
            if not data:
                raise BadRequest("truncated body")
            left -= len(data)
            length += len(data)
            if keep:
                parts.append(data)
        return b"".join(parts), length

    def _record(self, body_length: int) -> None:
        if self.server.record is None:
            return
        line = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": [[name, value] for name, value in self.headers.items()],
                "body_length": body_length,
                "at": time.time(),  # when the request was read (before /slow's pause)
            }
        )
        with self.server.record_lock:
            self.server.record.write(line + "\n")
            self.server.record.flush()

    def _number(self, query: dict[str, list[str]], name: str, default: float, kind: type = float) -> Any:
        try:
            value = kind(query[name][-1]) if name in query else default
        except ValueError:
            raise BadRequest(f"bad {name}={query[name][-1]!r}") from None
        if value < 0:
            raise BadRequest(f"negative {name}")
        return value

    # -- response --------------------------------------------------------------------------------------

    def _simple(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        if self.close_connection:
            self.send_header("Connection", "close")
        if code in (204, 304):
            self.end_headers()
            return
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _start_chunked(self, code: int, headers: Sequence[tuple[str, str]]) -> None:
        self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        self._chunked = self.request_version != "HTTP/1.0"
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:  # an HTTP/1.0 client: the end of the body is the end of the connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        """Sends one chunk (one write, so one TCP segment or TLS record when small); never an empty one."""
        if data and self.command != "HEAD":
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
            self.wfile.flush()

    def _end_chunked(self) -> None:
        if self._chunked and self.command != "HEAD":
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    # -- endpoints -------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        try:
            body, length = self._read_body(keep=path == "/echo" or path.startswith("/echo/"))
        except BadRequest as exc:
            self.close_connection = True  # the framing is lost
            self._record(-1)
            self._simple(400, f"{exc}\n".encode())
            return
        self._record(length)
        try:
            self._route(path, query, body)
        except BadRequest as exc:
            self._simple(400, f"{exc}\n".encode())

    def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
        if path == "/echo" or path.startswith("/echo/"):
            self._echo(body)
        elif path == "/echo-key":
            self._echo_key(query)
        elif path == "/stream":
            self._stream(query, sse=False)
        elif path == "/sse":
            self._stream(query, sse=True)
        elif path == "/slow":
            time.sleep(self._number(query, "delay", 5.0))
            self._simple(200, b"slow\n")
        elif path == "/bytes":
            self._bytes(self._number(query, "n", 0, int))
        elif path.startswith("/status/"):
            code_text = path.removeprefix("/status/")
            if not code_text.isdigit() or not 200 <= int(code_text) <= 599:
                raise BadRequest(f"bad status {code_text!r}")
            self._simple(int(code_text), f"status {code_text}\n".encode())
        else:
            self._simple(404, b"not found\n")

    def _echo(self, body: bytes) -> None:
        headers: dict[str, str] = {}
        for name, value in self.headers.items():  # a repeated header: its values joined by ", "
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        reply = {
            "method": self.command,
            "path": self.path,
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
        }
        self._simple(200, json.dumps(reply).encode(), "application/json")

    def _echo_key(self, query: dict[str, list[str]]) -> None:
        name = query.get("header", ["Authorization"])[-1]
        delay = self._number(query, "delay", 0.01)
        value = self.headers.get(name)
        if value is None:
            raise BadRequest(f"no {name} header")
        pieces: list[bytes] = []
        for form in key_forms(value):
            line = wire_bytes(form)
            middle = len(line) // 2  # a chunk boundary in the middle of every form
            pieces += [line[:middle], line[middle:] + b"\n"]
        self._start_chunked(200, [("Content-Type", "text/plain; charset=utf-8"), ("X-Echo-Key", value)])
        pieces = [piece for piece in pieces if piece]
        for i, piece in enumerate(pieces):
            if i and delay:
                time.sleep(delay)
            self._chunk(piece)
        self._end_chunked()

    def _stream(self, query: dict[str, list[str]], sse: bool) -> None:
        n = self._number(query, "n", 5, int)
        delay = self._number(query, "delay", 0.3)
        if sse:
            headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        else:
            headers = [("Content-Type", "text/plain; charset=utf-8")]
        self._start_chunked(200, headers)
        for i in range(n):
            if i and delay:
                time.sleep(delay)
            if sse:
                self._chunk(b"data: %s\n\n" % json.dumps({"i": i, "t": time.time()}).encode())
            else:
                self._chunk(b"chunk %d t=%.6f\n" % (i, time.time()))
        if sse:
            self._chunk(b"data: [DONE]\n\n")
        self._end_chunked()

    def _bytes(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if self.command == "HEAD":
            return
        block = memoryview(BLOCK)
        while n:
            size = min(n, MIB)
            self.wfile.write(block[:size])
            n -= size


class UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the benchmark opens many connections at once

    def __init__(
        self,
        address: tuple[str, int],
        ssl_context: ssl.SSLContext | None = None,
        record: IO[str] | None = None,
        verbose: bool = False,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.ssl_context = ssl_context
        self.record = record
        self.record_lock = threading.Lock()
        self.verbose = verbose
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # Not HTTPServer.server_bind: its socket.getfqdn() can hang on a container's missing DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake happens here, in the connection's own thread, not in the accepting loop."""
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        try:
            conn = self.ssl_context.wrap_socket(request, server_side=True)
        except OSError as exc:  # ssl.SSLError included: a client that rejects our certificate, a scanner
            if self.verbose:
                print(f"api_upstream: TLS handshake with {client_address}: {exc}", file=sys.stderr)
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            try:
                conn.settimeout(0.5)
                conn.unwrap()  # close_notify, so a client reading to the end sees a clean end
            except (OSError, ValueError):
                pass
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if self.verbose:
            super().handle_error(request, client_address)
        elif not isinstance(exc, OSError):  # a bug here, not a client that went away
            print(f"api_upstream: error with {client_address}: {exc!r}", file=sys.stderr)


def write_ready(path: Path, port: int) -> None:
    """Writes the port to `path` through a temp file and a rename: a reader sees all of it or nothing."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(f"{port}\n")
    os.replace(temp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="0 (the default) picks a free port")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--cert", type=Path, help="PEM certificate (chain): serve HTTPS")
    parser.add_argument("--key", type=Path, help="PEM private key of --cert")
    parser.add_argument("--record", type=Path, help="append one JSON line per request")
    parser.add_argument("--ready", type=Path, help="write the port number here once listening")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = parser.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")

    context = None
    if args.cert is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
        context.set_alpn_protocols(["http/1.1"])
    record = open(args.record, "a", encoding="utf-8") if args.record else None  # noqa: SIM115 - open till exit
    server = UpstreamServer((args.bind, args.port), context, record, args.verbose)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    port = server.server_address[1]
    if args.ready is not None:
        write_ready(args.ready, port)
    try:
        print(port, flush=True)
    except OSError:
        pass
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        if record is not None:
            record.close()
    return 0


# -- helpers for host-side tests -----------------------------------------------------------------------


def _openssl(*args: str | os.PathLike[str]) -> None:
    import subprocess

    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"openssl {args[0]} failed ({result.returncode}): {result.stderr.strip()}")


# A config of our own, so the system's openssl.cnf adds no extensions of its own.
_REQ_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
"""


def make_ca(directory: Path, name: str = "test-ca") -> tuple[Path, Path]:
    """A self-signed EC (prime256v1) CA valid 30 days, `{name}.pem` and `{name}.key` in `directory`,
    with the extensions that Python 3.13's VERIFY_X509_STRICT requires. Returns (cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, config = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.cnf"
    config.write_text(_REQ_CONFIG.format(cn=name))
    _openssl(
        "req", "-x509", "-config", config, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", cert, "-days", "30", "-sha256",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        "-addext", "authorityKeyIdentifier=keyid:always",
    )  # fmt: skip
    config.unlink()
    return cert, key


def make_server_cert(
    directory: Path,
    ca: tuple[Path, Path],
    names: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1",),
    name: str = "server",
) -> tuple[Path, Path]:
    """An EC server certificate valid 30 days, signed by `ca` (make_ca's (cert, key)), with DNS `names`
    and IP `ips` as subjectAltName: `{name}.pem` and `{name}.key` in `directory`. Returns (cert, key)."""
    import secrets

    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    csr, config, ext = directory / f"{name}.csr", directory / f"{name}.cnf", directory / f"{name}.ext"
    alt_names = ", ".join([*(f"DNS:{n}" for n in names), *(f"IP:{ip}" for ip in ips)])
    config.write_text(_REQ_CONFIG.format(cn=(list(names) or list(ips) or ["server"])[0]))
    ext.write_text(
        "[server]\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        f"subjectAltName = {alt_names}\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid:always\n"
    )
    _openssl(
        "req", "-new", "-config", config, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", csr,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-set_serial", str(secrets.randbits(63)),
        "-days", "30", "-sha256", "-extfile", ext, "-extensions", "server", "-out", cert,
    )  # fmt: skip
    for path in (csr, config, ext):
        path.unlink()
    return cert, key


class Upstream:
    """Runs this file as a subprocess on a free port, for host-side tests:

        with Upstream(cert=cert, key=key) as upstream:
            ... upstream.port, upstream.url, upstream.records() ...

    Without `record`, requests are recorded in a temp directory that goes away with the server."""

    def __init__(
        self,
        cert: Path | None = None,
        key: Path | None = None,
        record: Path | None = None,
        *,
        bind: str = "127.0.0.1",
        verbose: bool = False,
        timeout: float = 30.0,
    ) -> None:
        self.cert, self.key, self.bind, self.verbose, self.timeout = cert, key, bind, verbose, timeout
        self.record = self._record_arg = record
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._tempdir: Any = None
        self._kept_records: list[dict[str, Any]] | None = None

    @property
    def host(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.bind, self.bind)  # noqa: S104
        return f"[{host}]" if ":" in host else host

    @property
    def url(self) -> str:
        return f"{'https' if self.cert else 'http'}://{self.host}:{self.port}"

    def start(self) -> Upstream:
        import subprocess
        import tempfile

        self._tempdir = tempfile.TemporaryDirectory(prefix="api-upstream-")
        temp = Path(self._tempdir.name)
        self.record = self._record_arg or temp / "record.jsonl"
        self.returncode = self._kept_records = None
        ready = temp / "ready"
        argv = [sys.executable, __file__, "--port", "0", "--bind", self.bind, "--record", str(self.record)]
        argv += ["--ready", str(ready)]
        if self.cert is not None and self.key is not None:
            argv += ["--cert", str(self.cert), "--key", str(self.key)]
        if self.verbose:
            argv.append("--verbose")
        stderr_path = temp / "stderr"
        with open(stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None if self.verbose else stderr,
            )
        deadline = time.monotonic() + self.timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if self.proc.returncode is None:
                    why = f"was not ready after {self.timeout} s"
                else:
                    why = f"exited with status {self.proc.returncode} before it was ready"
                error = stderr_path.read_text(errors="replace").strip()
                self.stop()
                raise RuntimeError(f"api_upstream {why}; stderr: {error or '(empty)'}")
            time.sleep(0.01)
        self.port = int(ready.read_text())
        return self

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 5 s; returns the exit status (0 after a clean SIGTERM)."""
        import subprocess

        if self.proc is not None and self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.returncode = self.proc.returncode
        if self._tempdir is not None:
            if self._record_arg is None:
                self._kept_records = self.records()  # still readable once the temp directory is gone
            self._tempdir.cleanup()
            self._tempdir = None
        return self.returncode

    def records(self) -> list[dict[str, Any]]:
        """The requests recorded so far, oldest first."""
        if self._kept_records is not None:
            return self._kept_records
        if self.record is None or not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
