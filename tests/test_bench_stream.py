"""bench/stream.py runs end to end: every variant streams the bytes and gets a row (a smoke test of the
script, not a timed assertion; the figures themselves go to the README)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "stream.py"


@pytest.mark.skipif(shutil.which("socat") is None, reason="needs socat (make deps installs it)")
def test_every_variant_gets_a_row(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--bytes", str(4 << 20), "--rounds", "1", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line[:28].strip(): line[28:].split() for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {
        "socat",
        "runner",
        "runner, log kept in cache",
        "runner, no run log",
        "runner, no key to search",
        "runner, neither",
    }
    assert rows["socat"][1] == "1.00"
    assert all(float(rate) > 0 and float(cpu) > 0 for rate, _, cpu in (rows[k] for k in rows if k != "socat"))
    assert list(tmp_path.iterdir()) == [], "the run logs and the socket are cleaned up"
