"""install.sh and the units it installs, under real systemd 252 (bookworm) and 257 (trixie).

The session's installation (``installed``, see conftest.py) proves what a developer and an operator do
with it: run jobs through jobctl, socat and jobrunner-trigger (claim 1), `systemctl start job@NAME`
(claim 2); that outsiders are kept out (3), that nothing of a run is left (6), that a burst of
connections does not break the socket (7), and that systemd-analyze is happy (8). Installing twice and
uninstalling are checked too, the latter in a container of its own.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.test_docs import installed_docs

from .conftest import (
    CHECKOUT,
    PROJECT,
    REPO,
    Installation,
    add_users,
    copy_checkout,
    gated_run,
    jobs_toml,
    make_project,
    operator_start,
    run_install,
    store_credential,
    write_jobs,
)
from .container import Container

pytestmark = pytest.mark.e2e

# `systemd-analyze security job@x.service`'s overall exposure. README.md states it in its "Security"
# section: change both together (the figure moves whenever a sandboxing directive is added or dropped).
EXPOSURE = {"bookworm": "1.2", "trixie": "1.2"}

SOCKET = "/run/job.sock"
INSTALLED_PATHS = (
    "/usr/local/lib/jobrunner",
    "/usr/local/bin/jobctl",
    "/usr/local/bin/jobrunner-trigger",
    "/usr/local/sbin/jobrunner",
    "/usr/local/lib/systemd/system/job.socket",
    "/usr/local/lib/systemd/system/job@.service",
    "/usr/local/lib/systemd/system/jobrunner-config.path",
    "/usr/local/lib/systemd/system/jobrunner-config.service",
    "/etc/systemd/system/job.socket.d/10-install.conf",
    "/etc/systemd/system/job@.service.d/10-install.conf",
    "/etc/sysusers.d/jobrunner.conf",
    "/etc/tmpfiles.d/jobrunner.conf",
    "/usr/local/share/doc/jobrunner",
    "/var/cache/jobrunner",  # the parsed copy of jobs.toml: derived, so removed by --uninstall
)


def eventually(predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def job_units(inst: Installation) -> str:
    """Runs systemd still knows about (running, stopping or failed): front doors and jobs' units."""
    return inst.sh("systemctl list-units --all --plain --no-legend 'job@*' 'job-*@*'")


def wait_for_runs_to_end(inst: Installation) -> None:
    assert eventually(lambda: job_units(inst) == "", timeout=60), job_units(inst)


def json_run(inst: Installation, *args: str) -> list[dict[str, Any]]:
    result = inst.jobctl("--json", "run", *args)
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def journal_cursor(ct: Container) -> str:
    out = ct.run(["journalctl", "--show-cursor", "-n", "0", "--quiet"]).stdout.decode()
    return out.rpartition("-- cursor: ")[2].strip()


def journal_since(ct: Container, cursor: str, unit: str) -> str:
    ct.run(["journalctl", "--sync"], check=False)
    return ct.run(
        ["journalctl", "--no-pager", "-o", "cat", f"--after-cursor={cursor}", "-u", unit]
    ).stdout.decode()


def assert_shared_with_the_group_only(inst: Installation, path: str, mode: str) -> None:
    """`path` belongs to the developer group with `mode`: nothing for other users."""
    owner = inst.sh(f"stat -c '%a %G' {path}").split()
    assert owner == [mode, inst.group], (path, owner)
    denied = inst.container.run(["cat", path], user=inst.outsider, check=False)
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr


def assert_results_shared_and_deletable(inst: Installation, output_dir: str, log: str) -> None:
    """A run's result file and log are the group's (not the world's), and the developer deletes them."""
    assert inst.sh(f"cat {output_dir}/result.txt").startswith("result for ")
    assert "# ---- end" in inst.sh(f"cat {log}")
    assert_shared_with_the_group_only(inst, f"{output_dir}/result.txt", "660")
    assert_shared_with_the_group_only(inst, log, "660")
    assert inst.sh(f"stat -c %a {output_dir}").strip() == "2770"
    inst.sh(f"rm -r {output_dir} {log}", user=inst.developer)
    assert inst.container.run(["test", "-e", output_dir], check=False).returncode == 1
    assert inst.container.run(["test", "-e", log], check=False).returncode == 1


# --- 1. a developer runs jobs -------------------------------------------------------------------------


def test_developer_runs_jobs_with_jobctl(installed: Installation) -> None:
    result = installed.jobctl("run", "e2e-hello", "jobctl")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hello jobctl\nkey: {len(installed.secret)} bytes\n".encode()

    events = json_run(installed, "e2e-hello", "json")
    accepted, end = events[0], events[-1]
    assert (accepted["event"], end["event"], end["exit_code"]) == ("accepted", "exit", 0)
    assert end["output_dir"].startswith(f"{installed.outputs}/e2e-hello/")
    assert end["log"].startswith(f"{installed.logs}/e2e-hello/")
    assert_results_shared_and_deletable(installed, end["output_dir"], end["log"])


