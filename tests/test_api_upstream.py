"""The test upstream server of the API key proxy tests (tests/api_upstream.py), on the host."""

from __future__ import annotations

import base64
import http.client
import io
import itertools
import json
import socket
import ssl
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.api_upstream import Upstream, read_chunked

KEY = "Bearer sk-test-0123456789abcdef"


def strict_context(cafile: Path) -> ssl.SSLContext:
    """The default context, plus the strict X.509 checks Python 3.13 turns on by default."""
    context = ssl.create_default_context(cafile=cafile)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def connect(upstream: Upstream, pki: dict[str, Path], host: str = "127.0.0.1") -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(host, upstream.port, context=strict_context(pki["ca"]), timeout=10)


def get(conn: http.client.HTTPConnection, path: str, **kwargs: object) -> tuple[int, bytes]:
    conn.request(kwargs.pop("method", "GET"), path, **kwargs)  # type: ignore[arg-type]
    resp = conn.getresponse()
    return resp.status, resp.read()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_https_verifies_with_the_ca(upstream: Upstream, pki: dict[str, Path], host: str) -> None:
    assert upstream.url == f"https://127.0.0.1:{upstream.port}"
    context = strict_context(pki["ca"])
    context.set_alpn_protocols(["h2", "http/1.1"])
    conn = http.client.HTTPSConnection(host, upstream.port, context=context, timeout=10)
    assert get(conn, "/echo")[0] == 200
    assert conn.sock.selected_alpn_protocol() == "http/1.1"
    conn.close()


def test_another_ca_is_refused(upstream: Upstream, pki: dict[str, Path]) -> None:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", upstream.port, context=strict_context(pki["other_ca"]), timeout=10
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/echo")
    conn.close()
    assert get(connect(upstream, pki), "/echo")[0] == 200  # the server lives on


def test_keep_alive(upstream: Upstream, pki: dict[str, Path]) -> None:
    conn = connect(upstream, pki)
    sockets = []
    for i in range(3):
        status, body = get(conn, f"/echo/{i}", method="POST", body=b"x" * i)
        assert status == 200
        assert json.loads(body)["body"] == "x" * i
        sockets.append(conn.sock)
    assert sockets[0] is not None
    assert all(sock is sockets[0] for sock in sockets)
    conn.close()


def test_echo_headers_and_chunked_body(upstream: Upstream, pki: dict[str, Path]) -> None:
    conn = connect(upstream, pki)
    body = iter([b"hello ", "w\u00f6rld".encode(), b"!"])  # an iterable: http.client sends it chunked
    status, data = get(conn, "/echo/sub?q=1&r=2", method="PUT", body=body, headers={"X-Test": "yes"})
    assert status == 200
    echo = json.loads(data)
    assert echo["method"] == "PUT"
    assert echo["path"] == "/echo/sub?q=1&r=2"
    assert echo["headers"]["X-Test"] == "yes"
    assert echo["headers"]["Transfer-Encoding"] == "chunked"
    assert echo["body"] == "hello w\u00f6rld!"
    # The connection is still in step after a chunked request.
    assert json.loads(get(conn, "/echo", method="POST", body=b"abc")[1])["body"] == "abc"
    conn.close()


def test_echo_key_forms(upstream: Upstream, pki: dict[str, Path]) -> None:
    conn = connect(upstream, pki)
    conn.request("GET", "/echo-key", headers={"Authorization": KEY})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("X-Echo-Key") == KEY
    assert resp.getheader("Content-Length") is None
    assert resp.getheader("Transfer-Encoding") == "chunked"
    bare = KEY.removeprefix("Bearer ")
    assert resp.read().decode().splitlines() == [
        KEY,
        bare,
        base64.b64encode(KEY.encode()).decode(),
        KEY.encode().hex(),
        urllib.parse.quote(KEY, safe=""),
    ]
    status, body = get(conn, "/echo-key?header=X-Api-Key&delay=0", headers={"X-Api-Key": "k/1+2"})
    assert (status, body.decode().splitlines()) == (
        200,
        ["k/1+2", "k/1+2", "ay8xKzI=", "6b2f312b32", "k%2F1%2B2"],
    )
    assert get(conn, "/echo-key")[0] == 400  # no Authorization header
    conn.close()


