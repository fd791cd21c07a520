"""runner/apiproxy.py: the proxy of one API for one job connection, which adds the key to each request.

`Proxy` serves one end of a socketpair in a thread (the job's TCP connection, as the runner hands it
over); the test speaks HTTP on the other end, and the upstream is tests/api_upstream.py over HTTPS
with a CA of the test's own. The proxy's records come through a real `Reporter`, as JSON lines on a
second socketpair (the runner's side of the API's socket).

The key is generated at run time; nothing shaped like a real key is stored in this file.
"""

from __future__ import annotations

import http.client
import io
import itertools
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from runner import journal
from runner.apiproxy import MAX_HEADER_BYTES, Proxy, ProxyError, Reporter, _load_key, job_of_cgroup
from runner.config import Api
from runner.credentials import UNAVAILABLE
from runner.redact import encoded_forms
from tests.api_upstream import Upstream, key_forms

KEY = secrets.token_hex(16).encode()
BEARER = "Bearer " + KEY.decode()


@pytest.fixture(autouse=True)
def journal_entries(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What Reporter sends to the journal, each entry's message and fields on one line. (Autouse, so
    it is undone after `serve` has ended every proxy.)"""
    entries: list[str] = []

    def log(message: str, priority: int = journal.PRIORITY_INFO, **fields: object) -> None:
        entries.append(" ".join([message, *(f"{name}={value}" for name, value in fields.items())]))

    monkeypatch.setattr(journal, "log", log)
    return entries


def make_api(upstream: Upstream, pki: dict[str, Path], **fields: Any) -> Api:
    values: dict[str, Any] = {
        "name": "llm",
        "url": upstream.url,
        "credential": "llm-key",
        "ca": str(pki["ca"]),
        "timeout_s": 10.0,
    }
    values.update(fields)
    return Api(**values)


class Served:
    """One Proxy serving one job connection in a thread, as jobrunner-api-NAME@.service does."""

    def __init__(self, api: Api, key: bytes = KEY) -> None:
        self.client, proxy_end = socket.socketpair()
        self.client.settimeout(10)
        self.control, reporter_end = socket.socketpair()
        self.proxy = Proxy(api, key, proxy_end, Reporter(reporter_end, api.name, "build", "7"))
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, name="proxy", daemon=True)
        self.thread.start()
        self._records: list[dict[str, Any]] | None = None

    def _serve(self) -> None:
        try:
            self.proxy.serve()
        except BaseException as e:  # in main(), the process would die with a traceback
            self.errors.append(e)

    def connection(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("job.invalid", timeout=10)
        conn.sock = self.client
        return conn

    def wait_done(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the proxy still serves"
        errors, self.errors = self.errors, []  # reported once
        assert not errors, f"the proxy failed: {errors!r}"

    def records(self) -> list[dict[str, Any]]:
        """The job closes its side; once the proxy is done, what it reported (one JSON line a request)."""
        if self._records is None:
            try:
                self.client.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # closed already
            self.wait_done()
            self.proxy.reporter.control.close()
            self.control.settimeout(10)
            data = b""
            while piece := self.control.recv(65536):
                data += piece
            self.control.close()
            self.client.close()
            self._records = [json.loads(line) for line in data.splitlines()]
        return self._records


@pytest.fixture
def serve() -> Iterator[Callable[[Api], Served]]:
    started: list[Served] = []

    def start(api: Api) -> Served:
        served = Served(api)
        started.append(served)
        return served

    yield start
    for served in started:
        served.records()  # ends each proxy, even after a failed assertion


def request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | Iterator[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response, response.read()


def record_of(upstream: Upstream, path: str) -> dict[str, Any]:
    """The upstream's record of the one request to `path` (paths are made unique per test)."""
    found = [r for r in upstream.records() if r["path"] == path]
    assert len(found) == 1, f"{len(found)} requests to {path}"
    return found[0]


def header_values(record: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in record["headers"] if key.lower() == name.lower()]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class _Received:
    """Bytes already read, as the socket http.client.HTTPResponse parses."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self.data)


def parse(data: bytes) -> tuple[http.client.HTTPResponse, bytes]:
    response = http.client.HTTPResponse(cast(socket.socket, _Received(data)))
    response.begin()
    return response, response.read()


def read_to_end(sock: socket.socket) -> bytes:
    """All the proxy sends until it closes the connection. (A unix socket closed with unread data
    reports ECONNRESET once what it had sent is read: that is an end too.)"""
    data = b""
    try:
        while piece := sock.recv(65536):
            data += piece
    except ConnectionResetError:
        pass
    return data


def send_ignoring_close(sock: socket.socket, data: bytes) -> None:
    """Send what the proxy may stop reading halfway (it answers and closes)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


