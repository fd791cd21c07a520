"""runner/creds.py and `jobrunner creds`: the encrypted store, without systemd.

The CLI runs as a subprocess against a temporary JOBRUNNER_ROOT and JOBRUNNER_CONFIG, with fake
`systemd-creds` and `systemctl` executables first on PATH. The fakes record their argv, environment,
umask and the mode of the file they write into, so that the tests can prove the secret reached
systemd-creds on stdin only (and that nothing calls systemctl: which units load a credential is up to
jobs.toml and the generator now, not a drop-in per credential).

Earlier versions wrote job@.service.d/50-credential-NAME.conf for each credential, which loaded it into
every run of every job: `creds set` and `rm` remove such a "legacy drop-in" (tests write them by hand).
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
    sys.stderr.write("the fake systemctl was called\\n")
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

    @property
    def config(self) -> Path:
        """The JOBRUNNER_CONFIG of the CLI: absent until a test writes it (write_jobs)."""
        return self.bin.parent / "jobs.toml"

    def dropin(self, name: str) -> Path:
        return self.root / DROPINS / f"50-credential-{name}.conf"

    def write_legacy_dropin(self, name: str) -> Path:
        """The drop-in that `creds set` of earlier versions wrote (with its text of then)."""
        dropin = self.dropin(name)
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(
            f"# Written by `jobrunner creds set {name}`; removed by `jobrunner creds rm {name}`.\n"
            "[Service]\n"
            f"LoadCredentialEncrypted={name}:/etc/credstore.encrypted/{name}\n"
            f"SetCredential={name}:jobrunner:credential-file-missing\n"
        )
        return dropin

    def write_jobs(self, credentials: dict[str, list[str]]) -> Path:
        """A jobs.toml with a job for each entry of `credentials`, naming those credentials."""
        text = f'[runner]\nproject = "{self.bin.parent / "project"}"\n'
        for job, names in credentials.items():
            text += f'\n[jobs.{job}]\ncommand = ["/bin/true"]\ncredentials = {json.dumps(names)}\n'
        self.config.write_text(text)
        return self.config

    def env(self, path: str | None = None) -> dict[str, str]:
        return {
            "PATH": path if path is not None else f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "JOBRUNNER_ROOT": str(self.root),
            "JOBRUNNER_CONFIG": str(self.config),
            "JOBRUNNER_CONFIG_CACHE": "",
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


def test_set_writes_no_drop_in_reloads_nothing_and_says_how_to_use_it(fakes: Fakes) -> None:
    res = set_ok(fakes, "api-key", new_secret())
    assert not (fakes.root / DROPINS).exists(), "which units load it is up to jobs.toml"
    assert sorted(p.relative_to(fakes.root).as_posix() for p in fakes.root.rglob("*")) == [
        "etc",
        "etc/credstore.encrypted",
        "etc/credstore.encrypted/api-key",
    ]
    assert fakes.calls("systemctl") == []
    out = res.stdout.decode()
    assert f"Stored credential 'api-key' in {fakes.store / 'api-key'}" in out
    assert "encrypted by systemd-creds with the host key" in out
    # No job names it yet (there is no jobs.toml at all): how to use it.
    assert f"No job uses it yet. In {fakes.config}, either give it to a job (its table):" in out
    assert 'credentials = ["api-key"]' in out
    assert 'credential = "api-key"' in out  # or an API's key, which jobs never see
    assert "drop-in" not in out + res.stderr.decode()
    assert "reload" not in out + res.stderr.decode()
    # systemd-creds' own remarks are passed on as notes.
    assert f"note: systemd-creds: {WARNING}" in res.stderr.decode()


def test_set_says_which_jobs_use_it(fakes: Fakes) -> None:
    fakes.write_jobs({"build": ["api-key"], "lint": [], "deploy": ["other", "api-key"]})
    res = set_ok(fakes, "api-key", new_secret())
    out = res.stdout.decode()
    assert "  used by: build, deploy (from their next run on)\n" in out
    assert "No job uses it yet" not in out
    assert "credentials = [" not in out


def test_set_and_list_say_which_api_uses_it(fakes: Fakes) -> None:
    fakes.write_jobs({"build": ["other"]})
    with fakes.config.open("a") as f:
        f.write('\n[apis.llm]\nurl = "https://x"\ncredential = "llm-key"\n')
        f.write('\n[jobs.summarize]\ncommand = ["/bin/true"]\napis = ["llm"]\n')
    out = set_ok(fakes, "llm-key", new_secret()).stdout.decode()
    assert "  used by: API llm (summarize) (from their next run on)\n" in out
    assert "credentials = [" not in out  # not a hint that jobs.toml would refuse


def test_set_removes_a_legacy_drop_in_and_only_its_own(fakes: Fakes) -> None:
    legacy = fakes.write_legacy_dropin("api-key")
    other = fakes.write_legacy_dropin("other")
    (legacy.parent / "10-install.conf").write_text("[Service]\n")  # install.sh's, not ours
    res = set_ok(fakes, "api-key", new_secret())
    assert not legacy.exists()
    assert sorted(p.name for p in legacy.parent.iterdir()) == ["10-install.conf", other.name]
    assert f"note: removed {legacy}: it loaded 'api-key' into every run of every job" in res.stderr.decode()
    assert fakes.calls("systemctl") == []
    # Once gone, a second set has nothing to say about it.
    res = set_ok(fakes, "api-key", new_secret())
    assert "removed" not in res.stderr.decode()


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
    legacy = fakes.write_legacy_dropin("api-key")  # nothing changes, not even that
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
    assert legacy.is_file()


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
    "name", ["../x", "", "a b", ".", "..", "a/b", "x:y", "with\nnewline", "ä", "a" * 256, "a%i"]
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
    # The longest name is the longest whose legacy drop-in's file name fits in 255: set removes it.
    legacy = fakes.write_legacy_dropin(name)
    res = jobrunner(fakes, "creds", "set", "--", name, stdin=new_secret())
    assert res.returncode == 0, res.stderr
    assert (fakes.store / name).is_file()
    assert not legacy.exists()
    assert list(legacy.parent.iterdir()) == []
    assert fakes.calls("systemd-creds")[0]["argv"][2] == f"--name={name}"


def test_the_key_that_sealed_it_is_read_from_the_header(fakes: Fakes) -> None:
    fakes.set_option("creds-header", "93a894094874449090caf2fc93cab553")
    res = set_ok(fakes, "tpm", new_secret())
    assert "encrypted by systemd-creds with the TPM2 and the host key" in res.stdout.decode()
    fakes.set_option("creds-header", "00" * 16)
    res = set_ok(fakes, "unknown", new_secret())
    assert "encrypted by systemd-creds (TPM2 if available, else the host key)" in res.stdout.decode()


def test_list_says_which_key_sealed_each_credential(fakes: Fakes) -> None:
    for name, header in (("bound", "93a894094874449090caf2fc93cab553"), ("host-only", HOST_KEY),
                         ("tpm-only", "0c7cc07b117645919c4b0bea08bc20fe"), ("unknown", "00" * 16)):  # fmt: skip
        fakes.set_option("creds-header", header)
        set_ok(fakes, name, new_secret())
    fakes.write_legacy_dropin("only-dropin")
    rows = listed(jobrunner(fakes, "creds", "list"))
    assert {name: row[3] for name, row in rows.items()} == {
        "bound": "host+tpm2", "host-only": "host", "tpm-only": "tpm2", "unknown": "?", "only-dropin": "-",
    }  # fmt: skip


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


def test_no_reload_is_still_accepted_and_changes_nothing(fakes: Fakes) -> None:
    """Scripts written for the versions that ran `systemctl daemon-reload` after set and rm."""
    fakes.write_jobs({"build": ["api-key"]})
    res = set_ok(fakes, "api-key", new_secret(), "--no-reload")
    assert (fakes.store / "api-key").is_file()
    assert "used by: build" in res.stdout.decode()
    assert "--no-reload" not in res.stderr.decode()
    res = jobrunner(fakes, "creds", "rm", "--no-reload", "api-key")
    assert res.returncode == 0, res.stderr
    assert not (fakes.store / "api-key").exists()
    assert fakes.calls("systemctl") == []


# ------------------------------------------------------------------------------------------- list


def listed(res: subprocess.CompletedProcess[bytes]) -> dict[str, list[str]]:
    """`creds list`'s rows by name: [SIZE, MODIFIED, JOBS, KEY] (JOBS as printed, "a, b" or "-")."""
    lines = res.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "MODIFIED", "KEY", "JOBS"]
    rows = [line.split(maxsplit=4) for line in lines[1:]]
    return {name: [size, modified, jobs, key] for name, size, modified, key, jobs in rows}


