"""runner/endpoint.py: the job's loopback endpoint of an API, which hands each connection to a proxy.

`Endpoints` is driven by a small poll loop here, as the runner's Supervisor drives it. A thread plays
the API's proxy (jobrunner-api-NAME@.service) on a unix socket `<api>.sock` in tmp_path: it reads the
handshake line, answers, receives the job's connection (SCM_RIGHTS) and speaks HTTP on it. The job is
an HTTP client in another thread.
"""

from __future__ import annotations

import gc
import http.client
import io
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar, cast

import pytest

from runner import endpoint
from runner.config import Api
from runner.endpoint import Endpoints, Record, connection_owner, plain_response

T = TypeVar("T")
API = Api(name="llm", url="https://api.example.invalid", credential="llm-key")
OTHER_API = Api(name="other", url="https://other.example.invalid", credential="other-key")
URL = "JOB_API_LLM_URL"
RECORD_LINE = b'{"method": "GET", "path": "/x", "status": 200, "bytes": 2, "duration_ms": 1.0}\n'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nok"  # ends at EOF


def result(future: Future[T]) -> T:
    return future.result(timeout=10)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


@pytest.fixture
def records() -> list[Record]:
    return []


@pytest.fixture
def endpoints(tmp_path: Path, records: list[Record]) -> Iterator[Endpoints]:
    created = Endpoints("build", "42", [API], records.append, sockets_dir=str(tmp_path))
    yield created
    created.close()


def drive(endpoints: Endpoints, until: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """The runner's poll loop, until `until()` (checked at least every 20 ms)."""
    deadline = time.monotonic() + timeout_s
    while not until():
        now = time.monotonic()
        assert now < deadline, "timed out"
        endpoints.check_timers(now)
        poller = select.poll()
        for fd, events in endpoints.poll_fds():
            poller.register(fd, events)
        timer = endpoints.next_timer()
        wait = 0.02 if timer is None else min(0.02, max(timer - now, 0.0))
        for fd, _ in poller.poll(wait * 1000):
            if endpoints.owns(fd):
                endpoints.on_ready(fd)


def port_of(endpoints: Endpoints) -> int:
    return int(endpoints.urls[URL].rsplit(":", 1)[1])


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """The job: one HTTP request to its endpoint."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def get_on(sock: socket.socket, path: str) -> tuple[int, bytes]:
    """The job: one HTTP request on a connection it opened already."""
    with sock:
        sock.settimeout(10)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: endpoint\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        piece = sock.recv(1)
        assert piece, f"EOF after {line!r}"
        line += piece
    return line.rstrip(b"\n")


def read_head(sock: socket.socket) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        piece = sock.recv(1)
        assert piece, f"EOF after {head!r}"
        head += piece
    return head


class FakeProxy:
    """The API's socket in `directory`; `run` accepts `count` connections, each served by `serve`."""

    def __init__(self, directory: Path, serve: Callable[[socket.socket], bytes], api: str = "llm") -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(directory / f"{api}.sock"))
        self.listener.listen(8)
        self.listener.settimeout(10)
        self.serve = serve

    def run(self, count: int = 1) -> list[bytes]:
        """What `serve` returned for each connection."""
        seen = []
        for _ in range(count):
            control, _ = self.listener.accept()
            with control:
                control.settimeout(10)
                seen.append(self.serve(control))
        return seen

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fake_proxies() -> Iterator[list[FakeProxy]]:
    made: list[FakeProxy] = []
    yield made
    for fake in made:
        fake.close()


def answering(
    gate: threading.Event | None = None, got_request: threading.Event | None = None
) -> Callable[[socket.socket], bytes]:
    """A proxy that takes the connection, answers its request with ANSWER and reports it. Returns the
    handshake line and the request line."""

    def serve(control: socket.socket) -> bytes:
        hello = read_line(control)
        control.sendall(b"+\n")
        message, fds, _, _ = socket.recv_fds(control, 1, 1)
        assert (message, len(fds)) == (b"C", 1)
        with socket.socket(fileno=fds[0]) as job:
            job.settimeout(10)
            head = read_head(job)
            if got_request is not None:
                got_request.set()
            if gate is not None:
                assert gate.wait(10)
            job.sendall(ANSWER)
        control.sendall(RECORD_LINE)
        return hello + b" | " + head.split(b"\r\n", 1)[0]

    return serve


# ------------------------------------------------------------------------------------- handing over


