"""The bench's measuring side: runs *inside* the container, as the developer (or root), and prints JSON.

bench/run.py copies this file in and runs it once per measurement pass, so that no nsenter or setpriv
sits between the clock and what it times. Standard library only (the container has a bare python3).

    client.py latency SPEC_JSON     interleaved round trips: every target once a round, in a new
                                    (seeded) random order each round, so that neither a drift in
                                    the machine's speed nor what ran just before favours a target
    client.py concurrent SPEC_JSON  N clients x M requests against one target, split over several
                                    users (one process each; run it as root)
    client.py stream SPEC_JSON      one long reply: bytes, seconds, the runner's peak memory
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import random
import socket
import sys
import threading
import time
from typing import Any

RECV_SIZE = 1 << 20
SAMPLE_INTERVAL_S = 0.05  # how often the streaming pass samples the runner's peak memory


def socket_request(path: str, line: bytes, *, sink: bytearray | None = None) -> tuple[float, float, int]:
    """Connect, send one request line, read to EOF. Returns (time to first byte, total, bytes read)."""
    buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    started = time.perf_counter()
    first = 0.0
    total = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(line)
        while True:
            n = s.recv_into(view)
            if not n:
                break
            if not total:
                first = time.perf_counter()
            total += n
            if sink is not None:
                sink += view[:n]
    return first - started, time.perf_counter() - started, total


def spawn(argv: list[str]) -> tuple[float, float, int]:
    """Run a program to its end, output to /dev/null. Returns (total, total, exit status)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        started = time.perf_counter()
        pid = os.posix_spawnp(
            argv[0],
            argv,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, devnull, 1),
                (os.POSIX_SPAWN_DUP2, devnull, 2),
            ],
        )
        _, status = os.waitpid(pid, 0)
        elapsed = time.perf_counter() - started
    finally:
        os.close(devnull)
    return elapsed, elapsed, os.waitstatus_to_exitcode(status)


def one(target: dict[str, Any]) -> tuple[float, float]:
    """One request to a target; raises when the reply is not what a success looks like."""
    if target["kind"] == "socket":
        tail = bytearray()
        ttfb, total, n = socket_request(target["path"], target["line"].encode(), sink=tail)
        expect = target.get("expect", "")
        if not n or expect.encode() not in tail[-4096:]:
            raise RuntimeError(f"{target['name']}: unexpected reply {bytes(tail[-300:])!r}")
        return ttfb, total
    ttfb, total, status = spawn(target["argv"])
    if status != 0:
        raise RuntimeError(f"{target['name']}: {target['argv']} exited with {status}")
    return ttfb, total


def latency(spec: dict[str, Any]) -> dict[str, Any]:
    targets = list(spec["targets"])
    results: dict[str, dict[str, list[float]]] = {t["name"]: {"ttfb": [], "total": []} for t in targets}
    # A fixed order would give each target the same predecessor every time, and a round trip is faster
    # or slower depending on what the one before left behind (on systemd 252 the sandboxed floor was
    # measured faster right after the unsandboxed one than after any other): shuffle every round instead.
    shuffled = random.Random(spec.get("seed", 0))  # noqa: S311 - an order to measure in, not a secret
    for _ in range(spec["warmup"]):
        for t in targets:
            one(t)
    for _ in range(spec["requests"]):
        shuffled.shuffle(targets)
        for t in targets:
            ttfb, total = one(t)
            results[t["name"]]["ttfb"].append(ttfb)
            results[t["name"]]["total"].append(total)
            pause = spec.get("pause_s", 0.0)
            if pause:
                time.sleep(pause)  # let the previous instance's teardown finish outside the clock
    return results


