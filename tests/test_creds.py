"""runner/creds.py and `jobrunner creds`: the encrypted store and drop-ins, without systemd.

The CLI runs as a subprocess against a temporary JOBRUNNER_ROOT, with fake `systemd-creds` and
`systemctl` executables first on PATH. The fakes record their argv, environment, umask and the mode of
the file they write into, so that the tests can prove the secret reached systemd-creds on stdin only.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runner import creds
from runner.errors import CredentialStoreError

REPO = Path(__file__).resolve().parents[1]
# Written out here, not imported: the paths other code depends on.
STORE = "etc/credstore.encrypted"
DROPINS = "etc/systemd/system/job@.service.d"
HOST_KEY = "5a1c6a86df9d4096b1d5a65e0862f19a"
NULL_KEY = "058469daf6f54324800549da0f8ea2fb"
MARKER = b"FAKE-ENCRYPTED:"
WARNING = "Credential secret file '/var/lib/systemd/credential.secret' is not located on encrypted media"

FAKE = """\
#!{python}
import base64, json, os, sys

here = {here!r}
prog = os.path.basename(sys.argv[0])


def option(name):
    path = os.path.join(here, name)
    return open(path).read() if os.path.exists(path) else None


umask = os.umask(0)
os.umask(umask)
record = {{"prog": prog, "argv": sys.argv, "env": dict(os.environ), "umask": umask}}
if prog == "systemd-creds":
    out = os.readlink("/proc/self/fd/1")
    record["out"] = out
    record["out_mode"] = os.fstat(1).st_mode & 0o7777
    record["dir_mode"] = os.stat(os.path.dirname(out)).st_mode & 0o7777
with open(os.path.join(here, "calls.jsonl"), "a") as log:
    log.write(json.dumps(record) + "\\n")

if prog == "systemd-creds":
    failure = option("creds-fail")
    if failure is not None:
        sys.stderr.write(failure)
        sys.exit(1)
    data = sys.stdin.buffer.read()
    header = bytes.fromhex(option("creds-header") or {host_key!r})
    sys.stdout.buffer.write(base64.b64encode(header + {marker!r} + data) + b"\\n")
    sys.stderr.write({warning!r} + ", using anyway.\\n")
elif prog == "systemctl":
    if sys.argv[1:] == ["is-system-running"]:
        state = option("systemctl-state") or "running"
        print(state)
        sys.exit(0 if state == "running" else 1)
    failure = option("reload-fail")
    if failure is not None:
        sys.stderr.write(failure)
        sys.exit(1)