def test_the_jobs_connection_is_handed_to_the_proxy_which_answers_and_reports(
    tmp_path: Path,
    endpoints: Endpoints,
    records: list[Record],
    pool: ThreadPoolExecutor,
    fake_proxies: list[FakeProxy],
) -> None:
    fake_proxies.append(fake := FakeProxy(tmp_path, answering()))
    proxy = pool.submit(fake.run)
    assert endpoints.urls == {URL: f"http://127.0.0.1:{port_of(endpoints)}"}
    job = pool.submit(get, port_of(endpoints), "/x")

    drive(endpoints, job.done)
    endpoints.finish(timeout_s=5)

    # The body ends at EOF: the answer arrived whole only if the runner kept no copy of the connection.
    status, _, body = result(job)
    assert (status, body) == (200, b"ok")
    assert result(proxy) == [b"jobrunner-api 1 build 42 | GET /x HTTP/1.1"]
    assert records == [Record("llm", "GET /x -> 200, 2 bytes, 1.0 ms")]
    assert endpoints.poll_fds() == []


def test_a_proxy_that_refuses_is_a_502_with_its_reason(
    tmp_path: Path, endpoints: Endpoints, pool: ThreadPoolExecutor, fake_proxies: list[FakeProxy]
) -> None:
    def refuse(control: socket.socket) -> bytes:
        hello = read_line(control)
        control.sendall(b"-some reason\n")
        return hello

    fake_proxies.append(fake := FakeProxy(tmp_path, refuse))
    proxy = pool.submit(fake.run)
    job = pool.submit(get, port_of(endpoints), "/x")

    drive(endpoints, job.done)

    status, headers, body = result(job)
    assert status == 502
    assert headers["Connection"] == "close"
    assert body == b"jobrunner: API 'llm': some reason\n"
    assert result(proxy) == [b"jobrunner-api 1 build 42"]


def test_a_proxy_that_closes_before_it_is_ready_is_a_502_naming_its_journal(
    tmp_path: Path, endpoints: Endpoints, pool: ThreadPoolExecutor, fake_proxies: list[FakeProxy]
) -> None:
    fake_proxies.append(fake := FakeProxy(tmp_path, read_line))  # reads the handshake, then closes
    proxy = pool.submit(fake.run)
    job = pool.submit(get, port_of(endpoints), "/x")

    drive(endpoints, job.done)

    status, _, body = result(job)
    assert status == 502
    assert b"journalctl -u 'jobrunner-api-llm@*'" in body
    result(proxy)


def test_without_the_apis_socket_the_job_gets_a_502(endpoints: Endpoints, pool: ThreadPoolExecutor) -> None:
    job = pool.submit(get, port_of(endpoints), "/x")

    drive(endpoints, job.done)

    status, _, body = result(job)
    assert status == 502
    assert b"API 'llm' is not reachable" in body


def test_a_proxy_that_does_not_start_in_time_is_a_504(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    endpoints: Endpoints,
    pool: ThreadPoolExecutor,
    fake_proxies: list[FakeProxy],
) -> None:
    monkeypatch.setattr(endpoint, "READY_TIMEOUT_S", 0.3)

    def never_ready(control: socket.socket) -> bytes:
        read_line(control)
        return control.recv(1)  # b"" once the runner gives up

    fake_proxies.append(fake := FakeProxy(tmp_path, never_ready))
    proxy = pool.submit(fake.run)
    job = pool.submit(get, port_of(endpoints), "/x")

    drive(endpoints, job.done)

    status, _, body = result(job)
    assert status == 504
    assert b"did not start in time" in body
    assert result(proxy) == [b""]


# ------------------------------------------------------------------------------------ who connects


def test_the_owner_of_a_loopback_connection_is_its_processs_user() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname(), timeout=10) as client,
    ):
        server, peer = listener.accept()
        with server:
            assert peer == client.getsockname()

            assert connection_owner(peer, listener.getsockname()) == os.getuid()
            assert connection_owner(("127.0.0.1", 1), listener.getsockname()) is None
            assert connection_owner(peer, ("127.0.0.2", listener.getsockname()[1])) is None


TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 1111 1 0 100 0 0 10 0
   1: 0100007F:C350 0100007F:1F90 06 00000000:00000000 03:00000E2E 00000000  1002        0 0 3 0
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1001        0 2222 1 0 20 4 30 10 -1
   3: 0100007F:C351 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1003        0 3333 1 0 20 4 30 10 -1
   4: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  4242        0 4444 1 0 20 4 30 10 -1
