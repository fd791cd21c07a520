"""Job configuration: `/etc/jobrunner/jobs.toml` read with tomllib into value objects (runner.value).

Connections take tomllib's result from the parsed copy that `jobrunner check` keeps (runner.config_cache)
when it matches the file, and parse the file themselves otherwise.

Every mistake is reported as a ConfigError that names the file, the job and the key, with a hint.
"""

from __future__ import annotations

import enum
import os
import re

from runner import config_cache
from runner.errors import ConfigError, quoted
from runner.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms on every connection)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

DEFAULT_CONFIG_PATH = "/etc/jobrunner/jobs.toml"
CREDENTIAL_REFERENCE = "credential:"
DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_MAX_RUNS_PER_USER = 8
MAX_TIMEOUT_S = 86400.0  # job@.service's TimeoutStartSec=1d 1min is the backstop above it

# The environment the runner itself sets for every job; `env` may not override these.
RESERVED_ENV = frozenset(
    {"PATH", "LANG", "HOME", "CREDENTIALS_DIRECTORY", "JOB_NAME", "JOB_RUN_ID", "JOB_OUTPUT_DIR"}
)


class NameRule(Value):
    """The grammar of a name, as `pattern` writes it, checked with set operations: every connection
    validates the whole configuration, and compiling these as regular expressions cost each ~0.2 ms."""

    __slots__ = ("first", "max_length", "pattern", "rest")

    def __init__(self, pattern: str, first: str, rest: str, max_length: int | None) -> None:
        self.pattern = pattern  # for messages
        self.first = frozenset(first)  # the characters the name may start with
        self.rest = frozenset(rest)  # the characters it may contain
        self.max_length = max_length  # None: any length

    def fullmatch(self, text: str) -> bool:
        if self.max_length is not None and len(text) > self.max_length:
            return False
        return text[:1] in self.first and self.rest.issuperset(text)


_LOWER = "abcdefghijklmnopqrstuvwxyz"
_LETTERS = _LOWER + _LOWER.upper()
_DIGITS = "0123456789"
JOB_NAME = NameRule("[a-z][a-z0-9_-]{0,63}", _LOWER, _LOWER + _DIGITS + "_-", 64)
_CREDENTIAL_CHARACTERS = _LETTERS + _DIGITS + "_.-"  # a file name and an fd name for systemd
CREDENTIAL_NAME = NameRule("[A-Za-z0-9_.-]{1,255}", _CREDENTIAL_CHARACTERS, _CREDENTIAL_CHARACTERS, 255)
ENV_NAME = NameRule("[A-Za-z_][A-Za-z0-9_]*", _LETTERS + "_", _LETTERS + _DIGITS + "_", None)
# An API's name is part of unit names (jobrunner-api-NAME.socket) and of $JOB_API_<NAME>_URL.
API_NAME = NameRule("[a-z][a-z0-9_-]{0,31}", _LOWER, _LOWER + _DIGITS + "_-", 32)


class Concurrency(enum.StrEnum):
    REJECT = "reject"  # a second run while one is in progress is refused as busy
    QUEUE = "queue"  # it waits for the first to finish
    PARALLEL = "parallel"  # runs side by side

    def needs_lock(self) -> bool:
        return self is not Concurrency.PARALLEL


class Network(enum.StrEnum):
    ANY = "any"  # every address but link-local and multicast (the template's allow-list)
    NONE = "none"  # no network at all: a network namespace of its own, AF_UNIX only
    LISTED = "listed"  # only the addresses and prefixes in Sandbox.addresses


class Sandbox(Value):
    """What a job's own units get beyond the shared template (runner.units writes them). Not used by
    the runner itself: systemd applies them before the runner starts."""

    __slots__ = ("addresses", "jit", "memory_max", "network", "tasks_max")

    def __init__(
        self,
        network: Network = Network.ANY,
        addresses: tuple[str, ...] = (),  # with Network.LISTED: IPAddressAllow= entries
        memory_max: str | None = None,  # MemoryMax=; None: install.sh's default
        tasks_max: str | None = None,  # TasksMax=; None: install.sh's default
        jit: bool = False,  # MemoryDenyWriteExecute=no
    ) -> None:
        self.network = network
        self.addresses = addresses
        self.memory_max = memory_max
        self.tasks_max = tasks_max
        self.jit = jit


