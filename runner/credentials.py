"""Credentials that systemd loaded for this unit (LoadCredentialEncrypted=), read from $CREDENTIALS_DIRECTORY.

The runner never decrypts anything itself: systemd hands it the plaintext in a private, non-swappable
directory that only this unit's user can read, and removes it when the unit stops.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from runner.errors import CredentialError

# `jobrunner creds set` pairs each LoadCredentialEncrypted= with SetCredential=NAME:<this>, which
# systemd uses instead when the encrypted file is missing: the run then starts and can say so,
# where it would otherwise fail before the runner could tell the client anything. (A corrupt or
# expired file still fails the unit: systemd falls back only for a missing one.)
UNAVAILABLE = b"jobrunner:credential-file-missing"


def credentials_directory() -> str | None:
    return os.environ.get("CREDENTIALS_DIRECTORY") or None


def load_credentials(directory: str | None) -> dict[str, bytes]:
    """Every credential the unit loaded, by name (all of them are redacted, used by the job or not)."""
    if directory is None:
        return {}
    creds = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return {}
    for entry in entries:
        if entry.is_file():
            with open(entry.path, "rb") as f:
                value = f.read()
            if value != UNAVAILABLE:
                creds[entry.name] = value
    return creds


def require(names: tuple[str, ...], loaded: Mapping[str, bytes], job: str) -> None:
    for name in names:
        if name not in loaded and _fallback_in_use(name):
            raise CredentialError(
                f"job '{job}' needs credential {name!r}, but its encrypted file is missing",
                f"store it again as root: jobrunner creds set {name}",
            )
        if name not in loaded:
            raise CredentialError(
                f"job '{job}' needs credential {name!r}, which the unit did not load",
                f"store it as root: jobrunner creds set {name}  (it adds LoadCredentialEncrypted={name})",
            )


def secret_forms(value: bytes) -> list[bytes]:
    """The byte strings to redact for one credential: its value without surrounding whitespace
    (`echo KEY | systemd-creds encrypt` stores a trailing newline, which is no secret: redacting it
    would swallow the newline after every printed key)."""
    stripped = value.strip()
    return [stripped] if stripped else []


def env_value(value: bytes) -> str:
    """A credential as an environment variable value: trailing newline dropped."""
    return value.rstrip(b"\r\n").decode("utf-8", "surrogateescape")


def _fallback_in_use(name: str) -> bool:
    directory = credentials_directory()
    if directory is None:
        return False
    try:
        with open(os.path.join(directory, name), "rb") as f:
            return f.read() == UNAVAILABLE
    except OSError:
        return False
