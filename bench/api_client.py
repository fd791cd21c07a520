"""The API benchmark's measuring side: runs *as the job* (bench/api.py's [jobs.bench-api]) and prints JSON.

    python3 api_client.py --direct https://127.0.0.1:8443 --ca CA.pem --api bench
                          [--text-direct https://127.0.0.1:8444 --text-api bench-text]
                          [--requests 300] [--block 10] [--new 30] [--bytes 100000000] [--rounds 3]

Every figure is measured over both paths in this one process, so that each has its baseline beside it:
  direct    https to the upstream itself (the job's network reaches 127.0.0.1:8443), trusting --ca;
  endpoint  plain http to $JOB_API_<API>_URL: the runner hands each connection to a fresh proxy unit,
            which adds the key and forwards over TLS to the same upstream.
Passes (the clock runs from the request's first byte, or the connect, to the answer's last byte):
  keepalive one connection per path, warmed up, then --requests GET /echo on each, in blocks of --block
            that alternate between the paths (which one goes first flips every pair of blocks);
  new       --new GET /echo per path, each on a new connection (direct: TCP + TLS handshake; endpoint:
            TCP, a proxy unit's start, its TLS handshake with the upstream), alternating, a pause between;
  bytes     GET /bytes?n=--bytes, --rounds per path alternating after one untimed round each, read with
            readinto into one reused 1 MiB buffer; each on a connection of its own that has already
            answered a GET /echo (so neither a unit's start nor a TLS handshake is in that time);
  bytes-text the same from a second upstream and API (--text-direct, --text-api) whose /bytes is text.
The result is one line on stdout, RESULT_PREFIX then JSON; progress goes to stderr. Standard library only
(the job has the container's bare python3).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
import time
import urllib.parse
from typing import Any

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

RESULT_PREFIX = "api-bench-result "
READ_SIZE = 1 << 20
PAUSE_S = 0.03  # between new connections: the last proxy unit's teardown happens outside the clock


def log(msg: str) -> None:
    print(f"[api_client] {msg}", file=sys.stderr, flush=True)


class Route:
    """One way to the upstream: a host, a port, and TLS or not."""

    def __init__(self, name: str, url: str, context: ssl.SSLContext | None) -> None:
        parts = urllib.parse.urlsplit(url)
        self.name = name
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.context = context if parts.scheme == "https" else None

    def connect(self) -> http.client.HTTPConnection:
        if self.context is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=60, context=self.context
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        conn.connect()
        return conn


def get(conn: http.client.HTTPConnection, target: str) -> tuple[int, bytes]:
    conn.request("GET", target)
    response = conn.getresponse()
    return response.status, response.read()


class Failures:
    """Answers other than 200, per path: counted and the first few kept; their times are not."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, Any]] = {}

    def check(self, path: str, status: int, body: bytes) -> bool:
        if status == 200:
            return True
        entry = self.seen.setdefault(path, {"count": 0, "first": []})
        entry["count"] += 1
        if len(entry["first"]) < 3:
            entry["first"].append(f"{status}: {body[:200].decode(errors='replace').strip()}")
        return False


