"""The credential store: modes and owners, that each credential decrypts (to /dev/null), its key
and expiry date, who uses it, and those named but not stored."""

from __future__ import annotations

import os
import stat
from datetime import datetime
from pathlib import Path

from runner import creds
from runner.config import Config
from runner.doctor.base import (
    SYSTEMCTL_TIMEOUT_S,
    Context,
    Finding,
    group_name,
    ok,
    problem,
    user_name,
    warning,
)

EXPIRY_WARNING_S = 14 * 86400
FAR_FUTURE_S = 100 * 365 * 86400  # a credential still valid then has no expiry date worth the name
EXPIRY_PRECISION_S = 3600
DECRYPT_TIMEOUT_S = 60.0  # a TPM2 can take seconds
HOST_KEY_ONLY = "5a1c6a86df9d4096b1d5a65e0862f19a"  # runner.creds.KEY_TYPES: the host key, no TPM2
HOST_KEY_NOTE = "not located on encrypted media"  # systemd-creds' warning on every use of the host key


def credential_users(config: Config) -> dict[str, list[str]]:
    """credential name -> the jobs and APIs that name it."""
    users: dict[str, list[str]] = {}
    for job in config.jobs.values():
        for name in job.credentials:
            users.setdefault(name, []).append(f"job '{job.name}'")
    for api in config.apis.values():
        users.setdefault(api.credential, []).append(f"API '{api.name}'")
    return users


def check_credentials(ctx: Context) -> list[Finding]:
    config = ctx.config()
    store = creds.CredentialStore.from_environment()
    findings = store_directory_findings(store.directory)
    listed = store.list_credentials()
    stored = [c for c in listed if c.size is not None]
    users = credential_users(config)
    tpm2 = ctx.run(["systemd-creds", "has-tpm2"], SYSTEMCTL_TIMEOUT_S).returncode == 0
    for cred in stored:
        findings += credential_findings(
            ctx, store.directory / cred.name, cred.name, users.get(cred.name), tpm2
        )
    for cred in listed:
        if cred.has_dropin:
            findings.append(
                problem(
                    f"a legacy drop-in loads '{cred.name}' into every run: {store.dropin_dir}",
                    f"sudo jobrunner creds set {cred.name} (or run install.sh again): it removes the drop-in",
                )
            )
    for name in sorted(set(users) - {c.name for c in stored}):
        findings.append(
            problem(
                f"'{name}' is not stored, but {', '.join(users[name])} name(s) it: their runs fail",
                f"sudo jobrunner creds set {name}, or remove it from jobs.toml",
            )
        )
    return findings or [ok(f"no credentials stored in {store.directory}, and no job or API names one")]


def store_directory_findings(directory: Path) -> list[Finding]:
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return []
    issues = mode_issues(st, 0o700, directory=True)
    if issues:
        return [
            problem(
                f"{directory}: {'; '.join(issues)}", f"chown root:root {directory}; chmod 0700 {directory}"
            )
        ]
    return []


def mode_issues(st: os.stat_result, mode: int, *, directory: bool) -> list[str]:
    """What is wrong with a root-only file or directory (`mode` is what install.sh makes it)."""
    issues = []
    if directory and not stat.S_ISDIR(st.st_mode):
        issues.append("not a directory")
    if not directory and not stat.S_ISREG(st.st_mode):
        issues.append("not a regular file")
    if st.st_uid != 0 or st.st_gid != 0:
        issues.append(f"owned by {user_name(st.st_uid)}:{group_name(st.st_gid)}, not root:root")
    if stat.S_IMODE(st.st_mode) & 0o077:
        issues.append(f"mode {stat.S_IMODE(st.st_mode):04o}, not {mode:04o}: others can read it")
    return issues


