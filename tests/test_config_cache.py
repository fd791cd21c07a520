"""runner/config_cache.py and `jobrunner check`: the parsed copy of jobs.toml that spares connections tomllib.

The copy may only ever save time: every way it can be wrong (stale, foreign, writable by others, corrupt,
from another Python) must make the runner parse the file itself.
"""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from runner import config_cache
from runner.config import check_config, load_config
from runner.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SOURCE = b'[runner]\nproject = "/srv/p"\n\n[jobs.hello]\ncommand = ["/bin/echo", "hi"]\n'
PARSED = {"runner": {"project": "/srv/p"}, "jobs": {"hello": {"command": ["/bin/echo", "hi"]}}}


def write_copy(path: Path, source: bytes, parsed: object, form: object = config_cache.FORMAT) -> None:
    path.write_bytes(marshal.dumps((form, source, parsed)))
    path.chmod(0o644)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.toml.marshal"
    write_copy(path, SOURCE, PARSED)
    return path


# --------------------------------------------------------------------------------------- lookup


def test_a_matching_copy_is_used(copy: Path) -> None:
    assert config_cache.lookup(str(copy), SOURCE, os.getuid()) == PARSED


def test_a_copy_of_other_bytes_is_not_used(copy: Path) -> None:
    assert config_cache.lookup(str(copy), SOURCE + b"# edited\n", os.getuid()) is None


def test_a_copy_owned_by_someone_else_is_not_used(copy: Path) -> None:
    assert config_cache.lookup(str(copy), SOURCE, os.getuid() + 1) is None


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_a_copy_others_can_write_is_not_used(copy: Path, mode: int) -> None:
    copy.chmod(mode)
    assert config_cache.lookup(str(copy), SOURCE, os.getuid()) is None


def test_a_symlink_is_not_followed(copy: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(copy)
    assert config_cache.lookup(str(link), SOURCE, os.getuid()) is None


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", marshal.dumps((config_cache.FORMAT, SOURCE)), marshal.dumps(42)],
    ids=["empty", "garbage", "short-tuple", "not-a-tuple"],
)
def test_a_corrupt_copy_is_not_used(copy: Path, content: bytes) -> None:
    copy.write_bytes(content)
    assert config_cache.lookup(str(copy), SOURCE, os.getuid()) is None


def test_a_copy_from_another_format_or_python_is_not_used(copy: Path) -> None:
    form = ("jobrunner-config-cache", 1, (3, 0))
    write_copy(copy, SOURCE, PARSED, form)
    assert config_cache.lookup(str(copy), SOURCE, os.getuid()) is None


def test_a_copy_that_is_not_a_table_is_not_used(copy: Path) -> None:
    write_copy(copy, SOURCE, ["not", "a", "table"])
    assert config_cache.lookup(str(copy), SOURCE, os.getuid()) is None


def test_no_copy_is_no_error(tmp_path: Path) -> None:
    assert config_cache.lookup(str(tmp_path / "missing"), SOURCE, os.getuid()) is None


# --------------------------------------------------------------------------------------- store


@pytest.mark.parametrize(("config_mode", "copy_mode"), [(0o644, 0o644), (0o600, 0o600), (0o666, 0o644)])
def test_store_writes_a_copy_lookup_accepts_with_the_files_mode(
    tmp_path: Path, config_mode: int, copy_mode: int
) -> None:
    path = tmp_path / "cache" / "jobs.toml.marshal"
    config_cache.store(str(path), SOURCE, PARSED, 0o100000 | config_mode)
    assert path.stat().st_mode & 0o777 == copy_mode
    assert config_cache.lookup(str(path), SOURCE, os.getuid()) == PARSED
    assert sorted(p.name for p in path.parent.iterdir()) == ["jobs.toml.marshal"]  # no temporary left


def test_store_refuses_values_marshal_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        config_cache.store(str(tmp_path / "copy"), SOURCE, {"when": object()}, 0o644)
    assert list(tmp_path.iterdir()) == []


def test_cache_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config_cache.CACHE_ENV, raising=False)
    assert config_cache.cache_path("/etc/x.toml", "/etc/x.toml") == config_cache.DEFAULT_CACHE_PATH
    assert config_cache.cache_path("/tmp/other.toml", "/etc/x.toml") is None  # JOBRUNNER_CONFIG: no copy
    monkeypatch.setenv(config_cache.CACHE_ENV, "/tmp/copy")
    assert config_cache.cache_path("/tmp/other.toml", "/etc/x.toml") == "/tmp/copy"
    monkeypatch.setenv(config_cache.CACHE_ENV, "")
    assert config_cache.cache_path("/etc/x.toml", "/etc/x.toml") is None


# --------------------------------------------------------------------------------------- config.py


@pytest.fixture
def configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    config = tmp_path / "jobs.toml"
    config.write_bytes(SOURCE)
    cache = tmp_path / "cache" / "jobs.toml.marshal"
    monkeypatch.setenv(config_cache.CACHE_ENV, str(cache))
    return config, cache


def test_check_config_writes_the_copy_and_load_config_uses_it(configured: tuple[Path, Path]) -> None:
    config, cache = configured
    checked, written, error = check_config(config)
    assert (written, error) == (str(cache), None)
    assert list(checked.jobs) == ["hello"]
    # Forge the copy (same bytes, another result): load_config must take the copy's word for it.
    write_copy(cache, SOURCE, {**PARSED, "jobs": {"forged": {"command": ["/bin/true"]}}})
    assert list(load_config(config).jobs) == ["forged"]