"""


@dataclass
class Fakes:
    bin: Path
    root: Path

    def calls(self, prog: str | None = None) -> list[dict[str, Any]]:
        log = self.bin / "calls.jsonl"
        if not log.exists():
            return []
        records = [json.loads(line) for line in log.read_text().splitlines()]
        return [r for r in records if prog is None or r["prog"] == prog]

    def set_option(self, name: str, value: str) -> None:
        (self.bin / name).write_text(value)

    @property
    def store(self) -> Path:
        return self.root / STORE

    def dropin(self, name: str) -> Path:
        return self.root / DROPINS / f"50-credential-{name}.conf"

    def env(self, path: str | None = None) -> dict[str, str]:
        return {
            "PATH": path if path is not None else f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "JOBRUNNER_ROOT": str(self.root),
            "PYTHONPATH": str(REPO),
            "PYTHONDONTWRITEBYTECODE": "1",
            "LANG": "C.UTF-8",
        }


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    script = FAKE.format(
        python=sys.executable, here=str(fake_bin), host_key=HOST_KEY, marker=MARKER, warning=WARNING
    )
    for prog in ("systemd-creds", "systemctl"):
        (fake_bin / prog).write_text(script)
        (fake_bin / prog).chmod(0o755)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    return Fakes(fake_bin, root)


def new_secret() -> bytes:
    """Generated per run: no literal in this file looks like (or is) a real key."""
    return f"test-{secrets.token_urlsafe(24)}".encode()


def jobrunner(
    fakes: Fakes,
    *args: str,
    stdin: bytes = b"",
    path: str | None = None,
    user: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    ids: dict[str, Any] = {}
    python = sys.executable
    if user is not None:
        entry = pwd.getpwnam(user)
        # user= alone would keep root's group and supplementary groups.
        ids = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        found = python_for(ids)
        if found is None:
            pytest.skip(f"no Python 3.11+ that {user} can run (ours may live under /root)")
        python = found
    return subprocess.run(
        [python, "-m", "runner.admin", *args],
        input=stdin,
        capture_output=True,
        env=fakes.env(path),
        cwd="/",
        timeout=60,
        check=False,
        **ids,
    )


def python_for(ids: dict[str, Any]) -> str | None:
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if candidate is None:
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info >= (3, 11)"],
                capture_output=True,
                check=False,
                cwd="/",
                **ids,
            )
        except OSError:  # EACCES: it lives under /root
            continue
        if probe.returncode == 0:
            return candidate
    return None


def stored_plaintext(path: Path) -> bytes:
    """What the fake systemd-creds got on stdin, from the file it wrote."""
    blob = base64.b64decode(path.read_bytes())
    assert blob[16 : 16 + len(MARKER)] == MARKER
    return blob[16 + len(MARKER) :]


def set_ok(fakes: Fakes, name: str, secret: bytes, *extra: str) -> subprocess.CompletedProcess[bytes]:
    res = jobrunner(fakes, "creds", "set", *extra, name, stdin=secret + b"\n")
    assert res.returncode == 0, res.stderr.decode()
    return res


# -------------------------------------------------------------------------------------------- set


def test_set_passes_the_secret_on_stdin_only(fakes: Fakes) -> None:
    secret = new_secret()
    res = set_ok(fakes, "api-key", secret)

    [call] = fakes.calls("systemd-creds")
    assert call["argv"][1:] == ["encrypt", "--name=api-key", "-", "-"]
    for record in fakes.calls():
        assert not any(secret.decode() in arg for arg in record["argv"])
        assert not any(secret.decode() in value for value in record["env"].values())
        assert set(record["env"]) <= {"PATH", "LANG"}, "systemd-creds gets a minimal environment"
    # The fake wrote a transformed copy of exactly what it read on stdin (one newline stripped).
    assert stored_plaintext(fakes.store / "api-key") == secret
    assert secret not in (fakes.store / "api-key").read_bytes()
    assert secret not in res.stdout + res.stderr


def test_set_never_exposes_the_file_or_directory(fakes: Fakes) -> None:
    set_ok(fakes, "api-key", new_secret())
    [call] = fakes.calls("systemd-creds")
    # While systemd-creds wrote, its output was already a 0600 file in a 0700 directory, umask 077.
    assert call["out_mode"] == 0o600
    assert call["dir_mode"] == 0o700
    assert call["umask"] == 0o077
    assert Path(call["out"]).parent == fakes.store
    assert Path(call["out"]).name.startswith(".jobrunner-tmp-")

    st = fakes.store.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 0, 0)
    st = (fakes.store / "api-key").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
    assert sorted(p.name for p in fakes.store.iterdir()) == ["api-key"], "no temporary file is left"


def test_set_fixes_the_mode_of_an_existing_store(fakes: Fakes) -> None:
    fakes.store.mkdir(mode=0o755)
    fakes.store.chmod(0o755)
    res = set_ok(fakes, "api-key", new_secret())
    assert stat.S_IMODE(fakes.store.stat().st_mode) == 0o700
    assert f"changed the mode of {fakes.store} from 0755 to 0700" in res.stderr.decode()


def test_set_writes_the_drop_in_reloads_and_says_how_to_use_it(fakes: Fakes) -> None:
    res = set_ok(fakes, "api-key", new_secret())
    dropin = fakes.dropin("api-key")
    assert dropin.read_text() == (
        "# Written by `jobrunner creds set api-key`; removed by `jobrunner creds rm api-key`.\n"
        "[Service]\n"
        "LoadCredentialEncrypted=api-key:/etc/credstore.encrypted/api-key\n"
        "# Used by systemd only when the file above is missing, so the runner can say so (see\n"
        "# runner/credentials.py); never passed to a job as a key.\n"
        "SetCredential=api-key:jobrunner:credential-file-missing\n"
    )
    assert stat.S_IMODE(dropin.stat().st_mode) == 0o644
    assert sorted(p.name for p in dropin.parent.iterdir()) == [dropin.name]
    assert [c["argv"][1:] for c in fakes.calls("systemctl")] == [["is-system-running"], ["daemon-reload"]]
    out = res.stdout.decode()
    assert f"Stored credential 'api-key' in {fakes.store / 'api-key'}" in out
    assert str(dropin) in out
    assert 'credentials = ["api-key"]' in out
    assert "systemd reloaded" in out
    assert "encrypted by systemd-creds with the host key" in out
    # systemd-creds' own remarks are passed on as notes.
    assert f"note: systemd-creds: {WARNING}" in res.stderr.decode()


def test_set_replaces_atomically(fakes: Fakes) -> None:
    first, second = new_secret(), new_secret()
    set_ok(fakes, "api-key", first)
    inode = (fakes.store / "api-key").stat().st_ino
    res = set_ok(fakes, "api-key", second)
    assert "Replaced credential 'api-key'" in res.stdout.decode()
    assert stored_plaintext(fakes.store / "api-key") == second
    # A new file renamed over the old one, not the old one rewritten in place.
    assert (fakes.store / "api-key").stat().st_ino != inode
    assert sorted(p.name for p in fakes.store.iterdir()) == ["api-key"]


def test_failed_encryption_keeps_the_previous_value(fakes: Fakes) -> None:
    first = new_secret()
    set_ok(fakes, "api-key", first)
    fakes.set_option("creds-fail", "Failed to determine local credential host secret: Permission denied\n")
    second = new_secret()
    res = jobrunner(fakes, "creds", "set", "api-key", stdin=second)
    assert res.returncode == 69
    err = res.stderr.decode()
    assert "systemd-creds encrypt failed (exit status 1): Failed to determine local credential" in err
    assert "nothing was stored" in err
    assert second not in res.stdout + res.stderr
    assert stored_plaintext(fakes.store / "api-key") == first
    assert sorted(p.name for p in fakes.store.iterdir()) == ["api-key"]


def test_only_one_trailing_newline_is_stripped(fakes: Fakes) -> None:
    secret = new_secret()
    for stdin, expected in [
        (secret, secret),
        (secret + b"\n", secret),
        (secret + b"\n\n", secret + b"\n"),
        (secret + b"\r\n", secret + b"\r"),
        (b" " + secret + b" ", b" " + secret + b" "),
    ]:
        res = jobrunner(fakes, "creds", "set", "api-key", stdin=stdin)
        assert res.returncode == 0, res.stderr
        assert stored_plaintext(fakes.store / "api-key") == expected


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"", "the secret is empty"),
        (b"\n", "the secret is empty"),
        (b"  \t \n", "the secret is empty"),
        (b"abc", "too short: 3 bytes"),
        (b"1234567\n", "too short: 7 bytes"),
        (b"   abcdefg   \n", "too short: 7 bytes"),
        (b"x" * (1024 * 1024 + 1), "longer than systemd's limit"),
    ],
)
def test_empty_short_and_huge_secrets_are_refused(fakes: Fakes, stdin: bytes, message: str) -> None:
    res = jobrunner(fakes, "creds", "set", "api-key", stdin=stdin)
    assert res.returncode == 65
    err = res.stderr.decode()
    assert message in err
    if "short" in message:
        assert "mangle" in err, "the refusal explains why"
    assert fakes.calls() == [], "nothing was encrypted, nothing reloaded"
    assert not fakes.store.exists()
    assert not fakes.dropin("api-key").exists()


def test_eight_bytes_and_a_full_megabyte_are_accepted(fakes: Fakes) -> None:
    eight = secrets.token_hex(4).encode()
    set_ok(fakes, "short-ok", eight)
    assert stored_plaintext(fakes.store / "short-ok") == eight
    big = b"y" * (1024 * 1024)
    set_ok(fakes, "big", big)
    assert stored_plaintext(fakes.store / "big") == big


@pytest.mark.parametrize(
    "name", ["../x", "", "a b", ".", "..", "a/b", "x:y", "with\nnewline", "ä", "a" * 237, "a%i"]
)
def test_invalid_names_are_refused(fakes: Fakes, name: str) -> None:
    for action in ("set", "rm"):
        res = jobrunner(fakes, "creds", action, name, stdin=new_secret())
        assert res.returncode == 64, (action, res.stderr)
        assert "credential name" in res.stderr.decode()
    assert fakes.calls() == []
    assert not fakes.store.exists()
    assert not (fakes.root / DROPINS).exists()


def test_option_like_names_are_usage_errors(fakes: Fakes) -> None:
    res = jobrunner(fakes, "creds", "set", "--name=x", stdin=new_secret())
    assert res.returncode == 64
    assert fakes.calls() == []


@pytest.mark.parametrize("name", ["a" * 236, "A.b_c-1", "-lead", ".hidden", "x..y"])
def test_edge_names_are_accepted(fakes: Fakes, name: str) -> None:
    res = jobrunner(fakes, "creds", "set", "--", name, stdin=new_secret())
    assert res.returncode == 0, res.stderr
    assert (fakes.store / name).is_file()
    assert fakes.dropin(name).is_file()
    assert fakes.calls("systemd-creds")[0]["argv"][2] == f"--name={name}"


def test_the_key_that_sealed_it_is_read_from_the_header(fakes: Fakes) -> None:
    fakes.set_option("creds-header", "93a894094874449090caf2fc93cab553")
    res = set_ok(fakes, "tpm", new_secret())
    assert "encrypted by systemd-creds with the TPM2 and the host key" in res.stdout.decode()
    fakes.set_option("creds-header", "00" * 16)
    res = set_ok(fakes, "unknown", new_secret())
    assert "encrypted by systemd-creds (TPM2 if available, else the host key)" in res.stdout.decode()


def test_the_null_key_is_refused(fakes: Fakes) -> None:
    fakes.set_option("creds-header", NULL_KEY)
    res = jobrunner(fakes, "creds", "set", "api-key", stdin=new_secret())
    assert res.returncode == 70
    assert "null key" in res.stderr.decode()
    assert list(fakes.store.iterdir()) == []
    assert not fakes.dropin("api-key").exists()


def test_missing_systemd_creds_fails_before_reading_the_secret(fakes: Fakes, tmp_path: Path) -> None:
    only_systemctl = tmp_path / "only-systemctl"
    only_systemctl.mkdir()
    (only_systemctl / "systemctl").symlink_to(fakes.bin / "systemctl")
    res = jobrunner(fakes, "creds", "set", "api-key", stdin=new_secret(), path=str(only_systemctl))
    assert res.returncode == 69
    assert "systemd-creds not found" in res.stderr.decode()
    assert not fakes.store.exists()


def test_reload_is_skipped_with_a_warning_when_systemd_is_not_running(fakes: Fakes) -> None:
    fakes.set_option("systemctl-state", "offline")
    res = set_ok(fakes, "api-key", new_secret())
    assert "warning: systemd is not running here" in res.stderr.decode()
    assert [c["argv"][1:] for c in fakes.calls("systemctl")] == [["is-system-running"]]
    assert fakes.dropin("api-key").is_file()


def test_degraded_systemd_is_still_reloaded(fakes: Fakes) -> None:
    fakes.set_option("systemctl-state", "degraded")  # exit status 1, like "offline"
    set_ok(fakes, "api-key", new_secret())
    assert [c["argv"][1:] for c in fakes.calls("systemctl")] == [["is-system-running"], ["daemon-reload"]]


def test_no_reload(fakes: Fakes) -> None:
    res = set_ok(fakes, "api-key", new_secret(), "--no-reload")
    assert fakes.calls("systemctl") == []
    assert "--no-reload" in res.stderr.decode()


def test_failed_reload_is_an_error_that_says_the_files_are_in_place(fakes: Fakes) -> None:
    fakes.set_option("reload-fail", "Failed to reload daemon: Access denied\n")
    res = jobrunner(fakes, "creds", "set", "api-key", stdin=new_secret())
    assert res.returncode == 69
    err = res.stderr.decode()
    assert "systemctl daemon-reload failed (exit status 1): Failed to reload daemon" in err
    assert "the files are in place" in err


# ------------------------------------------------------------------------------------------- list


def test_list_shows_names_sizes_dates_and_drop_ins_never_values(fakes: Fakes) -> None:
    first, second = new_secret(), new_secret()
    set_ok(fakes, "api-key", first)
    set_ok(fakes, "other.key", second)
    before = len(fakes.calls("systemd-creds"))
    res = jobrunner(fakes, "creds", "list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "MODIFIED", "DROP-IN"]
    size = (fakes.store / "api-key").stat().st_size
    assert lines[1].split()[:2] == ["api-key", str(size)]
    assert lines[1].split()[3] == "yes"
    assert lines[2].split()[0] == "other.key"
    assert len(lines) == 3
    for secret in (first, second):
        assert secret not in res.stdout + res.stderr
    assert len(fakes.calls("systemd-creds")) == before, "list never decrypts"


def test_list_flags_orphans_and_loose_modes(fakes: Fakes) -> None:
    set_ok(fakes, "no-dropin", new_secret())
    set_ok(fakes, "no-file", new_secret())
    set_ok(fakes, "loose", new_secret())
    fakes.dropin("no-dropin").unlink()
    (fakes.store / "no-file").unlink()
    (fakes.store / "loose").chmod(0o644)
    (fakes.store / ".jobrunner-tmp-0123456789abcdef").write_bytes(b"half written")
    res = jobrunner(fakes, "creds", "list")
    assert res.returncode == 0
    rows = {line.split()[0]: line.split() for line in res.stdout.decode().splitlines()[1:]}
    assert sorted(rows) == ["loose", "no-dropin", "no-file"]
    assert rows["no-dropin"][3] == "no"
    assert rows["no-file"][1:] == ["-", "-", "yes"]
    err = res.stderr.decode()
    assert "'no-file' has a drop-in but no encrypted file" in err
    assert "'no-dropin' has no drop-in" in err
    assert "loose has mode 0644" in err


def test_list_of_an_empty_store(fakes: Fakes) -> None:
    res = jobrunner(fakes, "creds", "list")
    assert res.returncode == 0
    assert res.stdout.decode() == f"no credentials in {fakes.store}\n"


# --------------------------------------------------------------------------------------------- rm


def test_rm_removes_the_file_and_the_drop_in(fakes: Fakes) -> None:
    set_ok(fakes, "api-key", new_secret())
    set_ok(fakes, "kept", new_secret())
    res = jobrunner(fakes, "creds", "rm", "api-key")
    assert res.returncode == 0, res.stderr
    assert not (fakes.store / "api-key").exists()
    assert not fakes.dropin("api-key").exists()
    assert (fakes.store / "kept").exists()
    assert fakes.dropin("kept").exists()
    out = res.stdout.decode()
    assert f"removed {fakes.dropin('api-key')}" in out
    assert f"removed {fakes.store / 'api-key'}" in out
    assert fakes.calls("systemctl")[-1]["argv"][1:] == ["daemon-reload"]


def test_rm_of_an_unknown_name(fakes: Fakes) -> None:
    res = jobrunner(fakes, "creds", "rm", "nope")
    assert res.returncode == 66
    err = res.stderr.decode()
    assert "no credential 'nope'" in err
    assert "jobrunner creds list" in err
    assert fakes.calls() == []


def test_rm_cleans_up_half_a_credential(fakes: Fakes) -> None:
    set_ok(fakes, "api-key", new_secret())
    (fakes.store / "api-key").unlink()
    assert jobrunner(fakes, "creds", "rm", "api-key").returncode == 0
    assert not fakes.dropin("api-key").exists()


# ------------------------------------------------------------------------------------ permissions

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs the CLI as nobody: needs root")


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A JOBRUNNER_ROOT that nobody can traverse, as it can / (pytest's tmp_path is root-only)."""
    root = Path(tempfile.mkdtemp(prefix="jobrunner-creds-"))
    root.chmod(0o755)
    (root / "etc").mkdir(mode=0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root)