class Job(Value):
    __slots__ = (
        "allowed_groups",
        "apis",
        "args_pattern",
        "command",
        "concurrency",
        "credentials",
        "description",
        "env",
        "name",
        "sandbox",
        "timeout_s",
        "workdir",
    )

    def __init__(  # noqa: PLR0917 - built in one place, with keywords
        self,
        name: str,
        command: tuple[str, ...],
        description: str,
        workdir: str,
        timeout_s: float,
        args_pattern: str | None,  # a regular expression; None: the job takes no arguments
        env: Mapping[str, str],  # values may still be "credential:NAME" references
        credentials: tuple[str, ...],  # every credential the job uses, including env references
        allowed_groups: tuple[str, ...],  # empty: anyone who can reach the socket
        concurrency: Concurrency,
        sandbox: Sandbox | None = None,
        apis: tuple[str, ...] = (),  # [apis.NAME] it reaches through $JOB_API_<NAME>_URL
    ) -> None:
        self.name = name
        self.command = command
        self.description = description
        self.workdir = workdir
        self.timeout_s = timeout_s
        self.args_pattern = args_pattern
        self.env = env
        self.credentials = credentials
        self.allowed_groups = allowed_groups
        self.concurrency = concurrency
        self.sandbox = sandbox or Sandbox()
        self.apis = apis

    def accepts_arguments(self) -> bool:
        return self.args_pattern is not None

    def argument_matches(self, argument: str) -> bool:
        """Whether `argument` matches the job's `args` pattern in full. The pattern is compiled here, on
        first use (re keeps it), not when the configuration is loaded: every connection loads all jobs."""
        if self.args_pattern is None:
            return False
        try:
            return re.fullmatch(self.args_pattern, argument) is not None
        except re.error as e:  # only from a parsed copy that a check with another Python accepted
            raise ConfigError(
                f"job '{self.name}': key 'args' is not a valid regular expression: {e}",
                "fix it, then check the file: sudo jobrunner check",
            ) from None


class Api(Value):
    """An HTTP API that jobs call without holding its key ([apis.NAME]): runner.apiproxy adds the header
    `header: value` (with the credential's value for "{credential}") to each request and forwards it to
    `url` over TLS, outside the job's sandbox."""

    __slots__ = ("ca", "credential", "header", "name", "timeout_s", "url", "value")

    def __init__(  # noqa: PLR0917 - built in one place, with keywords
        self,
        name: str,
        url: str,  # the upstream's base URL: https, or http to a loopback address
        credential: str,
        header: str = "Authorization",
        value: str = "Bearer {credential}",
        ca: str | None = None,  # a CA bundle to trust for this upstream instead of the system's
        timeout_s: float = 300.0,  # for the upstream's answer (and each pause in it)
    ) -> None:
        self.name = name
        self.url = url
        self.credential = credential
        self.header = header
        self.value = value
        self.ca = ca
        self.timeout_s = timeout_s

    @property
    def env_name(self) -> str:
        return api_env_name(self.name)


def api_env_name(name: str) -> str:
    """The variable that holds the API's local base URL in a job's environment."""
    return f"JOB_API_{name.upper().replace('-', '_')}_URL"


class Config(Value):
    __slots__ = ("apis", "jobs", "logs", "max_runs_per_user", "outputs", "path", "project")

    def __init__(  # noqa: PLR0917
        self,
        path: str,
        project: str,
        outputs: str,
        logs: str,
        jobs: Mapping[str, Job],
        max_runs_per_user: int = DEFAULT_MAX_RUNS_PER_USER,  # runs one uid may have in flight at once
        apis: Mapping[str, Api] | None = None,
    ) -> None:
        self.path = path
        self.project = project
        self.outputs = outputs
        self.logs = logs
        self.jobs = jobs
        self.max_runs_per_user = max_runs_per_user
        self.apis = apis or {}