# ------------------------------------------------------------------------------------- the key added


def test_the_key_replaces_the_jobs_authorization_and_hop_by_hop_headers_stay_behind(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki))
    conn = served.connection()
    path = "/echo/" + unique("headers")
    conn.putrequest("GET", path, skip_accept_encoding=True)
    for name, value in [
        ("Authorization", "Bearer the-jobs-own-token"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "one hop only"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Proxy-Connection", "keep-alive"),
        ("Accept-Encoding", "gzip, br"),
        ("X-Custom", "passes"),
        ("X-Multi", "a"),
        ("X-Multi", "b"),
        ("User-Agent", "the-job/1"),
    ]:
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    response.read()

    assert response.status == 200
    seen = record_of(upstream, path)
    assert header_values(seen, "Authorization") == [BEARER]
    assert header_values(seen, "Accept-Encoding") == ["identity"]
    assert header_values(seen, "Host") == [f"127.0.0.1:{upstream.port}"]
    assert header_values(seen, "X-Custom") == ["passes"]
    assert header_values(seen, "X-Multi") == ["a, b"]
    assert header_values(seen, "User-Agent") == ["the-job/1"]
    names = {name.lower() for name, _ in seen["headers"]}
    for hop in ("connection", "x-hop", "keep-alive", "te", "proxy-authorization", "proxy-connection"):
        assert hop not in names, f"{hop} was forwarded"


def test_a_custom_header_carries_the_bare_key_and_replaces_the_jobs_own(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki, header="X-Api-Key", value="{credential}"))
    path = "/echo/" + unique("custom")

    response, _ = request(
        served.connection(),
        "GET",
        path,
        headers={"x-API-key": "the-jobs-own", "Authorization": "Basic am9iOmpvYg=="},
    )

    assert response.status == 200
    seen = record_of(upstream, path)
    assert header_values(seen, "X-Api-Key") == [KEY.decode()]
    assert header_values(seen, "Authorization") == ["Basic am9iOmpvYg=="]  # not the API's header here


def test_the_urls_base_path_prefixes_the_jobs_path_and_the_query_follows(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki, url=upstream.url + "/echo/"))

    response, body = request(served.connection(), "GET", "/x?q=1&r=two")

    assert response.status == 200
    assert json.loads(body)["path"] == "/echo/x?q=1&r=two"
    assert served.records()[0]["path"] == "/x"


# --------------------------------------------------------------------------------------- redaction


def leaked_forms(value: str) -> set[bytes]:
    """Every form of the key that must not reach the job: those /echo-key writes, the key's own."""
    return {KEY, *encoded_forms(KEY), *(form.encode() for form in key_forms(value))}


def test_the_echoed_key_is_redacted_in_the_body_and_the_headers_across_chunks(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki))
    conn = served.connection()
    # Every line of /echo-key is cut in two chunks, 50 ms apart: the halves reach the proxy apart.
    conn.request("GET", "/echo-key?delay=0.05")
    response = conn.getresponse()
    pieces = []
    while piece := response.read1():
        pieces.append(piece)
    body = b"".join(pieces)

    assert response.status == 200
    echoed = response.getheader("X-Echo-Key", "")
    assert "***" in echoed and KEY.decode() not in echoed
    lines = body.split(b"\n")
    assert len(lines) == 6 and lines[-1] == b""
    assert all(b"***" in line for line in lines[:5]), body
    assert lines[1] == b"***"  # the bare key, whole
    assert not [form for form in leaked_forms(BEARER) if form in body]
    assert len(pieces) > 1, "the answer was streamed, not buffered"


def test_a_custom_headers_echoed_key_is_redacted_in_every_form(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki, header="X-Api-Key", value="{credential}"))

    response, body = request(served.connection(), "GET", "/echo-key?header=X-Api-Key&delay=0.02")

    assert response.status == 200
    assert response.getheader("X-Echo-Key") == "***"
    assert body.count(b"***") >= 5
    assert not [form for form in leaked_forms(KEY.decode()) if form in body]


def test_the_key_in_the_jobs_path_is_redacted_in_the_record(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki))

    response, _ = request(served.connection(), "GET", f"/echo/{KEY.decode()}?q={KEY.decode()}")

    assert response.status == 200
    assert served.records()[0]["path"] == "/echo/***"