def concurrent(spec: dict[str, Any]) -> dict[str, Any]:
    """`clients` clients, split evenly over `users` (one process per user, run as that user: systemd
    counts MaxConnectionsPerSource= and the runner max_runs_per_user per user), each sending
    `requests_per_client` requests one after the other. All are released at once; the wall time runs
    from the release to the last reply. Runs as root, so that it can become each user."""
    users, targets = spec["users"], spec.get("targets") or [spec["target"]]
    per_user, requests = spec["clients"] // len(users), spec["requests_per_client"]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    children = []
    for user in users:
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become the user, start its clients on "go", report as JSON
            status = 1
            try:
                for fd in (ready_r, go_w, out_r):
                    os.close(fd)
                _become(user)
                result = _clients(targets, per_user, requests, ready_w, go_r, len(children) * per_user)
                data = json.dumps(result).encode()
                while data:
                    data = data[os.write(out_w, data) :]
                status = 0
            finally:
                os._exit(status)
        os.close(out_w)
        children.append((pid, out_r))
    os.close(ready_w)
    os.close(go_r)
    for _ in users:
        if not os.read(ready_r, 1):
            raise RuntimeError("a client process died before it was ready")
    began = time.perf_counter()
    os.close(go_w)  # every child's read of go_r returns: go
    latencies: list[float] = []
    errors: list[str] = []
    error_count = 0
    for pid, out_r in children:
        chunks = []
        while chunk := os.read(out_r, 1 << 16):  # read before waiting: a full pipe would block the child
            chunks.append(chunk)
        os.close(out_r)
        _, status = os.waitpid(pid, 0)
        if status != 0 or not chunks:
            raise RuntimeError(f"a client process failed (wait status {status})")
        result = json.loads(b"".join(chunks))
        latencies += result["latencies"]
        errors += result["errors"]
        error_count += result["error_count"]
    wall = time.perf_counter() - began
    return {
        "wall_s": wall,
        "latencies": latencies,
        "errors": errors[:20],
        "error_count": error_count,
        "requests": per_user * len(users) * requests,
        "users": len(users),
    }


def _become(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def _clients(  # noqa: PLR0917
    targets: list[dict[str, Any]], count: int, requests: int, ready_w: int, go_r: int, first: int
) -> dict[str, Any]:
    """`count` clients; client k uses targets[(first + k) % len(targets)] (spread over several jobs)."""
    latencies: list[float] = []
    errors: list[str] = []
    error_count = 0
    go = threading.Event()
    lock = threading.Lock()

    def client(target: dict[str, Any]) -> None:
        nonlocal error_count
        mine = []
        go.wait()
        for _ in range(requests):
            try:
                mine.append(one(target)[1])
            except Exception as e:  # counted, not fatal: the figure says how many failed
                with lock:
                    error_count += 1
                    if len(errors) < 20:
                        errors.append(str(e)[:200])
        with lock:
            latencies.extend(mine)

    threads = [
        threading.Thread(target=client, args=(targets[(first + k) % len(targets)],)) for k in range(count)
    ]
    for t in threads:
        t.start()
    os.write(ready_w, b"r")
    os.read(go_r, 1)  # returns b"" when the parent closes its end
    go.set()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors, "error_count": error_count}


def runner_processes() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            # job@.service's ExecStart (python3 -P -S -c "import runner.__main__; ...") or `-m runner`.
            if b"runner.__main__" in cmdline or b"\0-m\0runner\0" in cmdline:
                pids.append(int(entry))
    return pids


def vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def stream(spec: dict[str, Any]) -> dict[str, Any]:
    """One long reply; meanwhile sample VmHWM (the kernel's peak RSS) of every runner process."""
    peaks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in runner_processes():
                hwm = vm_hwm_kib(pid)
                if hwm is not None:
                    peaks[pid] = max(peaks.get(pid, 0), hwm)
            done.wait(SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tail = bytearray()
    # Only the last bytes are kept (to check the final line): the client must not be the bottleneck.
    buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    started = time.perf_counter()
    received = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(spec["path"])
        s.sendall(spec["line"].encode())
        while True:
            n = s.recv_into(view)
            if not n:
                break
            received += n
            tail = bytearray(view[n - 4096 : n]) if n >= 4096 else (tail + view[:n])[-4096:]
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    for pattern in spec.get("cleanup", []):
        for path in glob.glob(pattern):
            os.unlink(path)  # a 1 GiB run log per run would fill the container's RAM-backed overlay
    expect = spec.get("expect", "")
    if expect and expect.encode() not in tail:
        raise RuntimeError(f"stream: unexpected end of reply {bytes(tail[-300:])!r}")
    # A stream of a second is sampled ~20 times: seeing no runner then means the sampler cannot find it.
    # (A short one, --stream-bytes 1000000, may end between two samples: it reports no peak.)
    if spec.get("runner") and not peaks and seconds >= SAMPLE_INTERVAL_S * 20:
        raise RuntimeError(
            "stream: no runner process seen: its command line is not what runner_processes() knows"
        )
    return {
        "seconds": seconds,
        "wire_bytes": received,
        "payload_bytes": spec["payload_bytes"],
        "runner_vmhwm_kib": max(peaks.values()) if peaks else None,
    }


def main() -> int:
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    result = {"latency": latency, "concurrent": concurrent, "stream": stream}[mode](spec)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