def keepalive(
    routes: list[Route], requests: int, block: int, warmup: int, failures: Failures
) -> dict[str, list[float]]:
    conns = {r.name: r.connect() for r in routes}
    for r in routes:  # untimed, and proof that each path answers (the endpoint's with the key added)
        status, body = get(conns[r.name], "/echo")
        if failures.check(r.name, status, body):
            authorization = json.loads(body)["headers"].get("Authorization")
            log(f"keepalive: {r.name} answers; Authorization seen upstream: {authorization!r}")
        for _ in range(warmup - 1):
            failures.check(r.name, *get(conns[r.name], "/echo"))
    times: dict[str, list[float]] = {r.name: [] for r in routes}
    order = list(routes)
    for i in range((requests + block - 1) // block):
        if i % 2 == 0 and i:
            order.reverse()  # A B, B A, A B...: neither path always runs right after the other
        for r in order:
            conn = conns[r.name]
            for _ in range(min(block, requests - i * block)):
                started = time.perf_counter()
                status, body = get(conn, "/echo")
                elapsed = time.perf_counter() - started
                if failures.check(r.name, status, body):
                    times[r.name].append(elapsed)
    for conn in conns.values():
        conn.close()
    return times


def new_connections(
    routes: list[Route], requests: int, warmup: int, failures: Failures
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {r.name: [] for r in routes}
    order = list(routes)
    for i in range(warmup + requests):
        if i % 2:
            order.reverse()
        for r in order:
            started = time.perf_counter()
            conn = r.connect()
            status, body = get(conn, "/echo")
            conn.close()
            elapsed = time.perf_counter() - started
            if failures.check(r.name, status, body) and i >= warmup:
                times[r.name].append(elapsed)
            time.sleep(PAUSE_S)
    return times


def download(route: Route, size: int, buf: memoryview) -> dict[str, Any]:
    conn = route.connect()
    status, body = get(conn, "/echo")  # untimed: the proxy unit's start and the TLS handshakes
    if status != 200:
        raise RuntimeError(f"{route.name}: GET /echo: {status}: {body[:300]!r}")
    started = time.perf_counter()
    conn.request("GET", f"/bytes?n={size}")
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"GET /bytes: {response.status} {response.reason}: {response.read(300)!r}")
    got = 0
    while n := response.readinto(buf):
        got += n
    seconds = time.perf_counter() - started
    conn.close()
    if got != size:
        raise RuntimeError(f"{route.name}: /bytes gave {got} bytes, not {size}")
    framing = "chunked" if response.chunked else "content-length"
    return {"bytes": got, "seconds": seconds, "framing": framing}


def throughput(routes: list[Route], size: int, rounds: int, label: str) -> dict[str, list[dict[str, Any]]]:
    buf = memoryview(bytearray(READ_SIZE))
    results: dict[str, list[dict[str, Any]]] = {r.name: [] for r in routes}
    order = list(routes)
    for r in order:  # untimed: the first large answer of each path warms its buffers
        download(r, size, buf)
    for i in range(rounds):
        if i % 2:
            order.reverse()
        for r in order:
            result = download(r, size, buf)
            log(f"{label}: {r.name} {size / result['seconds'] / 1e6:.0f} MB/s")
            results[r.name].append(result)
    return results


def endpoint_of(api: str) -> str:
    variable = f"JOB_API_{api.upper().replace('-', '_')}_URL"
    url = os.environ.get(variable)
    if not url:
        sys.exit(f"api_client: ${variable} is not set: run me as a job that lists API {api!r}")
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--direct", required=True, help="the upstream's own https URL")
    parser.add_argument("--ca", required=True, help="the CA file to trust for --direct")
    parser.add_argument("--api", required=True, help="the API's name in jobs.toml ($JOB_API_<NAME>_URL)")
    parser.add_argument("--text-direct", help="an upstream whose /bytes is text, for a 'bytes-text' pass")
    parser.add_argument("--text-api", help="the API in front of --text-direct")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--new", type=int, default=30)
    parser.add_argument("--new-warmup", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=100_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="keepalive,new,bytes,bytes-text")
    args = parser.parse_args(argv)
    endpoint_url = endpoint_of(args.api)
    context = ssl.create_default_context(cafile=args.ca)
    routes = [Route("direct", args.direct, context), Route("endpoint", endpoint_url, None)]
    only = set(args.only.split(","))
    result: dict[str, Any] = {"python": sys.version.split()[0], "endpoint": endpoint_url, "errors": {}}
    passes: dict[str, Callable[[Failures], Any]] = {
        "keepalive": lambda f: keepalive(routes, args.requests, args.block, args.warmup, f),
        "new": lambda f: new_connections(routes, args.new, args.new_warmup, f),
        "bytes": lambda f: throughput(routes, args.bytes, args.rounds, "bytes"),
    }
    if args.text_api and args.text_direct:
        text_routes = [
            Route("direct", args.text_direct, context),
            Route("endpoint", endpoint_of(args.text_api), None),
        ]
        passes["bytes-text"] = lambda f: throughput(text_routes, args.bytes, args.rounds, "bytes-text")
    for name, measure in passes.items():
        if name not in only:
            continue
        log(f"{name}: ...")
        failures = Failures()
        try:
            result[name] = measure(failures)
        except Exception as e:  # the other passes still run; the table says what failed
            log(f"{name}: failed: {e!r}")
            failures.seen["pass"] = {"count": 1, "first": [repr(e)[:300]]}
        if failures.seen:
            log(f"{name}: failures: {failures.seen}")
            result["errors"][name] = failures.seen
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
