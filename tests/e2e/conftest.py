"""End-to-end fixtures: one real systemd container per distro, shared by the whole session.

Select distros with ``JOBRUNNER_E2E_DISTROS=bookworm,trixie`` (the default: both).
The repository is bound read-only at ``/src`` inside.  The container is shared:
a test that installs units or users should use names no other test uses, and
undo what would disturb later tests.

Missing prerequisites (not root, no debootstrap / systemd-nspawn / nsenter) skip
the e2e tests, except under CI (``CI=true``) or ``JOBRUNNER_E2E_REQUIRE=1``,
where they fail: .ci/install-deps installs everything, so a skip there would
only hide a broken setup.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from .container import DISTROS, Container

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("debootstrap", "systemd-nspawn", "nsenter", "setpriv")


def selected_distros() -> list[str]:
    raw = os.environ.get("JOBRUNNER_E2E_DISTROS", ",".join(DISTROS))
    chosen = [d.strip() for d in raw.split(",") if d.strip()]
    unknown = sorted(set(chosen) - set(DISTROS))
    if unknown:
        raise pytest.UsageError(f"JOBRUNNER_E2E_DISTROS: unknown distro(s) {unknown}, expected {DISTROS}")
    return chosen


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "e2e tests need root (debootstrap, systemd-nspawn, nsenter)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"e2e tests need {', '.join(missing)} (run .ci/install-deps)"
    return None


def _required() -> bool:
    flag = os.environ.get("JOBRUNNER_E2E_REQUIRE", os.environ.get("CI", ""))
    return flag.lower() in ("1", "true", "yes")


@pytest.fixture(scope="session", params=selected_distros())
def container(request: pytest.FixtureRequest) -> Iterator[Container]:
    """A booted Debian ``request.param`` container with the repository at /src (read-only)."""
    reason = _missing_prerequisite()
    if reason is not None:
        if _required():
            pytest.fail(f"{reason} [CI/JOBRUNNER_E2E_REQUIRE set, so not skipping]")
        pytest.skip(reason)
    # Turn SIGTERM (a CI timeout) into KeyboardInterrupt so that pytest still runs
    # this fixture's teardown and powers the container off.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with Container.boot(request.param, name="e2e", binds_ro={REPO: "/src"}) as ct:
            yield ct
    finally:
        signal.signal(signal.SIGTERM, previous)