def test_list_shows_names_sizes_dates_and_jobs_never_values(fakes: Fakes) -> None:
    first, second = new_secret(), new_secret()
    set_ok(fakes, "api-key", first)
    set_ok(fakes, "other.key", second)
    fakes.write_jobs({"build": ["api-key"], "lint": [], "deploy": ["other.key", "api-key"]})
    before = len(fakes.calls("systemd-creds"))
    res = jobrunner(fakes, "creds", "list")
    assert res.returncode == 0, res.stderr
    rows = listed(res)
    assert list(rows) == ["api-key", "other.key"]
    size = (fakes.store / "api-key").stat().st_size
    assert rows["api-key"][0] == str(size)
    assert rows["api-key"][2] == "build, deploy"
    assert rows["other.key"][2] == "deploy"
    assert res.stderr == b"", "every credential is used, every job's credentials are stored"
    for secret in (first, second):
        assert secret not in res.stdout + res.stderr
    assert len(fakes.calls("systemd-creds")) == before, "list never decrypts"
    assert fakes.calls("systemctl") == []


def test_list_notes_unused_credentials_and_warns_of_unstored_ones(fakes: Fakes) -> None:
    set_ok(fakes, "used", new_secret())
    set_ok(fakes, "spare", new_secret())
    fakes.write_jobs({"build": ["used", "missing"], "deploy": ["missing"], "lint": []})
    res = jobrunner(fakes, "creds", "list")
    assert res.returncode == 0, res.stderr
    rows = listed(res)
    assert list(rows) == ["spare", "used"], "a credential that is not stored has no row"
    assert rows["spare"][2] == "-"
    assert rows["used"][2] == "build"
    err = res.stderr.decode()
    assert "note: no job uses 'spare' (no `credentials` or [apis.*] in jobs.toml names it)" in err
    assert "'used'" not in err
    assert "warning: job(s) build, deploy name credential 'missing', which is not stored" in err