def test_echo_key_splits_the_key_across_chunks(upstream: Upstream, pki: dict[str, Path]) -> None:
    with (
        socket.create_connection(("127.0.0.1", upstream.port), timeout=10) as raw,
        strict_context(pki["ca"]).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        request = f"GET /echo-key HTTP/1.1\r\nHost: x\r\nAuthorization: {KEY}\r\nConnection: close\r\n\r\n"
        tls.sendall(request.encode())
        response = b""
        while data := tls.recv(65536):
            response += data
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    chunks = list(read_chunked(io.BytesIO(body)))
    assert b"".join(chunks).split(b"\n")[0] == KEY.encode()
    assert len(chunks) == 10
    assert not any(KEY.encode() in chunk or KEY.removeprefix("Bearer ").encode() in chunk for chunk in chunks)


def test_stream_chunks_are_spaced_in_time(upstream: Upstream, pki: dict[str, Path]) -> None:
    delay = 0.2
    conn = connect(upstream, pki)
    conn.request("GET", f"/stream?n=3&delay={delay}")
    resp = conn.getresponse()
    assert resp.getheader("Transfer-Encoding") == "chunked"
    buffer, arrivals = b"", list[float]()
    while data := resp.read1():
        buffer += data
        arrivals += [time.monotonic()] * (buffer.count(b"\n") - len(arrivals))
    lines = buffer.decode().splitlines()
    assert [line.split(" t=")[0] for line in lines] == ["chunk 0", "chunk 1", "chunk 2"]
    assert len(arrivals) == 3
    assert all(later - earlier > delay / 2 for earlier, later in itertools.pairwise(arrivals))
    sent = [float(line.split(" t=")[1]) for line in lines]
    assert all(later - earlier > delay / 2 for earlier, later in itertools.pairwise(sent))
    conn.close()


def test_sse(upstream: Upstream, pki: dict[str, Path]) -> None:
    conn = connect(upstream, pki)
    conn.request("GET", "/sse?n=2&delay=0")
    resp = conn.getresponse()
    assert resp.getheader("Content-Type") == "text/event-stream"
    assert resp.getheader("Cache-Control") == "no-cache"
    events = resp.read().decode().split("\n\n")
    assert [json.loads(event.removeprefix("data: "))["i"] for event in events[:2]] == [0, 1]
    assert events[2:] == ["data: [DONE]", ""]
    conn.close()


def test_bytes_slow_status_and_404(upstream: Upstream, pki: dict[str, Path]) -> None:
    conn = connect(upstream, pki)
    conn.request("GET", "/bytes?n=5000000")
    resp = conn.getresponse()
    assert resp.getheader("Content-Length") == "5000000"
    assert resp.getheader("Content-Type") == "application/octet-stream"
    body = resp.read()
    assert len(body) == 5_000_000
    assert body.count(b"x") == 5_000_000
    start = time.monotonic()
    assert get(conn, "/slow?delay=0.1") == (200, b"slow\n")
    assert time.monotonic() - start >= 0.1
    assert get(conn, "/status/503")[0] == 503
    assert get(conn, "/status/204") == (204, b"")
    assert get(conn, "/nowhere")[0] == 404
    assert get(conn, "/echo")[0] == 200  # still one connection
    conn.close()


def test_records(pki: dict[str, Path], tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    with Upstream(cert=pki["cert"], key=pki["key"], record=record) as server:
        conn = connect(server, pki)
        get(conn, "/echo?a=b", method="POST", body=iter([b"12345", b"678"]), headers={"X-One": "1"})
        get(conn, "/bytes?n=3", headers={"Authorization": KEY})
        conn.close()
    records = server.records()
    assert [(r["method"], r["path"], r["body_length"]) for r in records] == [
        ("POST", "/echo?a=b", 8),
        ("GET", "/bytes?n=3", 0),
    ]
    assert ["X-One", "1"] in records[0]["headers"]
    assert ["Authorization", KEY] in records[1]["headers"]
    assert record.read_text().count("\n") == 2


def test_plain_http(tmp_path: Path) -> None:
    with Upstream() as server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        assert json.loads(get(conn, "/echo", method="DELETE")[1])["method"] == "DELETE"
        conn.close()
        assert [r["method"] for r in server.records()] == ["DELETE"]
    assert server.returncode == 0
    assert server.records()[0]["path"] == "/echo"  # kept after the temp directory is gone