def test_jobctl_with_nothing_to_ask_leaves_no_failed_run_and_no_warning(installed: Installation) -> None:
    # jobctl connects before it parses its options (trigger/preconnect.py), so --help and a usage error
    # start a runner too; one that was asked nothing must end as a success that warns of nothing.
    ct = installed.container
    wait_for_runs_to_end(installed)
    cursor = journal_cursor(ct)

    assert installed.jobctl("--help").returncode == 0
    assert installed.jobctl("run").returncode == 64
    wait_for_runs_to_end(installed)

    journal = journal_since(ct, cursor, "job@*.service")
    assert journal.count("Deactivated successfully") == 2, journal  # the early connections were served
    assert "request failed" not in journal and "Failed with result" not in journal, journal


def test_a_failing_jobs_exit_status_reaches_jobctl(installed: Installation) -> None:
    result = installed.jobctl("run", "e2e-fail")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"", b"about to fail\n")
    end = json_run(installed, "e2e-fail")[-1]
    assert (end["event"], end["exit_code"]) == ("exit", 3)
    assert "# result: exited with 3" in installed.sh(f"cat {end['log']}")


LAST_LINE = re.compile(r"jobrunner: (\S+) \(run (\S+)\) exited with (\d+) after [\d.]+ s")


def test_developer_runs_jobs_with_socat(installed: Installation) -> None:
    def socat(request: str) -> tuple[str, re.Match[str]]:
        result = installed.container.run(
            ["socat", "-t", "60", "-", f"UNIX-CONNECT:{SOCKET}"],
            user=installed.developer,
            input=request.encode(),
        )
        text = result.stdout.decode()
        body, _, last = text.rstrip("\n").rpartition("\n")
        match = LAST_LINE.fullmatch(last)
        assert match, text
        return body, match

    body, end = socat("run e2e-hello socat\n")
    assert body == f"hello socat\nkey: {len(installed.secret)} bytes"
    assert (end[1], end[3]) == ("e2e-hello", "0")
    run_id = end[2]
    assert_results_shared_and_deletable(
        installed, f"{installed.outputs}/e2e-hello/{run_id}", f"{installed.logs}/e2e-hello/{run_id}.log"
    )
    body, end = socat("run e2e-fail\n")
    assert (body, end[3]) == ("about to fail", "3")


def test_developer_runs_jobs_with_jobrunner_trigger(installed: Installation) -> None:
    ok = installed.container.run(["jobrunner-trigger", "e2e-hello", "trigger"], user=installed.developer)
    lines = ok.stdout.decode().splitlines()
    assert lines[:2] == ["hello trigger", f"key: {len(installed.secret)} bytes"]
    assert LAST_LINE.fullmatch(lines[-1])
    failing = installed.container.run(
        ["jobrunner-trigger", "e2e-fail"], user=installed.developer, check=False
    )
    assert failing.returncode == 3, failing.stderr


# --- 2. an operator starts a job with systemctl --------------------------------------------------------


def test_operator_runs_a_job_with_systemctl_start(installed: Installation) -> None:
    ct = installed.container
    logs_before = set(installed.sh(f"ls {installed.logs}/e2e-hello 2>/dev/null || true").split())
    _, journal = operator_start(ct, "e2e-hello")
    assert f"key: {len(installed.secret)} bytes" in journal, journal
    assert "exited with 0" in journal
    new_logs = set(installed.sh(f"ls {installed.logs}/e2e-hello").split()) - logs_before
    assert len(new_logs) == 1
    assert "hello" in installed.sh(f"cat {installed.logs}/e2e-hello/{new_logs.pop()}")


def test_a_failing_job_fails_systemctl_start_and_its_unit(installed: Installation) -> None:
    ct = installed.container
    result, journal = operator_start(ct, "e2e-fail", check=False, also=("Failed with result",))
    assert result.returncode != 0
    assert b"job@e2e-fail.service failed" in result.stderr, result.stderr
    assert "about to fail" in journal
    assert "status=3" in journal and "Failed with result 'exit-code'" in journal, journal
    # (CollectMode=inactive-or-failed unloads the failed unit at once, so that per-connection instances
    # do not pile up as failed units: `systemctl is-failed` cannot show it afterwards, the journal does.)


# --- 3. outsiders cannot connect ----------------------------------------------------------------------


