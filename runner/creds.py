"""The encrypted credential store behind `jobrunner creds`.

A credential NAME is one file, relative to `$JOBRUNNER_ROOT` (default "/"; tests point it elsewhere):

    /etc/credstore.encrypted/NAME     the value, encrypted by systemd-creds; directory 0700, file 0600,
                                      root's

Which units load it is up to jobs.toml: the units of each job that names it in `credentials` carry
LoadCredentialEncrypted=NAME:<that file> (runner/units.py), and no other unit does. Earlier versions
loaded every credential into every run with a drop-in, job@.service.d/50-credential-NAME.conf (a
"legacy drop-in" here): `creds set` and `rm` remove it, and install.sh removes them all.

The plaintext travels only through a pipe into `systemd-creds encrypt --name=NAME - -`, whose output goes
straight into a 0600 file created here and then renamed into place: never a plaintext file, never argv,
never an environment. Nothing here ever decrypts.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import os
import re
import secrets
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from runner.config import CREDENTIAL_NAME
from runner.errors import MIN_SECRET_BYTES as SHORTEST_KEY
from runner.errors import CredentialStoreError

# sysexits(3)
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_IOERR = 74
EX_NOPERM = 77

CREDSTORE = PurePosixPath("/etc/credstore.encrypted")
DROPIN_DIR = PurePosixPath("/etc/systemd/system/job@.service.d")
DROPIN_PREFIX = "50-credential-"
DROPIN_SUFFIX = ".conf"
# The drop-in's file name must fit in NAME_MAX (255) too, which leaves 236 characters for NAME.
MAX_NAME_LENGTH = 255  # a file name, and what jobs.toml accepts
# A legacy drop-in's file name had to fit in NAME_MAX too: no longer name has one.
LEGACY_MAX_NAME_LENGTH = 255 - len(DROPIN_PREFIX) - len(DROPIN_SUFFIX)
# Half-written files (ours): not credentials, and not *.conf, so systemd never reads a half-written drop-in.
TMP_PREFIX = ".jobrunner-tmp-"

# The runner redacts every credential value (stripped of surrounding whitespace) from all output: a value
# this short would also match ordinary words and numbers and mangle the output of every job.
MIN_SECRET_BYTES = SHORTEST_KEY  # runner.errors.quoted() relies on it
MAX_SECRET_BYTES = 1024 * 1024  # systemd's CREDENTIAL_SIZE_MAX

ENCRYPT_TIMEOUT_S = 120.0  # a TPM2 can take seconds; a hung one must not hang us
SYSTEMCTL_TIMEOUT_S = 120.0
FALLBACK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The first 16 bytes of an encrypted credential name the key that sealed it (systemd's creds-util.h), so
# the file itself tells which key `--with-key=auto` (the default) chose: no TPM2 probing needed.
KEY_TYPES = {
    "5a1c6a86df9d4096b1d5a65e0862f19a": "the host key (/var/lib/systemd/credential.secret; no TPM2 found)",
    "93a894094874449090caf2fc93cab553": "the TPM2 and the host key",
    "0c7cc07b117645919c4b0bea08bc20fe": "the TPM2 only",
    "af4950a849134eb1a73846304ff30c05": "the TPM2 (signed PCR policy) and the host key",
    "faf7eb9341e3412ca1a436f95a29362f": "the TPM2 only (signed PCR policy)",
}
NULL_KEY = "058469daf6f54324800549da0f8ea2fb"
# The same keys as `creds list` names them, in systemd-creds' own words (its --with-key= values).
KEY_NAMES = {
    "5a1c6a86df9d4096b1d5a65e0862f19a": "host",
    "93a894094874449090caf2fc93cab553": "host+tpm2",
    "0c7cc07b117645919c4b0bea08bc20fe": "tpm2",
    "af4950a849134eb1a73846304ff30c05": "host+tpm2-with-public-key",
    "faf7eb9341e3412ca1a436f95a29362f": "tpm2-with-public-key",
    NULL_KEY: "null",
}


@dataclass(frozen=True, slots=True)
class StoredCredential:
    """One credential as `creds list` shows it: never its value."""

    name: str
    size: int | None  # of the encrypted file; None: only the drop-in exists
    modified: float | None  # the encrypted file's mtime
    mode: int | None  # the encrypted file's permission bits
    has_dropin: bool  # a legacy drop-in loads it into every unit of job@.service
    key: str = ""  # the id of the key that sealed it, from the file's header ("" if unreadable)


@dataclass(frozen=True, slots=True)
class StoreResult:
    name: str
    path: Path
    replaced: bool
    key: str  # how it was encrypted, as a phrase: "systemd-creds with the host key (...)"
    notes: tuple[str, ...]  # worth telling the administrator, not failures


_NAME_HINT = f"use 1 to {MAX_NAME_LENGTH} of the characters A-Z a-z 0-9 _ . - (not '.' or '..'), e.g. api-key"


def check_name(name: str) -> str:
    """A credential name valid for systemd (a file name and an fd name) and for jobs.toml."""
    if not name:
        raise CredentialStoreError("the credential name is empty", _NAME_HINT, exit_status=EX_USAGE)
    if name in (".", "..") or not CREDENTIAL_NAME.fullmatch(name):
        raise CredentialStoreError(f"invalid credential name {name!r}", _NAME_HINT, exit_status=EX_USAGE)
    if len(name) > MAX_NAME_LENGTH:
        raise CredentialStoreError(
            f"credential name too long ({len(name)} characters)",
            f"at most {MAX_NAME_LENGTH}, a file name's limit",
            exit_status=EX_USAGE,
        )
    if name.startswith(TMP_PREFIX):
        raise CredentialStoreError(
            f"invalid credential name {name!r}",
            f"names starting with {TMP_PREFIX!r} are reserved",
            exit_status=EX_USAGE,
        )
    return name


def read_secret(
    stdin: BinaryIO | None, *, interactive: bool, prompt: Callable[[str], str] = getpass.getpass
) -> bytes:
    """The secret from a pipe (one trailing newline dropped) or, at a terminal, typed twice without echo."""
    if interactive:
        try:
            first = prompt("Secret (not echoed): ")
            second = prompt("The same again: ")
        except EOFError:
            first = second = ""
        if first != second:
            raise CredentialStoreError(
                "the two entries differ", "nothing was stored; run the command again", exit_status=EX_DATAERR
            )
        return check_secret(first.encode("utf-8", "surrogateescape"))
    if stdin is None:
        raise CredentialStoreError(
            "no standard input to read the secret from",
            "pipe it in, e.g. jobrunner creds set NAME < keyfile",
            exit_status=EX_USAGE,
        )
    # One byte over the limit, plus the newline we strip, tells "too long" from "just fits".
    data = stdin.read(MAX_SECRET_BYTES + 2)
    return check_secret(data[:-1] if data.endswith(b"\n") else data)


def check_secret(secret: bytes) -> bytes:
    """Refuse values the runner could not use or redact safely; return `secret` unchanged."""
    if not secret.strip():
        raise CredentialStoreError(
            "the secret is empty", "nothing was stored; pipe in or type the API key", exit_status=EX_DATAERR
        )
    if len(secret) > MAX_SECRET_BYTES:
        raise CredentialStoreError(
            f"the secret is longer than systemd's limit of {MAX_SECRET_BYTES} bytes",
            "nothing was stored",
            exit_status=EX_DATAERR,
        )
    length = len(secret.strip())
    if length < MIN_SECRET_BYTES:
        raise CredentialStoreError(
            f"the secret is too short: {length} bytes, at least {MIN_SECRET_BYTES} are required",
            "nothing was stored. The runner removes every credential value from all job output; a value "
            "this short would also match ordinary text and mangle it. Use the real key (surrounding "
            "whitespace does not count)",
            exit_status=EX_DATAERR,
        )
    return secret


def require_root(command: str) -> None:
    if os.geteuid() != 0:
        raise CredentialStoreError(
            f"'{command}' must be run as root",
            f"sudo {command} (the credential store is root-only)",
            exit_status=EX_NOPERM,
        )


def require_program(program: str) -> None:
    if shutil.which(program, path=_env()["PATH"]) is None:
        raise CredentialStoreError(
            f"{program} not found", "jobrunner needs systemd 252 or later", exit_status=EX_UNAVAILABLE
        )


class CredentialStore:
    """The credential store and drop-ins under `root` ("/" in production)."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self.directory = root / CREDSTORE.relative_to("/")
        self.dropin_dir = root / DROPIN_DIR.relative_to("/")

    @classmethod
    def from_environment(cls) -> CredentialStore:
        return cls(Path(os.environ.get("JOBRUNNER_ROOT") or "/").absolute())

    def path(self, name: str) -> Path:
        return self.directory / check_name(name)

    def dropin(self, name: str) -> Path:
        return self.dropin_dir / f"{DROPIN_PREFIX}{check_name(name)}{DROPIN_SUFFIX}"

    # ---------------------------------------------------------------------------------------- set

    def store(self, name: str, secret: bytes) -> StoreResult:
        """Encrypt `secret` as credential `name` (replacing any previous value) and write its drop-in."""
        path = self.path(name)
        check_secret(secret)
        notes = self._ensure_directory()
        replaced = path.exists()
        tmp = self.directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            notes += self._encrypt(name, secret, tmp)
            key = _key_used(tmp)
            if key == NULL_KEY:
                raise CredentialStoreError(
                    "systemd-creds sealed the credential with the null key: it would not be confidential",
                    "nothing was stored; check that /var/lib/systemd/credential.secret can be created",
                    exit_status=EX_SOFTWARE,
                )
            os.replace(tmp, path)
        except OSError as e:
            raise _io_error(e, path) from None
        finally:
            _unlink_quietly(tmp)
        _fsync_directory(self.directory)
        if self.remove_legacy_dropin(name):
            notes.append(f"removed {self.dropin(name)}: it loaded '{name}' into every run of every job")
        return StoreResult(name, path, replaced, describe_key(key), tuple(notes))

    def _ensure_directory(self) -> list[str]:
        """The store exists, as a directory only root can enter (systemd-creds does not see to that)."""
        directory = self.directory
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            st = os.stat(directory)
            if not stat.S_ISDIR(st.st_mode):
                raise CredentialStoreError(
                    f"{directory} exists and is not a directory", "move it away", exit_status=EX_IOERR
                )
            notes = []
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(directory, 0o700)
                notes.append(f"changed the mode of {directory} from {stat.S_IMODE(st.st_mode):04o} to 0700")
            if (st.st_uid, st.st_gid) != (0, 0) and os.geteuid() == 0:
                os.chown(directory, 0, 0)
                notes.append(f"changed the owner of {directory} to root:root")
        except OSError as e:
            raise _io_error(e, directory) from None
        return notes

    def _encrypt(self, name: str, secret: bytes, tmp: Path) -> list[str]:
        """`systemd-creds encrypt`, the secret on its stdin, its output into the new 0600 file `tmp`."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever our umask
            argv = ["systemd-creds", "encrypt", f"--name={name}", "-", "-"]
            res = _spawn(argv, input=secret, stdout=fd, timeout=ENCRYPT_TIMEOUT_S)
            # Its messages are about keys and files, but make sure none can carry the value.
            said = res.stderr.replace(secret, b"[secret]").decode("utf-8", "replace").strip()
            if res.returncode != 0:
                raise CredentialStoreError(
                    f"systemd-creds encrypt failed ({_status(res.returncode)})"
                    + (f": {said}" if said else ""),
                    "nothing was stored",
                    exit_status=EX_UNAVAILABLE,
                )
            os.fsync(fd)
            if os.fstat(fd).st_size == 0:
                raise CredentialStoreError(
                    "systemd-creds encrypt succeeded but wrote nothing", "nothing was stored"
                )
        finally:
            os.close(fd)
        return [f"systemd-creds: {line}" for line in said.splitlines() if line.strip()]

    def remove_legacy_dropin(self, name: str) -> bool:
        """Remove job@.service.d/50-credential-NAME.conf if there is one (see the module's docstring)."""
        if len(name) > LEGACY_MAX_NAME_LENGTH:
            return False
        try:
            self.dropin(name).unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise _io_error(e, self.dropin(name)) from None
        return True

    # --------------------------------------------------------------------------------------- list

    def list_credentials(self) -> list[StoredCredential]:
        """Every stored credential and every drop-in of ours, by name; files are only stat()ed."""
        files: dict[str, os.stat_result] = {}
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if not entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
                        files[entry.name] = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            pass
        except PermissionError:
            raise CredentialStoreError(
                f"cannot read {self.directory}: permission denied",
                "the credential store is root-only (mode 0700): sudo jobrunner creds list",
                exit_status=EX_NOPERM,
            ) from None
        except OSError as e:
            raise _io_error(e, self.directory) from None
        dropins: set[str] = set()
        pattern = re.compile(re.escape(DROPIN_PREFIX) + r"(.+)" + re.escape(DROPIN_SUFFIX))
        try:
            with os.scandir(self.dropin_dir) as entries:
                for entry in entries:
                    match = pattern.fullmatch(entry.name)
                    if match:
                        dropins.add(match.group(1))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _io_error(e, self.dropin_dir) from None
        return [
            StoredCredential(
                name=name,
                size=files[name].st_size if name in files else None,
                modified=files[name].st_mtime if name in files else None,
                mode=stat.S_IMODE(files[name].st_mode) if name in files else None,
                has_dropin=name in dropins,
                key=self._key_of(name) if name in files else "",
            )
            for name in sorted(files.keys() | dropins)
        ]

    def _key_of(self, name: str) -> str:
        try:
            return _key_used(self.directory / name)
        except OSError:
            return ""

    # ----------------------------------------------------------------------------------------- rm

    def remove(self, name: str) -> list[Path]:
        """Remove a legacy drop-in (first: systemd must not hear of a file that is gone), then the file."""
        removed: list[Path] = []
        legacy = [self.dropin(name)] if len(check_name(name)) <= LEGACY_MAX_NAME_LENGTH else []
        for path in (*legacy, self.path(name)):
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise _io_error(e, path) from None
        if not removed:
            raise CredentialStoreError(
                f"no credential {name!r}",
                "see the stored ones with: jobrunner creds list",
                exit_status=EX_NOINPUT,
            )
        return removed


def describe_key(key_id: str) -> str:
    if key_id in KEY_TYPES:
        return f"systemd-creds with {KEY_TYPES[key_id]}"
    return "systemd-creds (TPM2 if available, else the host key)"


def key_name(key_id: str) -> str:
    """The key that sealed a credential, as `creds list` shows it: host, host+tpm2, tpm2, ... or "?"."""
    return KEY_NAMES.get(key_id, "?")


def _key_used(path: Path) -> str:
    """The id of the key type in an encrypted credential's header, as hex ("" if unreadable)."""
    with path.open("rb") as f:
        head = b"".join(f.read(256).split())[:24]  # base64 of the first 18 bytes
    try:
        return base64.b64decode(head, validate=True)[:16].hex()
    except (binascii.Error, ValueError):
        return ""


def _spawn(
    argv: list[str], *, input: bytes | None = None, stdout: int = subprocess.PIPE, timeout: float
) -> subprocess.CompletedProcess[bytes]:
    """The one place this module starts programs: argv only, a minimal environment, umask 077."""
    try:
        return subprocess.run(
            argv,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=_env(),
            umask=0o077,
            start_new_session=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise CredentialStoreError(
            f"{argv[0]} not found",
            "jobrunner needs systemd 252 or later (Debian: apt install systemd)",
            exit_status=EX_UNAVAILABLE,
        ) from None
    except subprocess.TimeoutExpired:
        raise CredentialStoreError(
            f"{argv[0]} {argv[1]} did not finish within {timeout:g} s",
            "nothing was stored" if argv[0] == "systemd-creds" else "",
            exit_status=EX_UNAVAILABLE,
        ) from None


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH") or FALLBACK_PATH, "LANG": "C.UTF-8"}


def _status(returncode: int) -> str:
    return f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"


def _io_error(e: OSError, path: Path) -> CredentialStoreError:
    where = e.filename or path
    if isinstance(e, PermissionError):
        return CredentialStoreError(
            f"{where}: permission denied", "run as root (sudo)", exit_status=EX_NOPERM
        )
    return CredentialStoreError(f"{where}: {e.strerror or e}", "", exit_status=EX_IOERR)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a crash must not bring back the old value or lose the new)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
