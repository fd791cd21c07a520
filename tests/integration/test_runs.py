"""The runner end to end over a real socket: runs, exit codes, files, redaction, cancel and detach."""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Runner, read_all, wait_for

pytestmark = pytest.mark.integration

FINAL_LINE = re.compile(rb"jobrunner: (\S+) \(run (\S+)\) exited with (\d+) after (\d+\.\d) s\n\Z")


def events(reply: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in reply.splitlines()]


def run_json(runner: Runner, job: str, *args: str, detach: bool = False) -> list[dict[str, object]]:
    request = {"op": "run", "job": job, "args": list(args), "detach": detach}
    return events(runner.request(json.dumps(request).encode() + b"\n"))


def output_of(evs: list[dict[str, object]], stream: str = "stdout") -> bytes:
    import base64

    out = b""
    for e in evs:
        if e["event"] == "output" and e["stream"] == stream:
            out += str(e["text"]).encode() if "text" in e else base64.b64decode(str(e["base64"]))
    return out


def test_text_run_streams_output_and_ends_with_the_exit_line(runner: Runner) -> None:
    reply = runner.request(b"run hello world\n")
    match = FINAL_LINE.search(reply)
    assert match, reply
    assert match.group(1) == b"hello" and match.group(3) == b"0"
    assert b"hello from hello" in reply and b"args: world" in reply
    assert f"key length: {len(runner.secret)}".encode() in reply  # the job had the key ...
    assert runner.secret.encode() not in reply  # ... and the client never sees it


def test_json_run_events_and_the_files_a_run_leaves(runner: Runner) -> None:
    evs = run_json(runner, "hello", "a", "b")
    assert next(e["event"] for e in evs) == "accepted"
    assert evs[-1]["event"] == "exit" and evs[-1]["exit_code"] == 0
    run_id = str(evs[0]["run_id"])
    assert evs[-1]["run_id"] == run_id
    assert evs[0]["output_dir"] == evs[-1]["output_dir"] == f"{runner.outputs}/hello/{run_id}"  # exactly
    output_dir = Path(str(evs[0]["output_dir"]))
    assert (output_dir / "result.txt").read_text() == "result\n"
    assert os.readlink(runner.outputs / "hello" / "latest") == run_id
    assert evs[0]["log"] == evs[-1]["log"] == f"{runner.logs}/hello/{run_id}.log"
    log = Path(str(evs[-1]["log"]))
    text = log.read_text()
    assert "\n# args: ['a', 'b']\n" in text and "# caller: uid=" in text and "# exit_code: 0" in text
    assert "hello from hello" in text


def test_exit_code_of_a_failing_job(runner: Runner) -> None:
    evs = run_json(runner, "fail")
    assert evs[-1]["exit_code"] == 3 and evs[-1]["signal"] is None
    assert output_of(evs, "stderr") == b"failing\n"
    assert runner.exit_statuses() == [3]  # the runner exits with the job's status: the unit fails with it


def test_a_job_killed_by_a_signal(runner: Runner) -> None:
    evs = run_json(runner, "killed")
    assert evs[-1]["exit_code"] == 128 + 9 and evs[-1]["signal"] == 9


def test_timeout_stops_the_job_and_says_so(runner: Runner) -> None:
    started = time.monotonic()
    evs = run_json(runner, "sleepy")
    assert time.monotonic() - started < 40  # stopped at its 1 s timeout, not run to its end (60 s)
    assert evs[-1]["exit_code"] == 124 and evs[-1]["timed_out"] is True
    assert "timed out" in Path(str(evs[-1]["log"])).read_text()


def test_job_environment_is_minimal_and_explicit(runner: Runner) -> None:
    evs = run_json(runner, "env")
    env = dict(line.split("=", 1) for line in output_of(evs).decode().splitlines())
    assert set(env) == {
        "PATH", "LANG", "HOME", "CREDENTIALS_DIRECTORY", "JOB_NAME", "JOB_RUN_ID", "JOB_OUTPUT_DIR",
    }  # fmt: skip
    assert env["JOB_NAME"] == "env" and env["HOME"] == "/tmp"
    assert "LISTEN_FDS" not in env and "JOBRUNNER_CONFIG" not in env