# --------------------------------------------------------------------------------- streaming, reuse


def test_a_streamed_answer_reaches_the_job_piece_by_piece(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    delay = 0.3
    served = serve(make_api(upstream, pki))
    conn = served.connection()
    conn.request("GET", f"/stream?n=3&delay={delay}")
    response = conn.getresponse()
    buffer, arrivals = b"", list[float]()
    while data := response.read1():
        buffer += data
        arrivals += [time.monotonic()] * (buffer.count(b"\n") - len(arrivals))

    assert response.status == 200
    assert [line.split(" t=")[0] for line in buffer.decode().splitlines()] == [
        "chunk 0",
        "chunk 1",
        "chunk 2",
    ]
    assert len(arrivals) == 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap > delay / 2 for gap in gaps), gaps


def test_one_connection_carries_many_requests_over_one_upstream_connection(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki))
    conn = served.connection()
    paths = ["/echo/1", "/stream?n=2&delay=0", "/bytes?n=10", "/sse?n=1&delay=0", "/echo/5"]
    statuses = []
    upstream_sockets = []
    for path in paths:
        response, _ = request(conn, "GET", path)
        statuses.append(response.status)
        assert served.proxy.upstream.connection is not None
        upstream_sockets.append(served.proxy.upstream.connection.sock)

    assert statuses == [200] * 5
    assert conn.sock is served.client, "the job's connection stayed open"
    assert all(sock is upstream_sockets[0] for sock in upstream_sockets), "the upstream's was reused"
    records = served.records()
    assert [(r["method"], r["path"], r["status"]) for r in records] == [
        ("GET", path.split("?")[0], 200) for path in paths
    ]
    assert records[2]["bytes"] == 10


def test_a_chunked_upload_reaches_the_upstream_whole(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki))
    conn = served.connection()
    big = "/bytes?n=0&id=" + unique("upload")

    response, body = request(conn, "POST", "/echo/chunked", body=iter([b"hello ", b"chunked ", b"world"]))
    big_response, _ = request(conn, "PUT", big, body=(b"y" * 65536 for _ in range(32)))

    assert response.status == 200
    echo = json.loads(body)
    assert echo["body"] == "hello chunked world"
    assert echo["headers"]["Transfer-Encoding"] == "chunked"
    assert big_response.status == 200
    assert record_of(upstream, big)["body_length"] == 32 * 65536


def test_a_content_length_upload_reaches_the_upstream_whole(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki))
    data = bytes(range(97, 123)) * 4000

    response, body = request(served.connection(), "PUT", "/echo/length", body=data)

    assert response.status == 200
    echo = json.loads(body)
    assert echo["body"].encode() == data
    assert echo["headers"]["Content-Length"] == str(len(data))
    assert "Transfer-Encoding" not in echo["headers"]


def test_a_job_that_expects_100_continue_gets_it_and_its_body_goes_on(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki))
    path = "/echo/" + unique("continue")
    served.client.sendall(
        f"POST {path} HTTP/1.1\r\nHost: job\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        interim += served.client.recv(1)

    served.client.sendall(b"hello")
    response = http.client.HTTPResponse(served.client)
    response.begin()

    assert interim.startswith(b"HTTP/1.1 100 ")
    assert response.status == 200
    assert json.loads(response.read())["body"] == "hello"
    assert header_values(record_of(upstream, path), "Expect") == []


# ------------------------------------------------------------------------------------------- errors


def test_an_upstream_that_is_down_is_a_502_that_says_so(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    with socket.socket() as bound:  # bound, never listening: connections to it are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        served = serve(make_api(upstream, pki, url=f"https://127.0.0.1:{port}"))

        response, body = request(served.connection(), "GET", "/echo")

    assert response.status == 502
    assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert f"cannot reach 127.0.0.1:{port}" in body.decode()
    record = served.records()[0]
    assert (record["status"], record["bytes"]) == (502, 0)
    assert "cannot reach" in record["error"]


def test_an_upstream_with_a_certificate_of_another_ca_is_a_502(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki, ca=str(pki["other_ca"])))

    response, body = request(served.connection(), "GET", "/echo")

    assert response.status == 502
    assert "certificate" in body.decode()


def test_a_slow_upstream_is_a_504_and_the_connection_serves_on(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki, timeout_s=0.5))
    conn = served.connection()
    started = time.monotonic()

    response, body = request(conn, "GET", "/slow?delay=60")

    assert response.status == 504
    assert "did not answer within 0.5 s" in body.decode()
    # Guards: the answer comes at the proxy's timeout, not when the upstream answers (60 s); 30 s leaves
    # a busy machine its margin.
    assert time.monotonic() - started < 30
    again, _ = request(conn, "GET", "/echo")
    assert again.status == 200
    assert [r["status"] for r in served.records()] == [504, 200]


