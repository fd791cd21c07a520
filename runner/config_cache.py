"""A parsed copy of jobs.toml, so that connections need not import tomllib.

tomllib pulls in `typing`, `datetime` and `string` and compiles its regular expressions: about 5 ms of
every connection, the largest single cost of the runner's start-up. `jobrunner check` (as root: run by
jobrunner-config.service whenever jobs.toml changes, and by install.sh) stores what tomllib made of the
file, with `marshal` (built in: nothing to import), next to the exact bytes it parsed. The runner uses
the copy only when those bytes equal the file's current content, so a stale, missing or unreadable copy
costs time, never correctness: the runner then parses the file itself.

Whoever can write the copy decides what jobs run, so it is trusted only when it is a regular file owned
by the configuration file's owner (root) and writable by nobody else; `/var/cache/jobrunner` is read-only
inside job@.service (ProtectSystem=strict) and root's outside it.
"""

from __future__ import annotations

import marshal
import os
import stat
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms on every connection)
if TYPE_CHECKING:
    from typing import Any

DEFAULT_CACHE_PATH = "/var/cache/jobrunner/jobs.toml.marshal"
CACHE_ENV = "JOBRUNNER_CONFIG_CACHE"  # tests and staging; empty: no cache
# marshal's format may change between Python versions: a copy from another version is not used.
FORMAT = ("jobrunner-config-cache", 1, sys.version_info[:2])


def cache_path(config_path: str, default_config_path: str) -> str | None:
    """Where the copy of `config_path` lives: `$JOBRUNNER_CONFIG_CACHE` if set, else the default location
    for the default configuration file only (a file named with JOBRUNNER_CONFIG has no copy)."""
    if CACHE_ENV in os.environ:
        return os.environ[CACHE_ENV] or None
    return DEFAULT_CACHE_PATH if config_path == default_config_path else None


def lookup(path: str, source: bytes, owner_uid: int) -> dict[str, Any] | None:
    """tomllib's result for `source`, from the copy at `path`; None when there is no usable copy."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner_uid or st.st_mode & 0o022:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            content = f.read()
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        # S302: only a root-owned copy that nobody else can write gets here (checked above).
        form, cached_source, parsed = marshal.loads(content)  # noqa: S302
    except (EOFError, ValueError, TypeError):
        return None
    if form != FORMAT or cached_source != source or not isinstance(parsed, dict):
        return None
    return parsed


def store(path: str, source: bytes, parsed: dict[str, Any], mode: int) -> None:
    """Write the copy atomically (a reader sees the old copy or the new one, never half of one), with
    the configuration file's permission bits (`mode`) less any write access for others.

    Raises OSError when the directory cannot be written, ValueError when the parsed file holds a value
    marshal cannot store (TOML dates and times, which no key of jobs.toml takes)."""
    data = marshal.dumps((FORMAT, source, parsed))
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, stat.S_IMODE(mode) & 0o644)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
        os.fchmod(fd, stat.S_IMODE(mode) & 0o644)  # what the umask took away from the mode above
        os.rename(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    finally:
        os.close(fd)