def test_outsider_cannot_connect(installed: Installation) -> None:
    assert installed.sh(f"stat -c '%a %U %G' {SOCKET}").split() == ["660", "root", installed.group]
    result = installed.jobctl("list", user=installed.outsider)
    assert result.returncode == 77, result.stderr
    assert f"sudo usermod -aG {installed.group} $USER".encode() in result.stderr
    trigger = installed.container.run(
        ["jobrunner-trigger", "e2e-hello"], user=installed.outsider, check=False
    )
    assert trigger.returncode == 77 and installed.group.encode() in trigger.stderr
    # The same request from the developer is served: the refusal is the group's doing.
    assert installed.jobctl("list").returncode == 0


# --- 6. nothing of a run is left -------------------------------------------------------------------


def test_a_runs_credentials_exist_only_while_it_runs(installed: Installation) -> None:
    wait_for_runs_to_end(installed)

    def credential_dirs() -> str:
        return installed.sh("ls -d /run/credentials/job-e2e-gate@*.service 2>/dev/null || true")

    with gated_run(installed):
        assert credential_dirs() != ""  # the run holds its key until the test lets it end ...
    wait_for_runs_to_end(installed)
    assert credential_dirs() == ""  # ... and then it is gone


def test_no_process_of_a_run_is_left(installed: Installation) -> None:
    result = installed.jobctl("run", "e2e-linger")
    assert result.returncode == 0 and result.stdout.startswith(b"left "), result
    wait_for_runs_to_end(installed)
    # The job's child escaped its process group (setsid); the unit's cgroup did not let it live on.
    processes = installed.sh("ps -eo args")
    assert "sleep 4242" not in processes, processes


# --- 7. a burst of connections ----------------------------------------------------------------------

BURST = r"""
import json, selectors, socket, sys, time

count = int(sys.argv[1])
started = time.monotonic()
open_, refused = [], 0
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect("/run/job.sock")
        s.sendall(b"list\n")
    except OSError:
        refused += 1
        s.close()
        continue
    s.setblocking(False)
    open_.append(s)
opened_s = time.monotonic() - started
selector = selectors.DefaultSelector()
for s in open_:
    selector.register(s, selectors.EVENT_READ, bytearray())
served = dropped = 0
deadline = time.monotonic() + 120
while selector.get_map() and time.monotonic() < deadline:
    for key, _ in selector.select(1):
        try:
            data = key.fileobj.recv(65536)
        except OSError:
            data = b""
        if data:
            key.data.extend(data)
            continue
        selector.unregister(key.fileobj)
        key.fileobj.close()
        if key.data:
            served += 1
        else:
            dropped += 1
print(json.dumps({"opened_s": opened_s, "served": served, "dropped": dropped, "refused": refused,
                  "unfinished": len(selector.get_map())}))
"""


def test_a_burst_of_connections_leaves_the_socket_working(installed: Installation) -> None:
    ct = installed.container
    wait_for_runs_to_end(installed)
    ct.write_file("/tmp/e2e-burst.py", BURST)
    result = ct.run(["python3", "/tmp/e2e-burst.py", "500"], user=installed.developer, timeout=180)
    burst = json.loads(result.stdout)
    assert burst["opened_s"] < 10, burst  # "in a few seconds"
    assert burst["served"] > 0 and burst["unfinished"] == 0, burst
    assert burst["served"] + burst["dropped"] + burst["refused"] == 500, burst
    # Beyond MaxConnections= systemd drops connections, but the socket stays up (no trigger limit) ...
    assert installed.sh("systemctl is-active job.socket").strip() == "active"
    # ... and the next user is served as usual.
    wait_for_runs_to_end(installed)
    result = installed.jobctl("run", "e2e-hello", "after")
    assert result.returncode == 0 and result.stdout.startswith(b"hello after\n"), result


# --- 8. systemd-analyze ------------------------------------------------------------------------------


def test_units_verify_clean(installed: Installation) -> None:
    result = installed.container.run(
        [
            "sh",
            "-c",
            "cd / && systemd-analyze verify job.socket job@x.service jobrunner-config.path jobrunner-config.service",
        ],
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b""), result.stderr.decode()


def test_security_exposure_is_the_stated_figure(installed: Installation) -> None:
    # A job's own unit, with the default network (the job's units carry the sandbox; the front door,
    # job@x.service, is rated lower: tests/e2e/test_units.py).
    out = installed.sh("systemd-analyze security --no-pager job-e2e-hello@x.service")
    match = re.search(r"Overall exposure level for job-e2e-hello@x\.service: (\d+\.\d) ", out)
    assert match, out
    assert match[1] == EXPOSURE[installed.container.distro], out


# --- install.sh, again and undone -------------------------------------------------------------------

STATE = r"""
find {paths} -printf '%p %M %u %g %s\n' -type f -exec sha256sum {{}} + 2>/dev/null | sort
systemctl is-enabled job.socket; systemctl is-active job.socket
systemctl show job.socket -p ActiveEnterTimestampMonotonic
getent group jobrunner | cut -d: -f1,3
stat -c '%n %a %U %G' {outputs} {logs} /etc/jobrunner/jobs.toml
"""


