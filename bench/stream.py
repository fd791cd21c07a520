"""Where the runner's streaming time goes: its own supervisor, with and without the run log (and its
page cache released as it grows, or kept) and the key search, against socat, on this machine (no
container, no sandbox).

    python3 bench/stream.py [--bytes N] [--rounds 5] [--dir DIR]

bench/run.py measures streaming end to end inside real systemd, where the runner cannot be taken apart.
This runs the same job (`yes LINE | head -c N`, bench/run.py's) under runner.execute.Supervisor in this
process, with the text protocol's framing, a run log in DIR (default /var/tmp: a disk, as a project's
logs directory is) and the redaction of one 40-byte key and its encoded forms, and takes one part away
at a time. A client process reads and discards. Every figure is a median over the rounds (each round
runs every variant once, in a new order), as a ratio to socat (-U, default 8 KiB buffer) moving the same
bytes in the same run; "runner CPU" is this process's own CPU time per GiB (the job and the client are
other processes). It runs with job@.service's malloc settings (its GLIBC_TUNABLES=), as the runner does.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run import GIB, STREAM_COMMAND  # bench/ is this script's directory, so first on sys.path

from runner import channel, execute, protocol, redact, runs
from tests.test_imports import job_service_environment

KEY = b"sk-bench-7f3a9c0de41b56a8d2e0c4f19b7a3e6d5c8f01"
# The runner's variants: (write the run log, search for the key, let the log's page cache go).
RUNNER_VARIANTS = {
    "runner": (True, True, True),
    "runner, log kept in cache": (True, True, False),
    "runner, no run log": (False, True, True),
    "runner, no key to search": (True, False, True),
    "runner, neither": (False, False, True),
}
VARIANTS = ("socat", *RUNNER_VARIANTS)


class Discard:
    """A run log that keeps nothing."""

    def write(self, data: bytes) -> None:
        pass


def read_to_end(sock: socket.socket) -> int:
    view = memoryview(bytearray(1 << 20))
    received = 0
    while n := sock.recv_into(view):
        received += n
    return received


def with_reader(serve: Callable[[socket.socket], None], size: int) -> None:
    """Run `serve` on one end of a socket pair while a child process reads the other to its end."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        os._exit(0 if read_to_end(theirs) == size else 1)
    theirs.close()
    serve(ours)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"the client did not read {size} bytes")


def run_runner(size: int, directory: str, *, log: bool, key: bool, release: bool) -> tuple[float, float]:
    """(seconds, runner CPU seconds) for one job streamed through the supervisor."""
    secrets = [KEY, *redact.encoded_forms(KEY)] if key else []
    log_path = os.path.join(directory, f"bench-stream-{os.getpid()}.log")
    release_every = runs.RELEASE_CACHE_EVERY if release else 0
    sink = runs.RunLog(log_path, release_cache_every=release_every) if log else Discard()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()

    def serve(conn: socket.socket) -> None:
        client = channel.ClientChannel(conn, protocol.Reply(protocol.Form.TEXT))
        job = execute.start(
            ["/bin/sh", "-c", STREAM_COMMAND, "stream", str(size)], {"PATH": "/usr/bin:/bin"}, "/"
        )
        execute.Supervisor(
            job, 3600, redact.Redactor(secrets), sink, client, cancel_when_client_leaves=True
        ).run()
        client.close()

    with_reader(serve, size)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    if isinstance(sink, runs.RunLog):
        sink.close()
        os.unlink(log_path)
    return seconds, (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)


def run_socat(size: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="jrb-") as short:  # a unix socket path has ~100 bytes
        return socat_round_trip(size, os.path.join(short, "socat.sock"))


def socat_round_trip(size: int, path: str) -> tuple[float, float]:
    command = STREAM_COMMAND.replace('"$1"', str(size))
    server = subprocess.Popen(
        ["socat", "-U", f"UNIX-LISTEN:{path},unlink-early", f"SYSTEM:{command}"], stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(200):
            if os.path.exists(path):
                break
            time.sleep(0.01)
        started = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            received = read_to_end(sock)
        seconds = time.perf_counter() - started
    finally:
        server.wait(timeout=60)
    if received != size:
        raise RuntimeError(f"socat moved {received} bytes, not {size}")
    return seconds, float("nan")


def measure(variant: str, size: int, directory: str) -> tuple[float, float]:
    if variant == "socat":
        return run_socat(size)
    log, key, release = RUNNER_VARIANTS[variant]
    return run_runner(size, directory, log=log, key=key, release=release)


def as_the_unit_starts_the_runner() -> None:
    """Re-run this script with job@.service's malloc settings (GLIBC_TUNABLES=, read at process start)."""
    tunables = job_service_environment()["GLIBC_TUNABLES"]
    if os.environ.get("GLIBC_TUNABLES") != tunables:
        env = {**os.environ, "GLIBC_TUNABLES": tunables}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # noqa: S606 - this same script, again


def main() -> int:
    as_the_unit_starts_the_runner()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=int, default=GIB, help="the job's output per run (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of every variant (default 5)")
    parser.add_argument(
        "--dir",
        default="/var/tmp",  # noqa: S108 - a disk, not tmpfs; the run's own directory is made with mkdtemp
        help="where the run log goes, in a new directory (default /var/tmp)",
    )
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="jobrunner-bench-", dir=args.dir)
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    shuffled = random.Random(1)  # noqa: S311 - an order to measure in, not a secret
    try:
        measure("runner", min(args.bytes, 64 << 20), directory)  # warm-up, untimed
        for round_ in range(args.rounds):
            shuffled.shuffle(order)
            for variant in order:
                results[variant].append(measure(variant, args.bytes, directory))
            print(f"[stream] round {round_ + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    finally:
        os.rmdir(directory)
    socat = statistics.median(args.bytes / s for s, _ in results["socat"])
    print(f"{args.bytes} bytes, {args.rounds} rounds, run log in {args.dir}, {os.cpu_count()} CPUs")
    print(f"{'variant':28} {'MB/s':>7} {'vs socat':>9} {'runner CPU s/GiB':>17}")
    for variant in VARIANTS:
        rate = statistics.median(args.bytes / s for s, _ in results[variant])
        cpu = statistics.median(c for _, c in results[variant]) * GIB / args.bytes
        cpu_text = "" if variant == "socat" else f"{cpu:.2f}"
        print(f"{variant:28} {rate / 1e6:7.0f} {rate / socat:9.2f} {cpu_text:>17}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
