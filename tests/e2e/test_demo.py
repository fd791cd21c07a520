"""README's first command works: the demo boots its own container, installs, and shows what it claims."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_the_demo_runs_end_to_end(container: object) -> None:
    # `container` only to share its skip/require rules (root, debootstrap, systemd-nspawn); the demo
    # boots a container of its own, as `make demo` does. One distro is enough: the rest of the e2e
    # suite covers both.
    distro = getattr(container, "distro", "bookworm")
    if distro != "bookworm":
        pytest.skip("the demo is exercised on bookworm")
    result = subprocess.run(
        [sys.executable, str(REPO / "demo" / "run_demo.py"), "--distro", distro],
        capture_output=True,
        timeout=600,
        check=False,
    )
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, output[-3000:]
    assert "hello, Ada: signed" in output and "hello, Grace: signed" in output  # jobctl and socat
    assert "Permission denied" in output  # the encrypted store
    assert "jobctl run hello" in output  # the app run directly says how to run it
    assert "Demo done" in output
