"""Redaction: every loaded credential value becomes `***` in whatever the runner sends or writes.

Output arrives in chunks, so a secret can straddle two reads. A `StreamRedactor` holds back only the
longest tail of a chunk that could still be the start of a secret, so ordinary output (a prompt, a
progress line) is never delayed waiting for bytes that may not come.
"""

from __future__ import annotations

import binascii
import re

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

MASK = b"***"
MIN_ENCODED_LENGTH = 8  # shorter fragments of an encoding would mangle ordinary output
URL_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def encoded_forms(secret: bytes) -> set[bytes]:
    """What a secret looks like printed through the common encodings, so those are redacted too:
    hex (lower and upper case), base64 and URL-safe base64 (at each of the three byte alignments it
    can have inside a longer encoded text: only the characters that depend on the secret alone), and
    URL percent-encoding (both hex cases). Not covered: other encodings, encryption, compression,
    or a secret printed piece by piece in a changed order."""
    forms = {binascii.hexlify(secret), binascii.hexlify(secret).upper()}
    for alignment in range(3):
        standard = binascii.b2a_base64(bytes(alignment) + secret, newline=False).rstrip(b"=")
        # Characters that mix in the zero padding before the secret, or whatever follows it, vary.
        start = (alignment * 4 + 2) // 3
        end = len(standard) - (1 if (alignment + len(secret)) % 3 else 0)
        core = standard[start:end]
        forms |= {core, core.replace(b"+", b"-").replace(b"/", b"_")}
    for escape in (b"%%%02X", b"%%%02x"):
        forms.add(b"".join(bytes([c]) if c in URL_UNRESERVED else escape % c for c in secret))
    forms.discard(secret)
    return {form for form in forms if len(form) >= MIN_ENCODED_LENGTH}


class Redactor:
    """Replaces a fixed set of secret byte strings; shared by all the streams of a run."""

    def __init__(self, secrets: Iterable[bytes]) -> None:
        # Longest first, so that a secret containing another is replaced whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._compiled: re.Pattern[bytes] | None = None

    def _pattern(self) -> re.Pattern[bytes]:
        # Compiled on first need: an alternation of a dozen escaped forms costs ~1 ms to compile, and
        # most runs never print a secret (the `in` checks below say so without it).
        if self._compiled is None:
            self._compiled = re.compile(b"|".join(re.escape(s) for s in self.secrets))
        return self._compiled

    def contains_secret(self, data: bytes) -> bool:
        # `in` is a fast substring search; the regex runs only on the rare data that holds a secret.
        return any(secret in data for secret in self.secrets)

    def redact(self, data: bytes) -> bytes:
        """Redact a complete piece of data (a message, a header line)."""
        return self._pattern().sub(MASK, data) if self.contains_secret(data) else data

    def finditer(self, data: bytes) -> Iterator[re.Match[bytes]]:
        return self._pattern().finditer(data) if self.contains_secret(data) else iter(())

    def redact_text(self, text: str) -> str:
        return self.redact(text.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)

    def held_back_length(self, data: bytes) -> int:
        """Length of the longest suffix of `data` that is a proper prefix of some secret.

        Runs on every chunk of output, so it looks only where such a suffix can start: at an occurrence
        of the secret's first byte among the last len(secret) - 1 bytes (usually none or one), rather
        than trying each of those lengths in turn (~30 us a chunk with a dozen encoded forms)."""
        longest = 0
        end = len(data)
        for secret in self.secrets:
            first = secret[0]
            start = data.find(first, max(end - len(secret) + 1, 0))
            while start != -1 and end - start > longest:
                if secret.startswith(data[start:]):
                    longest = end - start
                    break
                start = data.find(first, start + 1)
        return longest


class StreamRedactor:
    """Redacts one output stream chunk by chunk."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        """Return the redacted bytes that are safe to emit now."""
        redactor = self._redactor
        if not redactor.secrets:
            return chunk
        data = self._carry + chunk if self._carry else chunk
        # Hold back the tail that may still grow into a secret (even one that contains a shorter secret
        # that already matched: "postgres://app:PASS" may yet become the whole DATABASE_URL).
        cut = len(data) - redactor.held_back_length(data)
        found = redactor.contains_secret(data)
        if found:
            for match in redactor.finditer(data):
                if match.start() < cut < match.end():
                    cut = match.start()  # never emit part of a secret: keep the whole match for later
                    break
        if cut == len(data) and not found:
            self._carry = b""
            return data  # the usual case, without copying the chunk into a slice of itself
        self._carry = data[cut:]
        return redactor.redact(data[:cut]) if found else data[:cut]

    def flush(self) -> bytes:
        """The held-back tail at the end of the stream, redacted (it may hold a short secret whole)."""
        rest, self._carry = self._carry, b""
        return self._redactor.redact(rest)