def test_a_malformed_request_is_a_400_and_the_connection_closes(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki))
    served.client.sendall(b"GET /echo HTTP/1.1\r\nHost: job\r\nno colon here\r\n\r\n")

    response, body = parse(read_to_end(served.client))

    assert response.status == 400
    assert response.getheader("Connection") == "close"
    assert body.startswith(b"jobrunner: malformed request")
    served.wait_done()
    assert served.records() == []


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES + 2000, 16 * MAX_HEADER_BYTES])
def test_a_request_head_over_64_kib_is_a_431_and_the_connection_closes(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served], size: int
) -> None:
    served = serve(make_api(upstream, pki))
    head = b"GET /echo HTTP/1.1\r\nHost: job\r\nX-Big: " + b"b" * size + b"\r\n\r\n"
    sending = threading.Thread(target=send_ignoring_close, args=(served.client, head))
    sending.start()

    response, body = parse(read_to_end(served.client))

    sending.join(10)
    assert response.status == 431
    assert response.getheader("Connection") == "close"
    assert body.startswith(b"jobrunner: ")
    served.wait_done()
    assert not [r for r in upstream.records() if header_values(r, "X-Big")]


@pytest.mark.parametrize("target", ["http://example.com/echo", "*"])
def test_a_target_that_is_not_a_path_is_a_400(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served], target: str
) -> None:
    served = serve(make_api(upstream, pki))
    served.client.sendall(f"OPTIONS {target} HTTP/1.1\r\nHost: example.com\r\n\r\n".encode())

    response, body = parse(read_to_end(served.client))

    assert response.status == 400
    assert response.getheader("Connection") == "close"
    assert b"must be a path" in body
    assert [(r["method"], r["status"]) for r in served.records()] == [("OPTIONS", 400)]


@pytest.fixture
def answers_once() -> Iterator[Callable[[bytes], str]]:
    """A plain-HTTP upstream that reads one request, writes the given bytes and closes: its URL."""
    servers: list[tuple[socket.socket, threading.Thread]] = []

    def start(answer: bytes) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(10)

        def answer_one() -> None:
            conn, _ = listener.accept()
            with conn:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    head += conn.recv(1)
                conn.sendall(answer)

        thread = threading.Thread(target=answer_one, daemon=True)
        thread.start()
        servers.append((listener, thread))
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener, thread in servers:
        thread.join(10)
        listener.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nxyz",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nxyz",
    ],
    ids=["short-of-its-length", "chunked-between-chunks", "chunked-in-a-chunk"],
)
def test_an_answer_that_breaks_off_upstream_breaks_off_for_the_job(
    answers_once: Callable[[bytes], str], serve: Callable[[Api], Served], answer: bytes
) -> None:
    served = serve(Api(name="llm", url=answers_once(answer), credential="llm-key", timeout_s=5.0))
    conn = served.connection()
    conn.request("GET", "/cut")
    response = conn.getresponse()

    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()  # not a shorter answer that looks whole
    served.wait_done()  # the connection is closed, the proxy did not crash
    [record] = served.records()
    assert record["path"] == "/cut"
    assert record["error"].startswith("cut off: ")
    assert record["status"] == 200  # what the job was told before the answer broke off


# ------------------------------------------------------------------------------------------ records


def test_records_have_no_query_and_no_header_value(
    upstream: Upstream,
    pki: dict[str, Path],
    serve: Callable[[Api], Served],
    journal_entries: list[str],
) -> None:
    served = serve(make_api(upstream, pki))
    conn = served.connection()
    request(conn, "GET", "/echo/a?token=query-secret", headers={"X-Job": "header-secret"})
    request(conn, "POST", "/bytes?n=1000", body=b"12345")
    request(conn, "DELETE", "/status/404")
    request(conn, "GET", "/echo-key")

    records = served.records()

    assert [(r["method"], r["path"], r["status"]) for r in records] == [
        ("GET", "/echo/a", 200),
        ("POST", "/bytes", 200),
        ("DELETE", "/status/404", 404),
        ("GET", "/echo-key", 200),
    ]
    assert all(set(r) == {"method", "path", "status", "bytes", "duration_ms"} for r in records)
    assert records[1]["bytes"] == 1000
    assert all(isinstance(r["duration_ms"], float) and r["duration_ms"] >= 0 for r in records)
    assert len(journal_entries) == 4
    assert journal_entries[0].startswith("API llm: job build run 7: GET /echo/a -> 200, ")
    written = json.dumps(records) + "\n".join(journal_entries)
    for secret in [KEY.decode(), "query-secret", "header-secret"]:
        assert secret not in written


