"""What the runner imports before a job starts: every connection pays for each module (README, Performance)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_by(code: str) -> set[str]:
    """The modules `code` adds to a runner's interpreter, started as job@.service starts it (-P -S)."""
    probe = (
        f"import sys\nbefore = set(sys.modules)\n{textwrap.dedent(code)}\nprint(*set(sys.modules) - before)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-P", "-S", "-c", probe],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    return set(proc.stdout.split())


JOB_UNIT_TEMPLATE = REPO / "units" / "job-NAME@.service.in"  # every job's units are made from it


def job_service_settings(key: str, unit: Path = JOB_UNIT_TEMPLATE) -> list[str]:
    """The values of a unit's `KEY=` lines (by default the jobs' template), in order."""
    lines = unit.read_text().splitlines()
    return [line.removeprefix(f"{key}=") for line in lines if line.startswith(f"{key}=")]


def job_service_command(unit: Path = JOB_UNIT_TEMPLATE) -> list[str]:
    """A unit's ExecStart= (by default the jobs' template), split into words."""
    (exec_start,) = job_service_settings("ExecStart", unit)
    return shlex.split(exec_start)


def environment_of(assignments: list[str]) -> dict[str, str]:
    """What a unit's Environment= values set, in systemd's order (a later one, a drop-in's, wins)."""
    words = [word for value in assignments for word in shlex.split(value)]
    return dict(word.split("=", 1) for word in words)


def job_service_environment() -> dict[str, str]:
    """The jobs' template's Environment= assignments."""
    return environment_of(job_service_settings("Environment"))


def test_job_service_starts_the_runner_without_runpy() -> None:
    # `python3 -m runner` is the same program, but runpy imports importlib.util and contextlib first.
    program, *options, job = job_service_command()
    assert (program, job) == ("/usr/bin/python3", "@JOB@")
    # The front door starts the same way, with its own arguments.
    front_door = job_service_command(REPO / "units" / "job@.service")
    assert front_door[:-2] == [program, *options] and front_door[-2:] == ["--front-door", "%i"]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *options, "--help"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python3 -m runner")
    imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines()}
    assert "runner.service" in imported
    assert not imported & {"runpy", "importlib.util", "contextlib"}


def test_the_connection_path_does_not_import_pathlib() -> None:
    # pathlib drags in fnmatch, urllib.parse, ipaddress and ntpath: ~2 ms of every connection.
    imported = imported_by("import runner.__main__, runner.activation, runner.service")
    assert "runner.service" in imported
    assert not imported & {"pathlib", "fnmatch", "urllib", "urllib.parse", "ipaddress", "ntpath"}


def test_the_connection_path_builds_no_signal_enums_and_compiles_no_name_patterns() -> None:
    # signal builds three enum classes at import (_signal has the same functions, ~0.4 ms); struct is
    # not needed to read SO_PEERCRED (~0.1 ms); the names in jobs.toml are checked without compiling
    # regular expressions, and `args` patterns from the checked copy only when used (~0.3 ms).
    imported = imported_by(
        """\
        import re, shlex  # shlex compiles one pattern of its own at import
        already = len(re._cache)
        import runner.__main__, runner.activation, runner.service
        from runner import config
        config.parse_config(
            {"runner": {"project": "/p"}, "jobs": {"a-job": {"command": ["x"], "args": "[a-z]+", "env": {"A": "b"},
             "credentials": ["key"]}}},
            "/p/jobs.toml",
            compile_patterns=False,
        )
        print("compiled-patterns=" + str(len(re._cache) - already))
        """
    )
    assert "runner.service" in imported
    assert not imported & {"signal", "struct"}
    assert "compiled-patterns=0" in imported


def test_sending_status_to_systemd_does_not_import_socket(tmp_path: Path) -> None:
    # sdnotify and systemd.daemon import `socket` (with selectors, array, math) for one datagram: ~1.5 ms.
    import systemd  # where python-systemd is: the unit puts its directory on PYTHONPATH too

    imported = imported_by(
        f"""\
        import _socket, os
        sys.path.append("{Path(systemd.__path__[0]).parent}")
        manager = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        manager.bind("{tmp_path}/notify.sock")
        os.environ["NOTIFY_SOCKET"] = "{tmp_path}/notify.sock"
        import runner.__main__, runner.activation, runner.service
        from runner import notify
        notify.status("running")
        print("received=" + manager.recv(64).decode())
        """
    )
    assert "received=STATUS=running" in imported
    assert not imported & {"socket", "sdnotify", "selectors", "systemd.daemon"}


def test_a_text_request_does_not_import_json(tmp_path: Path) -> None:
    # `run NAME` over socat: parsed, answered and logged without json (~1 ms); a JSON request needs it.
    text = imported_by(
        f"""\
        import runner.service
        from runner import protocol, runs
        request = protocol.parse_request(b"run x")
        reply = protocol.Reply(protocol.guess_form(b"run x"))
        reply.output("stdout", b"out")
        reply.exit(protocol.ExitReport("x", "RID", 0, None, False, False, 0.5, "/l", "/o", ("w",)))
        reply.error("busy", "message", "hint")
        log = runs.RunLog("{tmp_path}/run.log")
        log.header({{"args": list(request.args), "command": ["/bin/true"], "detach": request.detach}})
        log.footer({{"exit_code": 0, "warnings": ["w"]}})
        log.close()
        """
    )
    assert "runner.service" in text
    assert "json" not in text
    assert "json" in imported_by('from runner import protocol\nprotocol.parse_request(b\'{"op": "list"}\')')
