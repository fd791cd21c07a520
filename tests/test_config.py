"""runner/config.py: jobs.toml into Job values, and a ConfigError naming file, job and key for each mistake."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from runner.config import (
    CREDENTIAL_NAME,
    ENV_NAME,
    JOB_NAME,
    Concurrency,
    Config,
    NameRule,
    Network,
    Sandbox,
    clean_path,
    config_path,
    load_config,
    parse_config,
)
from runner.errors import ConfigError, quoted

REPO = Path(__file__).resolve().parents[1]

# The keys a job table may have (INSTALL.md, docs): written out here, not imported from the module.
VALID_JOB_KEYS = (
    "command",
    "description",
    "workdir",
    "timeout",
    "args",
    "env",
    "credentials",
    "allowed_groups",
    "concurrency",
    "network",
    "memory_max",
    "tasks_max",
    "jit",
    "apis",
)
# Set by the runner for every job (docs): `env` may not override them.
RESERVED_ENV = ("PATH", "LANG", "HOME", "CREDENTIALS_DIRECTORY", "JOB_NAME", "JOB_RUN_ID", "JOB_OUTPUT_DIR")


def write_config(tmp_path: Path, body: str, *, project: Path | None = None) -> str:
    """A jobs.toml with a [runner] table for `project` (default tmp_path/project), then `body`."""
    project = project or tmp_path / "project"
    path = tmp_path / "jobs.toml"
    path.write_text(f'[runner]\nproject = "{project}"\n\n' + textwrap.dedent(body), encoding="utf-8")
    return str(path)


def write_raw(tmp_path: Path, text: str) -> str:
    path = tmp_path / "jobs.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def config_error(path: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


# --------------------------------------------------------------------------------------- a valid file


def test_full_config_parses_every_key_into_job_values(tmp_path: Path) -> None:
    project = tmp_path / "project"
    path = write_raw(
        tmp_path,
        f"""\
        [runner]
        project = "{project}"
        outputs = "/srv/jobrunner/outputs"
        logs = "var/logs"

        [jobs.build]
        command = ["bin/build", "--all", "two words"]
        description = "Build everything"
        workdir = "src/app"
        timeout = 90
        args = '[A-Za-z0-9_.-]+'
        env = {{ MODE = "fast", OPENAI_API_KEY = "credential:openai" }}
        credentials = ["openai", "github.token"]
        allowed_groups = ["developers", "ops"]
        concurrency = "queue"

        [jobs.lint]
        command = ["python3", "-m", "ruff", "check"]

        [jobs.sys-info]
        command = ["/usr/bin/env", "true"]
        workdir = "/srv/elsewhere"
        timeout = 2.5
        args = false
        concurrency = "parallel"
        """,
    )

    config = load_config(path)

    assert isinstance(config, Config)
    assert config.path == path
    assert config.project == str(project)
    assert config.outputs == "/srv/jobrunner/outputs"  # absolute: as given
    assert config.logs == f"{project}/var/logs"  # relative: under the project
    assert list(config.jobs) == ["build", "lint", "sys-info"]

    build = config.jobs["build"]
    assert build.name == "build"
    assert build.command == (f"{project}/bin/build", "--all", "two words")  # a project path
    assert build.description == "Build everything"
    assert build.workdir == f"{project}/src/app"
    assert build.timeout_s == 90.0
    assert build.args_pattern == "[A-Za-z0-9_.-]+"
    assert build.accepts_arguments()
    assert build.argument_matches("release-1.2_x")
    assert not build.argument_matches("no spaces")
    assert not build.argument_matches("release\n")  # in full: no "$" that lets a newline through
    assert dict(build.env) == {"MODE": "fast", "OPENAI_API_KEY": "credential:openai"}
    assert build.credentials == ("openai", "github.token")
    assert build.allowed_groups == ("developers", "ops")
    assert build.concurrency is Concurrency.QUEUE

    lint = config.jobs["lint"]
    assert lint.command == ("python3", "-m", "ruff", "check")  # a bare name is looked up in PATH later
    assert lint.description == ""
    assert lint.workdir == str(project)  # default: the project itself, without a "/."
    assert lint.timeout_s == 3600.0  # default: one hour
    assert lint.args_pattern is None
    assert not lint.accepts_arguments()
    assert dict(lint.env) == {}
    assert lint.credentials == ()
    assert lint.allowed_groups == ()
    assert lint.concurrency is Concurrency.REJECT  # default

    info = config.jobs["sys-info"]
    assert info.command == ("/usr/bin/env", "true")  # absolute: as given
    assert info.workdir == "/srv/elsewhere"
    assert info.timeout_s == 2.5
    assert info.args_pattern is None
    assert info.concurrency is Concurrency.PARALLEL


def test_outputs_and_logs_default_to_directories_in_the_project(tmp_path: Path) -> None:
    project = tmp_path / "p"
    config = load_config(write_config(tmp_path, "", project=project))

    assert config.outputs == f"{project}/outputs"
    assert config.logs == f"{project}/logs"
    assert dict(config.jobs) == {}


def test_a_dot_slash_program_is_resolved_against_the_project(tmp_path: Path) -> None:
    project = tmp_path / "p"
    path = write_config(tmp_path, '[jobs.a]\ncommand = ["./run.sh"]\n', project=project)

    assert load_config(path).jobs["a"].command[0] == f"{project}/run.sh"  # without the "./"


def test_paths_lose_dot_parts_and_extra_slashes_but_keep_dot_dot(tmp_path: Path) -> None:
    project = tmp_path / "p"
    path = write_raw(
        tmp_path,
        f"""\
        [runner]
        project = "{project}//./"
        outputs = "../shared//outputs/"
        logs = "./var//logs/."

        [jobs.a]
        command = ["./bin/../run.sh", "./arg"]
        workdir = "src/./app/"
        """,
    )

    config = load_config(path)

    assert config.project == str(project)
    # ".." stays, as pathlib keeps it: with the project a symlink, "p/.." is not tmp_path.
    assert config.outputs == f"{project}/../shared/outputs"
    assert config.logs == f"{project}/var/logs"
    assert config.jobs["a"].command == (f"{project}/bin/../run.sh", "./arg")  # arguments as given
    assert config.jobs["a"].workdir == f"{project}/src/app"


@pytest.mark.parametrize(
    "path", ["/", "/a", "///a", "/a//b/./c/", "a/../b", "..", "./", "", ".", "a/./../.", "/./", "a//"]
)
def test_clean_path_writes_paths_as_pathlib_does(path: str) -> None:
    # (pathlib also keeps a leading "//" as it is, which Linux reads as "/": clean_path makes it "/")
    assert clean_path(path) == str(PurePosixPath(path))


def test_only_parallel_runs_without_a_lock() -> None:
    assert Concurrency.REJECT.needs_lock()
    assert Concurrency.QUEUE.needs_lock()
    assert not Concurrency.PARALLEL.needs_lock()


def test_jobrunner_config_environment_variable_overrides_the_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, '[jobs.hello]\ncommand = ["/bin/echo", "hi"]\n')
    monkeypatch.setenv("JOBRUNNER_CONFIG", str(path))

    assert config_path() == path
    config = load_config()
    assert config.path == path
    assert list(config.jobs) == ["hello"]


@pytest.mark.parametrize("value", [None, ""])
def test_without_jobrunner_config_the_system_file_is_used(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("JOBRUNNER_CONFIG", raising=False)
    else:
        monkeypatch.setenv("JOBRUNNER_CONFIG", value)

    assert config_path() == "/etc/jobrunner/jobs.toml"


def test_jobrunner_config_is_cleaned_like_every_configured_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBRUNNER_CONFIG", "/etc/jobrunner//./jobs.toml")

    assert config_path() == "/etc/jobrunner/jobs.toml"


# ------------------------------------------------------------------------------- mistakes in a job


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('command = "bin/build"', "command"),
        ("command = [1, 2]", "command"),
        ("command = []", "command"),
        ('command = ["bin/build", "a\\u0000b"]', "command"),
        ("description = 5", "description"),
        ('description = ["a"]', "description"),
        ('workdir = ["src"]', "workdir"),
        ("workdir = 1", "workdir"),
        ('timeout = "10"', "timeout"),
        ("timeout = 0", "timeout"),
        ("timeout = -5", "timeout"),
        ("timeout = true", "timeout"),
        ("timeout = nan", "timeout"),
        ("timeout = [1]", "timeout"),
        ("args = true", "args"),
        ("args = 5", "args"),
        ('args = ["a"]', "args"),
        ("args = '[unclosed'", "args"),
        ("args = '(?P<x'", "args"),
        ('env = "MODE=fast"', "env"),
        ('env = ["MODE"]', "env"),
        ('env = { "1BAD" = "x" }', "env"),
        ('env = { "WITH-DASH" = "x" }', "env"),
        ("env = { MODE = 5 }", "env"),
        ("env = { MODE = { a = 1 } }", "env"),
        ('credentials = "openai"', "credentials"),
        ("credentials = [1]", "credentials"),
        ('credentials = ["bad/name"]', "credentials"),
        ('credentials = [""]', "credentials"),
        ('allowed_groups = "developers"', "allowed_groups"),
        ("allowed_groups = [7]", "allowed_groups"),
        ('concurrency = "sometimes"', "concurrency"),
        ("concurrency = 1", "concurrency"),
        ('concurrency = ["queue"]', "concurrency"),
    ],
)
def test_a_bad_value_names_the_file_the_job_and_the_key(tmp_path: Path, body: str, key: str) -> None:
    command = "" if body.startswith("command") else 'command = ["bin/build"]\n'
    path = write_config(tmp_path, f"[jobs.build]\n{command}{body}\n")

    error = config_error(path)

    assert str(path) in error.message
    assert "job 'build'" in error.message
    assert f"'{key}'" in error.message
    assert error.code == "config"
    assert error.exit_status == 78


def test_missing_command_names_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[jobs.build]\ndescription = "no command"\n')

    error = config_error(path)

    assert str(path) in error.message
    assert "job 'build'" in error.message
    assert "missing key 'command'" in error.message
    assert "command = [" in error.hint  # an example of what to write


def test_unknown_key_lists_the_valid_keys_in_the_hint(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[jobs.deploy]\ncommand = ["bin/deploy"]\ntimout = 5\n')

    error = config_error(path)

    assert str(path) in error.message
    assert "job 'deploy'" in error.message
    assert "unknown key 'timout'" in error.message
    for key in VALID_JOB_KEYS:
        assert key in error.hint


def test_bad_regular_expression_says_so(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[jobs.build]\ncommand = [\"bin/build\"]\nargs = '[a-z'\n")

    error = config_error(path)

    assert "'args'" in error.message
    assert "regular expression" in error.message


def test_args_patterns_of_a_checked_copy_are_compiled_when_an_argument_is_matched(tmp_path: Path) -> None:
    data = {"runner": {"project": str(tmp_path)}, "jobs": {"build": {"command": ["b"], "args": "[a-z"}}}
    with pytest.raises(ConfigError):
        parse_config(data, "jobs.toml")  # by default, every pattern is compiled while loading

    build = parse_config(data, "jobs.toml", compile_patterns=False).jobs["build"]  # not compiled yet

    with pytest.raises(ConfigError) as info:
        build.argument_matches("x")
    assert "job 'build'" in info.value.message
    assert "regular expression" in info.value.message
    assert "jobrunner check" in info.value.hint


def test_wrong_type_for_args_hints_at_false_or_a_pattern(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[jobs.build]\ncommand = ["bin/build"]\nargs = true\n')

    error = config_error(path)

    assert "false" in error.message
    assert "args = " in error.hint


def test_unknown_concurrency_lists_the_policies(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[jobs.build]\ncommand = ["bin/build"]\nconcurrency = "serial"\n')

    error = config_error(path)

    for policy in ("reject", "queue", "parallel"):
        assert policy in error.message
    assert "'serial'" in error.message


@pytest.mark.parametrize("name", RESERVED_ENV)
def test_env_may_not_override_what_the_runner_sets(tmp_path: Path, name: str) -> None:
    path = write_config(tmp_path, f'[jobs.build]\ncommand = ["bin/build"]\nenv = {{ {name} = "x" }}\n')

    error = config_error(path)

    assert str(path) in error.message
    assert "job 'build'" in error.message
    assert "'env'" in error.message
    assert name in error.message


def test_env_value_with_a_nul_character_says_so(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[jobs.build]\ncommand = ["bin/build"]\nenv = { MODE = "a\\u0000b" }\n')

    error = config_error(path)

    assert "'env'" in error.message
    assert "MODE" in error.message
    # A string with a NUL in it is still a string: the message must name the actual problem.
    assert "NUL" in error.message


def test_env_referencing_a_credential_not_listed_names_it_and_suggests_the_fix(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """\
        [jobs.build]
        command = ["bin/build"]
        credentials = ["github"]
        env = { OPENAI_API_KEY = "credential:openai" }
        """,
    )

    error = config_error(path)

    assert str(path) in error.message
    assert "job 'build'" in error.message
    assert "'env'" in error.message
    assert "'openai'" in error.message
    assert "credentials = ['github', 'openai']" in error.hint


def test_credential_reference_listed_in_credentials_is_accepted(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[jobs.build]\ncommand = ["bin/build"]\ncredentials = ["openai"]\n'
        'env = { KEY = "credential:openai", PLAIN = "credentials are not references" }\n',
    )

    job = load_config(path).jobs["build"]

    assert job.env["KEY"] == "credential:openai"
    assert job.env["PLAIN"] == "credentials are not references"
    assert job.credentials == ("openai",)


@pytest.mark.parametrize(
    "name",
    [
        "Build",
        "1build",
        "-build",
        "_build",
        "a b",
        "a/b",
        "..",
        "a.b",
        "d\u0435ploy",
        "\uff42uild",
        "x" * 65,
        "",
    ],
)
def test_invalid_job_name_names_the_file_and_the_job(tmp_path: Path, name: str) -> None:
    quoted = name.replace('"', '\\"')
    path = write_config(tmp_path, f'[jobs."{quoted}"]\ncommand = ["bin/build"]\n')

    error = config_error(path)

    assert str(path) in error.message
    assert f"job '{name}'" in error.message
    assert "invalid job name" in error.message
    assert "[a-z]" in error.hint


# Names are checked with set operations, not regular expressions (NameRule): each rule must accept
# exactly what its documented pattern matches in full.
NAME_CHARACTERS = st.text(st.sampled_from("aAzZ09_-.\n \u0435\uff42/") | st.characters(), max_size=300)


@pytest.mark.parametrize("rule", [JOB_NAME, CREDENTIAL_NAME, ENV_NAME], ids=lambda rule: rule.pattern)
@given(text=NAME_CHARACTERS)
@example(text="")
@example(text="a" * 64)
@example(text="a" * 65)
@example(text="a" * 255)
@example(text="a" * 256)
@example(text="ok\n")
def test_name_rules_accept_what_their_pattern_matches_in_full(rule: NameRule, text: str) -> None:
    assert rule.fullmatch(text) == (re.fullmatch(rule.pattern, text) is not None)


def test_longest_valid_job_name_is_accepted(tmp_path: Path) -> None:
    name = "a" + "b-_9" * 15 + "xyz"
    assert len(name) == 64
    path = write_config(tmp_path, f'[jobs.{name}]\ncommand = ["bin/build"]\n')

    assert list(load_config(path).jobs) == [name]


def test_a_job_that_is_not_a_table(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[jobs]\nbuild = "bin/build"\n')

    error = config_error(path)

    assert str(path) in error.message
    assert "job 'build'" in error.message
    assert "[jobs.build]" in error.message


# ---------------------------------------------------------------------------- mistakes in [runner]


def test_missing_runner_table(tmp_path: Path) -> None:
    path = write_raw(tmp_path, '[jobs.build]\ncommand = ["/bin/true"]\n')

    error = config_error(path)

    assert str(path) in error.message
    assert "[runner]" in error.message
    assert "project" in error.hint


def test_missing_project(tmp_path: Path) -> None:
    path = write_raw(tmp_path, '[runner]\nlogs = "/var/log/jobs"\n')

    error = config_error(path)

    assert str(path) in error.message
    assert "'project'" in error.message


@pytest.mark.parametrize("project", ["relative/project", "./project", "project"])
def test_relative_project_is_refused(tmp_path: Path, project: str) -> None:
    path = write_raw(tmp_path, f'[runner]\nproject = "{project}"\n')

    error = config_error(path)

    assert str(path) in error.message
    assert "'project'" in error.message
    assert "absolute" in error.message
    assert project in error.message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('project = ""', "project"),
        ("project = 5", "project"),
        ('project = "/p"\noutputs = 5', "outputs"),
        ('project = "/p"\nlogs = ["/l"]', "logs"),
        ('project = "/p"\nlogs = ""', "logs"),
    ],
)
def test_bad_runner_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = write_raw(tmp_path, f"[runner]\n{text}\n")

    error = config_error(path)

    assert str(path) in error.message
    assert "[runner]" in error.message
    assert f"'{key}'" in error.message


def test_unknown_runner_key_lists_the_valid_keys(tmp_path: Path) -> None:
    path = write_raw(tmp_path, '[runner]\nproject = "/p"\nprojekt = "/q"\n')

    error = config_error(path)

    assert str(path) in error.message
    assert "'projekt'" in error.message
    for key in ("project", "outputs", "logs"):
        assert key in error.hint


def test_unknown_top_level_table(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[jobz.build]\ncommand = ["bin/build"]\n')

    error = config_error(path)

    assert str(path) in error.message
    assert "'jobz'" in error.message


# ------------------------------------------------------------------------------------ the file itself


def test_invalid_toml_reports_the_file_and_the_line(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path,
        """\
        [runner]
        project = "/p"

        [jobs.build]
        command = = ["bin/build"]
        description = "the error is on the line above"
        """,
    )

    error = config_error(path)

    assert str(path) in error.message
    assert "invalid TOML" in error.message
    assert "line 5" in error.message


def test_a_file_that_is_not_utf8_is_invalid_toml(tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.toml")
    with open(path, "wb") as f:
        f.write(b'[runner]\nproject = "/p\xff"\n')

    error = config_error(path)

    assert str(path) in error.message
    assert "invalid TOML" in error.message


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope" / "jobs.toml")

    error = config_error(path)

    assert str(path) in error.message
    assert "no such file" in error.message
    assert error.hint


# ------------------------------------------------------------------ the sandbox keys (the job's own units)


def job_with(tmp_path: Path, body: str) -> str:
    """A jobs.toml with one job, build, with `body` after its command."""
    return write_config(tmp_path, f'[jobs.build]\ncommand = ["bin/build"]\n{textwrap.dedent(body)}\n')


def sandbox_of(tmp_path: Path, body: str) -> Sandbox:
    return load_config(job_with(tmp_path, body)).jobs["build"].sandbox


def test_a_job_without_sandbox_keys_gets_the_defaults(tmp_path: Path) -> None:
    sandbox = sandbox_of(tmp_path, "")

    assert sandbox.network is Network.ANY
    assert sandbox.addresses == ()
    assert sandbox.memory_max is None  # install.sh's default applies
    assert sandbox.tasks_max is None
    assert sandbox.jit is False
    assert sandbox == Sandbox()


@pytest.mark.parametrize(("value", "network"), [('"any"', Network.ANY), ('"none"', Network.NONE)])
def test_network_any_and_none(tmp_path: Path, value: str, network: Network) -> None:
    sandbox = sandbox_of(tmp_path, f"network = {value}")

    assert sandbox.network is network
    assert sandbox.addresses == ()


def test_a_network_list_is_kept_in_order_in_canonical_form(tmp_path: Path) -> None:
    sandbox = sandbox_of(
        tmp_path,
        """\
        network = ["10.0.0.0/8", "192.0.2.10", "2001:0DB8::/32", "2001:db8:0:0::1", "192.0.2.0/24", "::/0"]
        """,
    )

    assert sandbox.network is Network.LISTED
    assert sandbox.addresses == (
        "10.0.0.0/8",
        "192.0.2.10/32",  # a single address: its own prefix
        "2001:db8::/32",
        "2001:db8::1/128",
        "192.0.2.0/24",
        "::/0",
    )


@pytest.mark.parametrize(
    "entry",
    [
        "api.example.com",  # a host name: resolved only after the firewall is set, so refused
        "localhost",
        "10.0.0.1/8",  # host bits set: strict, so that what is allowed is what is written
        "2001:db8::1/32",
        "10.0.0.0/33",
        "256.1.2.3",
        "10.0.0",
        "192.0.2.10:443",
        "any",
        "",
        " 10.0.0.1",
    ],
)
def test_a_network_entry_that_is_not_an_address_or_prefix_is_refused(tmp_path: Path, entry: str) -> None:
    path = job_with(tmp_path, f'network = ["192.0.2.10", "{entry}"]')

    error = config_error(path)

    assert str(path) in error.message
    assert "job 'build'" in error.message
    assert "'network'" in error.message
    assert quoted(entry) in error.message  # whole when shorter than a key can be, else cut
    assert "not an IP address or prefix" in error.message
    assert "not host names" in error.hint


def test_a_long_wrong_network_entry_is_not_quoted_whole(tmp_path: Path) -> None:
    pasted = "sk-" + "0123456789abcdef" * 4  # a key pasted in the wrong place
    error = config_error(job_with(tmp_path, f'network = ["{pasted}"]'))

    assert "'network'" in error.message
    assert f"{pasted[:3]!r}... ({len(pasted)} characters)" in error.message
    assert pasted[:4] not in error.message


def test_an_empty_network_list_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = job_with(tmp_path, "network = []")

    error = config_error(path)

    assert str(path) in error.message
    assert "job 'build'" in error.message
    assert "'network' is an empty list" in error.message
    assert 'network = "none"' in error.hint


@pytest.mark.parametrize(
    "value",
    [
        '"all"',
        '"None"',
        '"ANY"',
        '""',
        '"10.0.0.0/8"',  # an address, not in a list
        "true",
        "5",
        "[1]",
        '["10.0.0.1", 2]',
        "{ allow = ['10.0.0.1'] }",
    ],
)
def test_a_wrong_network_value_names_the_file_the_job_and_the_key(tmp_path: Path, value: str) -> None:
    path = job_with(tmp_path, f"network = {value}")

    error = config_error(path)

    assert str(path) in error.message
    assert "job 'build'" in error.message
    assert "'network'" in error.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"512M"', "512M"),
        ("536870912", "536870912"),
        ('"536870912"', "536870912"),
        ('"2G"', "2G"),
        ('"64K"', "64K"),
        ('"1T"', "1T"),
        ('"infinity"', "infinity"),
    ],
)
def test_memory_max(tmp_path: Path, value: str, expected: str) -> None:
    assert sandbox_of(tmp_path, f"memory_max = {value}").memory_max == expected


@pytest.mark.parametrize(
    "value",
    [
        '"0"',
        "0",
        '"-1"',
        "-1",
        '"0G"',
        '"1.5G"',
        "1.5",
        "true",
        "false",
        '""',
        '"G"',
        '"512m"',
        '"512MB"',
        '"512 M"',
        '"Infinity"',
        '"50%"',
        '"\u0661\u0662M"',  # digits, but not ASCII ones
        '["1G"]',
    ],
)
def test_a_wrong_memory_max_is_refused(tmp_path: Path, value: str) -> None:
    path = job_with(tmp_path, f"memory_max = {value}")

    error = config_error(path)

    assert str(path) in error.message
    assert "job 'build'" in error.message
    assert "'memory_max' must be a whole number above 0" in error.message
    assert 'memory_max = "2G"' in error.hint


@pytest.mark.parametrize(
    ("value", "expected"), [("256", "256"), ('"256"', "256"), ("1", "1"), ('"infinity"', "infinity")]
)
def test_tasks_max(tmp_path: Path, value: str, expected: str) -> None:
    assert sandbox_of(tmp_path, f"tasks_max = {value}").tasks_max == expected


@pytest.mark.parametrize("value", ["0", '"0"', "-5", '"256K"', '"2G"', "2.5", "true", '"many"', '""'])
def test_a_wrong_tasks_max_is_refused(tmp_path: Path, value: str) -> None:
    path = job_with(tmp_path, f"tasks_max = {value}")

    error = config_error(path)

    assert str(path) in error.message
    assert "job 'build'" in error.message
    assert "'tasks_max' must be a whole number above 0" in error.message
    assert "K, M, G" not in error.message  # no unit suffixes for a number of tasks


def test_jit(tmp_path: Path) -> None:
    assert sandbox_of(tmp_path, "jit = true").jit is True
    assert sandbox_of(tmp_path, "jit = false").jit is False


@pytest.mark.parametrize("value", ['"yes"', '"true"', "1", "0", "[true]"])
def test_jit_must_be_a_boolean(tmp_path: Path, value: str) -> None:
    path = job_with(tmp_path, f"jit = {value}")

    error = config_error(path)

    assert str(path) in error.message
    assert "job 'build'" in error.message
    assert "'jit' must be true or false" in error.message


@pytest.mark.parametrize(
    "key", ["networks", "memory-max", "MemoryMax", "tasks", "sandbox", "private_network"]
)
def test_unknown_sandbox_like_keys_are_still_refused(tmp_path: Path, key: str) -> None:
    error = config_error(job_with(tmp_path, f'{key} = "none"'))

    assert f"unknown key {quoted(key)}" in error.message
    for valid in ("network", "memory_max", "tasks_max", "jit"):
        assert valid in error.hint


def test_every_sandbox_key_at_once(tmp_path: Path) -> None:
    sandbox = sandbox_of(
        tmp_path, 'network = ["192.0.2.0/24"]\nmemory_max = "4G"\ntasks_max = 512\njit = true'
    )

    assert sandbox == Sandbox(
        network=Network.LISTED, addresses=("192.0.2.0/24",), memory_max="4G", tasks_max="512", jit=True
    )


def parse_in_a_fresh_interpreter(thorough: bool) -> subprocess.CompletedProcess[str]:
    """parse_config of a job with a network list, in an interpreter started as the jobs' units start
    the runner (-P -S); prints whether that imported ipaddress, then the job's addresses."""
    probe = textwrap.dedent(
        f"""\
        import sys
        from runner import config
        assert "ipaddress" not in sys.modules
        data = {{"runner": {{"project": "/p"}}, "jobs": {{"build": {{"command": ["x"],
                "network": ["192.0.2.10", "2001:DB8::/32"], "memory_max": "1G", "jit": True}}}}}}
        parsed = config.parse_config(data, "/p/jobs.toml", compile_patterns={thorough})
        print("ipaddress" in sys.modules, *parsed.jobs["build"].sandbox.addresses)
        """
    )
    return subprocess.run(
        [sys.executable, "-P", "-S", "-c", probe],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )


