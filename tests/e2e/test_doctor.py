"""`jobrunner doctor` against the installed product under real systemd (252 on bookworm, 257 on trixie).

On the installation the session's `installed` fixture made, doctor finds no problem (warnings allowed).
Each test then plants one problem, checks that doctor finds it (exit status 1, the right check named)
and undoes it; the last test checks that every one was undone. The firewall and cgroup probes are held
to what the container really does, found by probes of the test's own with other programs (socat, sh,
dd), not to what these containers are known to do.

jobrunner-config.path applies every change of jobs.toml, attributes included, with a daemon-reload that
rewrites the generator's directory while doctor may be reading it: the tests that touch jobs.toml stop
it first, and every doctor run waits until no run of jobrunner-config.service is queued or running.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from .conftest import Installation, settle, write_jobs
from .container import Container
from .test_hostile import CGROUP_V1_DISTROS, cgroup_v1_container, install, limits_unavailable

pytestmark = pytest.mark.e2e

JOBS_TOML = "/etc/jobrunner/jobs.toml"
STORE = "/etc/credstore.encrypted"
CHECKS = [
    "systemd", "configuration", "firewall", "tasks-limit", "memory-limit", "credentials", "socket", "polkit",
    "admins", "writable", "units", "outputs", "security",
]  # fmt: skip
PORT = 48219  # the test's own firewall probe listens here, on the container's loopback
POLKIT_RULE = """polkit.addRule(function(action, subject) {{
    if (action.id == "org.freedesktop.systemd1.manage-units" && subject.isInGroup("{group}")) {{
        return polkit.Result.YES;
    }}
}});
"""


Results = list[dict[str, Any]]


def doctor(inst: Installation, *options: str) -> tuple[int, str]:
    """`jobrunner doctor OPTIONS` as root: its exit status and output. It never shows the key."""
    settle(inst.container)
    res = inst.container.run(["jobrunner", "doctor", *options], check=False, timeout=120)
    out, err = res.stdout.decode(), res.stderr.decode()
    assert inst.secret not in out + err
    assert err == "", err  # every finding is on stdout; no traceback
    return res.returncode, out


def results(inst: Installation) -> tuple[int, Results]:
    status, out = doctor(inst, "--json")
    found: Results = json.loads(out)
    return status, found


def problems(found: Results) -> list[tuple[str, str]]:
    return [(r["check"], r["message"]) for r in found if r["status"] == "problem"]


def of(found: Results, check: str) -> Results:
    return [r for r in found if r["check"] == check]


def finds(inst: Installation, check: str, pattern: str) -> Results:
    """Doctor exits 1 and `check` reports a problem matching `pattern`; returns all results."""
    status, found = results(inst)
    assert status == 1, problems(found)
    assert any(check == c and re.search(pattern, m) for c, m in problems(found)), problems(found)
    return found


@pytest.fixture(scope="module")
def inst(installed: Installation) -> Iterator[Installation]:
    """The session's installation; jobs.toml as it was, and its watch running, afterwards."""
    ct = installed.container
    original = ct.run(["cat", JOBS_TOML]).stdout.decode()
    yield installed
    ct.run(["systemctl", "stop", "jobrunner-config.path"])
    write_jobs(ct, original)
    ct.run(["systemctl", "start", "jobrunner-config.path"])


@contextmanager
def watch_stopped(inst: Installation) -> Iterator[str]:
    """jobrunner-config.path stopped (edits of jobs.toml are not applied); yields jobs.toml's text. On
    the way out, jobs.toml is that text again, applied (`jobrunner check`), and the watch runs again."""
    ct = inst.container
    ct.run(["systemctl", "stop", "jobrunner-config.path"])
    settle(ct)
    original = ct.run(["cat", JOBS_TOML]).stdout.decode()
    try:
        yield original
    finally:
        write_jobs(ct, original)  # also its mode, 0644
        ct.run(["systemctl", "start", "jobrunner-config.path"])


def test_a_clean_installation_has_no_problem(inst: Installation) -> None:
    status, found = results(inst)
    assert (status, problems(found)) == (0, [])
    assert list(dict.fromkeys(r["check"] for r in found)) == CHECKS
    assert {r["status"] for r in found} <= {"ok", "warning"}
    assert all(r["fix"] for r in found if r["status"] != "ok") and all(
        r["fix"] is None for r in of(found, "systemd")
    )
    version = inst.container.run(["systemctl", "--version"]).stdout.decode().splitlines()[0]
    assert of(found, "systemd")[0]["message"] == version
    # The session's credential decrypts, with the host key (no TPM2 here), for the jobs that name it.
    (line,) = [
        r["message"] for r in of(found, "credentials") if r["message"].startswith(f"'{inst.credential}':")
    ]
    assert (
        "decrypts; sealed with the host key" in line
        and "no expiry date" in line
        and "job 'e2e-hello'" in line
    )
    # The units README's "Security" rates, held to its figures.
    ratings = {r["message"].split(":")[0] for r in of(found, "security")}
    assert {"job@0.service", "job-e2e-hello@x.service", "job-e2e-probe@x.service"} <= ratings


