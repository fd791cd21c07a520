"""The hostile client: what tests/e2e/test_hostile.py runs inside the container, as a developer.

Copied into the container and run with its python3 (standard library only). Each mode drives the socket
one hostile way and prints one JSON document on stdout for the test to judge:

    burst N JOB [--jobctl-runs M --jobctl-job SLOW] [--detach]   N runs at once (threads), M jobctl runs
    cancel JOB MARKER               run; read until MARKER is in the reply; close (a cancel)
    stall JOB close|hold SECONDS    run and read nothing; close after SECONDS, or wait for the hang-up
    midstream JOB BYTES             run; read BYTES of the reply; close
    loris N INTERVAL PAYLOAD        N connections, one byte of PAYLOAD every INTERVAL s, never a newline
    send BASE64                     one request, sent as given
    fuzz SEED                       random and hostile requests, eight at a time
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any

SOCKET = "/run/job.sock"
Result = dict[str, Any]


def connect() -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(SOCKET)
    return s


def read_reply(
    s: socket.socket, started: float, timeout: float = 180.0, until: bytes | None = None
) -> Result:
    """Everything until the server closes (or `until` appears): the reply, and how it ended."""
    data, reset, timed_out = bytearray(), False, False
    s.settimeout(timeout)
    while until is None or until not in data:
        try:
            chunk = s.recv(1 << 16)
        except ConnectionResetError:
            reset = True
            break
        except TimeoutError:
            timed_out = True
            break
        if not chunk:
            break
        data += chunk
    reply = data.decode("utf-8", "replace")
    return {"reply": reply, "reset": reset, "timeout": timed_out, "elapsed": time.monotonic() - started}


def exchange(request: bytes, until: bytes | None = None) -> Result:
    started = time.monotonic()
    try:
        s = connect()
    except OSError as e:
        return {"connect_error": str(e), "reply": "", "reset": False, "timeout": False, "elapsed": 0.0}
    try:
        try:
            s.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before reading all of it: what (if anything) it said is still readable
        return read_reply(s, started, until=until)
    finally:
        s.close()


def run_request(job: str, detach: bool = False) -> bytes:
    return json.dumps({"op": "run", "job": job, "args": [], "detach": detach}).encode() + b"\n"


def burst(args: argparse.Namespace) -> Result:
    """`connections` JSON runs of `job` released at once by a barrier, and `jobctl_runs` real jobctl runs
    of `jobctl_job` started just before them."""
    # --no-retry: each refusal jobctl sees is one systemd counted (test_hostile.py's check); jobctl's
    # retries are proven by test_burst.py
    procs = [
        subprocess.Popen(
            ["jobctl", "run", "--no-retry", args.jobctl_job], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(args.jobctl_runs)
    ]
    results: list[Result] = [{} for _ in range(args.connections)]
    barrier = threading.Barrier(max(1, args.connections))
    request = run_request(args.job, args.detach)
    until = b'"event":"accepted"' if args.detach else None

    def one(i: int) -> None:
        barrier.wait()
        results[i] = exchange(request, until)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.connections)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobctl = []
    for p in procs:
        out, err = p.communicate()
        jobctl.append(
            {
                "rc": p.returncode,
                "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace"),
            }
        )
    return {"connections": results, "jobctl": jobctl, "seconds": time.monotonic() - started}


def cancel(args: argparse.Namespace) -> Result:
    return exchange(run_request(args.job), until=args.marker.encode())


def stall(args: argparse.Namespace) -> Result:
    started = time.monotonic()
    s = connect()
    s.sendall(run_request(args.job))
    if args.mode == "close":
        time.sleep(args.seconds)
        s.close()
        return {"elapsed": time.monotonic() - started}
    poller = select.poll()
    poller.register(s, select.POLLRDHUP | select.POLLHUP)  # the server's close, unread data or not
    hangup = None
    while hangup is None and time.monotonic() - started < args.seconds:
        if poller.poll(500):
            hangup = time.monotonic() - started
    s.close()
    return {"hangup_after": hangup}


def midstream(args: argparse.Namespace) -> Result:
    started = time.monotonic()
    s = connect()
    s.sendall(run_request(args.job))
    got = 0
    while got < args.bytes and (chunk := s.recv(1 << 16)):
        got += len(chunk)
    s.close()
    return {"received": got, "elapsed": time.monotonic() - started}


class Loris:
    """One slow client: a byte every so often, never a newline."""

    def __init__(self) -> None:
        self.sock = connect()
        self.sock.setblocking(False)
        self.started = time.monotonic()
        self.sent = 0
        self.reply = bytearray()
        self.closed_after: float | None = None

    def dribble(self, payload: bytes) -> None:
        try:
            self.sent += self.sock.send(payload[self.sent % len(payload) :][:1])
        except OSError:
            pass  # the server is done with us: its reply, and the end, are still to be read

    def receive(self) -> None:
        try:
            chunk = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except ConnectionResetError:
            chunk = b""
        self.reply += chunk
        if not chunk:
            self.closed_after = time.monotonic() - self.started
            self.sock.close()


def loris(args: argparse.Namespace) -> list[Result]:
    payload = args.payload.encode()
    clients = [Loris() for _ in range(args.connections)]
    next_byte = time.monotonic()
    give_up = time.monotonic() + args.give_up
    while (waiting := [c for c in clients if c.closed_after is None]) and time.monotonic() < give_up:
        if time.monotonic() >= next_byte:
            for c in waiting:
                c.dribble(payload)
            next_byte = time.monotonic() + args.interval
        ready, _, _ = select.select([c.sock for c in waiting], [], [], 0.2)
        for c in waiting:
            if c.sock in ready:
                c.receive()
    return [
        {"closed_after": c.closed_after, "reply": c.reply.decode(errors="replace"), "sent": c.sent}
        for c in clients
    ]


def send(args: argparse.Namespace) -> Result:
    return exchange(base64.b64decode(args.request))


# ------------------------------------------------------------------------------------------------- fuzz

LOOKALIKES = ["hostile-quick\u200b", "h\u043estile-quick", "\uff48ostile-quick", "hostile\u2010quick",
              "hostile-quic\u212a", "HOSTILE-QUICK", "hostile-quick\u0301"]  # fmt: skip
NAMES = ["", "/", "..", ".", "../hostile-quick", "../../etc/passwd", "hostile-quick/", "/hostile-quick",
         "hostile quick", " hostile-quick", "hostile-quick\t", "-rf", "--help", "x" * 65, "a" * 4000,
         "hostile-quick;id", "$(id)", "`id`", "hostile-quick\nlist", *LOOKALIKES]  # fmt: skip
ARGS = ["$(id)", "`id`", "; rm -rf /", "| cat /etc/shadow", "&& true", "--", "--help", "-", "a\nb", "\r",
        "'\"", "*", "~", "${PATH}", "\\", "%s%n", "\u202eevil", "x" * 70000]  # fmt: skip
WRONG_TYPES: dict[str, list[Any]] = {
    "job": [None, True, 0, 1.5, [], ["hostile-quick"], {}],
    "args": [None, True, 0, "a", "", {}, [1], [None], [["a"]]],
    "detach": [None, 0, 1, "yes", "", [], {}],
}


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def fuzz_cases(rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(category, delivery, request). Deliveries: line (sent as is), halfclose (then shutdown(SHUT_WR)),
    nothing (no newline, no half-close: the deadline answers), early (closed at once: no reply)."""
    quick = {"op": "run", "job": "hostile-quick"}
    cases = [("random-bytes", "line", rng.randbytes(rng.randrange(1, 300)) + b"\n") for _ in range(15)]
    cases += [
        ("huge-line", "line", b"run hostile-quick " + b"a" * 70000 + b"\n"),
        ("huge-line", "line", b"x" * 70000),
        ("huge-json", "line", line({**quick, "args": ["a" * 65000]})),
        ("no-newline", "halfclose", b"run no-such-job"),
        ("no-newline", "nothing", b"run hostile-quick"),
        ("no-newline", "nothing", b'{"op": "run", "job": "hostile-quick"}'),
        ("empty", "line", b"\n"),
        ("empty", "halfclose", b""),
        ("blank", "line", b"   \t \r\n"),
        ("nul", "line", b"run hostile\x00quick\n"),
        ("nul", "line", b'{"op": "run", "job": "hostile-quick\\u0000"}\n'),
        ("invalid-utf8", "line", b"run \xff\xfe\xfd\n"),
        ("invalid-utf8", "line", b'{"op": "run", "job": "\xc3\x28"}\n'),
        ("lone-surrogate", "line", b'{"op": "run", "job": "hostile-quick", "args": ["\\ud800"]}\n'),
        ("nested-json", "line", b'{"op": ' + b"[" * 30000 + b"\n"),
        ("nested-json", "line", b"[" * 50000 + b"]" * 10000 + b"\n"),
        ("json-array", "line", b'["run", "hostile-quick"]\n'),
        ("unbalanced-quote", "line", b"run hostile-quick 'oops\n"),
        ("many-args", "line", line({"op": "run", "job": "hostile-echo", "args": ["a"] * 1025})),
        ("100k-args", "line", b"run hostile-echo " + b"a " * 100000 + b"\n"),
        ("100k-args", "line", line({"op": "run", "job": "hostile-echo", "args": ["a"] * 100000})),
        ("early-close", "early", b"run hostile-slow\n"),
        ("early-close", "early", b"run hostile-"),
        ("unknown-field", "line", line({"op": "list", "verbose": True})),
        ("unknown-field", "line", line({**quick, "env": {"A": "1"}})),
    ]
    cases += [
        ("unknown-op", "line", op + b"\n") for op in (b"delete", b"RUN", b"exec", b"list --all", b"run")
    ]
    cases += [("unknown-op", "line", line({**quick, "op": op})) for op in ("delete", "RUN", None, 1, ["run"])]
    cases += [
        ("wrong-type", "line", line({**quick, k: v})) for k, values in WRONG_TYPES.items() for v in values
    ]
    for name in NAMES:
        cases.append(("hostile-name", "line", line({"op": "run", "job": name})))
        cases.append(("hostile-name", "line", b"run " + name.encode() + b"\n"))
    cases += [("hostile-args", "line", line({**quick, "args": [arg]})) for arg in ARGS]
    valid = [line(quick), b"run hostile-quick\n", b"list\n"]
    for _ in range(15):
        data = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.choice(
                [0, 10, 32, 34, 39, 92, 123, 125, 255, rng.randrange(256)]
            )
        cases.append(("mutated", "line", bytes(data)))
    return cases