def test_install_twice_converges(installed: Installation) -> None:
    state = STATE.format(paths=" ".join(INSTALLED_PATHS), outputs=installed.outputs, logs=installed.logs)
    before = installed.sh(state)
    again = run_install(installed.container, "--project", installed.project)
    output = again.stdout.decode()
    assert "install.sh: nothing changed" in output, output
    assert not re.search(r"^install\.sh: (wrote|installed|started|restarted) ", output, re.MULTILINE), output
    # Same files, same modes, same socket (not even restarted), and the tests' jobs.toml is kept.
    assert installed.sh(state) == before
    assert installed.jobctl("run", "e2e-hello", "again").returncode == 0


def test_the_documentation_is_installed_as_the_repository_lays_it_out(installed: Installation) -> None:
    # So that README's links (docs/ci.md, docs/performance.md, ...) work in the installed copy too.
    for doc in installed_docs():
        installed_doc = installed.container.path(f"/usr/local/share/doc/jobrunner/{doc}")
        assert installed_doc.read_bytes() == (REPO / doc).read_bytes(), doc


def test_help_and_usage_errors(installed: Installation) -> None:
    ct = installed.container
    help_ = run_install(ct, "--help")
    assert b"--project DIR" in help_.stdout and b"--uninstall" in help_.stdout
    for args, message in (
        ((), b"--project DIR is required"),
        (("--project", PROJECT, "--group", "Bad Name"), b"not a valid group name"),
        (("--project", PROJECT, "--bogus"), b"unknown argument: --bogus"),
    ):
        result = run_install(ct, *args, check=False)
        assert result.returncode == 64 and message in result.stderr, result.stderr
    missing = run_install(ct, "--project", "/nonexistent", check=False)
    assert missing.returncode == 66 and b"no such directory" in missing.stderr


def test_fresh_install_options_uninstall_and_reinstall(installed: Installation) -> None:
    """In a container of its own: --no-apt with a package missing, the limits, --uninstall, reinstall."""
    with Container.boot(installed.container.distro, name="e2einstall", binds_ro={REPO: "/src"}) as ct:
        add_users(ct)
        make_project(ct)
        copy_checkout(ct)
        # Hide python3-sdnotify (a package directory, or a module in older releases).
        find = "import os, sdnotify; f = sdnotify.__file__; print(os.path.dirname(f) if f.endswith('__init__.py') else f)"
        sdnotify = ct.run(["python3", "-c", find]).stdout.decode().strip()
        ct.run(["mv", sdnotify, "/root/sdnotify-hidden"])
        refused = run_install(ct, "--project", PROJECT, "--no-apt", check=False)
        assert refused.returncode == 69, refused.stderr
        assert b"missing: python3-sdnotify (and --no-apt was given)" in refused.stderr
        ct.run(["mv", "/root/sdnotify-hidden", sdnotify])

        run_install(ct, "--project", PROJECT, "--no-apt", "--tasks-max", "32", "--memory-max", "512M")
        ct.run(["usermod", "-aG", "jobrunner", "alice"])
        write_jobs(ct, jobs_toml())
        limits = ct.run(["systemctl", "show", "job-e2e-hello@x.service", "-p", "TasksMax", "-p", "MemoryMax"])
        assert sorted(limits.stdout.decode().split()) == ["MemoryMax=536870912", "TasksMax=32"]
        secret = "demo-" + secrets.token_hex(16)
        store_credential(ct, "api-key", secret)
        ran = ct.run(["jobctl", "--json", "run", "e2e-hello", "before"], user="alice")
        output_dir = json.loads(ran.stdout.decode().splitlines()[-1])["output_dir"]

        removed = run_install(ct, "--uninstall")
        said = removed.stdout.decode()
        assert "Kept on purpose" in said and "api-key" in said
        assert ct.run(["sh", "-c", "command -v jobctl"], user="alice", check=False).returncode != 0
        status = ct.run(["systemctl", "status", "job.socket"], check=False)
        assert status.returncode == 4 and b"could not be found" in status.stderr, status
        for path in INSTALLED_PATHS:
            assert ct.run(["test", "-e", path], check=False).returncode == 1, path
        for kept in (
            "/etc/credstore.encrypted/api-key",
            "/etc/jobrunner/jobs.toml",
            f"{output_dir}/result.txt",
        ):
            ct.run(["test", "-e", kept])

        # Installing again picks up the credential and the configuration that were kept.
        ct.run(["sh", "-c", f"rm -rf {CHECKOUT}"])
        copy_checkout(ct)
        run_install(ct, "--project", PROJECT, "--no-apt")
        again = ct.run(["jobctl", "run", "e2e-hello", "after"], user="alice")
        assert again.stdout == f"hello after\nkey: {len(secret)} bytes\n".encode()