def test_parsing_the_checked_copy_does_not_import_ipaddress() -> None:
    # Every connection parses the copy `jobrunner check` made (compile_patterns=False): the addresses were
    # checked then, and the runner does not use them (systemd applies them before it starts).
    assert parse_in_a_fresh_interpreter(thorough=False).stdout.split() == [
        "False",
        "192.0.2.10",
        "2001:DB8::/32",
    ]
    # The thorough parse (check, the generator) does import it, to check and rewrite each address.
    assert parse_in_a_fresh_interpreter(thorough=True).stdout.split() == [
        "True",
        "192.0.2.10/32",
        "2001:db8::/32",
    ]


def test_parsing_the_checked_copy_still_checks_the_network_value_types(tmp_path: Path) -> None:
    def parse(network: object) -> Sandbox:
        data = {"runner": {"project": "/p"}, "jobs": {"build": {"command": ["x"], "network": network}}}
        return parse_config(data, "/p/jobs.toml", compile_patterns=False).jobs["build"].sandbox

    assert parse("none").network is Network.NONE
    for wrong in ([], "all", 5, ["10.0.0.1", 2]):
        with pytest.raises(ConfigError, match="'network'"):
            parse(wrong)


# ------------------------------------------------------------------------------------------- [apis.*]

API = """
[apis.llm]
url = "https://api.example.com/v1/"
credential = "llm-key"

[jobs.summarize]
command = ["/bin/true"]
apis = ["llm"]
credentials = ["other-secret"]
"""