# ------------------------------------------------------------------------------- HEAD, 204 and 304


def test_head_keeps_its_content_length_and_204_and_304_have_no_body(
    upstream: Upstream, pki: dict[str, Path], serve: Callable[[Api], Served]
) -> None:
    served = serve(make_api(upstream, pki))
    conn = served.connection()

    head, head_body = request(conn, "HEAD", "/bytes?n=1234")
    no_content, no_content_body = request(conn, "GET", "/status/204")
    not_modified, not_modified_body = request(conn, "GET", "/status/304")
    after, after_body = request(conn, "GET", "/echo/after")

    assert (head.status, head.getheader("Content-Length"), head_body) == (200, "1234", b"")
    assert (no_content.status, no_content_body) == (204, b"")
    assert (not_modified.status, not_modified_body) == (304, b"")
    assert (after.status, json.loads(after_body)["path"]) == (200, "/echo/after")  # still in step
    assert [(r["method"], r["status"], r["bytes"]) for r in served.records()] == [
        ("HEAD", 200, 0),
        ("GET", 204, 0),
        ("GET", 304, 0),
        ("GET", 200, len(after_body)),
    ]


# ------------------------------------------------------------------------- who connected, the key


@pytest.mark.parametrize(
    ("cgroup", "job"),
    [
        ("0::/system.slice/system-job\\x2dbuild.slice/job-build@3-123-1000.service", "build"),
        (
            "0::/system.slice/system-job\\x2dnightly\\x2dreport.slice/job-nightly-report@0-9-1000.service\n",
            "nightly-report",
        ),
        ("0::/system.slice/job@build.service", "build"),
        ("0::/system.slice/system-job.slice/job@build.service\n", "build"),
        ("12:pids:/system.slice/job@build.service\n0::/system.slice/job@build.service\n", "build"),
        ("0::/system.slice/system-jobrunner\\x2dapi\\x2dllm.slice/jobrunner-api-llm@0-4242-0.service", None),
        ("0::/user.slice/user-1000.slice/session-4.scope", None),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/app.service", None),
        ("0::/system.slice/jobrunner.service", None),
        ("0::/system.slice/system-job\\x2dbuild.slice", None),
        ("0::/system.slice/job@.service", None),
        # A user's own service manager may name a unit anything: never taken for a job's.
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/job@build.service", None),
        ("0::/user.slice/user-1000.slice/user@1000.service/job-build@1-2-3.service", None),
        ("0::/system.slice/other.slice/deeper.slice/job@build.service", None),
        ("", None),
    ],
)
def test_the_job_of_a_cgroup(cgroup: str, job: str | None) -> None:
    assert job_of_cgroup(cgroup) == job


def test_a_missing_key_names_the_command_that_stores_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: Upstream, pki: dict[str, Path]
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    api = make_api(upstream, pki)

    with pytest.raises(ProxyError) as missing:
        _load_key(api)
    (tmp_path / "llm-key").write_bytes(UNAVAILABLE)  # systemd's SetCredential= fallback
    with pytest.raises(ProxyError) as unavailable:
        _load_key(api)

    for error in (missing.value, unavailable.value):
        assert error.status == 502
        assert "jobrunner creds set llm-key" in error.text


def test_a_keys_trailing_newline_is_not_part_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: Upstream, pki: dict[str, Path]
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "llm-key").write_bytes(KEY + b"\n")

    assert _load_key(make_api(upstream, pki)) == KEY
    (tmp_path / "llm-key").write_bytes(b"\r\n")
    with pytest.raises(ProxyError, match="jobrunner creds set llm-key"):
        _load_key(make_api(upstream, pki))  # an empty key is no key


def test_the_proxy_run_by_hand_says_how_it_is_started() -> None:
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run(
        [sys.executable, "-c", "import runner.apiproxy; runner.apiproxy.main()", "llm"],
        capture_output=True,
        env=env,
        check=False,
        timeout=60,
    )

    assert res.returncode != 0
    assert b"Traceback" not in res.stderr
    assert b"started by systemd (jobrunner-api-NAME.socket)" in res.stderr