def test_list_without_a_jobs_toml_shows_no_jobs(fakes: Fakes) -> None:
    set_ok(fakes, "api-key", new_secret())
    assert not fakes.config.exists()
    res = jobrunner(fakes, "creds", "list")
    assert res.returncode == 0, res.stderr
    assert listed(res)["api-key"][2] == "-"


def test_list_flags_legacy_drop_ins_and_loose_modes(fakes: Fakes) -> None:
    set_ok(fakes, "legacy", new_secret())
    set_ok(fakes, "loose", new_secret())
    fakes.write_legacy_dropin("legacy")
    only_dropin = fakes.write_legacy_dropin("only-dropin")
    (fakes.store / "loose").chmod(0o644)
    (fakes.store / ".jobrunner-tmp-0123456789abcdef").write_bytes(b"half written")
    (only_dropin.parent / "10-install.conf").write_text("[Service]\n")  # not a credential's
    fakes.write_jobs({"build": ["legacy", "loose"]})
    res = jobrunner(fakes, "creds", "list")
    assert res.returncode == 0
    rows = listed(res)
    assert sorted(rows) == ["legacy", "loose", "only-dropin"]
    assert rows["only-dropin"] == ["-", "-", "-", "-"]
    assert rows["legacy"][2] == "build"
    err = res.stderr.decode()
    assert (
        "warning: 'only-dropin' has a legacy drop-in but no encrypted file: `jobrunner creds rm only-dropin`"
        in err
    )
    assert (
        f"warning: 'legacy' has a legacy drop-in ({fakes.dropin('legacy')}) that loads it into every run: "
        "`sudo jobrunner creds set legacy` or install.sh removes it"
    ) in err
    assert "'loose' has a legacy drop-in" not in err
    assert f"warning: {fakes.store / 'loose'} has mode 0644" in err


def test_list_of_an_empty_store(fakes: Fakes) -> None:
    res = jobrunner(fakes, "creds", "list")
    assert res.returncode == 0
    assert res.stdout.decode() == f"no credentials in {fakes.store}\n"


# --------------------------------------------------------------------------------------------- rm


def test_rm_removes_the_file(fakes: Fakes) -> None:
    set_ok(fakes, "api-key", new_secret())
    set_ok(fakes, "kept", new_secret())
    res = jobrunner(fakes, "creds", "rm", "api-key")
    assert res.returncode == 0, res.stderr
    assert not (fakes.store / "api-key").exists()
    assert (fakes.store / "kept").exists()
    assert res.stdout.decode() == f"removed {fakes.store / 'api-key'}\n"
    assert res.stderr == b"", "no job names it: nothing to warn about"
    assert fakes.calls("systemctl") == []


def test_rm_removes_a_legacy_drop_in_too(fakes: Fakes) -> None:
    set_ok(fakes, "api-key", new_secret())
    set_ok(fakes, "kept", new_secret())
    legacy = fakes.write_legacy_dropin("api-key")
    kept = fakes.write_legacy_dropin("kept")
    res = jobrunner(fakes, "creds", "rm", "api-key")
    assert res.returncode == 0, res.stderr
    assert not legacy.exists()
    assert not (fakes.store / "api-key").exists()
    assert kept.exists()
    assert (fakes.store / "kept").exists()
    # The drop-in first: it must never name a file that is already gone.
    assert res.stdout.decode() == f"removed {legacy}\nremoved {fakes.store / 'api-key'}\n"


