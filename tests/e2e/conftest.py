"""End-to-end fixtures: one real systemd container per distro, shared by the whole session.

Select distros with ``JOBRUNNER_E2E_DISTROS=bookworm,trixie`` (the default: both); selecting none
(``JOBRUNNER_E2E_DISTROS=""``) skips every e2e test, which under CI is an error instead.
The repository is bound read-only at ``/src`` inside.  The container is shared:
a test that installs units or users should use names no other test uses, and
undo what would disturb later tests.

Missing prerequisites (not root, no debootstrap / systemd-nspawn / nsenter) skip
the e2e tests, except under CI (``CI=true``) or ``JOBRUNNER_E2E_REQUIRE=1``,
where they fail: .ci/install-deps installs everything, so a skip there would
only hide a broken setup.

``installed`` is jobrunner installed in that container the way a user installs
it: ``./install.sh --project /home/alice/project`` from a (writable) copy of the
checkout, a developer ``alice`` in the group, an outsider ``mallory``, the test
jobs of ``JOBS_TOML`` and a credential ``api-key`` stored with ``jobrunner
creds set``.  Tests that change the installation restore it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    if not chosen and _required():
        raise pytest.UsageError(
            f"JOBRUNNER_E2E_DISTROS={raw!r} selects no distro, which would skip every e2e test "
            f"[CI/JOBRUNNER_E2E_REQUIRE set]; expected some of {DISTROS}"
        )
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


# --------------------------------------------------------------------------- #
# jobrunner, installed
# --------------------------------------------------------------------------- #

DEVELOPER = "alice"
OUTSIDER = "mallory"
GROUP = "jobrunner"
CREDENTIAL = "api-key"
PROJECT = f"/home/{DEVELOPER}/project"
# install.sh runs from a writable copy of the checkout, as from a user's clone (/src is read-only).
CHECKOUT = "/root/jobrunner"
# Copied into the project: the demo app (when the examples exist) and the tests' own programs.
DEMO_PROJECT = REPO / "examples" / "demo-project"
TEST_PROJECT = Path(__file__).parent / "project"

# The e2e tests' jobs (tests append their own tables). {project} and {credential} are filled in.
JOBS_TOML = """\
# Written by tests/e2e/conftest.py.
[runner]
project = "{project}"

[jobs.e2e-hello]
description = "Greets its arguments, says how long its key is, writes a result file"
command = ["/bin/sh", "-c", '''
echo "hello $*"
echo "key: $(wc -c < "$CREDENTIALS_DIRECTORY/{credential}") bytes"
echo "result for $*" > "$JOB_OUTPUT_DIR/result.txt"
''', "e2e-hello"]
args = "[A-Za-z0-9_-]+"
credentials = ["{credential}"]
concurrency = "parallel"

[jobs.e2e-fail]
description = "Fails with exit status 3"
command = ["/bin/sh", "-c", "echo 'about to fail' >&2; exit 3"]
concurrency = "parallel"

[jobs.e2e-linger]
description = "Leaves a process of its own session behind, then exits"
command = ["/bin/sh", "-c", "setsid sleep 4242 </dev/null >/dev/null 2>&1 & echo left $!"]

[jobs.e2e-hold]
description = "Holds its key for two seconds"
command = ["/bin/sh", "-c", "sleep 2; echo held"]
credentials = ["{credential}"]
concurrency = "parallel"

[jobs.e2e-gate]
description = "Holds its key until the test creates 'release' in its output directory (2 minutes at most)"
command = ["/bin/sh", "-c", '''
i=0
until [ -e "$JOB_OUTPUT_DIR/release" ] || [ $i -ge 1200 ]; do sleep 0.1; i=$((i+1)); done
echo released
''']
credentials = ["{credential}"]
concurrency = "parallel"