RUNNER_KEYS = ("project", "outputs", "logs", "max_runs_per_user")
JOB_KEYS = (
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
API_KEYS = ("url", "credential", "header", "value", "ca", "timeout")
CREDENTIAL_PLACEHOLDER = "{credential}"


def config_path() -> str:
    """The configuration file: `$JOBRUNNER_CONFIG` (tests, staging) or the system default."""
    return clean_path(os.environ.get("JOBRUNNER_CONFIG") or DEFAULT_CONFIG_PATH)


def clean_path(path: str) -> str:
    """`path` without "." parts and repeated or trailing slashes, as pathlib writes it (pathlib itself
    costs every connection ~2 ms of imports). ".." parts stay, as in pathlib: `link/..` is the parent of
    where the link points, which os.path.normpath's dropping both would change."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return ("/" if path.startswith("/") else "") + "/".join(parts) or "."


def _join(directory: str, path: str) -> str:
    """pathlib's `directory / path`: an absolute `path` as it is, a relative one under `directory`."""
    return clean_path(os.path.join(directory, path))


def load_config(path: str | None = None) -> Config:
    """The configuration, from the parsed copy that `jobrunner check` keeps (runner.config_cache) when it
    matches the file byte for byte, else parsed with tomllib."""
    path = path or config_path()
    source, st = _read(path)
    cache = config_cache.cache_path(path, DEFAULT_CONFIG_PATH)
    data = config_cache.lookup(cache, source, st.st_uid) if cache else None
    if data is None:
        return parse_config(_parse_toml(source, path), path)
    # The check that wrote the copy compiled every `args` pattern: they are compiled when used.
    return parse_config(data, path, compile_patterns=False)


def parse_file(path: str) -> Config:
    """The configuration in `path`, parsed and checked in full with tomllib (never the parsed copy)."""
    source, _ = _read(path)
    return parse_config(_parse_toml(source, path), path)


# An edit made while jobrunner-config.service is checking does not start it again (systemd merges the
# path unit's request into the running start), so the check looks again when the file changed under it.
CHECK_ATTEMPTS = 5


def check_config(path: str | None = None) -> tuple[Config, str | None, OSError | None]:
    """Parse the file with tomllib (never from the copy), validate it, and refresh the parsed copy that
    connections use; again if the file changed meanwhile. Returns the configuration, the copy's path
    (None: this file has none) and the error that kept the copy from being written, if any (the file is
    valid all the same).

    Raises ConfigError when the file is invalid; the old copy then stays, matching the old content only."""
    path = path or config_path()
    cache = config_cache.cache_path(path, DEFAULT_CONFIG_PATH)
    for _ in range(CHECK_ATTEMPTS):
        source, st = _read(path)
        data = _parse_toml(source, path)
        config = parse_config(data, path)
        if cache is None:
            return config, None, None
        try:
            config_cache.store(cache, source, data, st.st_mode)
        except OSError as e:
            return config, cache, e
        except ValueError:  # a TOML date in a value parse_config does not look at: marshal cannot store it
            return config, None, None
        if _read(path)[0] == source:
            break
    return config, cache, None


def _read(path: str) -> tuple[bytes, os.stat_result]:
    try:
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file", "create it (see INSTALL.md), or run install.sh to get an example"
        ) from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied", "the runner must be able to read it") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory", "JOBRUNNER_CONFIG names the file, jobs.toml") from None


