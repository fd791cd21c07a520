"""Coverage-guided fuzzing of the request parser with atheris (issue 4, "Bad input").

    pip install atheris
    python3 tests/fuzz/atheris_protocol.py -atheris_runs=200000
    python3 tests/fuzz/atheris_protocol.py -atheris_runs=200000 --keep-going   # list every finding

Drives runner.protocol.parse_request and guess_form with raw bytes, checking the properties of
tests/test_fuzz_protocol.py: every input parses to a Request with a valid job name and at most 1024
valid arguments without NUL, or raises a RunnerError with a short message whose error reply is one
well-formed line in both forms; guess_form never fails and agrees with the request's form.

Without a corpus directory argument it starts from a small seed corpus and a dictionary of protocol
tokens, in a temporary directory /tmp/jobrunner-fuzz-*/ (where crash-* files go too, unless
-artifact_prefix= says otherwise). By default the first finding stops the run and libFuzzer saves the
input as crash-*; with --keep-going each distinct finding is printed once, the run goes on, and it
ends with a summary (exit status 1 if anything was found).
Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import atheris

with atheris.instrument_imports():
    import shlex  # noqa: F401  (instrumented: text requests are split with it)

    from runner.protocol import Form, guess_form

from tests.test_fuzz_protocol import HOSTILE_NAMES, VALID_HOSTILE_ARGS, parse_outcome

SEEDS = [
    b'{"op": "list"}',
    b"list",
    b'{"op": "run", "job": "echo-args", "args": ["a", "--", "$(id)"], "detach": false}',
    b'{"op": "run", "job": "fail", "args": [], "detach": true}',
    b"run echo-args 'two words' \"x\" a\\ b -- ';'",
    b'{"op": "run", "job": "echo-args", "args": ["\\u0041", "\\ud83d\\ude42"]}',
    b"[" * 50 + b"]" * 50,
    *(json.dumps({"op": "run", "job": name}).encode("utf-8", "surrogatepass") for name in HOSTILE_NAMES[:20]),
    json.dumps({"op": "run", "job": "echo-args", "args": VALID_HOSTILE_ARGS}).encode(),  # no NUL: find it
]
TOKENS = [
    '"op"',
    '"run"',
    '"list"',
    '"job"',
    '"args"',
    '"detach"',
    "true",
    "false",
    "null",
    "run ",
    "list",
    "echo-args",
    "\\u0000",
    "\\ud800",
    "\\\\",
    "'",
    '"',
    "--",
]

findings: dict[str, int] = {}
keep_going = False
runs = 0


def test_one_input(data: bytes) -> None:
    global runs  # noqa: PLW0603 (atheris calls this with the data only)
    runs += 1
    try:
        check(data)
    except Exception:  # an AssertionError (a property) or any other exception (a crash)
        if not keep_going:
            raise
        report(data)


def check(data: bytes) -> None:
    form = guess_form(data)
    assert form in (Form.JSON, Form.TEXT), form
    assert (form is Form.JSON) == (data.lstrip()[:1] in (b"{", b"[")), (form, data[:80])
    outcome = parse_outcome(data)  # the properties of tests/test_fuzz_protocol.py
    assert isinstance(outcome, Exception) or outcome.form is form, (outcome, data[:80])


def report(data: bytes) -> None:
    """Print a finding the first time its kind (exception type and failing line) is seen."""
    kind, value, tb = sys.exc_info()
    frame = traceback.extract_tb(tb)[-1]
    key = f"{kind.__name__ if kind else '?'} at {Path(frame.filename).name}:{frame.lineno}"
    findings[key] = findings.get(key, 0) + 1
    if findings[key] == 1:
        shown = str(value).splitlines()[0][:300] if str(value) else ""
        print(f"\n=== finding {len(findings)}: {key}: {shown}\n    input: {data[:200]!r}", file=sys.stderr)


def summary() -> None:
    """--keep-going: the totals when libFuzzer ends the run, and a failing exit status on findings."""
    total = sum(findings.values())
    print(f"\n{runs} inputs, {len(findings)} distinct findings ({total} failing inputs)", file=sys.stderr)
    for key, count in findings.items():
        print(f"    {count:8d}  {key}", file=sys.stderr)
    sys.stderr.flush()
    if findings:
        os._exit(1)


def seed_corpus(directory: Path) -> list[str]:
    (directory / "corpus").mkdir()
    for i, seed in enumerate(SEEDS):
        (directory / "corpus" / f"seed-{i}").write_bytes(seed)
    (directory / "tokens.dict").write_text("".join(f"{json.dumps(t)}\n" for t in TOKENS))
    return [f"-dict={directory / 'tokens.dict'}", str(directory / "corpus")]


def main() -> None:
    global keep_going  # noqa: PLW0603 (atheris calls test_one_input with the data only)
    argv = [a for a in sys.argv if a != "--keep-going"]
    keep_going = len(argv) != len(sys.argv)
    if keep_going:
        atexit.register(summary)
    directory = Path(tempfile.mkdtemp(prefix="jobrunner-fuzz-"))
    if not any(a.startswith("-artifact_prefix=") for a in argv):
        argv.append(f"-artifact_prefix={directory}/")  # crash-* files there, not in the working tree
    if not any(not a.startswith("-") for a in argv[1:]):
        argv += seed_corpus(directory)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