"""


@pytest.mark.skipif(sys.byteorder != "little", reason="the table's addresses are written for little-endian")
def test_the_owner_is_the_uid_of_the_peers_established_entry(tmp_path: Path) -> None:
    table = tmp_path / "tcp"
    table.write_text(TABLE)
    local = ("127.0.0.1", 8080)  # 0100007F:1F90

    assert connection_owner(("127.0.0.1", 50000), local, str(table)) == 4242
    assert connection_owner(("127.0.0.1", 50001), local, str(table)) == 1003
    assert connection_owner(("127.0.0.1", 50002), local, str(table)) is None
    assert connection_owner(("127.0.0.1", 50000), local, str(tmp_path / "missing")) is None
    (tmp_path / "empty").write_text("")
    assert connection_owner(("127.0.0.1", 50000), local, str(tmp_path / "empty")) is None


def test_a_connection_from_another_user_is_refused_with_403(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    endpoints: Endpoints,
    pool: ThreadPoolExecutor,
    fake_proxies: list[FakeProxy],
) -> None:
    monkeypatch.setattr(endpoint, "connection_owner", lambda *args: os.getuid() + 1)
    fake_proxies.append(fake := FakeProxy(tmp_path, answering()))
    job = pool.submit(get, port_of(endpoints), "/x")

    drive(endpoints, job.done)

    status, _, body = result(job)
    assert status == 403
    assert b"the job's own processes only" in body
    fake.listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        fake.listener.accept()  # the proxy was never asked


# ------------------------------------------------------------------------------- connection limit


def test_over_max_connections_the_next_one_waits_until_one_closes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    endpoints: Endpoints,
    pool: ThreadPoolExecutor,
    fake_proxies: list[FakeProxy],
) -> None:
    monkeypatch.setattr(endpoint, "MAX_CONNECTIONS", 1)
    gate, got_first = threading.Event(), threading.Event()
    first_answer = answering(gate, got_first)
    served = 0

    def serve(control: socket.socket) -> bytes:
        nonlocal served
        served += 1
        return first_answer(control) if served == 1 else answering()(control)

    fake_proxies.append(fake := FakeProxy(tmp_path, serve))
    proxy = pool.submit(fake.run, 2)
    first = pool.submit(get, port_of(endpoints), "/first")
    drive(endpoints, got_first.is_set)  # the first is handed over and its proxy is serving it
    listener_fd = next(iter(endpoints.listeners))

    second_sock = socket.create_connection(("127.0.0.1", port_of(endpoints)), timeout=10)
    second = pool.submit(get_on, second_sock, "/second")
    waiting = select.poll()
    waiting.register(listener_fd, select.POLLIN)

    assert waiting.poll(10_000), "the second connection waits in the listen queue"
    assert listener_fd not in [fd for fd, _ in endpoints.poll_fds()]
    assert served == 1
    gate.set()
    drive(endpoints, second.done)
    assert result(first) == (200, {"Content-Type": "text/plain", "Connection": "close"}, b"ok")
    assert result(second) == (200, b"ok")
    assert [line.split(b" | ")[1] for line in result(proxy)] == [
        b"GET /first HTTP/1.1",
        b"GET /second HTTP/1.1",
    ]


# -------------------------------------------------------------------------------- answers, closing


def test_a_plain_response_is_complete_http_that_closes_the_connection() -> None:
    class Received:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def makefile(self, mode: str) -> io.BytesIO:
            return io.BytesIO(self.data)

    def parse(data: bytes) -> tuple[http.client.HTTPResponse, bytes]:
        response = http.client.HTTPResponse(cast(socket.socket, Received(data)))
        response.begin()
        return response, response.read()

    forbidden, body = parse(plain_response(403, "Forbidden", "not yours \u00e9"))

    assert (forbidden.status, forbidden.reason) == (403, "Forbidden")
    assert forbidden.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert forbidden.getheader("Connection") == "close"
    assert forbidden.will_close
    assert body == "jobrunner: not yours \u00e9\n".encode()
    assert forbidden.getheader("Content-Length") == str(len(body))
    assert forbidden.getheader("Retry-After") is None


def fd_count() -> int:
    gc.collect()  # sockets of earlier tests, in reference cycles, are not closed in the middle of this one
    return len(os.listdir("/proc/self/fd"))


def test_close_closes_listeners_links_and_refusals(
    tmp_path: Path, records: list[Record], pool: ThreadPoolExecutor
) -> None:
    release = threading.Event()

    def waiting(control: socket.socket) -> bytes:
        read_line(control)
        assert release.wait(10)
        return control.recv(1)  # b"": the runner closed its side

    before = fd_count()
    fake = FakeProxy(tmp_path, waiting)
    proxy = pool.submit(fake.run)
    endpoints = Endpoints("build", "42", [API, OTHER_API], records.append, sockets_dir=str(tmp_path))
    linked = socket.create_connection(("127.0.0.1", port_of(endpoints)), timeout=10)
    other_port = int(endpoints.urls["JOB_API_OTHER_URL"].rsplit(":", 1)[1])
    refused = socket.create_connection(("127.0.0.1", other_port), timeout=10)  # no socket: a refusal
    drive(endpoints, lambda: bool(endpoints.links and endpoints.refusals))

    endpoints.close()

    assert endpoints.poll_fds() == []
    assert linked.recv(100) == b"", "the runner's copy of the job's connection is closed"
    assert refused.recv(65536).startswith(b"HTTP/1.1 502 ")
    assert refused.recv(100) == b""
    release.set()
    assert result(proxy) == [b""], "the proxy saw its socket close"
    for sock in (linked, refused, fake):
        sock.close()
    assert fd_count() == before