def test_an_edited_file_is_parsed_not_taken_from_the_stale_copy(configured: tuple[Path, Path]) -> None:
    config, _ = configured
    check_config(config)
    config.write_bytes(SOURCE + b'\n[jobs.added]\ncommand = ["/bin/true"]\n')
    assert sorted(load_config(config).jobs) == ["added", "hello"]


def test_an_invalid_file_fails_the_check_and_is_not_taken_from_the_copy(
    configured: tuple[Path, Path],
) -> None:
    config, cache = configured
    check_config(config)
    before = cache.read_bytes()
    config.write_bytes(SOURCE + b"\n[jobs.broken]\n")  # no command
    with pytest.raises(ConfigError, match="missing key 'command'"):
        check_config(config)
    assert cache.read_bytes() == before
    with pytest.raises(ConfigError, match="missing key 'command'"):
        load_config(config)


def test_a_copy_that_cannot_be_written_is_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "jobs.toml"
    config.write_bytes(SOURCE)
    (tmp_path / "not-a-directory").write_text("")  # fails even for root, unlike a read-only directory
    cache = tmp_path / "not-a-directory" / "jobs.toml.marshal"
    monkeypatch.setenv(config_cache.CACHE_ENV, str(cache))
    checked, written, error = check_config(config)
    assert list(checked.jobs) == ["hello"]
    assert written == str(cache)
    assert isinstance(error, OSError)


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # -S, as job@.service starts the runner: no site-packages .pth hook imports typing behind our back
        [sys.executable, "-P", "-S", "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_connection_with_a_matching_copy_does_not_import_tomllib(configured: tuple[Path, Path]) -> None:
    config, cache = configured
    env = {"JOBRUNNER_CONFIG": str(config), config_cache.CACHE_ENV: str(cache)}
    probe = """\
        import sys
        from runner.config import load_config
        print(list(load_config().jobs), "tomllib" in sys.modules, "typing" in sys.modules)
        """
    assert run_python(probe, env).stdout == "['hello'] True True\n"  # no copy yet: parsed
    check_config(config)
    assert run_python(probe, env).stdout == "['hello'] False False\n"


# --------------------------------------------------------------------------------------- jobrunner check


def jobrunner_check(config: Path, cache: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner.admin", "check", "--config", str(config), *options],
        env={**os.environ, "PYTHONPATH": str(REPO), config_cache.CACHE_ENV: str(cache)},
        capture_output=True,
        text=True,
        check=False,
    )


def test_jobrunner_check_says_where_the_copy_is(configured: tuple[Path, Path]) -> None:
    config, cache = configured
    result = jobrunner_check(config, cache)
    assert result.returncode == 0, result.stderr
    assert f"parsed copy for connections: {cache}" in result.stdout
    assert config_cache.lookup(str(cache), SOURCE, os.getuid()) == PARSED


def test_jobrunner_check_of_an_invalid_file_exits_78(configured: tuple[Path, Path]) -> None:
    config, cache = configured
    config.write_bytes(b"[runner\n")
    result = jobrunner_check(config, cache)
    assert result.returncode == 78
    assert "invalid TOML" in result.stderr
    assert not cache.exists()


def test_jobrunner_check_quiet_says_nothing_of_a_valid_file_but_refreshes_the_copy(
    configured: tuple[Path, Path],
) -> None:
    config, cache = configured
    result = jobrunner_check(config, cache, "--quiet")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert config_cache.lookup(str(cache), SOURCE, os.getuid()) == PARSED


def test_jobrunner_check_quiet_does_not_quote_an_invalid_file(configured: tuple[Path, Path]) -> None:
    """jobrunner-config.service logs to the journal and holds no credential to redact with: a key pasted
    into jobs.toml must not reach the journal through the error message."""
    config, cache = configured
    pasted = "sk-live-0123456789abcdef"
    config.write_bytes(SOURCE + f'"{pasted}" = 1\n[jobs.x]\nworkdir = "{pasted}"\n'.encode())
    loud = jobrunner_check(config, cache)
    assert loud.returncode == 78
    assert pasted in loud.stderr  # by hand, as root, the details (the case the quiet form exists for)
    quiet = jobrunner_check(config, cache, "--quiet")
    assert quiet.returncode == 78
    assert f"{config} is invalid" in quiet.stderr
    assert "sudo jobrunner check" in quiet.stderr
    assert pasted not in quiet.stdout + quiet.stderr


def test_an_edit_during_the_check_is_checked_too(
    configured: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd does not start jobrunner-config.service again for an edit made while it runs."""
    config, cache = configured
    real_store = config_cache.store
    edits = [SOURCE + b'\n[jobs.added]\ncommand = ["/bin/true"]\n']

    def store_then_edit(*args: Any) -> None:
        real_store(*args)
        if edits:
            config.write_bytes(edits.pop())

    monkeypatch.setattr(config_cache, "store", store_then_edit)
    checked, _, _ = check_config(config)
    assert sorted(checked.jobs) == ["added", "hello"]
    assert config_cache.lookup(str(cache), config.read_bytes(), os.getuid()) is not None
