"""The project's bash scripts are shellcheck-clean (trigger/trigger_job.sh, POSIX sh, has its own test)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("install.sh", ".ci/run", ".ci/install-deps")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_is_clean(script: str) -> None:
    result = subprocess.run(["shellcheck", str(REPO / script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
