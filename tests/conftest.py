"""Fixtures for every test."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def hangup_at_its_default() -> Iterator[None]:
    """Under `nohup` every child would start with SIGHUP ignored, and jobctl and trigger_job.sh rightly
    leave an ignored SIGHUP ignored: the tests that send it need the default, whoever ran pytest."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)
