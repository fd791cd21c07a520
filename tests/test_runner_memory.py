"""The runner's memory while it streams, as job@.service starts it: its malloc settings (the unit's
GLIBC_TUNABLES=) keep the 1 MiB read buffers from being mapped afresh, and page-faulted in, on every read.

A count of page faults, not a timing: bench/stream.py and bench/run.py measure what it is worth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_imports import job_service_environment

REPO = Path(__file__).resolve().parents[1]
STREAMED = 256 << 20

# Streams STREAMED bytes through the runner's supervisor (bench/stream.py's, no run log, no key) and
# prints the minor page faults this process took doing it.
STREAM_AND_COUNT = f"""
import json, resource, sys
sys.path[:0] = [{str(REPO / "bench")!r}, {str(REPO)!r}]
import stream
stream.run_runner(16 << 20, "/", log=False, key=False, release=True)  # warm-up: the first buffers
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
stream.run_runner({STREAMED}, "/", log=False, key=False, release=True)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def faults_while_streaming(tunables: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    proc = subprocess.run(
        [sys.executable, "-c", STREAM_AND_COUNT], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    faults: int = json.loads(proc.stdout)
    return faults


def test_the_units_malloc_settings_keep_read_buffers_from_faulting() -> None:
    tunables = job_service_environment()["GLIBC_TUNABLES"]

    with_unit_settings = faults_while_streaming(tunables)
    with_glibc_defaults = faults_while_streaming(None)

    pages = STREAMED // os.sysconf("SC_PAGE_SIZE")
    # glibc's defaults: a fresh mapping for many of the reads (about half the pages streamed, here).
    assert with_glibc_defaults > pages // 10, (with_unit_settings, with_glibc_defaults)
    # With them: hundreds (mostly the fork of the reading process and the job's spawn).
    assert with_unit_settings < pages // 20, (with_unit_settings, with_glibc_defaults)