[jobs.e2e-probe]
description = "Reports what the sandbox lets a job do (JSON)"
command = ["bin/e2e-probe"]
args = "[0-9a-f.:]+(%lo:[0-9]+)?"
"""

DEMO_JOB = """
[jobs.hello]
description = "The demo app"
command = ["bin/hello"]
args = "[A-Za-z0-9 _.-]{{1,64}}"
credentials = ["{credential}"]
"""


@dataclass(frozen=True)
class Installation:
    """jobrunner as install.sh left it in ``container``, with the tests' users, jobs and credential."""

    container: Container
    project: str
    outputs: str
    logs: str
    group: str
    developer: str  # in the group
    outsider: str  # not in the group
    secret: str  # the credential's value, made for this session
    credential: str
    install_output: str  # what install.sh printed

    def jobctl(
        self, *args: str, user: str = DEVELOPER, input: bytes | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the installed jobctl as ``user``; a non-zero exit is returned, not raised."""
        return self.container.run(["jobctl", *args], user=user, input=input, check=False, timeout=timeout)

    def sh(self, script: str, *, user: str | None = None) -> str:
        """Run a shell snippet inside (as root by default); return its stdout, raise if it fails."""
        return self.container.run(["sh", "-euc", script], user=user).stdout.decode()


def copy_checkout(ct: Container, dest: str = CHECKOUT) -> None:
    """A writable copy of /src without caches, as a fresh clone would be."""
    excludes = " ".join(
        f"--exclude={shlex.quote(x)}" for x in (".git", "__pycache__", ".*_cache", ".venv", "*.egg-info")
    )
    ct.run(
        [
            "sh",
            "-euc",
            f"rm -rf {dest}; mkdir -p {dest}; tar -C /src {excludes} -cf - . | tar -C {dest} -xf -",
        ]
    )


def run_install(ct: Container, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """``./install.sh ARGS`` from the copied checkout, as root."""
    return ct.run(["sh", "-c", f'cd {CHECKOUT} && exec ./install.sh "$@"', "install.sh", *args], check=check)


def make_project(ct: Container) -> None:
    """The developer's project: the demo app (if any) and the tests' programs, owned by the developer."""
    for source in (DEMO_PROJECT, TEST_PROJECT):
        if source.is_dir():
            ct.copy_in(source, PROJECT)
    ct.run(["chown", "-R", f"{DEVELOPER}:{DEVELOPER}", f"/home/{DEVELOPER}"])


def add_users(ct: Container) -> None:
    for user in (DEVELOPER, OUTSIDER):
        ct.run(["sh", "-c", f"id {user} >/dev/null 2>&1 || useradd --create-home {user}"])


def store_credential(ct: Container, name: str, secret: str) -> None:
    """With the product's own command, from stdin: `printf %s SECRET | jobrunner creds set NAME`."""
    ct.run(["jobrunner", "creds", "set", name], input=secret.encode())


def write_jobs(ct: Container, text: str) -> None:
    """Write jobs.toml and apply it now, as `sudo jobrunner check` does; then wait for the run of
    jobrunner-config.service that the edit also started (jobrunner-config.path), which regenerates the
    same units: a test must not race it to them."""
    ct.write_file("/etc/jobrunner/jobs.toml", text)
    ct.run(["jobrunner", "check"])
    settle(ct)


def settle(ct: Container) -> None:
    """Wait until no run of jobrunner-config.service (an edit of jobs.toml, applied) is queued or running."""
    ct.run(["sh", "-c", """
for i in $(seq 600); do
    state=$(systemctl show -P ActiveState jobrunner-config.service)
    if [ "$state" != activating ] && ! systemctl list-jobs --no-legend | grep -q jobrunner-config; then exit 0; fi
    sleep 0.1
done
exit 1"""])  # fmt: skip


def jobs_toml(credential: str = CREDENTIAL) -> str:
    text = JOBS_TOML.format(project=PROJECT, credential=credential)
    if (DEMO_PROJECT / "bin" / "hello").exists():
        text += DEMO_JOB.format(credential=credential)
    return text


@pytest.fixture(scope="session")
def installed(container: Container) -> Installation:
    """jobrunner installed with install.sh (once per distro); the developer may run the test jobs."""
    ct = container
    add_users(ct)
    make_project(ct)
    copy_checkout(ct)
    result = run_install(ct, "--project", PROJECT)
    ct.run(["usermod", "--append", "--groups", GROUP, DEVELOPER])
    write_jobs(ct, jobs_toml())
    secret = "demo-" + secrets.token_hex(16)
    store_credential(ct, CREDENTIAL, secret)
    return Installation(
        container=ct,
        project=PROJECT,
        outputs=f"{PROJECT}/outputs",
        logs=f"{PROJECT}/logs",
        group=GROUP,
        developer=DEVELOPER,
        outsider=OUTSIDER,
        secret=secret,
        credential=CREDENTIAL,
        install_output=result.stdout.decode(),
    )


@contextmanager
def gated_run(inst: Installation) -> Iterator[dict[str, Any]]:
    """A run of e2e-gate, detached, as the developer (its `accepted` event): it runs, holding its key,
    until the block ends, which releases it and waits until systemd has let go of its unit."""
    started = inst.jobctl("--json", "run", "--detach", "e2e-gate")
    assert started.returncode == 0, started.stderr
    accepted: dict[str, Any] = json.loads(started.stdout.splitlines()[0])
    try:
        yield accepted
    finally:
        inst.container.run(["touch", f"{accepted['output_dir']}/release"])
        inst.container.run(
            ["sh", "-c", "until [ -z \"$(systemctl list-units --all --plain --no-legend 'job-e2e-gate@*')\" ]; "
             "do sleep 0.1; done"],
            timeout=60,
        )  # fmt: skip


def operator_start(
    ct: Container, job: str, *, check: bool = True, also: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess[bytes], str]:
    """`systemctl start job@JOB.service`, as an operator, and what its unit wrote to the journal. The
    job's output reaches the journal through its stdout stream, which journald may read after the start
    has returned, even after `journalctl --sync`: this waits until the runner's last line (`jobrunner:
    JOB (run ...) ...`, the stream's end) is there, and each of `also` (systemd's own messages)."""
    cursor = ct.run(["journalctl", "--show-cursor", "-n", "0", "--quiet"]).stdout.decode()
    cursor = cursor.rpartition("-- cursor: ")[2].strip()
    result = ct.run(["systemctl", "start", f"job@{job}.service"], check=check)
    journal = ""
    for _ in range(600):
        ct.run(["journalctl", "--sync"])
        journal = ct.run(
            ["journalctl", "-o", "cat", "--no-pager", f"--after-cursor={cursor}", "-u", f"job@{job}.service"]
        ).stdout.decode()
        lines = journal.splitlines()
        # (`in`, not startswith: output that does not end in a newline shares the runner's last line)
        if any(f"jobrunner: {job} (run " in line for line in lines) and all(a in journal for a in also):
            return result, journal
        time.sleep(0.1)
    raise AssertionError(f"the end of job@{job}.service's run is not in the journal:\n{journal}")


def exposure(ct: Container, unit: str) -> float:
    """`systemd-analyze security UNIT`'s overall exposure level."""
    out = ct.run(["systemd-analyze", "security", unit], check=False).stdout.decode()
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    return float(match.group(1))