def test_rm_of_an_unknown_name(fakes: Fakes) -> None:
    res = jobrunner(fakes, "creds", "rm", "nope")
    assert res.returncode == 66
    err = res.stderr.decode()
    assert "no credential 'nope'" in err
    assert "jobrunner creds list" in err
    assert fakes.calls() == []


def test_rm_of_a_name_with_only_a_legacy_drop_in(fakes: Fakes) -> None:
    legacy = fakes.write_legacy_dropin("api-key")
    res = jobrunner(fakes, "creds", "rm", "api-key")
    assert res.returncode == 0, res.stderr
    assert not legacy.exists()
    assert res.stdout.decode() == f"removed {legacy}\n"
    assert jobrunner(fakes, "creds", "rm", "api-key").returncode == 66, "now it is gone"


def test_rm_warns_about_the_jobs_that_still_name_it(fakes: Fakes) -> None:
    set_ok(fakes, "api-key", new_secret())
    fakes.write_jobs({"build": ["api-key"], "lint": ["other"], "deploy": ["api-key"]})
    res = jobrunner(fakes, "creds", "rm", "api-key")
    assert res.returncode == 0, res.stderr
    assert not (fakes.store / "api-key").exists()
    err = res.stderr.decode()
    assert f"warning: job(s) build, deploy still name 'api-key' in {fakes.config}" in err
    assert "lint" not in err
    assert "other jobs are not affected" in err


def test_check_marks_the_credentials_that_are_not_stored(fakes: Fakes) -> None:
    set_ok(fakes, "stored", new_secret())
    fakes.write_jobs({"build": ["stored", "missing"], "lint": []})
    res = jobrunner(fakes, "check", "--no-reload")
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode()
    assert "build" in out
    assert "credentials: stored, missing (NOT STORED)" in out
    assert "units: job-build.socket, job-build@.service, job@build.service" in out
    assert "units: job-lint.socket, job-lint@.service, job@lint.service" in out
    err = res.stderr.decode()
    assert "job 'build' names credential 'missing', which is not stored" in err
    assert "sudo jobrunner creds set missing" in err
    assert "'stored'" not in err
    assert fakes.calls("systemctl") == []


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
    assert (result.path, result.replaced) == (fakes.store / "api-key", False)
    assert result.notes == (f"systemd-creds: {WARNING}, using anyway.",)
    assert not fakes.dropin("api-key").exists()
    legacy = fakes.write_legacy_dropin("api-key")
    [listed] = store.list_credentials()
    assert (listed.name, listed.has_dropin, listed.mode) == ("api-key", True, 0o600)
    result = store.store("api-key", secret)
    assert result.replaced
    assert result.notes[1:] == (f"removed {legacy}: it loaded 'api-key' into every run of every job",)
    [listed] = store.list_credentials()
    assert (listed.name, listed.has_dropin, listed.mode) == ("api-key", False, 0o600)
    assert store.remove("api-key") == [fakes.store / "api-key"]
    assert store.list_credentials() == []
    with pytest.raises(CredentialStoreError, match="no credential 'api-key'") as info:
        store.remove("api-key")
    assert info.value.exit_status == 66


def test_remove_legacy_dropin(fakes: Fakes) -> None:
    store = creds.CredentialStore(fakes.root)
    assert not store.remove_legacy_dropin("api-key"), "none there: not an error"
    legacy = fakes.write_legacy_dropin("api-key")
    other = fakes.write_legacy_dropin("other")
    assert store.dropin("api-key") == legacy
    assert store.remove_legacy_dropin("api-key")
    assert not legacy.exists()
    assert other.exists()
    assert not store.remove_legacy_dropin("api-key")
    with pytest.raises(CredentialStoreError):
        store.remove_legacy_dropin("../x")


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


def test_list_with_an_invalid_jobs_toml_says_it_cannot_tell(fakes: Fakes) -> None:
    # Not "no job uses it": the file could not be read, so jobrunner does not know.
    set_ok(fakes, "api-key", new_secret())
    fakes.config.write_text("[runner\n")
    res = jobrunner(fakes, "creds", "list")
    assert res.returncode == 0, res.stderr
    assert listed(res)["api-key"][2] == "?"
    err = res.stderr.decode()
    assert f"cannot read {fakes.config}" in err and "no job uses" not in err


def test_names_as_long_as_jobs_toml_allows_are_stored_and_removed(fakes: Fakes) -> None:
    # 255 characters: a file name's limit, and jobs.toml's; too long for a legacy drop-in, so none is looked for.
    name = "b" * 255
    res = jobrunner(fakes, "creds", "set", name, stdin=new_secret())
    assert res.returncode == 0, res.stderr
    assert (fakes.store / name).is_file()
    res = jobrunner(fakes, "creds", "rm", name)
    assert res.returncode == 0, res.stderr
    assert not (fakes.store / name).exists()