def credential_findings(
    ctx: Context, path: Path, name: str, users: list[str] | None, tpm2: bool
) -> list[Finding]:
    """The credential's own line (does it decrypt, with which key, until when, for whom), then its issues."""
    key = creds._key_used(path)  # the file's header names the key that sealed it
    decrypts, reason = decrypt(ctx, path, name)
    used = f"used by {', '.join(users)}" if users else "used by no job or API"
    if not decrypts:
        what = "it has expired" if expired(reason) else reason
        findings = [
            problem(
                f"'{name}' does not decrypt: {what}; {used}",
                f"store it again: sudo jobrunner creds set {name}",
            )
        ]
    else:
        until, soon = expiry(ctx, path, name)
        findings = [ok(f"'{name}': decrypts; sealed with {describe(key)}; {until}; {used}")]
        if soon:
            findings.append(
                warning(f"'{name}' {until}", f"store a new value: sudo jobrunner creds set {name}")
            )
    findings += file_findings(path, name)
    findings += key_findings(name, key, tpm2)
    if not users:
        findings.append(
            warning(
                f"'{name}' is stored, but no job's credentials and no [apis.NAME] name it",
                f"remove it (sudo jobrunner creds rm {name}), or name it in jobs.toml",
            )
        )
    return findings


def file_findings(path: Path, name: str) -> list[Finding]:
    issues = mode_issues(os.lstat(path), 0o600, directory=False)
    if not issues:
        return []
    return [problem(f"'{name}' ({path}): {'; '.join(issues)}", f"chown root:root {path}; chmod 0600 {path}")]


def key_findings(name: str, key: str, tpm2: bool) -> list[Finding]:
    if key == creds.NULL_KEY:
        return [
            problem(
                f"'{name}' is sealed with the null key: anyone can decrypt it",
                f"sudo jobrunner creds set {name}",
            )
        ]
    if tpm2 and key == HOST_KEY_ONLY:
        return [
            warning(
                f"'{name}' is sealed with the host key only, though this host has a TPM2",
                f"store it again (sudo jobrunner creds set {name}): it is then bound to the TPM2 too",
            )
        ]
    return []


def describe(key: str) -> str:
    return creds.KEY_TYPES.get(key, "an unknown key")


def decrypt(ctx: Context, path: Path, name: str, at: float | None = None) -> tuple[bool, str]:
    """Whether systemd-creds decrypts the credential (as of `at`: --timestamp=), and why not. Its output,
    the value, goes to /dev/null."""
    argv = ["systemd-creds", "decrypt", f"--name={name}"]
    if at is not None:
        argv.append(f"--timestamp=@{int(at)}")
    res = ctx.run([*argv, str(path), "-"], DECRYPT_TIMEOUT_S, discard_output=True)
    lines = [line for line in res.stderr.splitlines() if line.strip() and HOST_KEY_NOTE not in line]
    return res.returncode == 0, " ".join(lines)[:300] or f"exit status {res.returncode}"


def expired(reason: str) -> bool:
    return "time passed" in reason  # systemd-creds: "Credential's time passed, refusing to use."


def expiry(ctx: Context, path: Path, name: str) -> tuple[str, bool]:
    """When the credential expires, in words, and whether that is within EXPIRY_WARNING_S. The file does
    not say (its not-after date is encrypted, and systemd-creds has no command that shows it): decrypting
    as of a later time (--timestamp=) does, bisected to the hour."""
    now = ctx.now()
    soon = now + EXPIRY_WARNING_S
    valid_then, reason = decrypt(ctx, path, name, soon)
    low, high = (soon, now + FAR_FUTURE_S) if valid_then else (now, soon)
    if valid_then:
        valid, reason = decrypt(ctx, path, name, high)
        if valid:
            return "no expiry date", False
    if not expired(reason):
        return f"expiry date unknown ({reason})", False
    when = bisect_expiry(ctx, path, name, low, high)
    if when is None:
        return "expiry date unknown", False
    return f"expires around {when_words(when)}", not valid_then


def bisect_expiry(ctx: Context, path: Path, name: str, low: float, high: float) -> float | None:
    """The time the credential expires, within EXPIRY_PRECISION_S: valid at `low`, expired at `high`."""
    while high - low > EXPIRY_PRECISION_S:
        middle = (low + high) / 2
        valid, reason = decrypt(ctx, path, name, middle)
        if valid:
            low = middle
        elif expired(reason):
            high = middle
        else:
            return None
    return high


def when_words(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:00 %Z")