def test_shell_metacharacters_are_passed_verbatim(runner: Runner) -> None:
    tricky = ["$(touch /tmp/pwned)", "; rm -rf /", "`id`", "a b", "--", "-n", "new\nline", "ünïcødé", "'\""]
    evs = run_json(runner, "echo-args", *tricky)
    assert output_of(evs).decode() == "".join(arg + "\n" for arg in tricky)
    assert evs[-1]["exit_code"] == 0
    # The text form's quoting reaches the job the same way.
    reply = runner.request(b"run echo-args 'a b' \"c'd\" '$(id)'\n")
    assert reply.startswith(b"a b\nc'd\n$(id)\n")


def test_binary_output_is_byte_exact(runner: Runner) -> None:
    expected = bytes(range(256)) * 64
    assert output_of(run_json(runner, "binary")) == expected
    text_reply = runner.request(b"run binary\n")
    assert text_reply[: len(expected)] == expected
    assert FINAL_LINE.search(text_reply[len(expected) :])


def test_the_key_is_redacted_everywhere(runner: Runner) -> None:
    secret = runner.secret.encode()
    evs = run_json(runner, "leak")
    stdout, stderr = output_of(evs), output_of(evs, "stderr")
    for data in (stdout, stderr, runner.request(b"run leak\n"), Path(str(evs[-1]["log"])).read_bytes()):
        assert secret not in data
        # Not even half of it in one piece: the split write is caught across the two reads.
        assert secret[: len(secret) // 2] not in data
    assert b"plain: ***" in stdout and b"split: ***" in stdout and b"end without newline: ***" in stdout
    assert stderr == b"stderr: ***\n"


def test_stray_processes_of_the_job_are_killed_when_it_exits(runner: Runner) -> None:
    evs = run_json(runner, "orphans")
    orphan = int((Path(str(evs[0]["output_dir"])) / "orphan").read_text())
    assert evs[-1]["exit_code"] == 0
    wait_for(lambda: not _alive(orphan), 5, "the orphan to be killed")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def _start_waiter(runner: Runner, detach: bool = False) -> tuple[socket.socket, Path]:
    conn = runner.connect()
    conn.sendall(json.dumps({"op": "run", "job": "waiter", "detach": detach}).encode() + b"\n")
    accepted = json.loads(conn.makefile("rb").readline())
    pid_file = Path(accepted["output_dir"]) / "pid"
    wait_for(pid_file.exists, 5, "the job to start")
    return conn, Path(accepted["log"])


def test_client_going_away_cancels_the_job(runner: Runner) -> None:
    conn, log = _start_waiter(runner)
    pid = int((log.parent.parent.parent / "outputs" / "waiter" / log.stem / "pid").read_text())
    assert _alive(pid)
    conn.close()
    wait_for(lambda: not _alive(pid), 5, "the cancelled job to end")
    wait_for(lambda: "# ---- end" in log.read_text(), 5, "the run log footer")
    assert "cancelled" in log.read_text()


def test_half_closing_is_not_leaving(runner: Runner) -> None:
    # socat shuts down its sending side when its input ends: the run must go on and report.
    with runner.connect() as conn:
        conn.sendall(b"run sleepy\n")
        conn.shutdown(socket.SHUT_WR)
        reply = read_all(conn)
    assert FINAL_LINE.search(reply) and b"exited with 124" in reply


def test_detached_run_survives_its_client(runner: Runner) -> None:
    with runner.connect() as conn:
        conn.sendall(b'{"op": "run", "job": "detached", "detach": true}\n')
        accepted = json.loads(conn.makefile("rb").readline())
    assert accepted["event"] == "accepted" and accepted["detach"] is True
    done = Path(accepted["output_dir"]) / "done"
    wait_for(done.exists, 10, "the detached job to finish")
    log = Path(accepted["log"])
    wait_for(lambda: "# exit_code: 0" in log.read_text(), 5, "the run log footer")
    assert "finished" in log.read_text()


def _concurrently(runner: Runner, job: str, count: int) -> list[list[dict[str, object]]]:
    results: list[list[dict[str, object]]] = [[] for _ in range(count)]

    def one(i: int) -> None:
        results[i] = run_json(runner, job)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def _intervals(runner: Runner, job: str) -> list[tuple[float, float]]:
    lines = (runner.outputs / job / "timeline").read_text().split("\n")
    starts = sorted(float(line.split()[1]) for line in lines if line.startswith("start"))
    ends = sorted(float(line.split()[1]) for line in lines if line.startswith("end"))
    return list(zip(starts, ends, strict=True))


def test_concurrency_reject_refuses_a_second_run_as_busy(runner: Runner) -> None:
    results = _concurrently(runner, "slow-reject", 3)
    finals = sorted(str(r[-1].get("code", r[-1]["event"])) for r in results)
    assert finals == ["busy", "busy", "exit"]
    assert len(_intervals(runner, "slow-reject")) == 1


def test_concurrency_queue_runs_all_one_at_a_time(runner: Runner) -> None:
    results = _concurrently(runner, "slow-queue", 3)
    assert [r[-1]["event"] for r in results] == ["exit"] * 3
    intervals = _intervals(runner, "slow-queue")
    assert len(intervals) == 3
    for (_, end), (next_start, _) in itertools.pairwise(intervals):
        assert next_start >= end  # never two at once


def test_concurrency_parallel_runs_side_by_side(runner: Runner) -> None:
    results = _concurrently(runner, "slow-parallel", 3)
    assert [r[-1]["event"] for r in results] == ["exit"] * 3
    intervals = _intervals(runner, "slow-parallel")
    assert max(start for start, _ in intervals) < min(end for _, end in intervals)  # all overlapped


def test_large_output_keeps_the_runner_memory_flat(runner: Runner) -> None:
    def peak_rss_kib(size: int) -> int:
        with runner.connect() as conn:
            conn.sendall(f"run big {size}\n".encode())
            first = conn.recv(64)
            pid = int(first.split(b"\n")[0].split()[-1])
            received = len(first)
            while received < size:  # read it all, throwing it away
                chunk = conn.recv(1 << 20)
                assert chunk
                received += len(chunk)
            status = Path(f"/proc/{pid}/status").read_text()  # the job sleeps 2 s: the runner is still there
            read_all(conn)
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]

    small = peak_rss_kib(1000)
    large = peak_rss_kib(200_000_000)
    assert large - small < 8 * 1024, f"runner peak memory grew from {small} KiB to {large} KiB"


