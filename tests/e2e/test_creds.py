"""`jobrunner creds` against the real systemd-creds and systemd (252 on bookworm, 257 on trixie).

The CLI runs from the read-only repository at /src, as root (or as nobody, to be refused). Every test uses
its own credential names, since the container is shared by the session, and removes what it stored.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from .container import Container

pytestmark = pytest.mark.e2e

STORE = "/etc/credstore.encrypted"
DROPINS = "/etc/systemd/system/job@.service.d"


def jobrunner(
    ct: Container, *args: str, stdin: bytes | None = None, user: str | None = None
) -> tuple[int, str, str]:
    res = ct.run(
        ["python3", "-m", "runner.admin", *args],
        input=stdin,
        user=user,
        check=False,
        env={"PYTHONPATH": "/src", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    return res.returncode, res.stdout.decode(), res.stderr.decode()


def new_secret() -> bytes:
    return f"e2e-{secrets.token_urlsafe(24)}".encode()


def stat(ct: Container, path: str) -> str:
    return ct.run(["stat", "-c", "%a %U %G %F", path]).stdout.decode().strip()


def exists(ct: Container, path: str) -> bool:
    return ct.run(["test", "-e", path], check=False).returncode == 0


@pytest.fixture
def name(container: Container) -> Iterator[str]:
    """A credential name no other test uses; whatever is left of it is removed afterwards."""
    cred = f"e2e-creds-{secrets.token_hex(4)}"
    yield cred
    container.run(["rm", "-f", f"{STORE}/{cred}", f"{DROPINS}/50-credential-{cred}.conf"])
    container.run(["systemctl", "daemon-reload"])


def decrypt_in_service(ct: Container, cred: str, *properties: str) -> bytes:
    """What a DynamicUser= service with `properties` finds in $CREDENTIALS_DIRECTORY/cred."""
    res = ct.run(
        ["systemd-run", "--wait", "--pipe", "--quiet", "--collect", "-p", "DynamicUser=yes", *properties,
         "sh", "-c", f'cat "$CREDENTIALS_DIRECTORY/{cred}"'],
    )  # fmt: skip
    return res.stdout


def test_set_encrypts_into_a_root_only_store_that_services_can_use(container: Container, name: str) -> None:
    secret = new_secret()
    status, out, err = jobrunner(container, "creds", "set", name, stdin=secret + b"\n")
    assert status == 0, err
    path = f"{STORE}/{name}"
    dropin = f"{DROPINS}/50-credential-{name}.conf"
    assert f"Stored credential '{name}' in {path}" in out
    # No TPM2 in the container: systemd-creds' auto mode picks the host key, and the header says so.
    assert "encrypted by systemd-creds with the host key" in out
    # No job names it: nothing loads it, and the output says how to give it to a job.
    assert "No job uses it yet" in out and f'credentials = ["{name}"]' in out
    assert not exists(container, dropin)
    assert secret.decode() not in out + err

    assert stat(container, STORE) == "700 root root directory"
    assert stat(container, path) == "600 root root regular file"
    assert secret not in container.run(["cat", path]).stdout
    # Decrypted by systemd for a service: exactly the value, one trailing newline stripped.
    assert decrypt_in_service(container, name, "-p", f"LoadCredentialEncrypted={name}:{path}") == secret
    # The name sealed into the file is checked on decryption: it must be NAME, not the temporary name.
    other = container.run(
        ["systemd-run", "--wait", "--pipe", "--quiet", "--collect", "-p", "DynamicUser=yes",
         "-p", f"LoadCredentialEncrypted=other-name:{path}", "true"],
        check=False,
    )  # fmt: skip
    assert other.returncode == 243, other  # 243/CREDENTIALS: "Embedded credential name ... does not match"
    # No temporary file left behind.
    listing = container.run(["ls", "-A", STORE]).stdout.decode().split()
    assert not [f for f in listing if f.startswith(".jobrunner-tmp-")]


def test_set_and_rm_remove_a_legacy_drop_in(container: Container, name: str) -> None:
    # Before one unit per job, `creds set` wrote a drop-in of job@.service that loaded the credential
    # into every run: set (and rm) take it away, so that only the jobs that name it load it.
    dropin = f"{DROPINS}/50-credential-{name}.conf"
    legacy = f"[Service]\nLoadCredentialEncrypted={name}:{STORE}/{name}\n"
    container.run(["sh", "-c", f"mkdir -p {DROPINS} && cat > {dropin}"], input=legacy.encode())
    status, _, err = jobrunner(container, "creds", "set", name, stdin=new_secret())
    assert status == 0, err
    assert f"removed {dropin}" in err
    assert not exists(container, dropin)
    container.run(["sh", "-c", f"cat > {dropin}"], input=legacy.encode())
    status, _, err = jobrunner(container, "creds", "rm", name)
    assert status == 0, err
    assert not exists(container, dropin) and not exists(container, f"{STORE}/{name}")


def test_replace_then_list_then_rm(container: Container, name: str) -> None:
    first, second = new_secret(), new_secret()
    assert jobrunner(container, "creds", "set", name, stdin=first)[0] == 0
    status, out, err = jobrunner(container, "creds", "set", name, stdin=second)
    assert status == 0, err
    assert f"Replaced credential '{name}'" in out
    path = f"{STORE}/{name}"
    assert decrypt_in_service(container, name, "-p", f"LoadCredentialEncrypted={name}:{path}") == second

    status, out, err = jobrunner(container, "creds", "list")
    assert status == 0, err
    [row] = [line.split() for line in out.splitlines() if line.split()[:1] == [name]]
    size = container.run(["stat", "-c", "%s", path]).stdout.decode().strip()
    assert row[1] == size
    assert row[3] == "host"  # the key that sealed it: a container has no TPM2
    assert row[4] == "-"  # no job uses it
    for secret in (first, second):
        assert secret.decode() not in out + err

    status, out, err = jobrunner(container, "creds", "rm", name)
    assert status == 0, err
    assert f"removed {path}" in out
    assert not exists(container, path)
    assert not exists(container, f"{DROPINS}/50-credential-{name}.conf")
    status, out, _ = jobrunner(container, "creds", "list")
    assert name not in out

    status, _, err = jobrunner(container, "creds", "rm", name)
    assert status == 66
    assert f"no credential '{name}'" in err
    assert "jobrunner creds list" in err


def test_non_root_is_refused_with_77(container: Container, name: str) -> None:
    assert jobrunner(container, "creds", "set", name, stdin=new_secret())[0] == 0
    for args in (("set", name), ("rm", name)):
        status, out, err = jobrunner(container, "creds", *args, stdin=new_secret(), user="nobody")
        assert status == 77, err
        assert f"'jobrunner creds {args[0]}' must be run as root" in err
        assert "Traceback" not in err
    status, out, err = jobrunner(container, "creds", "list", user="nobody")
    assert status == 77, err
    assert f"cannot read {STORE}: permission denied" in err
    assert out == ""
    # The credential is untouched, and nobody cannot read it directly either.
    assert exists(container, f"{STORE}/{name}")
    assert container.run(["cat", f"{STORE}/{name}"], user="nobody", check=False).returncode != 0


def test_short_and_empty_keys_are_refused_with_65(container: Container, name: str) -> None:
    for stdin in (b"", b"\n", b"short\n", b"1234567"):
        status, _, err = jobrunner(container, "creds", "set", name, stdin=stdin)
        assert status == 65, (stdin, err)
        assert ("too short" in err) or ("empty" in err)
    assert not exists(container, f"{STORE}/{name}")
    assert not exists(container, f"{DROPINS}/50-credential-{name}.conf")


def test_invalid_name_is_refused_with_64(container: Container) -> None:
    for bad in ("../escape", "a b", "x:y"):
        status, _, err = jobrunner(container, "creds", "set", bad, stdin=new_secret())
        assert status == 64, err
        assert "invalid credential name" in err
    assert not exists(container, "/etc/escape")
