"""README's first command works: the demo boots its own container, installs, and shows what it claims."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import _missing_prerequisite, _required, selected_distros

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


# Once, on the first distro selected (bookworm by default): the rest of the e2e suite covers each
# one, and the demo boots a container of its own, as `make demo` does. Not collected for the others,
# rather than skipped there.
@pytest.mark.parametrize("distro", selected_distros()[:1])
def test_the_demo_runs_end_to_end(distro: str) -> None:
    # The e2e rules of conftest.py: a missing prerequisite skips, or fails under CI.
    reason = _missing_prerequisite()
    if reason is not None:
        if _required():
            pytest.fail(f"{reason} [CI/JOBRUNNER_E2E_REQUIRE set, so not skipping]")
        pytest.skip(reason)
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