def test_the_text_output_is_one_aligned_line_per_item_with_the_fix_below(inst: Installation) -> None:
    status, out = doctor(inst)
    assert status == 0
    lines = out.splitlines()
    summary = re.fullmatch(r"summary: 0 problem\(s\), (\d+) warning\(s\), (\d+) ok", lines[-1])
    assert summary, lines[-1]
    items = [line for line in lines[:-2] if not line.lstrip().startswith("fix: ")]
    assert all(re.match(r"(ok     |warning)  [a-z -]{13}  \S", line) for line in items), items
    fixes = [i for i, line in enumerate(lines) if line.lstrip().startswith("fix: ")]
    assert len(fixes) == int(summary.group(1))  # a fix under each warning, at the message's column
    assert all(lines[i - 1].startswith("warning") and lines[i].index("fix:") == 24 for i in fixes)


def test_no_probe_unit_is_left_behind(inst: Installation) -> None:
    doctor(inst)
    inst.container.run(["sh", "-c", """
for i in $(seq 100); do
    [ -z "$(systemctl list-units --all --no-legend 'jobrunner-doctor-*')" ] && exit 0
    sleep 0.1
done
systemctl list-units --all 'jobrunner-doctor-*'; exit 1"""])  # fmt: skip


# --------------------------------------------------------------------------- what the host enforces


def own_probe(ct: Container, *argv: str, properties: tuple[str, ...] = ()) -> int:
    """The exit status of `argv` in a transient unit of the test's own with `properties`."""
    props = [word for prop in properties for word in ("-p", prop)]
    unit = f"--unit=e2e-doctor-own-{secrets.token_hex(4)}"
    return ct.run(
        ["systemd-run", "--wait", "--pipe", "--quiet", "--collect", unit, *props, *argv], check=False
    ).returncode


def firewall_enforced(ct: Container) -> bool:
    """socat to a listener on 127.0.0.1 outside the unit: it connects without IPAddressDeny=any, and not
    with it when the firewall works."""
    ct.run(["systemd-run", "--quiet", "--collect", "--unit=e2e-doctor-listener", "socat",
            f"TCP-LISTEN:{PORT},bind=127.0.0.1,fork,reuseaddr", "EXEC:/bin/true"])  # fmt: skip
    try:
        ct.run(
            [
                "sh",
                "-c",
                f"for i in $(seq 100); do ss -ltn | grep -q ':{PORT} ' && exit 0; sleep 0.1; done; exit 1",
            ]
        )
        connect = ("socat", "-u", "/dev/null", f"TCP:127.0.0.1:{PORT},connect-timeout=2")
        assert own_probe(ct, *connect) == 0, "the control connection failed"
        return own_probe(ct, *connect, properties=("IPAddressDeny=any",)) != 0
    finally:
        ct.run(["systemctl", "stop", "e2e-doctor-listener"], check=False)


def tasks_enforced(ct: Container) -> bool:
    """sh starting six processes: it cannot fork them all under TasksMax=3 when the limit holds. It then
    exits and leaves the others, and systemd on cgroup v1 in a container never hears that they are gone:
    a short TimeoutStopSec= rather than the 90 s default."""
    script = ("sh", "-c", "for i in 1 2 3 4 5 6; do sleep 1 & done; wait")
    assert own_probe(ct, *script) == 0, "the control failed"
    return own_probe(ct, *script, properties=("TasksMax=3", "TimeoutStopSec=2")) != 0


def memory_enforced(ct: Container) -> bool:
    """dd reading 300 MB at once: its buffer cannot fit under MemoryMax=32M when the limit holds."""
    dd = ("dd", "if=/dev/zero", "of=/dev/null", "bs=300M", "count=1", "status=none")
    assert own_probe(ct, *dd) == 0, "the control failed"
    return own_probe(ct, *dd, properties=("MemoryMax=32M", "MemorySwapMax=0")) != 0


def verdicts(found: Results) -> dict[str, bool]:
    """What doctor says each probe showed: "enforced here", "not enforced on this host", or neither."""
    said = {}
    for check in ("firewall", "tasks-limit", "memory-limit"):
        first = of(found, check)[0]["message"]
        assert " is enforced here: " in first or " is not enforced on this host: " in first, first
        said[check] = " is enforced here: " in first
    return said


