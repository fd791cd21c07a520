"""Fixtures and hooks for every test.

In CI (``CI`` set to 1, true or yes) nothing may skip: a skip there would hide a claim that was never
proven (a missing tool, a host that cannot run a test), so a skipped test is reported as failed, with
the reason it gave. Run by hand, a skip stays a skip, and pytest prints every reason (``-rs``).

Hypothesis keeps nothing in the checkout: no example database, and its caches in a temporary
directory that is removed when the session ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import hypothesis
import pytest

from tests.api_upstream import Upstream, make_ca, make_server_cert

hypothesis.settings.register_profile("jobrunner", database=None)
hypothesis.settings.load_profile("jobrunner")
_HYPOTHESIS_HOME = pytest.StashKey[str]()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    # Read when hypothesis first stores something (its constants cache), after this.
    if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
        home = tempfile.mkdtemp(prefix="jobrunner-hypothesis-")
        config.stash[_HYPOTHESIS_HOME] = home
        os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = home


def pytest_unconfigure(config: pytest.Config) -> None:
    home = config.stash.get(_HYPOTHESIS_HOME, None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


def _fail_a_skip_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may skip: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In CI a skipped test fails, whatever skipped it (a mark, pytest.skip(), a fixture)."""
    report = yield
    _fail_a_skip_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """... and so does a module skipped whole at collection (pytest.skip(allow_module_level=True))."""
    report = yield
    _fail_a_skip_in_ci(report)
    return report


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
