"""The security claims of README.md, proven against the installed product under real systemd.

A developer (in the socket's group) can use the key through jobs but cannot read it by any of the
obvious routes, and a job is boxed in: it writes only outputs and logs, sees no other home, has a
private /tmp and no capabilities. Each test fails if the claim it names breaks.
"""

from __future__ import annotations

import json
import shlex
import time

import pytest

from tests.e2e.conftest import Installation

pytestmark = pytest.mark.e2e

SECURITY_JOBS = """
[jobs.sec-hold]
description = "Holds the key for a while (for the tests that try to steal it)"
command = ["/bin/sh", "-c", "echo $$ > \\"$JOB_OUTPUT_DIR/pid\\"; echo holding; exec sleep 30"]
credentials = ["{credential}"]
env = {{ API_KEY = "credential:{credential}" }}
concurrency = "parallel"

[jobs.sec-leak]
description = "Prints the key in plain ways: the runner must redact it"
command = ["/bin/sh", "-c", "cat \\"$CREDENTIALS_DIRECTORY/{credential}\\"; echo \\"env: $API_KEY\\" >&2"]
credentials = ["{credential}"]
env = {{ API_KEY = "credential:{credential}" }}

[jobs.sec-probe]
description = "Reports what the sandbox lets a job do"
command = ["/bin/sh", "-c", '''
for path in /etc/probe /usr/probe /var/tmp/probe /root/probe "$HOME/../probe" {project}/probe \\
            /home/{developer}/probe "$JOB_OUTPUT_DIR/probe" /var/cache/jobrunner/jobs.toml.marshal; do
    if touch "$path" 2>/dev/null; then echo "write-ok $path"; else echo "write-denied $path"; fi
done
echo "home: $(ls -A /home | tr '\\n' ' ')"
echo "developer-home: $(ls -A /home/{developer} | tr '\\n' ' ')"
echo "tmp-before: $(ls -A /tmp | tr '\\n' ' ')"
touch "/tmp/probe-$JOB_RUN_ID"
grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status | tr '\\t' ' '
echo "uid: $(id -u) groups: $(id -G)"
''']
"""


@pytest.fixture(scope="module")
def secured(installed: Installation) -> Installation:
    config = SECURITY_JOBS.format(
        credential=installed.credential, project=installed.project, developer=installed.developer
    )
    installed.container.run(["sh", "-c", "cat >> /etc/jobrunner/jobs.toml"], input=config.encode())
    installed.container.run(["jobrunner", "check"])  # the new jobs' units, now (the .path unit races us)
    return installed


def as_developer(inst: Installation, command: str) -> tuple[int, bytes]:
    result = inst.container.run(["sh", "-c", command], user=inst.developer, check=False)
    return result.returncode, result.stdout + result.stderr


def start_holding_job(inst: Installation) -> int:
    """Start sec-hold, detached, as the developer; return the job's pid in the container."""
    started = inst.jobctl("--json", "run", "--detach", "sec-hold")
    assert started.returncode == 0, started.stderr
    accepted = json.loads(started.stdout.splitlines()[0])
    pid_file = f"{accepted['output_dir']}/pid"
    for _ in range(100):
        result = inst.container.run(["cat", pid_file], check=False)
        if result.returncode == 0 and result.stdout.strip():
            return int(result.stdout)
        time.sleep(0.05)
    raise AssertionError("sec-hold did not start")


def test_developer_cannot_read_the_encrypted_store_or_the_host_key(secured: Installation) -> None:
    for path in (f"/etc/credstore.encrypted/{secured.credential}", "/var/lib/systemd/credential.secret"):
        status, output = as_developer(secured, f"cat {path}")
        assert status != 0 and b"Permission denied" in output, (path, output)
    # As root, both exist: the denial above is the permission, not a missing file.
    secured.container.run(["test", "-s", f"/etc/credstore.encrypted/{secured.credential}"])
    secured.container.run(["test", "-s", "/var/lib/systemd/credential.secret"])


