"""The runner's exceptions: one base with a message and a hint, one subclass per failure domain.

Each subclass carries the stable error code of the wire protocol (docs/protocol.md) and the exit status
(sysexits) that the runner process and `jobctl` use for it.
"""

from __future__ import annotations

# The shortest value `jobrunner creds set` stores (runner/creds.py): anything shorter is no key.
MIN_SECRET_BYTES = 8


_quote_in_full = False


def quote_in_full() -> None:
    """For `jobrunner check` by hand (root, at a terminal): the administrator sees the whole text."""
    global _quote_in_full  # noqa: PLW0603 - one switch for one process, set once at its start
    _quote_in_full = True


def quoted(text: str) -> str:
    """`text`, from a client or jobs.toml, for an error message that no key can redact: the front door
    holds none, and a job's unit only its own. A key pasted in the wrong place (as a job name, an op,
    a key of jobs.toml) must not come back whole, so a text as long as a key is cut to its first
    three characters."""
    if _quote_in_full or len(text) < MIN_SECRET_BYTES:
        return repr(text)
    return f"{text[:3]!r}... ({len(text)} characters)"


class RunnerError(Exception):
    """A failure that is reported to the caller as an `error` event, never as a traceback."""

    code = "internal"
    exit_status = 70  # EX_SOFTWARE

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.run_id: str | None = None  # set when the failure happened after a run had started


class RequestError(RunnerError):
    code = "bad-request"
    exit_status = 64  # EX_USAGE


class UnknownJobError(RunnerError):
    code = "unknown-job"
    exit_status = 64


class UnknownRunError(RunnerError):
    """`logs RUN_ID`: no such run, or none the caller may see (runner.history): the same answer."""

    code = "unknown-run"
    exit_status = 64


class ArgumentsError(RunnerError):
    code = "bad-arguments"
    exit_status = 64


class ForbiddenError(RunnerError):
    code = "forbidden"
    exit_status = 77  # EX_NOPERM


class BusyError(RunnerError):
    code = "busy"
    exit_status = 75  # EX_TEMPFAIL


class ConfigError(RunnerError):
    code = "config"
    exit_status = 78  # EX_CONFIG


class CredentialError(RunnerError):
    code = "credential"
    exit_status = 78


class CredentialStoreError(RunnerError):
    """`jobrunner creds`: storing, listing or removing an encrypted credential failed (an admin command,
    not part of the wire protocol). The sysexits status depends on the cause, so it is given per error."""

    code = "credential-store"

    def __init__(self, message: str, hint: str = "", *, exit_status: int = 70) -> None:
        super().__init__(message, hint)
        self.exit_status = exit_status


class ActivationError(RunnerError):
    """The runner was started some other way than by systemd (e.g. by hand)."""

    code = "activation"
    exit_status = 78


class InternalError(RunnerError):
    code = "internal"
    exit_status = 70