def assert_probes_agree(inst: Installation) -> Results:
    ct = inst.container
    _, found = results(inst)
    own = {
        "firewall": firewall_enforced(ct),
        "tasks-limit": tasks_enforced(ct),
        "memory-limit": memory_enforced(ct),
    }
    assert verdicts(found) == own
    return found


def test_doctor_reports_what_this_host_enforces(inst: Installation) -> None:
    found = assert_probes_agree(inst)
    # Where a limit holds, doctor says so; where it does not, install.sh's defaults are a warning.
    for check in ("tasks-limit", "memory-limit"):
        assert of(found, check)[0]["status"] == ("ok" if verdicts(found)[check] else "warning")


# Bookworm only: systemd 257 refuses to boot on cgroup v1, so there is no such container for trixie;
# tests/vm/test_vm.py::test_doctor_says_the_firewall_and_the_limits_are_enforced shows it on 257 (and 252).
@pytest.mark.parametrize("container", CGROUP_V1_DISTROS, indirect=True)
def test_where_the_limits_hold_doctor_says_so(installed: Installation) -> None:
    # These containers get no pids or memory controller; test_hostile.py's cgroup v1 bookworm container
    # does.
    reason = limits_unavailable(installed.container.distro)
    if reason:
        pytest.skip(reason)
    with cgroup_v1_container(installed.container.distro) as ct:
        found = assert_probes_agree(install(ct))
    assert verdicts(found)["tasks-limit"] and verdicts(found)["memory-limit"], found
    assert [r["status"] for r in of(found, "tasks-limit") + of(found, "memory-limit")] == ["ok", "ok"]


LIMITED_JOB = """
[jobs.e2e-doctor-limited]
description = "Relies on TasksMax= and MemoryMax="
command = ["/bin/true"]
tasks_max = 7
memory_max = "300M"
"""


def test_a_job_that_relies_on_a_limit_the_host_ignores_is_a_problem(inst: Installation) -> None:
    with watch_stopped(inst) as original:
        write_jobs(inst.container, original + LIMITED_JOB)
        status, found = results(inst)
        said = verdicts(found)
        relying = {c: m for c, m in problems(found) if "job 'e2e-doctor-limited'" in m}
        assert relying == {
            check: f"job 'e2e-doctor-limited' ({key}) relies on it to {purpose}, and this host does not enforce it"
            for check, key, purpose in (
                ("tasks-limit", "tasks_max = 7", "contain a fork bomb"),
                ("memory-limit", "memory_max = 300M", "contain its memory use"),
            )
            if not said[check]
        }
        assert status == (1 if relying else 0), problems(found)


# ------------------------------------------------------------------------------- planted problems


def test_a_world_writable_jobs_toml(inst: Installation) -> None:
    ct = inst.container
    with watch_stopped(inst):
        ct.run(["chmod", "0666", JOBS_TOML])
        finds(inst, "writable", f"^{JOBS_TOML} can be changed by every user$")


def test_a_directory_above_jobs_toml_that_a_user_owns(inst: Installation) -> None:
    ct = inst.container
    ct.run(["chown", inst.outsider, "/etc/jobrunner"])
    try:
        finds(inst, "writable", f"^/etc/jobrunner can be changed by its owner {inst.outsider}$")
    finally:
        ct.run(["chown", "root", "/etc/jobrunner"])


def test_runner_code_that_others_can_write(inst: Installation) -> None:
    ct = inst.container
    ct.run(["chmod", "o+w", "/usr/local/lib/jobrunner/runner"])
    try:
        finds(inst, "writable", "^/usr/local/lib/jobrunner/runner can be changed by every user$")
    finally:
        ct.run(["chmod", "o-w", "/usr/local/lib/jobrunner/runner"])


def test_a_credential_file_others_can_read(inst: Installation) -> None:
    ct = inst.container
    path = f"{STORE}/{inst.credential}"
    ct.run(["chmod", "0644", path])
    try:
        finds(inst, "credentials", f"^'{inst.credential}' \\({path}\\): mode 0644, not 0600")
    finally:
        ct.run(["chmod", "0600", path])


MISSING_JOB = """
[jobs.e2e-doctor-missing]
description = "Names a credential that is not stored"
command = ["/bin/true"]
credentials = ["e2e-doctor-not-stored"]
"""


def test_a_job_that_names_a_credential_not_stored(inst: Installation) -> None:
    with watch_stopped(inst) as original:
        write_jobs(inst.container, original + MISSING_JOB)
        found = finds(
            inst, "credentials", "^'e2e-doctor-not-stored' is not stored, but job 'e2e-doctor-missing'"
        )
        assert [c for c, _ in problems(found)] == ["credentials"]  # its units are in place: nothing else