def _parse_toml(source: bytes, path: str) -> dict[str, Any]:
    import tomllib  # only when there is no usable parsed copy: ~5 ms with typing and datetime

    try:
        return tomllib.loads(source.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        # tomllib's message already carries "(at line L, column C)".
        raise ConfigError(
            f"{path}: invalid TOML: {e}", "fix the syntax; see INSTALL.md for an example"
        ) from None


def parse_config(data: Mapping[str, Any], path: str, *, compile_patterns: bool = True) -> Config:
    """The configuration `data` (tomllib's result) describes, or a ConfigError. `compile_patterns`: check
    that each job's `args` is a valid regular expression by compiling it (~0.1 ms each); without it,
    an invalid one is only found when an argument is matched against it (Job.argument_matches)."""
    unknown = set(data) - {"runner", "jobs", "apis"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown table {_names(unknown)}",
            "the file has a [runner] table, [jobs.NAME] tables and [apis.NAME] tables",
        )
    runner = data.get("runner")
    if not isinstance(runner, dict):
        raise ConfigError(f"{path}: missing [runner] table", 'add [runner] with project = "/path/to/project"')
    _check_keys(runner, RUNNER_KEYS, f"{path}: [runner]")
    project = _runner_path(runner, "project", path, None)
    outputs = _runner_path(runner, "outputs", path, project)
    logs = _runner_path(runner, "logs", path, project)

    jobs_table = data.get("jobs", {})
    if not isinstance(jobs_table, dict):
        raise ConfigError(f"{path}: 'jobs' must be tables [jobs.NAME]", "")
    jobs = {
        name: _parse_job(name, table, path, project, compile_patterns) for name, table in jobs_table.items()
    }
    apis = _parse_apis(data.get("apis", {}), path, thorough=compile_patterns)
    _check_job_apis(jobs, apis, path)
    max_runs = runner.get("max_runs_per_user", DEFAULT_MAX_RUNS_PER_USER)
    if isinstance(max_runs, bool) or not isinstance(max_runs, int) or not 1 <= max_runs <= 1024:
        raise ConfigError(
            f"{path}: [runner]: key 'max_runs_per_user' must be a whole number from 1 to 1024", ""
        )
    return Config(
        path=path,
        project=project,
        outputs=outputs,
        logs=logs,
        jobs=jobs,
        max_runs_per_user=max_runs,
        apis=apis,
    )


def _runner_path(runner: Mapping[str, Any], key: str, path: str, project: str | None) -> str:
    where = f"{path}: [runner]"
    if key not in runner:
        if project is None:
            raise ConfigError(
                f"{where}: missing key 'project'", 'set project = "/absolute/path/of/the/project"'
            )
        return _join(project, key)  # the defaults are named like the keys: "outputs", "logs"
    value = runner[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: key '{key}' must be a non-empty string", "")
    if project is None:
        if not os.path.isabs(value):
            raise ConfigError(f"{where}: 'project' must be an absolute path, not {value!r}", "")
        return clean_path(value)
    return _join(project, value)  # an absolute value as it is


def _parse_job(name: str, table: Any, path: str, project: str, compile_patterns: bool) -> Job:
    where = f"{path}: job '{name}'"
    if not JOB_NAME.fullmatch(name):
        raise ConfigError(f"{where}: invalid job name", f"job names match {JOB_NAME.pattern}")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table [jobs.{name}]", "")
    _check_keys(table, JOB_KEYS, where)

    command = _string_list(table, "command", where, required=True)
    if not command:
        raise ConfigError(
            f"{where}: key 'command' must not be empty", 'e.g. command = ["bin/build", "--all"]'
        )
    env = _parse_env(table.get("env", {}), where)
    credentials = _string_list(table, "credentials", where)
    for cred in credentials:
        if not CREDENTIAL_NAME.fullmatch(cred):
            raise ConfigError(f"{where}: key 'credentials': invalid credential name {cred!r}", "")
    referenced = [
        v.removeprefix(CREDENTIAL_REFERENCE) for v in env.values() if v.startswith(CREDENTIAL_REFERENCE)
    ]
    for ref in referenced:
        if ref not in credentials:
            raise ConfigError(
                f"{where}: key 'env' uses credential {ref!r}, which is not in 'credentials'",
                f"add it: credentials = [{', '.join(repr(c) for c in [*credentials, ref])}]",
            )
    return Job(
        name=name,
        command=(_resolve_program(command[0], project), *command[1:]),
        description=_string(table, "description", where, ""),
        workdir=_join(project, _string(table, "workdir", where, ".")),
        timeout_s=_timeout(table, where),
        args_pattern=_args_pattern(table, where, compile_patterns),
        env=env,
        credentials=tuple(credentials),
        allowed_groups=tuple(_string_list(table, "allowed_groups", where)),
        concurrency=_concurrency(table, where),
        sandbox=_sandbox(table, where, thorough=compile_patterns),
        apis=tuple(_string_list(table, "apis", where)),
    )


def _resolve_program(program: str, project: str) -> str:
    # "bin/build" is the project's; "python3" is looked up in PATH; "/usr/bin/env" is as given.
    if "/" in program and not program.startswith("/"):
        return _join(project, program)
    return program


def _check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {quoted(key)}", f"valid keys: {', '.join(allowed)}")


def _string(table: Mapping[str, Any], key: str, where: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: key {key!r} must be a string, not {_type(value)}", "")
    return value


def _string_list(table: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> list[str]:
    if key not in table:
        if required:
            raise ConfigError(f"{where}: missing key {key!r}", 'e.g. command = ["bin/build", "--all"]')
        return []
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: key {key!r} must be a list of strings, not {_type(value)}", "")
    if any("\0" in v for v in value):
        raise ConfigError(f"{where}: key {key!r} contains a NUL character", "")
    return list(value)


def _timeout(table: Mapping[str, Any], where: str) -> float:
    value = table.get("timeout", DEFAULT_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_TIMEOUT_S:
        raise ConfigError(
            f"{where}: key 'timeout' must be a number of seconds, above 0 and at most {MAX_TIMEOUT_S:g}, "
            f"not {value!r}",
            "the unit's TimeoutStartSec= stops any run after a day anyway",
        )
    return float(value)


def _args_pattern(table: Mapping[str, Any], where: str, compile_pattern: bool) -> str | None:
    value = table.get("args", False)
    if value is False:
        return None
    if not isinstance(value, str):
        raise ConfigError(
            f"{where}: key 'args' must be false or a regular expression, not {value!r}",
            "e.g. args = '[A-Za-z0-9_.-]+' (every argument must match it in full)",
        )
    if compile_pattern:
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(f"{where}: key 'args' is not a valid regular expression: {e}", "") from None
    return value


def _parse_env(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: key 'env' must be a table of strings, not {_type(value)}", "")
    for name, v in value.items():
        if not ENV_NAME.fullmatch(name):
            raise ConfigError(f"{where}: key 'env': invalid variable name {name!r}", "")
        if name in RESERVED_ENV:
            raise ConfigError(f"{where}: key 'env': {name} is set by the runner and cannot be overridden", "")
        if not isinstance(v, str):
            raise ConfigError(f"{where}: key 'env': {name} must be a string, not {_type(v)}", "")
        if "\0" in v:
            raise ConfigError(f"{where}: key 'env': {name} contains a NUL character", "")
    return dict(value)


def _concurrency(table: Mapping[str, Any], where: str) -> Concurrency:
    value = table.get("concurrency", Concurrency.REJECT.value)
    try:
        return Concurrency(value)
    except ValueError:
        raise ConfigError(
            f"{where}: key 'concurrency' must be one of {', '.join(Concurrency)}, not {value!r}", ""
        ) from None


def _sandbox(table: Mapping[str, Any], where: str, *, thorough: bool) -> Sandbox:
    """The keys that shape the job's own units: network, memory_max, tasks_max, jit. `thorough`: parse
    every address with `ipaddress` (jobrunner check and the generator); connections trust the parsed
    copy that such a check wrote, and skip that import."""
    network, addresses = _network(table.get("network", Network.ANY.value), where, thorough)
    jit = table.get("jit", False)
    if not isinstance(jit, bool):
        raise ConfigError(f"{where}: key 'jit' must be true or false, not {_type(jit)}", "")
    return Sandbox(
        network=network,
        addresses=addresses,
        memory_max=_limit(table, "memory_max", where, MEMORY_SUFFIXES, 'e.g. memory_max = "2G"'),
        tasks_max=_limit(table, "tasks_max", where, "", "e.g. tasks_max = 256"),
        jit=jit,
    )


NETWORK_HINT = 'network = "any" (the default), "none", or a list such as ["192.0.2.10", "2001:db8::/32"]'


def _network(value: Any, where: str, thorough: bool) -> tuple[Network, tuple[str, ...]]:
    if isinstance(value, str):
        if value in (Network.ANY, Network.NONE):
            return Network(value), ()
        raise ConfigError(
            f'{where}: key \'network\' must be "any", "none" or a list of addresses', NETWORK_HINT
        )
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{where}: key 'network' must be a string or a list of strings, not {_type(value)}", ""
        )
    if not value:
        raise ConfigError(
            f"{where}: key 'network' is an empty list", 'for no network at all: network = "none"'
        )
    if thorough:
        return Network.LISTED, tuple(_ip_prefix(v, where) for v in value)
    return Network.LISTED, tuple(value)


def _ip_prefix(entry: str, where: str) -> str:
    """An address or a CIDR prefix, as systemd's IPAddressAllow= takes it (written the canonical way)."""
    import ipaddress  # jobrunner check and the generator only: connections trust the checked copy

    try:
        return str(ipaddress.ip_network(entry, strict=True))
    except ValueError as e:
        raise ConfigError(
            # ipaddress's message quotes the whole entry: "it" instead, so that quoted()'s cut holds.
            f"{where}: key 'network': {quoted(entry)} is not an IP address or prefix "
            f"({str(e).replace(repr(entry), 'it')})",
            "write addresses (192.0.2.10, 2001:db8::1) or prefixes (10.0.0.0/8), not host names: "
            "a job's firewall is set when its unit starts, before any name is resolved",
        ) from None


MEMORY_SUFFIXES = "KMGT"


def _limit(table: Mapping[str, Any], key: str, where: str, suffixes: str, example: str) -> str | None:
    """A whole number above 0 (with one of `suffixes`, or as a string), or "infinity", as systemd takes
    it; None when the key is absent (the default from install.sh applies)."""
    if key not in table:
        return None
    value = table[key]
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)
    if isinstance(value, str):
        number = value[:-1] if value[-1:] in suffixes and suffixes else value
        if value == "infinity" or (number.isdigit() and number.isascii() and int(number) > 0):
            return value
    allowed = f'a whole number above 0{" (optionally with K, M, G or T)" if suffixes else ""} or "infinity"'
    raise ConfigError(f"{where}: key {key!r} must be {allowed}", example)


def _type(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "a table" if isinstance(value, dict) else type(value).__name__
    )


def _names(names: set[str]) -> str:
    return ", ".join(repr(n) for n in sorted(names))


# --- [apis.NAME]


def _parse_apis(table: Any, path: str, *, thorough: bool) -> dict[str, Api]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'apis' must be tables [apis.NAME]", "")
    apis = {name: _parse_api(name, value, path, thorough) for name, value in table.items()}
    seen: dict[str, str] = {}
    for name in apis:
        other = seen.setdefault(api_env_name(name), name)
        if other != name:
            raise ConfigError(
                f"{path}: APIs {other!r} and {name!r} would both be ${api_env_name(name)}",
                "rename one of them ('-' and '_' are the same in the variable's name)",
            )
    return apis


def _parse_api(name: str, table: Any, path: str, thorough: bool) -> Api:
    where = f"{path}: API '{name}'"
    if not API_NAME.fullmatch(name):
        raise ConfigError(f"{where}: invalid API name", f"API names match {API_NAME.pattern}")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table [apis.{name}]", "")
    _check_keys(table, API_KEYS, where)
    for key in ("url", "credential"):
        if key not in table:
            raise ConfigError(f"{where}: missing key {key!r}", API_EXAMPLE)
    url = _string(table, "url", where, "")
    credential = _string(table, "credential", where, "")
    if not CREDENTIAL_NAME.fullmatch(credential):
        raise ConfigError(
            f"{where}: key 'credential': invalid credential name {quoted(credential)}",
            f"credential names match {CREDENTIAL_NAME.pattern}",
        )
    header = _string(table, "header", where, "Authorization")
    value = _string(table, "value", where, "Bearer " + CREDENTIAL_PLACEHOLDER)
    ca = table.get("ca")
    if ca is not None and (not isinstance(ca, str) or not ca.startswith("/")):
        raise ConfigError(
            f"{where}: key 'ca' must be an absolute path", 'e.g. ca = "/etc/jobrunner/api-ca.pem"'
        )
    timeout = table.get("timeout", 300)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ConfigError(f"{where}: key 'timeout' must be a number of seconds above 0", "the default is 300")
    if thorough:
        _check_api_url(url, where)
        _check_header(header, value, where)
        if ca is not None and not os.path.isfile(ca):
            raise ConfigError(f"{where}: key 'ca': {ca}: no such file", "a PEM file of CA certificates")
    return Api(
        name, url.rstrip("/"), credential, header, value, clean_path(ca) if ca else None, float(timeout)
    )


API_EXAMPLE = 'e.g. url = "https://api.example.com" and credential = "api-key"'
# Headers the proxy itself sets or that belong to one connection: an API's key never goes in them.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "accept-encoding",
    }
)
_TOKEN_CHARACTERS = frozenset(_LETTERS + _DIGITS + "!#$%&'*+-.^_`|~")  # RFC 9110's tchar


def _check_api_url(url: str, where: str) -> None:
    from urllib.parse import urlsplit  # jobrunner check and the generator only

    hint = "https://HOST[:PORT][/PATH], or http:// to a loopback address (http://127.0.0.1:8080)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{where}: key 'url' is not a valid URL ({e})", hint) from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{where}: key 'url' must be an https:// URL with a host, not {quoted(url)}", hint)
    if parts.username or parts.password or parts.query or parts.fragment or port == 0:
        raise ConfigError(f"{where}: key 'url' must have no user, password, query or fragment", hint)
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError(
            f"{where}: key 'url' is plain http to {parts.hostname}: "
            "the key would cross the network unencrypted",
            "use https (http is allowed to a loopback address only)",
        )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_header(header: str, value: str, where: str) -> None:
    if not header or not _TOKEN_CHARACTERS.issuperset(header) or header.lower() in RESERVED_HEADERS:
        raise ConfigError(
            f"{where}: key 'header' must be the name of an ordinary HTTP header, not {quoted(header)}",
            'e.g. header = "Authorization" or "X-Api-Key"',
        )
    if CREDENTIAL_PLACEHOLDER not in value:
        raise ConfigError(
            f"{where}: key 'value' does not contain {CREDENTIAL_PLACEHOLDER}",
            'e.g. value = "Bearer {credential}", or value = "{credential}" for the key alone',
        )
    if any(c in value for c in "\r\n\0"):
        raise ConfigError(f"{where}: key 'value' contains a line break or NUL character", "")


def _check_job_apis(jobs: Mapping[str, Job], apis: Mapping[str, Api], path: str) -> None:
    """Each job's `apis` exist; and no job holds a key that an API adds for it."""
    keys = {api.credential: api.name for api in apis.values()}
    for job in jobs.values():
        where = f"{path}: job '{job.name}'"
        for name in job.apis:
            if name not in apis:
                raise ConfigError(
                    f"{where}: key 'apis': no API {quoted(name)}",
                    f"define it as [apis.{name}]" if API_NAME.fullmatch(name) else "",
                )
            if api_env_name(name) in job.env:
                raise ConfigError(f"{where}: key 'env': {api_env_name(name)} is set by the runner", "")
        for credential in job.credentials:
            if credential in keys:
                raise ConfigError(
                    f"{where}: key 'credentials' names {credential!r}, the key of API '{keys[credential]}':"
                    " a job never holds an API's key",
                    f'remove it and list the API instead: apis = ["{keys[credential]}"]',
                )
