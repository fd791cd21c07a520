"""runner/redact.py (and runner/credentials.py, which decides what is redacted and what the job sees).

Test secrets are generated at run time; nothing shaped like a real key is stored in this file.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from runner import credentials
from runner.errors import CredentialError
from runner.redact import MASK, Redactor, encoded_forms


def token(n: int = 20) -> bytes:
    """A random secret: 2n lowercase hex characters."""
    return secrets.token_hex(n).encode()


def stream_all(redactor: Redactor, chunks: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
    """Feed the chunks to one stream; return everything emitted and what each feed emitted."""
    stream = redactor.stream()
    emitted = [stream.feed(chunk) for chunk in chunks]
    return b"".join(emitted) + stream.flush(), emitted


def splits(data: bytes, parts: int) -> list[list[bytes]]:
    """Every way to cut `data` into `parts` consecutive chunks (empty chunks included)."""
    result = []
    for cuts in itertools.combinations_with_replacement(range(len(data) + 1), parts - 1):
        bounds = [0, *cuts, len(data)]
        result.append([data[a:b] for a, b in itertools.pairwise(bounds)])
    return result


# ------------------------------------------------------------------------------- whole pieces of data


def test_a_secret_is_masked() -> None:
    secret = token()

    assert Redactor([secret]).redact(b"key=" + secret + b"\n") == b"key=***\n"


def test_every_occurrence_of_every_secret_is_masked() -> None:
    a, b = token(), token(8)
    data = b"".join([a, b" and ", b, b" ", a, a, b"\n", b])

    assert Redactor([a, b]).redact(data) == b"*** and *** ******\n***"


def test_a_secret_containing_another_is_masked_whole() -> None:
    inner = token(8)
    outer = b"postgres://app:" + inner + b"@db.internal:5432/prod"

    redactor = Redactor([inner, outer])

    assert redactor.redact(b"url " + outer + b" pw " + inner) == b"url *** pw ***"


def test_overlapping_secrets_leave_no_secret_visible() -> None:
    common = token(4)
    a = token(4) + common
    b = common + token(4)
    data = b"<" + a + b[len(common) :] + b">"  # a and b share `common`

    out = Redactor([a, b]).redact(data)

    assert a not in out
    assert b not in out
    assert out.startswith(b"<***")


def test_no_secrets_is_a_passthrough() -> None:
    data = os.urandom(64)
    redactor = Redactor([])
    stream = redactor.stream()

    assert redactor.redact(data) == data
    assert stream.feed(data) == data
    assert stream.flush() == b""


def test_empty_secrets_are_ignored() -> None:
    assert Redactor([b""]).redact(b"abc") == b"abc"


def test_redact_text() -> None:
    secret = token()

    assert Redactor([secret]).redact_text(f"naïve {secret.decode()} ✓") == "naïve *** ✓"


def test_redact_text_keeps_undecodable_bytes() -> None:
    secret = token()
    text = (b"\xff" + secret + b"\xfe").decode("utf-8", "surrogateescape")

    out = Redactor([secret]).redact_text(text)

    assert out.encode("utf-8", "surrogateescape") == b"\xff***\xfe"


# ------------------------------------------------------------------------------------------- streams


def test_a_secret_split_at_every_point_into_two_and_three_chunks() -> None:
    secret = token(6)
    data = b"a " + secret + b" b " + secret + b"\n"
    expected = b"a *** b ***\n"
    redactor = Redactor([secret])

    for parts in (2, 3):
        for chunks in splits(data, parts):
            out, _ = stream_all(redactor, chunks)
            assert out == expected, chunks


def test_several_and_overlapping_secrets_split_at_every_point() -> None:
    common = b"#" + token(2) + b"#"
    a = token(3) + common  # ends with what b starts with
    b = common + token(3)
    c = token(2)
    data = c + b"|" + a + b[len(common) :] + b"|" + b + a + b"\n" + c
    redactor = Redactor([a, b, c])
    expected = redactor.redact(data)
    assert a not in expected and b not in expected and c not in expected

    for parts in (2, 3):
        for chunks in splits(data, parts):
            out, _ = stream_all(redactor, chunks)
            assert out == expected, chunks


def test_a_secret_containing_another_split_at_every_point() -> None:
    inner = token(3)
    outer = b"u:" + inner + b"@h"
    data = b"x" + outer + b"y" + inner + b"z"
    redactor = Redactor([inner, outer])

    for parts in (2, 3):
        for chunks in splits(data, parts):
            out, _ = stream_all(redactor, chunks)
            assert out == b"x***y***z", chunks


def test_database_url_is_not_leaked_when_output_is_cut_after_the_password() -> None:
    # Two credentials, one inside the other: the password and the URL that contains it.
    password = token(12)
    url = b"postgres://app:" + password + b"@db.internal:5432/prod"
    redactor = Redactor(credentials.secret_forms(password + b"\n") + credentials.secret_forms(url + b"\n"))
    cut = len(b"DATABASE_URL=postgres://app:") + len(password)
    line = b"DATABASE_URL=" + url + b"\n"

    out, _ = stream_all(redactor, [line[:cut], line[cut:]])

    assert out == b"DATABASE_URL=***\n"
    assert b"db.internal" not in out


def test_output_that_cannot_start_a_secret_is_emitted_at_once() -> None:
    secret = token()  # hex: never starts with 'h', ' ' or '\n'
    stream = Redactor([secret]).stream()

    assert stream.feed(b"hello\n") == b"hello\n"
    assert stream.feed(b"Password: ") == b"Password: "
    assert stream.flush() == b""


def test_only_the_possible_start_of_a_secret_is_held_back() -> None:
    secret = b"!" + token()  # '!' appears nowhere else: the held-back tail is exactly the secret's start
    redactor = Redactor([secret])

    for k in range(1, len(secret)):
        stream = redactor.stream()
        assert stream.feed(b"progress " + secret[:k]) == b"progress "
        assert stream.flush() == secret[:k]  # the stream ended: it never was a secret
        assert stream.flush() == b""


def held_back_by_definition(secrets: list[bytes], data: bytes) -> int:
    """The longest suffix of `data` that is a proper prefix of a secret, trying every length."""
    lengths = [k for s in secrets for k in range(1, len(s)) if data.endswith(s[:k])]
    return max(lengths, default=0)


@given(
    secrets=st.lists(st.binary(min_size=1, max_size=12), min_size=1, max_size=4),
    data=st.binary(max_size=40),
    tail=st.integers(0, 3),
)
@example(secrets=[b"aab"], data=b"xaa", tail=0)  # the first candidate start is not the answer
@example(secrets=[b"abab"], data=b"ababab", tail=0)
@example(secrets=[b"ab", b"abcd"], data=b"xabc", tail=0)
def test_held_back_length_is_the_longest_suffix_that_starts_a_secret(
    secrets: list[bytes], data: bytes, tail: int
) -> None:
    data += secrets[0][:tail]  # often end with the start of a secret
    redactor = Redactor(secrets)
    assert redactor.held_back_length(data) == held_back_by_definition(redactor.secrets, data)


def test_held_back_bytes_come_out_with_the_next_chunk_when_no_secret_follows() -> None:
    secret = b"!" + token()
    stream = Redactor([secret]).stream()

    assert stream.feed(b"a" + secret[:5]) == b"a"
    assert stream.feed(b"X\n") == secret[:5] + b"X\n"
    assert stream.flush() == b""


def test_a_complete_secret_at_the_end_of_a_chunk_is_not_held() -> None:
    # "!" only at the start: no end of the secret can begin it again (see the test below).
    secret = b"!" + token()
    stream = Redactor([secret]).stream()

    assert stream.feed(b"k=" + secret) == b"k=***"
    assert stream.flush() == b""


def test_a_secret_whose_end_may_begin_it_again_is_held_whole() -> None:
    # Its last byte could start a second, overlapping occurrence: wait for the next bytes (or the end).
    secret = b"x" + token() + b"x"
    stream = Redactor([secret]).stream()

    assert stream.feed(b"k=" + secret) == b"k="
    assert stream.flush() == MASK


def test_streams_are_independent() -> None:
    secret = b"!" + token()
    redactor = Redactor([secret])
    stdout, stderr = redactor.stream(), redactor.stream()

    assert stdout.feed(secret[:10]) == b""
    assert stderr.feed(secret[10:]) == secret[10:]  # stderr does not complete stdout's secret
    assert stdout.feed(secret[10:]) == MASK


def test_a_secret_fed_one_byte_at_a_time() -> None:
    secret = b"!" + token()  # no end of it can begin it again, so it is not held once complete
    data = b"A" + secret + b"B"

    out, emitted = stream_all(Redactor([secret]), [data[i : i + 1] for i in range(len(data))])

    assert out == b"A***B"
    assert emitted[0] == b"A"  # not held: 'A' cannot start the secret
    assert emitted[1:-2] == [b""] * (len(secret) - 1)  # nothing of the secret comes out while it arrives
    assert emitted[-2:] == [b"***", b"B"]


ALPHABET = b"ab\n"
small = st.binary(min_size=1, max_size=6).map(lambda b: bytes(ALPHABET[x % 3] for x in b))
text = st.binary(max_size=40).map(lambda b: bytes(ALPHABET[x % 3] for x in b))


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(small, min_size=1, max_size=3), text, st.lists(st.integers(0, 40), max_size=4))
def test_stream_equals_whole_redaction_for_any_chunking(
    secret_list: list[bytes], data: bytes, cuts: list[int]
) -> None:
    # Secrets contained in other secrets are covered by the tests above; here: any other overlap.
    assume(not any(a != b and a in b for a in secret_list for b in secret_list))
    redactor = Redactor(secret_list)
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]

    out, _ = stream_all(redactor, [data[a:b] for a, b in itertools.pairwise(bounds)])

    assert out == redactor.redact(data)
    for secret in secret_list:
        assert secret not in out


# ------------------------------------------------------------------------------- runner/credentials.py


def test_load_credentials_reads_every_file_in_the_directory(tmp_path: Path) -> None:
    a, b = token() + b"\n", os.urandom(32)
    (tmp_path / "openai").write_bytes(a)
    (tmp_path / "github.token").write_bytes(b)
    (tmp_path / "subdir").mkdir()

    assert credentials.load_credentials(str(tmp_path)) == {"openai": a, "github.token": b}


def test_load_credentials_without_a_directory(tmp_path: Path) -> None:
    assert credentials.load_credentials(None) == {}
    assert credentials.load_credentials(str(tmp_path / "missing")) == {}


def test_credentials_directory_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert credentials.credentials_directory() == str(tmp_path)

    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert credentials.credentials_directory() is None


def test_require_passes_when_every_credential_is_loaded() -> None:
    loaded = {"openai": token(), "github": token()}

    credentials.require(("openai", "github"), loaded, "deploy")  # raises if refused
    credentials.require((), {}, "deploy")  # raises if refused


def test_require_names_the_missing_credential_and_the_fix() -> None:
    with pytest.raises(CredentialError) as info:
        credentials.require(("openai", "github"), {"openai": token()}, "deploy")

    error = info.value
    assert "'github'" in error.message
    assert "deploy" in error.message
    assert "jobrunner creds set github" in error.hint
    assert error.code == "credential"
    assert error.exit_status == 78


def test_secret_forms_drop_the_trailing_newline() -> None:
    value = token()

    assert credentials.secret_forms(value + b"\n") == [value]
    assert credentials.secret_forms(value + b"\r\n") == [value]
    assert credentials.secret_forms(value) == [value]
    assert credentials.secret_forms(b"\n") == []
    assert credentials.secret_forms(b"") == []


def test_a_printed_credential_keeps_its_newline_after_redaction() -> None:
    value = token()
    redactor = Redactor(credentials.secret_forms(value + b"\n"))

    out, _ = stream_all(redactor, [b"key: " + value + b"\nnext line\n"])

    assert out == b"key: ***\nnext line\n"


def test_env_value_drops_the_trailing_newline_only() -> None:
    value = token()

    assert credentials.env_value(value + b"\n") == value.decode()
    assert credentials.env_value(value + b"\r\n") == value.decode()
    assert credentials.env_value(b"  " + value + b" \n") == "  " + value.decode() + " "


def test_env_value_keeps_bytes_that_are_not_utf8() -> None:
    value = b"\xff" + token() + b"\xfe"

    assert os.fsencode(credentials.env_value(value + b"\n")) == value


def test_the_environment_form_of_a_credential_is_always_redacted() -> None:
    value = b" " + token() + b" \n"
    redactor = Redactor(credentials.secret_forms(value))

    printed = credentials.env_value(value).encode()  # what the job sees, and may print

    assert redactor.redact(printed) == b" *** "


# --- encoded forms (issue: hostile conditions, "secrets")


def secret_span(name: str, before: bytes, secret: bytes) -> tuple[int, int]:
    """The characters of `name`'s encoding of before + secret + after that depend on the secret alone:
    the first, and the last plus one. base64 packs 6 bits a character, so a character at either end
    may mix the key's first or last bits with its neighbours': that one is not the key's alone."""
    import urllib.parse

    if name in ("base64", "urlsafe base64"):
        start_bit, end_bit = 8 * len(before), 8 * (len(before) + len(secret))
        return -(-start_bit // 6), end_bit // 6
    if name in ("hex", "HEX"):
        return 2 * len(before), 2 * (len(before) + len(secret))
    start = len(urllib.parse.quote(before, safe=""))  # url: a byte is one character or three, alone
    return start, start + len(urllib.parse.quote(secret, safe=""))


@pytest.mark.parametrize("length", [8, 9, 10, 24, 40, 41, 42])
def test_encoded_forms_catch_the_key_in_every_common_encoding_and_alignment(length: int) -> None:
    import base64
    import binascii
    import urllib.parse

    secret = os.urandom(length)
    redactor = Redactor([secret, *encoded_forms(secret)])
    for before in (b"", b"a", b"ab", b"abc"):
        for after in (b"", b"z", b"yz", b"\n"):
            blob = before + secret + after
            encodings = {
                "base64": base64.b64encode(blob),
                "urlsafe base64": base64.urlsafe_b64encode(blob),
                "hex": binascii.hexlify(blob),
                "HEX": binascii.hexlify(blob).upper(),
                "url": urllib.parse.quote(blob, safe="").encode(),
                "url, lower-case escapes": re.sub(
                    "%[0-9A-F]{2}", lambda m: m.group().lower(), urllib.parse.quote(blob, safe="")
                ).encode(),
            }
            for name, encoded in encodings.items():
                redacted = redactor.redact(encoded)
                where = (name, before, after, redacted)
                # One mask, and around it only what the encoding of the neighbours holds: every
                # character that depends on the key alone is gone, so nothing of it can be decoded back
                # (a mask over only part of the key's characters fails here).
                assert redacted.count(b"***") == 1, where
                left, right = redacted.split(b"***")
                assert encoded.startswith(left) and encoded.endswith(right), where
                start, end = secret_span(name.split(",")[0], before, secret)
                assert len(left) <= start and len(encoded) - len(right) >= end, where


def test_encoded_forms_skip_fragments_too_short_to_redact_safely() -> None:
    assert all(len(form) >= 8 for form in encoded_forms(b"abcdefgh"))
    assert b"abcdefgh" not in encoded_forms(b"abcdefgh")  # the plain form is the caller's