@needs_root
def test_set_and_rm_refuse_non_root(fakes: Fakes, shared_root: Path) -> None:
    fakes.root = shared_root
    for args in (("set", "api-key"), ("rm", "api-key")):
        res = jobrunner(fakes, "creds", *args, stdin=new_secret(), user="nobody")
        assert res.returncode == 77, res.stderr
        assert f"'jobrunner creds {args[0]}' must be run as root" in res.stderr.decode()
        assert "sudo" in res.stderr.decode()
    assert fakes.calls() == []
    assert not fakes.store.exists()


@needs_root
def test_list_as_non_root_cannot_read_the_store(fakes: Fakes, shared_root: Path) -> None:
    fakes.root = shared_root
    set_ok(fakes, "api-key", new_secret())
    res = jobrunner(fakes, "creds", "list", user="nobody")
    assert res.returncode == 77
    err = res.stderr.decode()
    assert f"cannot read {fakes.store}: permission denied" in err
    assert "root-only" in err


# ------------------------------------------------------------------------------------ a terminal


def at_terminal(fakes: Fakes, name: str, answers: list[bytes]) -> tuple[int, bytes]:
    """Run `creds set NAME` on a pseudo-terminal, answering each prompt; its exit status and screen."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its stdin, stdout and controlling terminal
        try:
            os.chdir("/")
            argv = [sys.executable, "-m", "runner.admin", "creds", "set", name]
            os.execve(sys.executable, argv, fakes.env())  # noqa: S606 (an argv, no shell: what we want)
        finally:
            os._exit(127)
    screen = b""
    try:
        for answer in answers:
            while not screen.rstrip().endswith(b":"):
                screen += os.read(fd, 1024)
            os.write(fd, answer + b"\n")
            screen += b"|"  # where we answered; the next prompt must come after it
        while True:
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(fd)
        _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), screen


def test_at_a_terminal_the_secret_is_asked_twice_without_echo(fakes: Fakes) -> None:
    secret = new_secret()
    status, screen = at_terminal(fakes, "api-key", [secret, secret])
    assert status == 0, screen
    assert screen.count(b"Secret (not echoed):") == 1
    assert screen.count(b"The same again:") == 1
    assert secret not in screen, "the terminal did not echo it"
    assert stored_plaintext(fakes.store / "api-key") == secret


def test_at_a_terminal_two_different_entries_store_nothing(fakes: Fakes) -> None:
    status, screen = at_terminal(fakes, "api-key", [new_secret(), new_secret()])
    assert status == 65
    assert b"the two entries differ" in screen
    assert fakes.calls() == []
    assert not fakes.store.exists()


# ------------------------------------------------------------------------------------ module API


def test_read_secret_from_a_terminal_asks_twice() -> None:
    secret = new_secret().decode()
    prompts: list[str] = []

    def typed(answers: list[str]) -> Any:
        def prompt(text: str) -> str:
            prompts.append(text)
            return answers.pop(0)

        return prompt

    assert creds.read_secret(None, interactive=True, prompt=typed([secret, secret])) == secret.encode()
    assert len(prompts) == 2
    with pytest.raises(CredentialStoreError, match="differ") as info:
        creds.read_secret(None, interactive=True, prompt=typed([secret, secret + "x"]))
    assert info.value.exit_status == 65
    assert secret not in info.value.message + info.value.hint

    def eof(text: str) -> str:
        raise EOFError

    with pytest.raises(CredentialStoreError, match="empty"):
        creds.read_secret(None, interactive=True, prompt=eof)


def test_store_api_with_an_explicit_root(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{fakes.bin}:{os.environ['PATH']}")
    store = creds.CredentialStore(fakes.root)
    secret = new_secret()
    result = store.store("api-key", secret)
    assert (result.path, result.dropin, result.replaced) == (
        fakes.store / "api-key",
        fakes.dropin("api-key"),
        False,
    )
    assert store.store("api-key", secret).replaced
    [listed] = store.list_credentials()
    assert (listed.name, listed.has_dropin, listed.mode) == ("api-key", True, 0o600)
    assert store.remove("api-key") == [fakes.dropin("api-key"), fakes.store / "api-key"]
    assert store.list_credentials() == []


def test_jobrunner_root_defaults_to_slash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBRUNNER_ROOT", raising=False)
    store = creds.CredentialStore.from_environment()
    assert store.directory == Path("/etc/credstore.encrypted")
    assert store.dropin("x") == Path("/etc/systemd/system/job@.service.d/50-credential-x.conf")


def test_help_lists_the_exit_statuses() -> None:
    for argv in (["--help"], ["creds", "--help"]):
        res = subprocess.run(
            [sys.executable, "-m", "runner.admin", *argv],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")},
            check=True,
        )
        for status in ("64", "65", "66", "69", "74", "77"):
            assert f"\n  {status} " in res.stdout, (argv, status)