def test_an_api_gets_its_defaults_and_a_job_lists_it(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, API))

    api = config.apis["llm"]
    assert (api.url, api.credential, api.header, api.value) == (
        "https://api.example.com/v1",  # without the trailing slash: request paths start with one
        "llm-key",
        "Authorization",
        "Bearer {credential}",
    )
    assert (api.ca, api.timeout_s) == (None, 300.0)
    assert api.env_name == "JOB_API_LLM_URL"
    assert config.jobs["summarize"].apis == ("llm",)
    assert config.jobs["summarize"].credentials == ("other-secret",)  # other secrets it holds as before


def test_every_api_key_is_taken(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here beyond existing")
    config = load_config(
        write_config(
            tmp_path,
            f"""
            [apis.internal-api]
            url = "http://127.0.0.1:8080"
            credential = "internal.token"
            header = "X-Api-Key"
            value = "{{credential}}"
            ca = "{ca}"
            timeout = 30
            """,
        )
    )
    api = config.apis["internal-api"]
    assert (api.header, api.value, api.ca, api.timeout_s) == ("X-Api-Key", "{credential}", str(ca), 30.0)
    assert api.env_name == "JOB_API_INTERNAL_API_URL"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('credential = "k"', "missing key 'url'"),
        ('url = "https://x"', "missing key 'credential'"),
        ('url = "https://x"\ncredential = "k"\nport = 1', "unknown key 'port'"),
        ('url = "http://api.example.com"\ncredential = "k"', "plain http to api.example.com"),
        ('url = "ftp://x"\ncredential = "k"', "must be an https:// URL"),
        ('url = "https://x/?q=1"\ncredential = "k"', "no user, password, query or fragment"),
        ('url = "https://user:pw@x"\ncredential = "k"', "no user, password, query or fragment"),
        ('url = "https://x:99999"\ncredential = "k"', "not a valid URL"),
        ('url = "https://x"\ncredential = "a/b"', "invalid credential name"),
        ('url = "https://x"\ncredential = "k"\nheader = "Host"', "ordinary HTTP header"),
        ('url = "https://x"\ncredential = "k"\nheader = "Bad Header"', "ordinary HTTP header"),
        ('url = "https://x"\ncredential = "k"\nvalue = "Bearer"', "does not contain {credential}"),
        ('url = "https://x"\ncredential = "k"\nvalue = "{credential}\\n"', "line break"),
        ('url = "https://x"\ncredential = "k"\nca = "relative.pem"', "absolute path"),
        ('url = "https://x"\ncredential = "k"\nca = "/nonexistent/ca.pem"', "no such file"),
        ('url = "https://x"\ncredential = "k"\ntimeout = 0', "'timeout' must be a number"),
    ],
)
def test_a_bad_api_is_refused_with_the_reason(tmp_path: Path, table: str, message: str) -> None:
    error = config_error(write_config(tmp_path, f"[apis.llm]\n{table}\n"))

    assert message in error.message
    assert "API 'llm'" in error.message