def test_expired_expiring_and_unused_credentials(inst: Installation) -> None:
    ct = inst.container
    names = {"expired": "+1s", "expiring": "+3d"}
    for name, not_after in names.items():
        ct.run(["sh", "-c", f"printf %s {name}-{secrets.token_hex(8)} | systemd-creds encrypt --name=e2e-doctor-{name} "
                f"--not-after={not_after} - {STORE}/e2e-doctor-{name} && chmod 0600 {STORE}/e2e-doctor-{name}"])  # fmt: skip
    try:
        # Past the first one's not-after: systemd-creds refuses it from now on.
        ct.run(["sh", "-c", f"until ! systemd-creds decrypt --name=e2e-doctor-expired {STORE}/e2e-doctor-expired - "
                ">/dev/null 2>&1; do sleep 0.2; done"], timeout=30)  # fmt: skip
        found = finds(inst, "credentials", "^'e2e-doctor-expired' does not decrypt: it has expired")
        warned = [r["message"] for r in of(found, "credentials") if r["status"] == "warning"]
        assert any(re.fullmatch(r"'e2e-doctor-expiring' expires around \S+ \S+ \S+", m) for m in warned), (
            warned
        )
        for name in names:
            assert (
                f"'e2e-doctor-{name}' is stored, but no job's credentials and no [apis.NAME] name it"
                in warned
            )
    finally:
        ct.run(["rm", "-f", *(f"{STORE}/e2e-doctor-{name}" for name in names)])


def test_units_missing_and_stale_after_an_edit_nothing_applied(inst: Installation) -> None:
    ct = inst.container
    with watch_stopped(inst) as original:
        # e2e-linger removed, e2e-doctor-new added, and nothing reloads systemd.
        edited = re.sub(r"\n\[jobs\.e2e-linger\]\n(?:[^\[\n].*\n|\n)*", "\n", original)
        assert "e2e-linger" not in edited and "[jobs.e2e-hold]" in edited
        ct.write_file(JOBS_TOML, edited + '\n[jobs.e2e-doctor-new]\ncommand = ["/bin/true"]\n')
        found = finds(
            inst, "units", "^jobs.toml calls for units systemd has not loaded: job-e2e-doctor-new.socket"
        )
        assert (
            "units",
            "sockets of jobs or APIs jobs.toml no longer has: job-e2e-linger.socket",
        ) in problems(found)
        assert any(
            r["message"].startswith("jobrunner-config.path is not running") for r in of(found, "units")
        )


def test_a_polkit_rule_that_lets_the_developers_start_units(inst: Installation) -> None:
    ct = inst.container
    rule = "/etc/polkit-1/rules.d/49-e2e-doctor.rules"
    ct.write_file(rule, POLKIT_RULE.format(group="e2e-ops"))
    try:
        # Granted to another group: a file to look at, not a problem.
        status, found = results(inst)
        assert status == 0 and of(found, "polkit") == [{
            "check": "polkit", "status": "warning",
            "message": f"{rule} mentions org.freedesktop.systemd1.manage-units: whoever it grants that can start a "
                       "unit that loads any credential",
            "fix": "make sure it grants it to administrators only",
        }]  # fmt: skip
        ct.write_file(rule, POLKIT_RULE.format(group=inst.group))
        finds(inst, "polkit", f"^{rule} grants org.freedesktop.systemd1.manage-units and names {inst.group}")
    finally:
        ct.run(["rm", "-f", rule])


def test_outputs_every_user_can_read(inst: Installation) -> None:
    ct = inst.container
    ct.run(["chmod", "o+rx", inst.outputs])
    try:
        finds(inst, "outputs", f"^outputs {inst.outputs}: mode 2775: every user can get at the results$")
    finally:
        ct.run(["chmod", "2770", inst.outputs])


def test_a_drop_in_that_weakens_a_jobs_sandbox(inst: Installation) -> None:
    ct = inst.container
    dropin = "/etc/systemd/system/job-e2e-fail@.service.d/50-e2e-doctor.conf"
    ct.write_file(dropin, "[Service]\nProtectSystem=no\nProtectHome=no\nPrivateDevices=no\nCapabilityBoundingSet=~\n"
                  "NoNewPrivileges=no\nSystemCallFilter=\nRestrictAddressFamilies=\n")  # fmt: skip
    ct.run(["systemctl", "daemon-reload"])
    try:
        finds(
            inst, "security", r"^job-e2e-fail@x\.service: exposure \d+\.\d, above the 1\.2 README promises$"
        )
    finally:
        ct.run(["rm", "-rf", dropin.rsplit("/", 1)[0]])
        ct.run(["systemctl", "daemon-reload"])


def test_every_planted_problem_was_undone(inst: Installation) -> None:
    status, found = results(inst)
    assert (status, problems(found)) == (0, [])
    assert not any(r["status"] == "warning" and r["check"] in ("polkit", "units") for r in found), found