def fuzz_one(delivery: str, request: bytes) -> Result:
    started = time.monotonic()
    s = connect()
    try:
        try:
            s.sendall(request)
            if delivery == "halfclose":
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if delivery == "early":
            return {"reply": "", "reset": False, "timeout": False, "elapsed": 0.0}
        return read_reply(s, started, timeout=60.0)
    finally:
        s.close()


def fuzz(args: argparse.Namespace) -> list[Result]:
    cases = fuzz_cases(random.Random(args.seed))
    results: list[Result] = [{} for _ in cases]
    # The ones that wait for the deadline first, so that the others are done meanwhile.
    todo = sorted(range(len(cases)), key=lambda i: cases[i][1] != "nothing")
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            results[i] = fuzz_one(cases[i][1], cases[i][2])

    threads = [threading.Thread(target=worker) for _ in range(args.parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [
        {
            "category": c,
            "delivery": d,
            "request": base64.b64encode(r[:300]).decode(),
            "size": len(r),
            **result,
        }
        for (c, d, r), result in zip(cases, results, strict=True)
    ]


# ------------------------------------------------------------------------------------------------- main

MODES = {
    "burst": (burst, ["connections:int", "job", "--jobctl-runs:int", "--jobctl-job", "--detach:flag"]),
    "cancel": (cancel, ["job", "marker"]),
    "stall": (stall, ["job", "mode", "seconds:float"]),
    "midstream": (midstream, ["job", "bytes:int"]),
    "loris": (loris, ["connections:int", "interval:float", "payload", "--give-up:float"]),
    "send": (send, ["request"]),
    "fuzz": (fuzz, ["seed:int", "--parallel:int"]),
}
DEFAULTS = {"--jobctl-runs": 0, "--jobctl-job": "", "--give-up": 60.0, "--parallel": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    for mode, (func, params) in MODES.items():
        sub = modes.add_parser(mode)
        for param in params:
            name, _, kind = param.partition(":")
            if kind == "flag":
                sub.add_argument(name, action="store_true")
            else:
                convert = {"int": int, "float": float}.get(kind, str)
                sub.add_argument(
                    name, type=convert, **({"default": DEFAULTS[name]} if name in DEFAULTS else {})
                )
        sub.set_defaults(func=func)
    args = parser.parse_args()
    json.dump(args.func(args), sys.stdout)


if __name__ == "__main__":
    main()
