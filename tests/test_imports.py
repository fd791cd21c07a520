"""What the runner imports before a job starts: every connection pays for each module (README, Performance)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_by(code: str) -> set[str]:
    """The modules `code` adds to a runner's interpreter, started as job@.service starts it (-P -S)."""
    probe = (
        f"import sys\nbefore = set(sys.modules)\n{textwrap.dedent(code)}\nprint(*set(sys.modules) - before)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-P", "-S", "-c", probe],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    return set(proc.stdout.split())


def test_the_connection_path_does_not_import_pathlib() -> None:
    # pathlib drags in fnmatch, urllib.parse, ipaddress and ntpath: ~2 ms of every connection.
    imported = imported_by("import runner.__main__, runner.activation, runner.service")
    assert "runner.service" in imported
    assert not imported & {"pathlib", "fnmatch", "urllib", "urllib.parse", "ipaddress", "ntpath"}