def test_developer_cannot_read_a_running_jobs_credentials_environment_or_memory(
    secured: Installation,
) -> None:
    pid = start_holding_job(secured)
    try:
        # The job really has the key in its environment and its credential directory ...
        environ = secured.container.run(["cat", f"/proc/{pid}/environ"]).stdout
        assert secured.secret.encode() in environ
        creds = secured.container.run(
            ["sh", "-c", "cat /run/credentials/job-*@*.service/" + secured.credential]
        )
        assert secured.secret.encode() in creds.stdout
        # ... and the developer can reach none of it.
        attempts = {
            "credential directory": f"cat /run/credentials/job-*@*.service/{secured.credential}",
            "environ": f"cat /proc/{pid}/environ",
            "memory": f"head -c 100 /proc/{pid}/mem",
            "ptrace": (
                "python3 -c 'import ctypes,sys; libc=ctypes.CDLL(None, use_errno=True); "
                f"r=libc.ptrace(16, {pid}, 0, 0); sys.exit(0 if r == 0 else 1)'"
            ),
        }
        for what, command in attempts.items():
            status, output = as_developer(secured, command)
            assert status != 0, f"developer could read the job's {what}: {output[:200]!r}"
            assert secured.secret.encode() not in output
    finally:
        secured.container.run(["kill", str(pid)], check=False)


def test_printed_keys_are_redacted_in_the_stream_the_run_log_and_the_journal(secured: Installation) -> None:
    result = secured.jobctl("--json", "run", "sec-leak")
    assert result.returncode == 0, result.stderr
    assert secured.secret.encode() not in result.stdout + result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    printed = "".join(e.get("text", "") for e in events if e["event"] == "output")
    assert "***" in printed and "env: ***" in printed
    log = secured.container.run(["cat", events[-1]["log"]]).stdout
    assert b"***" in log and secured.secret.encode() not in log
    journal = secured.container.run(["journalctl", "-o", "json", "--no-pager", "-u", "job-*@*"]).stdout
    assert journal and secured.secret.encode() not in journal


def test_running_the_app_or_the_runner_directly_fails_clearly(secured: Installation) -> None:
    status, output = as_developer(secured, f"cd {shlex.quote(secured.project)} && bin/hello")
    assert status != 0 and b"jobctl run hello" in output
    status, output = as_developer(secured, "PYTHONPATH=/usr/local/lib/jobrunner python3 -m runner hello")
    assert status == 78 and b"jobctl run NAME" in output and b"Traceback" not in output


def probe(inst: Installation) -> dict[str, list[str]]:
    result = inst.jobctl("run", "sec-probe")
    assert result.returncode == 0, result.stderr
    report: dict[str, list[str]] = {}
    for line in result.stdout.decode().splitlines():
        key, _, value = line.partition(" ")
        report.setdefault(key.rstrip(":"), []).append(value)
    return report


def test_a_job_writes_only_its_outputs_and_logs(secured: Installation) -> None:
    report = probe(secured)
    allowed = sorted(report["write-ok"])
    # Its own output directory, and /var/tmp, which PrivateTmp= makes private to the run (like /tmp).
    assert len(allowed) == 2, allowed
    assert "/outputs/sec-probe/" in allowed[0] and allowed[0].endswith("/probe")
    assert allowed[1] == "/var/tmp/probe"
    # ... not the parsed copy of jobs.toml that connections trust (runner/config_cache.py), nor the rest.
    assert "/var/cache/jobrunner/jobs.toml.marshal" in report["write-denied"]
    assert len(report["write-denied"]) == 7, report["write-denied"]
    # ... and that /var/tmp is the run's own: the host's /var/tmp has no probe.
    assert secured.container.run(["test", "-e", "/var/tmp/probe"], check=False).returncode != 0


def test_a_job_sees_no_home_but_the_project(secured: Installation) -> None:
    report = probe(secured)
    assert report["home"] == [f"{secured.developer} "]  # not mallory's, not anyone else's
    assert report["developer-home"] == [f"{secured.project.rsplit('/', 1)[1]} "]
    # Outside the sandbox the developer's home holds more than the project.
    secured.container.run(["touch", f"/home/{secured.developer}/private-notes"])
    assert probe(secured)["developer-home"] == report["developer-home"]


def test_a_job_has_a_private_tmp(secured: Installation) -> None:
    first = probe(secured)
    second = probe(secured)
    assert "probe-" not in " ".join(second["tmp-before"])  # the first run's file is gone
    assert first["tmp-before"] == [""] or "probe-" not in first["tmp-before"][0]
    host_tmp = secured.container.run(["sh", "-c", "ls -A /tmp"]).stdout.decode()
    assert "probe-" not in host_tmp


def test_a_job_has_no_capabilities(secured: Installation) -> None:
    report = probe(secured)
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert report[name] == ["0000000000000000"], (name, report[name])
    uid = int(report["uid"][0].split()[0])
    assert uid != 0 and 61184 <= uid <= 65519  # a DynamicUser= uid, not root, not a real user