def test_encoded_keys_and_keys_in_tracebacks_are_redacted(runner: Runner) -> None:
    import base64
    import binascii

    secret = runner.secret.encode()
    evs = run_json(runner, "leak-encoded")
    everything = output_of(evs) + output_of(evs, "stderr") + Path(str(evs[-1]["log"])).read_bytes()
    assert evs[-1]["exit_code"] == 1  # the traceback's exit status
    assert b"RuntimeError: could not authenticate with ***" in everything
    recognisable = [secret, binascii.hexlify(secret), binascii.hexlify(secret).upper()]
    recognisable += [base64.b64encode(secret)[:-4], base64.urlsafe_b64encode(secret)[:-4]]
    for form in recognisable:
        assert form not in everything, form
    assert everything.count(b"***") >= 10


def test_one_user_cannot_take_more_than_their_share(runner: Runner) -> None:
    # jobs.toml sets max_runs_per_user = 4: a fifth run at once is refused as busy, the sixth works
    # again as soon as one of the four is over.
    held = [_start_waiter(runner)[0] for _ in range(4)]
    try:
        refused = run_json(runner, "fail")
        assert refused[-1]["event"] == "error" and refused[-1]["code"] == "busy"
        assert "4 runs in progress" in str(refused[-1]["message"])
        held.pop().close()  # cancels one run, which frees its slot
        wait_for(lambda: run_json(runner, "fail")[-1].get("exit_code") == 3, 10, "a free slot")
    finally:
        for conn in held:
            conn.close()
