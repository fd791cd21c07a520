"""The parsed copy of jobs.toml (runner/config_cache.py) under real systemd.

jobrunner-config.path refreshes it whenever the file is written or replaced; connections use it instead
of importing tomllib while it matches the file, and parse the file themselves when it does not; a job
cannot write it (test_security.py's probe tries).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from .conftest import Installation

pytestmark = pytest.mark.e2e

CONFIG = "/etc/jobrunner/jobs.toml"
COPY = "/var/cache/jobrunner/jobs.toml.marshal"
IMPORTTIME_DROPIN = "/run/systemd/system/job@.service.d/90-e2e-importtime.conf"  # the front door: list
COPY_MATCHES = f"""
import marshal, os, sys
st = os.stat({COPY!r})
form, source, parsed = marshal.loads(open({COPY!r}, "rb").read())
print(source == open({CONFIG!r}, "rb").read(), st.st_uid, oct(st.st_mode & 0o777))
"""


def copy_state(inst: Installation) -> str:
    return inst.container.run(["python3", "-c", COPY_MATCHES], check=False).stdout.decode().strip()


def config_unit_state(inst: Installation) -> str:
    show = ["systemctl", "show", "-P", "ActiveState", "jobrunner-config.service"]
    return inst.container.run(show).stdout.decode().strip()


def wait_for_matching_copy(inst: Installation, timeout: float = 15) -> str:
    """Until the copy matches the file and jobrunner-config.service is done (an edit made while it runs
    is merged into that run by systemd: the next step must not race it)."""
    deadline = time.monotonic() + timeout
    while (
        (state := copy_state(inst)) != "True 0 0o644" or config_unit_state(inst) not in ("inactive", "failed")
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    return state


@pytest.fixture
def restore_config(installed: Installation) -> Iterator[None]:
    ct = installed.container
    original = ct.run(["cat", CONFIG]).stdout
    try:
        yield
    finally:
        ct.run(["systemctl", "start", "jobrunner-config.path"])
        ct.write_file(CONFIG, original)
        ct.run(["jobrunner", "check"])


def test_install_leaves_a_matching_root_owned_copy(installed: Installation) -> None:
    assert wait_for_matching_copy(installed) == "True 0 0o644"
    assert installed.container.run(["systemctl", "is-enabled", "jobrunner-config.path"]).stdout.strip() == (
        b"enabled"
    )


@pytest.mark.usefixtures("restore_config")
def test_the_copy_follows_every_kind_of_edit(installed: Installation) -> None:
    ct = installed.container
    wait_for_matching_copy(installed)
    # Replaced by rename, as editors and sed -i do.
    ct.run(
        ["sed", "-i", 's/^description = "Fails with exit status 3"/description = "Fails: status 3"/', CONFIG]
    )
    assert wait_for_matching_copy(installed) == "True 0 0o644"
    assert b"Fails: status 3" in installed.jobctl("list").stdout
    # Written in place.
    ct.run(["sh", "-c", f"printf '\\n[jobs.e2e-added]\\ncommand = [\"/bin/true\"]\\n' >> {CONFIG}"])
    assert wait_for_matching_copy(installed) == "True 0 0o644"
    assert b"e2e-added" in installed.jobctl("list").stdout


def runner_imports(inst: Installation) -> str:
    """What the runner imported while serving `jobctl list` (python's -X importtime, from the journal)."""
    ct = inst.container
    cursor = ct.run(["journalctl", "-n", "0", "--show-cursor", "-q"]).stdout.decode().split("cursor: ")[-1]
    assert inst.jobctl("list").returncode == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = ct.run(
            ["journalctl", f"--after-cursor={cursor.strip()}", "-t", "jobrunner", "-o", "cat", "--no-pager"]
        ).stdout.decode()
        if "runner.protocol" in out:
            return out
        time.sleep(0.1)
    raise AssertionError("no import times in the journal")


@pytest.mark.usefixtures("restore_config")
def test_connections_skip_tomllib_while_the_copy_matches(installed: Installation) -> None:
    ct = installed.container
    ct.write_file(IMPORTTIME_DROPIN, b"[Service]\nEnvironment=PYTHONPROFILEIMPORTTIME=1\n")
    ct.run(["systemctl", "daemon-reload"])
    try:
        wait_for_matching_copy(installed)
        imports = runner_imports(installed)
        assert "runner.config" in imports
        assert "tomllib" not in imports
        # A copy that no longer matches is not used: the runner parses the file itself.
        ct.run(["systemctl", "stop", "jobrunner-config.path"])
        ct.run(["sh", "-c", f"echo '# edited while nothing refreshes the copy' >> {CONFIG}"])
        assert copy_state(installed).startswith("False")
        assert "tomllib" in runner_imports(installed)
    finally:
        ct.run(["rm", "-f", IMPORTTIME_DROPIN])
        ct.run(["systemctl", "daemon-reload"])


@pytest.mark.usefixtures("restore_config")
def test_an_invalid_edit_fails_the_config_unit_and_connections_report_it(installed: Installation) -> None:
    ct = installed.container
    wait_for_matching_copy(installed)
    ct.run(["sh", "-c", f"echo '[jobs.broken]' >> {CONFIG}"])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        state = ct.run(["systemctl", "is-failed", "jobrunner-config.service"], check=False).stdout.strip()
        if state == b"failed":
            break
        time.sleep(0.1)
    assert state == b"failed"
    log = ct.run(["journalctl", "-u", "jobrunner-config.service", "-n", "20", "-o", "cat"]).stdout.decode()
    # The unit says that the file is invalid, not how: that could quote a key pasted into the file.
    assert f"{CONFIG} is invalid (not saying how" in log
    assert "broken" not in log
    by_hand = ct.run(["jobrunner", "check"], check=False)
    assert by_hand.returncode == 78
    assert b"job 'broken': missing key 'command'" in by_hand.stderr
    result = installed.jobctl("list")
    assert result.returncode == 78
    assert b"job 'broken': missing key 'command'" in result.stderr
    ct.run(["systemctl", "reset-failed", "jobrunner-config.service"])
