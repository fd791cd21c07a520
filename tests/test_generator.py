"""runner/generator.py: the systemd generator that writes every job's units (systemd.generator(7)).

It must never fail a daemon-reload (exit 0 whatever jobs.toml holds), and never quote jobs.toml in what
it logs: a key pasted into the file by mistake would end up in the journal.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runner import generator, units
from runner.config import parse_file

REPO = Path(__file__).resolve().parents[1]
FAKE_SECRET = "pasted-" + secrets.token_hex(12)  # made at run time: what a pasted key would look like

VALID = """\
[runner]
project = "/srv/project"

[jobs.build]
command = ["bin/build"]
credentials = ["api-key"]
network = "none"

[jobs.lint]
command = ["bin/lint"]
"""


@pytest.fixture
def dirs(tmp_path: Path) -> list[str]:
    """NORMAL_DIR, EARLY_DIR, LATE_DIR: what systemd passes, each an empty directory."""
    paths = [tmp_path / name for name in ("normal", "early", "late")]
    for path in paths:
        path.mkdir()
    return [str(path) for path in paths]


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "jobs.toml"
    monkeypatch.setenv("JOBRUNNER_CONFIG", str(path))
    return path


def written(directory: str) -> set[str]:
    root = Path(directory)
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_a_valid_file_gives_every_jobs_units(
    config: Path, dirs: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    config.write_text(VALID)

    assert generator.main(["jobrunner-generator", *dirs]) == 0

    files = written(dirs[0])
    for job in ("build", "lint"):
        for name in units.unit_names(job):
            assert name in files
        assert f"sockets.target.wants/job-{job}.socket" in files
        assert f"job-{job}@.service.d/30-job-profile.conf" in files
    expected = units.render(parse_file(str(config)), Path(units.template_path()).read_text())
    assert files == {unit.path for unit in expected}
    profile = Path(dirs[0], "job-build@.service.d/30-job-profile.conf").read_text()
    assert "LoadCredentialEncrypted=api-key:/etc/credstore.encrypted/api-key" in profile
    assert "PrivateNetwork=yes" in profile
    assert written(dirs[1]) == written(dirs[2]) == set(), "only the normal directory"
    assert capsys.readouterr() == ("", "")


def test_one_directory_is_enough(config: Path, tmp_path: Path) -> None:
    config.write_text(VALID)
    out = tmp_path / "out"
    out.mkdir()

    assert generator.main(["jobrunner-generator", str(out)]) == 0

    assert "job-lint.socket" in written(str(out))


def test_a_file_without_jobs_gives_no_units(config: Path, dirs: list[str]) -> None:
    config.write_text('[runner]\nproject = "/srv/project"\n')

    assert generator.main(["jobrunner-generator", *dirs]) == 0

    assert written(dirs[0]) == set()


@pytest.mark.parametrize(
    "body",
    [
        f'timeout = "{FAKE_SECRET}"',  # a wrong type: the message would quote the value
        f'description = ["{FAKE_SECRET}"]',
        f'network = ["{FAKE_SECRET}"]',
        f'memory_max = "{FAKE_SECRET}"',
        f'"{FAKE_SECRET}" = 1',  # an unknown key: the message would name it
        f'credentials = ["{FAKE_SECRET}/x"]',
        f'env = {{ API_KEY = "credential:{FAKE_SECRET}" }}',
        f'args = "[{FAKE_SECRET}"',
        f"command = = {FAKE_SECRET}",  # not TOML
    ],
)
def test_an_invalid_file_gives_no_units_exits_0_and_is_not_quoted(
    config: Path, dirs: list[str], capsys: pytest.CaptureFixture[str], body: str
) -> None:
    config.write_text(VALID + f"\n[jobs.deploy]\ncommand = ['bin/deploy']\n{body}\n")

    assert generator.main(["jobrunner-generator", *dirs]) == 0

    assert written(dirs[0]) == set(), "no job's units, not even the valid jobs'"
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{config} is invalid, no job units" in err
    assert "jobrunner check" in err
    assert FAKE_SECRET not in err
    assert FAKE_SECRET[:8] not in err


def test_an_invalid_file_in_a_real_process(config: Path, dirs: list[str]) -> None:
    """As systemd runs it: the same, from the command line."""
    config.write_text(VALID + f'\n[jobs.deploy]\ncommand = ["bin/deploy"]\ntimeout = "{FAKE_SECRET}"\n')

    res = run_generator(dirs, {"JOBRUNNER_CONFIG": str(config)})

    assert res.returncode == 0
    assert FAKE_SECRET not in res.stdout + res.stderr
    assert "is invalid" in res.stderr
    assert written(dirs[0]) == set()


def test_no_file_no_units_and_nothing_to_say(
    config: Path, dirs: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert not config.exists()

    assert generator.main(["jobrunner-generator", *dirs]) == 0

    assert written(dirs[0]) == set()
    assert capsys.readouterr() == ("", "")


def test_without_jobrunner_config_the_system_file_is_read(
    tmp_path: Path, dirs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOBRUNNER_CONFIG", raising=False)
    system_file = tmp_path / "etc-jobs.toml"
    system_file.write_text(VALID)
    monkeypatch.setattr(generator, "DEFAULT_CONFIG_PATH", str(system_file))

    assert generator.main(["jobrunner-generator", *dirs]) == 0

    assert "job-build.socket" in written(dirs[0])


def test_a_directory_instead_of_the_file(
    config: Path, dirs: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    config.mkdir()

    assert generator.main(["jobrunner-generator", *dirs]) == 0

    assert written(dirs[0]) == set()
    assert "is invalid" in capsys.readouterr().err


def test_a_missing_template_gives_no_units(
    config: Path,
    dirs: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config.write_text(VALID)
    missing = tmp_path / "nowhere" / "job-NAME@.service.in"
    monkeypatch.setattr(generator, "template_path", lambda: str(missing))

    assert generator.main(["jobrunner-generator", *dirs]) == 0

    assert written(dirs[0]) == set()
    assert f"cannot read {missing}" in capsys.readouterr().err


@pytest.mark.parametrize("count", [0, 2, 4])  # directories: systemd passes 1 or 3
def test_wrong_arguments_are_a_usage_error(
    config: Path, dirs: list[str], capsys: pytest.CaptureFixture[str], count: int
) -> None:
    config.write_text(VALID)
    argv = ["jobrunner-generator", *(dirs * 2)[:count]]

    assert generator.main(argv) == 64

    assert "usage: jobrunner-generator NORMAL_DIR [EARLY_DIR LATE_DIR]" in capsys.readouterr().err
    for directory in dirs:
        assert written(directory) == set()


def test_a_usage_error_in_a_real_process(dirs: list[str], tmp_path: Path) -> None:
    res = run_generator([], {"JOBRUNNER_CONFIG": str(tmp_path / "jobs.toml")})

    assert res.returncode == 64
    assert res.stderr.startswith("usage: ")


def run_generator(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python3 -m runner.generator ARGS`, as install.sh's wrapper starts it (-P -S)."""
    code = textwrap.dedent(
        """\
        import sys
        from runner.generator import main
        sys.exit(main(sys.argv))
        """
    )
    return subprocess.run(
        [sys.executable, "-P", "-S", "-c", code, *args],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
