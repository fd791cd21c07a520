"""runner/doctor/, `jobrunner doctor`: the logic of each check, without systemd.

Programs (systemctl, systemd-run, systemd-creds, systemd-analyze) are a fake `run` that answers from a
table and records each call; files are temporary trees, with owners given by a fake lstat where they
matter (the tests may run as any user). tests/e2e/test_doctor.py runs the real thing under systemd.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import re
import socket
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from runner import admin, apply, units
from runner.config import Config, parse_config
from runner.doctor import access, base, command, credentials, installation, probes
from runner.doctor.base import Completed, Context, Finding, Result, Status
from runner.doctor.probes import Enforced, Probe

REPO = Path(__file__).resolve().parents[1]
HOST_KEY = "5a1c6a86df9d4096b1d5a65e0862f19a"
TPM2_AND_HOST_KEY = "93a894094874449090caf2fc93cab553"
NULL_KEY = "058469daf6f54324800549da0f8ea2fb"
DAY = 86400.0
NOW = 1_800_000_000.0


class FakeRun:
    """Programs answered by the first rule whose words all appear in argv; every call is recorded."""

    def __init__(self, rules: dict[str, Completed | Callable[[Sequence[str]], Completed]]) -> None:
        self.rules = rules
        self.calls: list[tuple[list[str], bool]] = []

    def __call__(self, argv: Sequence[str], timeout: float, *, discard_output: bool = False) -> Completed:
        self.calls.append((list(argv), discard_output))
        for words, answer in self.rules.items():
            if all(word in argv for word in words.split()):
                return answer(argv) if callable(answer) else answer
        return Completed(1, "", f"no rule for {argv}")


def done(stdout: str = "", returncode: int = 0, stderr: str = "") -> Completed:
    return Completed(returncode, stdout, stderr)


def stat_result(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, gid, 0, 0, 0, 0))


def statuses(findings: Sequence[Finding]) -> list[str]:
    return [str(f.status) for f in findings]


def config_of(jobs: dict[str, object], apis: dict[str, object] | None = None) -> Config:
    data: dict[str, object] = {"runner": {"project": "/srv/project"}, "jobs": jobs}
    if apis:
        data["apis"] = apis
    return parse_config(data, "/etc/jobrunner/jobs.toml")


API = {"url": "https://api.example.com", "credential": "llm-key"}


# ------------------------------------------------------------------------------- mode checks


def test_a_root_only_file_or_directory_has_no_issues() -> None:
    assert credentials.mode_issues(stat_result(stat.S_IFREG | 0o600), 0o600, directory=False) == []
    assert credentials.mode_issues(stat_result(stat.S_IFDIR | 0o700), 0o700, directory=True) == []


def test_mode_issues_name_what_lets_others_in() -> None:
    issues = credentials.mode_issues(stat_result(stat.S_IFREG | 0o644), 0o600, directory=False)
    assert issues == ["mode 0644, not 0600: others can read it"]
    issues = credentials.mode_issues(stat_result(stat.S_IFDIR | 0o750, uid=0, gid=0), 0o700, directory=True)
    assert issues == ["mode 0750, not 0700: others can read it"]
    issues = credentials.mode_issues(
        stat_result(stat.S_IFREG | 0o600, uid=4242, gid=4242), 0o600, directory=False
    )
    assert issues == ["owned by 4242:4242, not root:root"]
    assert (
        credentials.mode_issues(stat_result(stat.S_IFLNK | 0o777), 0o600, directory=False)[0]
        == "not a regular file"
    )


def test_socket_must_be_root_group_0660(tmp_path: Path) -> None:
    path = str(tmp_path / "job.sock")
    group = grp.struct_group(("devs", "x", 4000, []))
    good = stat_result(stat.S_IFSOCK | 0o660, uid=0, gid=4000)
    assert access.socket_findings(path, group, lambda _: good).status is Status.OK
    open_to_all = stat_result(stat.S_IFSOCK | 0o666, uid=0, gid=4000)
    finding = access.socket_findings(path, group, lambda _: open_to_all)
    assert finding.status is Status.PROBLEM and "mode 0666, not 0660" in finding.message
    other_group = stat_result(stat.S_IFSOCK | 0o660, uid=0, gid=0)
    assert "not devs" in access.socket_findings(path, group, lambda _: other_group).message
    missing = access.socket_findings(path, group)  # nothing there
    assert missing.status is Status.PROBLEM and "missing" in missing.message


def test_a_real_socket_is_recognised(tmp_path: Path) -> None:
    path = str(tmp_path / "real.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        os.chmod(path, 0o660)
        group = grp.struct_group(("devs", "x", 4000, []))
        # Its type and mode as they are; its owners as install.sh's units make them.
        finding = access.socket_findings(path, group, lambda p: stat_result(os.lstat(p).st_mode, 0, 4000))
    assert finding.status is Status.OK, finding


@pytest.mark.parametrize(
    ("mode", "gid", "expected"),
    [
        (0o2770, 0, ["ok"]),
        (0o2775, 0, ["problem"]),  # world-readable
        (0o2770, 4242, ["problem"]),  # another group
        (0o0770, 0, ["warning"]),  # not setgid
    ],
)
def test_outputs_and_logs_are_the_groups_only(mode: int, gid: int, expected: list[str]) -> None:
    st = stat_result(stat.S_IFDIR | mode, uid=0, gid=gid)
    findings = installation.shared_directory_findings("outputs", "/srv/p/outputs", "root", lambda _: st)
    assert statuses(findings) == expected, findings


def test_free_space_below_a_gib_or_five_percent_is_a_warning() -> None:
    def vfs(free_blocks: int, blocks: int) -> os.statvfs_result:
        return os.statvfs_result((4096, 4096, blocks, free_blocks, free_blocks, 0, 0, 0, 0, 255))

    gib = (1 << 30) // 4096
    assert installation.space_finding("/o", vfs(10 * gib, 100 * gib)).status is Status.OK
    assert installation.space_finding("/o", vfs(gib // 2, 100 * gib)).status is Status.WARNING
    assert installation.space_finding("/o", vfs(4 * gib, 100 * gib)).status is Status.WARNING  # 4 %


# ------------------------------------------------------------------------ writable by others


def nobody(gid: int) -> list[str]:
    return []


def some(gid: int) -> list[str]:
    return ["alice"]


def test_writers_by_owner_group_and_others() -> None:
    assert access.writers(stat_result(stat.S_IFREG | 0o644), some) == []
    assert access.writers(stat_result(stat.S_IFREG | 0o644, uid=4242), nobody) == ["its owner 4242"]
    assert access.writers(stat_result(stat.S_IFREG | 0o664, gid=4242), some) == ["group 4242 (alice)"]
    assert access.writers(stat_result(stat.S_IFREG | 0o664, gid=4242), nobody) == []  # an empty group
    assert access.writers(stat_result(stat.S_IFREG | 0o646), nobody) == ["every user"]
    # /tmp: others may create entries, but not replace root's.
    assert access.writers(stat_result(stat.S_IFDIR | 0o1777), some) == []
    assert access.writers(stat_result(stat.S_IFLNK | 0o777, uid=4242), some) == []  # links cannot change


class Tree:
    """A temporary tree whose files all count as root's but for those given an owner."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.owners: dict[str, int] = {}

    def lstat(self, path: str) -> os.stat_result:
        real = os.lstat(path)
        return stat_result(real.st_mode, uid=self.owners.get(path, 0), gid=0)

    def writable(self, *paths: tuple[Path, bool]) -> list[tuple[str, str]]:
        return access.find_writable([(str(p), r) for p, r in paths], lambda gid: [], self.lstat)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    for directory in ("etc/jobrunner", "lib/jobrunner/runner"):
        (tmp_path / directory).mkdir(parents=True)
    (tmp_path / "etc/jobrunner/jobs.toml").write_text("")
    (tmp_path / "lib/jobrunner/runner/admin.py").write_text("")
    for path in [tmp_path, *tmp_path.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield Tree(tmp_path)
    for path in [tmp_path, *tmp_path.rglob("*")]:
        path.chmod(0o755)


def test_a_tree_only_root_can_write_is_clean(tree: Tree) -> None:
    root = tree.root
    assert tree.writable((root / "etc/jobrunner/jobs.toml", False), (root / "lib/jobrunner", True)) == []


def test_a_world_writable_file_is_found(tree: Tree) -> None:
    toml = tree.root / "etc/jobrunner/jobs.toml"
    toml.chmod(0o666)
    assert tree.writable((toml, False)) == [(str(toml), f"{toml} can be changed by every user")]


def test_a_writable_parent_directory_is_found_with_what_it_exposes(tree: Tree) -> None:
    toml = tree.root / "etc/jobrunner/jobs.toml"
    tree.owners[str(tree.root / "etc")] = 4242
    found = tree.writable((toml, False))
    assert found == [
        (
            str(tree.root / "etc"),
            f"{tree.root / 'etc'} can be changed by its owner 4242, and with it {toml.parent}",
        )
    ]


def test_a_directory_is_searched_in_full_when_recursive(tree: Tree) -> None:
    code = tree.root / "lib/jobrunner"
    (code / "runner").chmod(0o777)
    assert [path for path, _ in tree.writable((code, True))] == [str(code / "runner")]
    assert tree.writable((code, False)) == []  # only the directory itself and those above it


def test_a_link_is_followed_to_where_it_leads(tree: Tree) -> None:
    target = tree.root / "lib/jobrunner/runner"
    link = tree.root / "etc/code"
    link.symlink_to(target)
    target.chmod(0o777)
    assert [path for path, _ in tree.writable((link, False))] == [str(target)]


def test_missing_paths_are_skipped(tree: Tree) -> None:
    assert tree.writable((tree.root / "no/such/file", True)) == []


# ------------------------------------------------------------------------------------- polkit

GRANT = """polkit.addRule(function(action, subject) {
    if (action.id == "org.freedesktop.systemd1.manage-units" && subject.isInGroup("%s")) {
        return polkit.Result.YES;
    }
});
"""
PKLA = """[ops]
Identity=unix-group:ops
Action=org.freedesktop.systemd1.*
ResultActive=yes
"""


@pytest.fixture
def polkit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for directory in ("etc/rules.d", "usr/rules.d", "etc/localauthority/50-local.d"):
        (tmp_path / directory).mkdir(parents=True)
    monkeypatch.setattr(
        access, "POLKIT_RULE_DIRS", (str(tmp_path / "etc/rules.d"), str(tmp_path / "usr/rules.d"))
    )
    monkeypatch.setattr(
        access, "POLKIT_PKLA_DIRS", (str(tmp_path / "etc/localauthority"), str(tmp_path / "none"))
    )
    monkeypatch.setattr(access, "developer_names", lambda ctx: {"jobrunner", "alice"})
    return tmp_path


def test_polkit_files_that_grant_starting_units_are_found(polkit: Path) -> None:
    (polkit / "usr/rules.d/50-networkd.rules").write_text(
        'if (action.id == "org.freedesktop.hostname1.set-hostname")'
    )
    (polkit / "etc/rules.d/49-ops.rules").write_text(GRANT % "ops")
    (polkit / "etc/rules.d/README").write_text("org.freedesktop.systemd1.manage-units")  # not a rules file
    (polkit / "etc/localauthority/50-local.d/ops.pkla").write_text(PKLA)
    assert access.polkit_grants(access.POLKIT_RULE_DIRS, access.POLKIT_PKLA_DIRS) == [
        (str(polkit / "etc/rules.d/49-ops.rules"), "org.freedesktop.systemd1.manage-units"),
        (str(polkit / "etc/localauthority/50-local.d/ops.pkla"), "org.freedesktop.systemd1.*"),
    ]


def test_a_grant_to_others_is_a_warning_and_to_the_developers_a_problem(polkit: Path) -> None:
    ctx = Context(FakeRun({}))
    assert statuses(access.check_polkit(ctx)) == ["ok"]
    (polkit / "etc/rules.d/49-ops.rules").write_text(GRANT % "ops")
    assert statuses(access.check_polkit(ctx)) == ["warning"]
    (polkit / "etc/rules.d/48-devs.rules").write_text(GRANT % "jobrunner")
    findings = access.check_polkit(ctx)
    assert statuses(findings) == ["problem", "warning"]
    assert "48-devs.rules" in findings[0].message and "jobrunner" in findings[0].message


def test_a_name_is_mentioned_only_as_a_whole_word() -> None:
    assert access.mentions('isInGroup("jobrunner")', "jobrunner")
    assert access.mentions("Identity=unix-group:jobrunner\n", "jobrunner")
    assert not access.mentions('isInGroup("jobrunner-jobs")', "jobrunner")
    assert not access.mentions('subject.user == "malice"', "alice")


def test_administrators_who_are_developers_are_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = {"sudo": grp.struct_group(("sudo", "x", 27, ["bob", "alice"]))}

    def getgrnam(name: str) -> grp.struct_group:
        return groups[name]

    monkeypatch.setattr(grp, "getgrnam", getgrnam)
    monkeypatch.setattr(pwd, "getpwall", lambda: [])
    monkeypatch.setattr(access, "developer_names", lambda ctx: {"jobrunner", "alice"})
    findings = access.check_admins(Context(FakeRun({})))
    assert statuses(findings) == ["warning", "ok"]
    assert findings[0].message.startswith("alice: developer(s) in group 'sudo'")
    assert findings[1].message.endswith(": alice, bob")
    groups.clear()
    assert [f.message for f in access.check_admins(Context(FakeRun({})))] == [
        "no one is in sudo, wheel, admin"
    ]


# ------------------------------------------------------------------------------------- units


SHOW = """Id={}
LoadState={}
ActiveState={}
NeedDaemonReload={}
"""


def show(*units: tuple[str, str, str, str]) -> str:
    return "\n".join(SHOW.format(*unit) for unit in units)


def test_systemctl_show_is_asked_about_an_instance_of_each_template() -> None:
    run = FakeRun(
        {
            "show": done(
                show(
                    ("job-a.socket", "loaded", "active", "no"),
                    ("job-a@0.service", "loaded", "inactive", "no"),
                )
            )
        }
    )
    states = installation.unit_states(Context(run), ["job-a.socket", "job-a@.service"])
    assert run.calls[0][0][-3:] == ["--", "job-a.socket", "job-a@0.service"]
    assert states["job-a@.service"]["LoadState"] == "loaded" and set(states) == {
        "job-a.socket",
        "job-a@.service",
    }


def test_units_missing_changed_silent_or_stale_are_problems() -> None:
    names = ["job-a.socket", "job-a@.service", "job-b.socket", "job-b@.service"]
    states = installation.parse_show(
        show(
            ("job-a.socket", "loaded", "active", "no"),
            ("job-a@.service", "loaded", "inactive", "yes"),
            ("job-b.socket", "loaded", "failed", "no"),
            ("job-b@.service", "not-found", "inactive", "no"),
            ("job-old.socket", "loaded", "active", "no"),
            ("job-gone.socket", "not-found", "inactive", "no"),
        )
    )
    loaded = {"job-a.socket", "job-b.socket", "job-old.socket", "job-gone.socket"}
    findings = installation.unit_findings(names, ["job-a.socket", "job-b.socket"], states, loaded)
    assert [f.message.split(":")[0] for f in findings] == [
        "jobs.toml calls for units systemd has not loaded",
        "units changed on disk since systemd loaded them",
        "sockets of jobs.toml's jobs and APIs not listening",
        "sockets of jobs or APIs jobs.toml no longer has",
    ]
    assert [f.message.split(": ")[1] for f in findings] == [
        "job-b@.service",
        "job-a@.service",
        "job-b.socket",
        "job-old.socket",
    ]
    assert statuses(findings) == ["problem"] * 4


def test_units_in_line_with_jobs_toml_have_no_findings() -> None:
    names = ["job-a.socket", "job-a@.service"]
    states = installation.parse_show(
        show(("job-a.socket", "loaded", "active", "no"), ("job-a@.service", "loaded", "inactive", "no"))
    )
    assert installation.unit_findings(names, ["job-a.socket"], states, {"job-a.socket"}) == []


def generated(config: Config, directory: Path) -> list[units.Unit]:
    """What the generator writes for `config`, written into `directory` as it would."""
    expected = units.render(
        config, (REPO / "units" / "job-NAME@.service.in").read_text(), root=str(directory / "no-root")
    )
    units.write(expected, str(directory))
    return expected


def test_the_generators_files_match_what_jobs_toml_makes_now(tmp_path: Path) -> None:
    config = config_of({"a": {"command": ["/bin/true"]}, "b": {"command": ["/bin/true"]}})
    expected = generated(config, tmp_path)
    assert installation.generated_findings(expected, str(tmp_path)) == []
    # jobs.toml changed (a job's profile, a new job, a removed one) but nothing reloaded systemd:
    changed = config_of({"a": {"command": ["/bin/true"], "tasks_max": 7}, "c": {"command": ["/bin/true"]}})
    now = units.render(
        changed, (REPO / "units" / "job-NAME@.service.in").read_text(), root=str(tmp_path / "no-root")
    )
    findings = installation.generated_findings(now, str(tmp_path))
    assert [f.message for f in findings] == [
        "generated from an earlier jobs.toml (or template): job-a@.service, job-c.socket, job-c@.service, "
        "job@a.service, job@c.service",
        "generated for jobs or APIs jobs.toml no longer has: job-b.socket, job-b@.service, job@b.service",
    ]
    # What unit_findings said already is not said twice.
    said = {
        "job-c.socket",
        "job-c@.service",
        "job@c.service",
        "job-b.socket",
        "job-b@.service",
        "job@b.service",
    }
    assert [f.message for f in installation.generated_findings(now, str(tmp_path), said)] == [
        "generated from an earlier jobs.toml (or template): job-a@.service, job@a.service"
    ]


def test_a_generated_file_belongs_to_its_unit() -> None:
    assert installation.unit_of("job-x.socket.d/10-install.conf") == "job-x.socket"
    assert installation.unit_of("sockets.target.wants/job-x.socket") == "job-x.socket"
    assert installation.unit_of("job@x.service") == "job@x.service"


# ------------------------------------------------------------------------------------ probes


def test_probes_are_short_lived_collected_units_with_unique_names() -> None:
    run = FakeRun({"systemd-run": done("connected\n")})
    ctx = Context(run)
    probes.probe_unit(ctx, "firewall", ("IPAddressDeny=any",), "code")
    probes.probe_unit(ctx, "firewall", ("IPAddressDeny=any",), "code")
    names = []
    for argv, _ in run.calls:
        assert argv[:5] == ["systemd-run", "--wait", "--pipe", "--quiet", "--collect"]
        assert f"RuntimeMaxSec={probes.PROBE_RUNTIME_S}" in argv and "IPAddressDeny=any" in argv
        assert f"TimeoutStopSec={probes.PROBE_STOP_S}" in argv
        names.append(next(a for a in argv if a.startswith("--unit=jobrunner-doctor-firewall-")))
    assert len(set(names)) == 2


def test_a_probe_that_outlives_its_timeout_is_stopped() -> None:
    run = FakeRun({"systemd-run": done(returncode=124, stderr="timed out"), "stop": done()})
    probes.probe_unit(Context(run), "memory", (), "code")
    unit = run.calls[0][0][5].removeprefix("--unit=")
    assert run.calls[1][0] == ["systemctl", "stop", unit]


def test_the_firewall_is_enforced_when_the_control_connects_and_the_denied_unit_cannot() -> None:
    connected, blocked = done("connected\n"), done("blocked\n")
    assert probes.firewall_verdict(connected, blocked).enforced is Enforced.YES
    assert probes.firewall_verdict(connected, connected).enforced is Enforced.NO
    assert probes.firewall_verdict(blocked, blocked).enforced is Enforced.UNKNOWN  # the control failed
    failed = done(returncode=1, stderr="Failed to start transient service unit")
    unknown = probes.firewall_verdict(connected, failed)
    assert unknown.enforced is Enforced.UNKNOWN and "Failed to start" in unknown.detail


def test_tasks_and_memory_verdicts() -> None:
    assert probes.tasks_verdict(done("started 3 refused 5\n")).enforced is Enforced.YES
    assert probes.tasks_verdict(done("started 8 refused 0\n")).enforced is Enforced.NO
    assert probes.tasks_verdict(done(returncode=1)).enforced is Enforced.UNKNOWN
    assert probes.memory_verdict(done("started\nsurvived\n")).enforced is Enforced.NO
    assert probes.memory_verdict(done("started\nrefused\n")).enforced is Enforced.YES
    assert probes.memory_verdict(done("started\n", returncode=1)).enforced is Enforced.YES  # killed
    assert probes.memory_verdict(done("", returncode=1)).enforced is Enforced.UNKNOWN
    assert probes.memory_verdict(done("started\n")).enforced is Enforced.UNKNOWN


def test_a_protection_the_host_ignores_is_a_problem_for_each_job_that_relies_on_it() -> None:
    relying = ["job 'a' (tasks_max = 7)"]
    no = Probe(Enforced.NO, "evidence")
    assert statuses(probes.protection_findings(no, probes.TASKS, relying)) == ["warning", "problem"]
    assert statuses(probes.protection_findings(no, probes.TASKS, [])) == ["warning"]  # the defaults only
    assert statuses(probes.protection_findings(no, probes.FIREWALL, [])) == ["warning"]
    said = probes.protection_findings(no, probes.TASKS, relying)
    assert said[0].message == (
        "TasksMax= (process limits) is not enforced on this host: evidence; install.sh's --tasks-max and the "
        "API proxies' TasksMax= have no effect"
    )
    assert (
        said[1].message
        == "job 'a' (tasks_max = 7) relies on it to contain a fork bomb, and this host does not enforce it"
    )
    assert statuses(probes.protection_findings(Probe(Enforced.YES, "e"), probes.TASKS, relying)) == ["ok"]
    assert statuses(probes.protection_findings(Probe(Enforced.UNKNOWN, "e"), probes.TASKS, relying)) == [
        "warning"
    ]


@pytest.fixture
def jobs_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    def write(text: str) -> None:
        path = tmp_path / "jobs.toml"
        path.write_text('[runner]\nproject = "/srv/project"\n' + text)
        monkeypatch.setenv("JOBRUNNER_CONFIG", str(path))

    return write


def test_the_jobs_that_rely_on_the_firewall(
    jobs_toml: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs_toml(
        '[jobs.any]\ncommand = ["/bin/true"]\n[jobs.listed]\ncommand = ["/bin/true"]\nnetwork = ["192.0.2.1"]\n'
        '[jobs.offline]\ncommand = ["/bin/true"]\nnetwork = "none"\n'
        '[apis.llm]\nurl = "https://api.example.com"\ncredential = "llm-key"\n'
    )
    monkeypatch.setattr(probes, "probe_firewall", lambda ctx: Probe(Enforced.NO, "it connected"))
    findings = probes.check_firewall(Context(FakeRun({})))
    assert [f.message.split(" relies")[0] for f in findings[1:]] == [
        "job 'any' (network = \"any\")",
        "job 'listed' (network = [addresses])",
        "the proxy of API 'llm'",
    ]
    assert statuses(findings) == ["warning"] + ["problem"] * 3
    assert (
        findings[0].message
        == "IPAddressDeny= (the jobs' IP firewall) is not enforced on this host: it connected"
    )


def test_the_jobs_that_rely_on_limits(
    jobs_toml: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs_toml(
        '[jobs.plain]\ncommand = ["/bin/true"]\n[jobs.capped]\ncommand = ["/bin/true"]\ntasks_max = 7\nmemory_max = "300M"\n'
    )
    monkeypatch.setattr(probes, "probe_tasks", lambda ctx: Probe(Enforced.NO, "8 started"))
    monkeypatch.setattr(probes, "probe_memory", lambda ctx: Probe(Enforced.NO, "filled"))
    tasks = probes.check_tasks(Context(FakeRun({})))
    memory = probes.check_memory(Context(FakeRun({})))
    assert statuses(tasks) == statuses(memory) == ["warning", "problem"]
    assert tasks[1].message.startswith("job 'capped' (tasks_max = 7) relies on it")
    assert memory[1].message.startswith("job 'capped' (memory_max = 300M) relies on it")


# ------------------------------------------------------------------------------- credentials


def sealed(path: Path, key: str = HOST_KEY) -> Path:
    """A file that starts like systemd-creds' output for `key` (its header's first 16 bytes)."""
    path.write_bytes(base64.b64encode(bytes.fromhex(key) + b"\0" * 32) + b"\n")
    path.chmod(0o600)
    return path


def systemd_creds(expires: float | None = None, failure: str = "") -> Callable[[Sequence[str]], Completed]:
    """A fake `systemd-creds decrypt`: refuses after `expires` (as of --timestamp=, or NOW), or always."""

    def answer(argv: Sequence[str]) -> Completed:
        if failure:
            return done(returncode=1, stderr=failure)
        at = next(
            (float(a.removeprefix("--timestamp=@")) for a in argv if a.startswith("--timestamp=@")), NOW
        )
        if expires is not None and at > expires:
            return done(returncode=1, stderr="Credential's time passed, refusing to use.\n")
        return done(
            stderr="Credential secret file '/var/lib/systemd/credential.secret' is not located on encrypted media, using anyway.\n"
        )

    return answer


Checked = Callable[..., tuple[list[Finding], FakeRun]]


@pytest.fixture
def credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Checked:
    """credential_findings of a file sealed with the host key, as if root's (whoever runs the tests)."""
    real = credentials.mode_issues

    def as_roots(st: os.stat_result, mode: int, *, directory: bool) -> list[str]:
        return real(stat_result(st.st_mode), mode, directory=directory)

    monkeypatch.setattr(credentials, "mode_issues", as_roots)

    def check(
        answer: Callable[[Sequence[str]], Completed], users: list[str] | None, mode: int = 0o600
    ) -> tuple[list[Finding], FakeRun]:
        run = FakeRun({"decrypt": answer})
        path = sealed(tmp_path / "api-key")
        path.chmod(mode)
        findings = credentials.credential_findings(
            Context(run, now=lambda: NOW), path, "api-key", users, tpm2=False
        )
        return findings, run

    return check


def test_a_credential_is_decrypted_to_dev_null_only(credential: Checked) -> None:
    findings, run = credential(systemd_creds(), ["job 'hello'"])
    assert statuses(findings) == ["ok"]
    assert findings[0].message == (
        "'api-key': decrypts; sealed with the host key (/var/lib/systemd/credential.secret; no TPM2 found); "
        "no expiry date; used by job 'hello'"
    )
    assert run.calls, "systemd-creds was asked"
    for argv, discard_output in run.calls:
        # The value goes to systemd-creds' stdout, which is /dev/null: never through the doctor.
        assert argv[:4] == ["systemd-creds", "decrypt", "--name=api-key", *argv[3:4]] and argv[-1] == "-"
        assert discard_output, argv


def test_an_expired_credential_is_a_problem(credential: Checked) -> None:
    findings, _ = credential(systemd_creds(expires=NOW - DAY), ["job 'hello'"])
    assert statuses(findings) == ["problem"]
    assert "'api-key' does not decrypt: it has expired" in findings[0].message


def test_a_credential_sealed_for_another_name_is_a_problem(credential: Checked) -> None:
    said = "Embedded credential name 'other' does not match filename 'api-key', refusing."
    findings, _ = credential(systemd_creds(failure=said), ["job 'hello'"])
    assert statuses(findings) == ["problem"] and said in findings[0].message


def test_the_expiry_date_is_found_by_decrypting_as_of_later_times(credential: Checked) -> None:
    expires = NOW + 3 * DAY + 5000
    findings, run = credential(systemd_creds(expires=expires), ["job 'hello'"])
    assert statuses(findings) == ["ok", "warning"]  # within 14 days
    shown = re.search(r"expires around (\S+ \S+)", findings[0].message)
    assert shown, findings[0].message
    found = max(float(a.removeprefix("--timestamp=@")) for argv, _ in run.calls for a in argv
                if a.startswith("--timestamp=@") and float(a.removeprefix("--timestamp=@")) <= expires)  # fmt: skip
    assert expires - found <= credentials.EXPIRY_PRECISION_S
    assert len(run.calls) <= 2 + 10  # now, +14 days, then a bisection to the hour


def test_a_credential_that_expires_later_is_ok_with_its_date(credential: Checked) -> None:
    findings, run = credential(systemd_creds(expires=NOW + 90 * DAY), ["job 'hello'"])
    assert statuses(findings) == ["ok"] and "expires around" in findings[0].message
    assert len(run.calls) <= 3 + 20


def test_an_expiry_systemd_creds_cannot_tell_is_unknown(credential: Checked) -> None:
    calls = {"n": 0}

    def flaky(argv: Sequence[str]) -> Completed:
        calls["n"] += 1
        return done() if calls["n"] == 1 else done(returncode=1, stderr="TPM2 operation failed")

    findings, _ = credential(flaky, ["job 'hello'"])
    assert "expiry date unknown (TPM2 operation failed)" in findings[0].message


def test_a_credential_others_can_read_is_a_problem(credential: Checked) -> None:
    findings, _ = credential(systemd_creds(), ["job 'hello'"], mode=0o644)
    assert statuses(findings) == ["ok", "problem"]
    assert findings[1].message.endswith("mode 0644, not 0600: others can read it")
    assert findings[1].fix is not None and re.search(r"; chmod 0600 /\S+/api-key$", findings[1].fix)


def test_an_unused_credential_is_a_warning(credential: Checked) -> None:
    findings, _ = credential(systemd_creds(), None)
    assert statuses(findings) == ["ok", "warning"] and "used by no job or API" in findings[0].message


def test_the_key_that_sealed_a_credential() -> None:
    assert credentials.key_findings("k", HOST_KEY, tpm2=False) == []
    assert statuses(credentials.key_findings("k", HOST_KEY, tpm2=True)) == ["warning"]  # could be the TPM2's
    assert credentials.key_findings("k", TPM2_AND_HOST_KEY, tpm2=True) == []
    assert statuses(credentials.key_findings("k", NULL_KEY, tpm2=False)) == ["problem"]


def test_credentials_named_but_not_stored_and_stored_but_unused(
    tmp_path: Path, jobs_toml: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs_toml(
        '[jobs.a]\ncommand = ["/bin/true"]\ncredentials = ["api-key", "missing"]\n'
        '[jobs.b]\ncommand = ["/bin/true"]\ncredentials = ["missing"]\n'
        '[apis.llm]\nurl = "https://api.example.com"\ncredential = "llm-key"\n'
    )
    store = tmp_path / "root/etc/credstore.encrypted"
    store.mkdir(parents=True, mode=0o700)
    sealed(store / "api-key")
    sealed(store / "spare")
    monkeypatch.setenv("JOBRUNNER_ROOT", str(tmp_path / "root"))
    monkeypatch.setattr(
        credentials, "mode_issues", lambda st, mode, directory: []
    )  # owners: whoever runs the tests
    ctx = Context(FakeRun({"decrypt": systemd_creds(), "has-tpm2": done(returncode=1)}), now=lambda: NOW)
    findings = credentials.check_credentials(ctx)
    assert [(str(f.status), f.message.split(":")[0]) for f in findings] == [
        ("ok", "'api-key'"),
        ("ok", "'spare'"),
        ("warning", "'spare' is stored, but no job's credentials and no [apis.NAME] name it"),
        ("problem", "'llm-key' is not stored, but API 'llm' name(s) it"),
        ("problem", "'missing' is not stored, but job 'a', job 'b' name(s) it"),
    ]


# -------------------------------------------------------------------------------- security


def test_each_unit_is_held_to_the_readmes_figure() -> None:
    config = config_of(
        {
            "web": {"command": ["/bin/true"]},
            "offline": {"command": ["/bin/true"], "network": "none"},
            "summarize": {"command": ["/bin/true"], "network": "none", "apis": ["llm"]},
        },
        {"llm": API},
    )
    assert installation.exposure_limits(config) == {
        "job@0.service": 0.6,
        "job-web@x.service": 1.2,
        "job-offline@x.service": 0.6,
        "job-summarize@x.service": 0.8,
        "jobrunner-api-llm@x.service": 1.2,
    }


def test_exposures_above_the_promise_are_problems() -> None:
    text = (
        "  NAME  DESCRIPTION  EXPOSURE\n"
        "→ Overall exposure level for job-web@x.service: 1.2 OK :-)\n"
        "→ Overall exposure level for job-offline@x.service: 2.9 OK :-)\n"
    )
    levels = installation.parse_exposures(text)
    assert levels == {"job-web@x.service": 1.2, "job-offline@x.service": 2.9}
    limits = {"job-web@x.service": 1.2, "job-offline@x.service": 0.6, "job-gone@x.service": 1.2}
    findings = installation.exposure_findings(limits, levels)
    assert statuses(findings) == ["ok", "problem", "warning"]
    assert findings[1].message == "job-offline@x.service: exposure 2.9, above the 0.6 README promises"


def test_systemd_version() -> None:
    def version(text: str) -> list[Finding]:
        return probes.check_systemd(Context(FakeRun({"--version": done(text)})))

    assert statuses(version("systemd 257 (257.13-1~deb13u1)\n+PAM +AUDIT\n")) == ["ok"]
    assert statuses(version("systemd 247 (247.3-7)\n")) == ["problem"]
    assert statuses(probes.check_systemd(Context(FakeRun({})))) == ["problem"]


# ------------------------------------------------------------------------ running and output


def test_a_check_that_fails_is_a_problem_of_that_check_not_a_traceback() -> None:
    def broken(ctx: Context) -> list[Finding]:
        raise OSError(13, "Permission denied")

    def unchecked(ctx: Context) -> list[Finding]:
        raise base.NotChecked("not checked: jobs.toml cannot be read")

    checks = (("first", lambda ctx: [base.ok("fine")]), ("broken", broken), ("unchecked", unchecked))
    results = list(base.run_checks(checks, Context(FakeRun({}))))
    assert [(r.check, str(r.status)) for r in results] == [
        ("first", "ok"),
        ("broken", "problem"),
        ("unchecked", "problem"),
    ]
    assert results[1].message == "the check failed: PermissionError: [Errno 13] Permission denied"


RESULTS = [
    Result("systemd", Status.OK, "systemd 257", None),
    Result("credentials", Status.WARNING, "'spare' is stored, but unused", "sudo jobrunner creds rm spare"),
    Result(
        "writable", Status.PROBLEM, "/etc/jobrunner/jobs.toml can be changed by every user", "chmod go-w it"
    ),
]


def test_text_output_is_aligned_with_an_indented_fix() -> None:
    lines = "\n".join(command.format_result(r, 11) for r in RESULTS).splitlines()
    assert lines == [
        "ok       systemd      systemd 257",
        "warning  credentials  'spare' is stored, but unused",
        "                      fix: sudo jobrunner creds rm spare",
        "problem  writable     /etc/jobrunner/jobs.toml can be changed by every user",
        "                      fix: chmod go-w it",
    ]
    assert command.summary(RESULTS) == "\nsummary: 1 problem(s), 1 warning(s), 1 ok"


def test_json_output_is_a_list_of_check_status_message_fix() -> None:
    shown = json.loads(command.format_json(RESULTS))
    assert [list(item) for item in shown] == [["check", "status", "message", "fix"]] * 3
    assert shown[0] == {"check": "systemd", "status": "ok", "message": "systemd 257", "fix": None}
    assert [item["status"] for item in shown] == ["ok", "warning", "problem"]


def test_the_exit_status_is_1_only_for_a_problem() -> None:
    assert command.exit_status(RESULTS[:2]) == 0  # warnings allowed
    assert command.exit_status(RESULTS) == 1
    assert command.exit_status([]) == 0


@pytest.fixture
def fake_checks(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[Finding]], None]:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(apply, "systemd_running", lambda: True)

    def use(findings: list[Finding]) -> None:
        monkeypatch.setattr(
            command,
            "CHECKS",
            (("systemd", lambda ctx: [findings[0]]), ("writable", lambda ctx: findings[1:])),
        )

    return use


def test_jobrunner_doctor_prints_each_item_and_exits_1_on_a_problem(
    fake_checks: Callable[[list[Finding]], None], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_checks(
        [base.ok("systemd 257"), base.problem("/etc/jobrunner can be changed by alice", "chown root")]
    )
    assert admin.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[:3] == [
        "ok       systemd   systemd 257",
        "problem  writable  /etc/jobrunner can be changed by alice",
        "                   fix: chown root",
    ]
    assert out.endswith("summary: 1 problem(s), 0 warning(s), 1 ok\n")


def test_jobrunner_doctor_json_exits_0_with_warnings(
    fake_checks: Callable[[list[Finding]], None], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_checks([base.ok("systemd 257"), base.warning("TasksMax= is not enforced", "cgroup v2")])
    assert admin.main(["doctor", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown[1] == {
        "check": "writable",
        "status": "warning",
        "message": "TasksMax= is not enforced",
        "fix": "cgroup v2",
    }


def test_jobrunner_doctor_needs_root_and_systemd(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert admin.main(["doctor"]) == 77
    assert "'jobrunner doctor' must be run as root" in capsys.readouterr().err
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(apply, "systemd_running", lambda: False)
    assert admin.main(["doctor"]) == 69
    with pytest.raises(SystemExit) as usage:
        admin.main(["doctor", "--colour"])
    assert usage.value.code == 64


def test_the_help_documents_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as shown:
        admin.main(["doctor", "--help"])
    assert shown.value.code == 0
    out = capsys.readouterr().out
    assert "  0    no problem found (warnings allowed)\n  1    at least one problem\n" in out
    assert "77   not run as root" in out and '{"check", "status", "message", "fix"}' in out
    for name, _ in command.CHECKS:
        assert f"\n  {name} " in out, name


def test_a_legacy_drop_in_that_loads_a_credential_into_every_run_is_a_problem(
    tmp_path: Path, jobs_toml: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs_toml('[jobs.a]\ncommand = ["/bin/true"]\ncredentials = ["api-key"]\n')
    store = tmp_path / "root/etc/credstore.encrypted"
    store.mkdir(parents=True, mode=0o700)
    sealed(store / "api-key")
    dropins = tmp_path / "root/etc/systemd/system/job@.service.d"
    dropins.mkdir(parents=True)
    (dropins / "50-credential-api-key.conf").write_text("[Service]\nLoadCredentialEncrypted=api-key\n")
    monkeypatch.setenv("JOBRUNNER_ROOT", str(tmp_path / "root"))
    monkeypatch.setattr(credentials, "mode_issues", lambda st, mode, directory: [])
    ctx = Context(FakeRun({"decrypt": systemd_creds(), "has-tpm2": done(returncode=1)}), now=lambda: NOW)
    findings = credentials.check_credentials(ctx)
    assert statuses(findings) == ["ok", "problem"]
    assert findings[1].message == f"a legacy drop-in loads 'api-key' into every run: {dropins}"


def test_an_invalid_jobs_toml_is_a_problem_and_the_checks_that_need_it_say_so(
    jobs_toml: Callable[[str], None],
) -> None:
    jobs_toml('[jobs.a]\ncommand = "not a list"\n')
    ctx = Context(FakeRun({}))
    (finding,) = probes.check_configuration(ctx)
    assert finding.status is Status.PROBLEM and "key 'command' must be a list of strings" in finding.message
    results = list(
        base.run_checks((("units", installation.check_units), ("socket", access.check_socket)), ctx)
    )
    assert [(r.check, str(r.status)) for r in results] == [("units", "problem"), ("socket", "problem")]
    assert (
        results[0].message.startswith("not checked: ")
        and "see the check 'configuration'" in results[0].message
    )


def test_the_front_door_and_the_watch_of_jobs_toml_must_run() -> None:
    running = installation.parse_show(
        show(("job.socket", "loaded", "active", "no"), ("jobrunner-config.path", "loaded", "active", "no"))
    )
    assert installation.service_findings(running) == []
    stopped = installation.parse_show(
        show(
            ("job.socket", "loaded", "inactive", "no"), ("jobrunner-config.path", "loaded", "inactive", "no")
        )
    )
    findings = installation.service_findings(stopped)
    assert statuses(findings) == ["problem", "warning"]
    assert findings[0].fix == "sudo systemctl enable --now job.socket"
