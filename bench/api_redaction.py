"""What redacting an API's answers costs: the proxy's throughput with each choice of what it searches for.

The API proxy (runner/apiproxy.py) searches every answer for the key and its encoded forms (hex in both
cases, base64 and URL-safe base64 at each alignment, URL-encoding: runner/redact.py's encoded_forms).
Each form searched is one more pass over every byte. This measures, in one process on this host (no
systemd: the proxy class itself, over a socketpair, from the HTTPS test upstream), the throughput of a
100 MB answer read directly and through the proxy with:
  forms  the key and its encoded forms (what the proxy does)
  key    the key alone
  none   no redaction at all (the ceiling: TLS, HTTP framing and copying)
Rounds alternate, and each figure is the median of its rounds; ratios are against direct in the same
run. The trade-off is written down in runner/apiproxy.py (Proxy.__init__) and docs/performance.md.

    python3 bench/api_redaction.py [--rounds 5] [--size 100000000]
"""

from __future__ import annotations

import argparse
import http.client
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner import apiproxy
from runner.config import Api
from runner.redact import Redactor, encoded_forms
from tests.api_upstream import Upstream, make_ca, make_server_cert

KEY = b"sk-bench-0123456789abcdefghijklmnopqrstuv"
MODES = ("forms", "key", "none")


class _Quiet:
    def report(self, record: dict[str, object]) -> None:
        pass


def _read_all(conn: http.client.HTTPConnection, path: str) -> int:
    buffer = memoryview(bytearray(1 << 20))
    conn.request("GET", path)
    response = conn.getresponse()
    total = 0
    while n := response.readinto(buffer):
        total += n
    return total


def direct(upstream: Upstream, ca: Path, path: str) -> float:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", upstream.port, context=ssl.create_default_context(cafile=str(ca))
    )
    started = time.perf_counter()
    size = _read_all(conn, path)
    elapsed = time.perf_counter() - started
    conn.close()
    return size / elapsed / 1e6


def proxied(upstream: Upstream, ca: Path, path: str, mode: str) -> float:
    api = Api(name="bench", url=upstream.url, credential="bench-key", ca=str(ca))
    job_side, proxy_side = socket.socketpair()
    proxy = apiproxy.Proxy(api, KEY, proxy_side, _Quiet())
    if mode == "key":
        proxy.redactor = Redactor([KEY])
    elif mode == "none":
        proxy.redactor = Redactor([])
    thread = threading.Thread(target=proxy.serve)
    thread.start()
    conn = http.client.HTTPConnection("bench")
    conn.sock = job_side
    started = time.perf_counter()
    size = _read_all(conn, path)
    elapsed = time.perf_counter() - started
    job_side.close()
    thread.join()
    return size / elapsed / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=100_000_000)
    args = parser.parse_args()
    path = f"/bytes?n={args.size}"
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ca = make_ca(directory)
        cert, key = make_server_cert(directory, ca)
        figures: dict[str, list[float]] = {"direct": [], **{mode: [] for mode in MODES}}
        with Upstream(cert=cert, key=key) as upstream:
            for _ in range(args.rounds):
                figures["direct"].append(direct(upstream, ca[0], path))
                for mode in MODES:
                    figures[mode].append(proxied(upstream, ca[0], path, mode))
    forms = len(Redactor({KEY} | encoded_forms(KEY)).secrets)
    base = statistics.median(figures["direct"])
    print(
        f"{args.size / 1e6:.0f} MB answer, median of {args.rounds} rounds ({forms} byte strings for 'forms')"
    )
    print(f"{'path':<28} {'MB/s':>8} {'vs direct':>10}")
    print(f"{'direct https':<28} {base:>8.0f} {'':>10}")
    for mode in MODES:
        value = statistics.median(figures[mode])
        print(f"{'proxy, redacting ' + mode:<28} {value:>8.0f} {value / base:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
