"""Fixtures for every test."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api_upstream import Upstream, make_ca, make_server_cert


@pytest.fixture(autouse=True, scope="session")
def hangup_at_its_default() -> Iterator[None]:
    """Under `nohup` every child would start with SIGHUP ignored, and jobctl and trigger_job.sh rightly
    leave an ignored SIGHUP ignored: the tests that send it need the default, whoever ran pytest."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)


# --- An HTTPS upstream for the API proxy's tests (tests/api_upstream.py): a CA of its own, a second CA
# that does not vouch for it, and the server, once per module that asks for them.


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory)
    other_ca = make_ca(directory, "other-ca")
    cert, key = make_server_cert(directory, ca)
    return {"ca": ca[0], "other_ca": other_ca[0], "cert": cert, "key": key}


@pytest.fixture(scope="module")
def upstream(pki: dict[str, Path]) -> Iterator[Upstream]:
    with Upstream(cert=pki["cert"], key=pki["key"]) as server:
        yield server
    assert server.returncode == 0