def test_http_is_allowed_to_a_loopback_address_only(tmp_path: Path) -> None:
    for url in ("http://127.0.0.1:8080", "http://localhost", "http://[::1]:9000/base"):
        path = write_config(tmp_path, f'[apis.local]\nurl = "{url}"\ncredential = "k"\n')
        assert load_config(path).apis["local"].url == url


def test_api_names_are_checked_and_must_not_meet_in_one_variable(tmp_path: Path) -> None:
    assert (
        "invalid API name"
        in config_error(write_config(tmp_path, '[apis.LLM]\nurl = "https://x"\ncredential = "k"\n')).message
    )
    both = (
        '[apis.a-b]\nurl = "https://x"\ncredential = "k"\n[apis.a_b]\nurl = "https://y"\ncredential = "k"\n'
    )
    assert "would both be $JOB_API_A_B_URL" in config_error(write_config(tmp_path, both)).message


def test_a_job_may_list_only_defined_apis(tmp_path: Path) -> None:
    error = config_error(write_config(tmp_path, '[jobs.j]\ncommand = ["/bin/true"]\napis = ["nope"]\n'))

    assert "no API 'nope'" in error.message
    assert error.hint == "define it as [apis.nope]"


def test_a_job_never_holds_an_apis_key(tmp_path: Path) -> None:
    body = API.replace('credentials = ["other-secret"]', 'credentials = ["llm-key"]')
    error = config_error(write_config(tmp_path, body))

    assert "'llm-key', the key of API 'llm'" in error.message
    assert 'apis = ["llm"]' in error.hint
    # Nor a job that does not list the API: the key is the proxy's alone.
    other = API + '\n[jobs.other]\ncommand = ["/bin/true"]\ncredentials = ["llm-key"]\n'
    assert "the key of API 'llm'" in config_error(write_config(tmp_path, other)).message


def test_a_job_cannot_set_its_apis_variable_itself(tmp_path: Path) -> None:
    body = API + '\n[jobs.summarize.env]\nJOB_API_LLM_URL = "http://elsewhere"\n'
    assert "JOB_API_LLM_URL is set by the runner" in config_error(write_config(tmp_path, body)).message


def test_the_parsed_copy_keeps_the_apis(tmp_path: Path) -> None:
    import tomllib

    path = write_config(tmp_path, API)
    with open(path, "rb") as f:
        data = tomllib.load(f)
    quick = parse_config(data, path, compile_patterns=False)  # what a connection does with the copy

    assert quick.apis["llm"].url == "https://api.example.com/v1"
    assert quick.jobs["summarize"].apis == ("llm",)
