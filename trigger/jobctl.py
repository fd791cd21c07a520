"""jobctl: run a job on the jobrunner socket and stream its output.

The wire format is docs/protocol.md (JSON requests, JSON Lines replies). This module uses the standard
library only, and imports little: every developer invocation pays for it. Modules that only errors,
--help or non-UTF-8 output need are imported where they are used. The connection is a
`_socket.socket`, the C type that `socket.socket` extends: it has every method jobctl uses, and the
`socket` module's import (enum conversions of its constants, `selectors`) would cost every start ~2 ms.
The `jobctl` command (`run()`) exits without the interpreter's teardown.
"""

from __future__ import annotations  # annotations stay strings: typing is never imported at run time

import _signal  # `signal` without its enum classes (stubs/_signal.pyi): ~0.4 ms of every start
import _socket
import argparse
import errno
import gc
import json
import os
import sys
from enum import IntEnum

from trigger.preconnect import (
    DEFAULT_SOCKET,
    SOCKET_ENV,
    EarlyConnection,
    default_socket,
    job_socket,
    valid_job_name,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2-3 ms at every start-up)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from types import FrameType
    from typing import Any, BinaryIO, NoReturn

    from trigger.terminal import Backoff, StatusLine

DEFAULT_GROUP = "jobrunner"  # named in the permission hint when the socket's group cannot be looked up
MAX_REQUEST = 64 * 1024  # bytes, including the newline (docs/protocol.md)
RECV_SIZE = 1024 * 1024
# An output event carries at most ~64 KiB of data; JSON escaping can make that ~6 times longer. Anything
# far beyond is a broken server, and must not make us buffer without bound.
MAX_LINE = 16 * 1024 * 1024
CANCEL_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)
START_HINT = "is job.socket running? sudo systemctl enable --now job.socket"
JOURNAL_HINT = "the server's side is in the journal: journalctl -u 'job@*'"
# A job's own socket that connect() refuses with these is not there for us (the job has no units yet,
# job.socket was stopped, or it is not ours to use): jobctl asks the main socket, which says why if it
# cannot run the job either. None: Python's "AF_UNIX path too long", a path no socket can be bound to.
NO_DIRECT_SOCKET = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR, errno.EACCES, None})
# The main socket's `busy` error when the job's socket closed the connection it handed over without a
# word (runner/service.py _not_started): in its message, and in no other `busy` error's.
NOT_STARTED = " did not start: "
TICK_S = 1.0  # how long a run may be silent before its status line is drawn, and how often it is redrawn
# The server waits 10 s for the request (docs/protocol.md): a connection made at start-up longer ago than
# this (jobctl starved of CPU, in a burst of hundreds) could be answered with that deadline's error, and
# is not used; a new one is made instead.
EARLY_MAX_AGE_S = 5.0


class ExitCode(IntEnum):
    """jobctl's own exit statuses (sysexits.h where one fits); a finished run exits with the job's."""

    OK = 0
    USAGE = 64
    UNAVAILABLE = 69
    SOFTWARE = 70
    IOERR = 74
    TEMPFAIL = 75
    NOPERM = 77
    CONFIG = 78
    BROKEN_PIPE = 128 + _signal.SIGPIPE
    CONNECTION_LOST = 255


# The `error` event's codes (docs/protocol.md); any other code is ExitCode.SOFTWARE.
ERROR_EXIT_CODES: dict[str, ExitCode] = {
    "bad-request": ExitCode.USAGE,
    "unknown-job": ExitCode.USAGE,
    "bad-arguments": ExitCode.USAGE,
    "forbidden": ExitCode.NOPERM,
    "busy": ExitCode.TEMPFAIL,
    "config": ExitCode.CONFIG,
    "credential": ExitCode.CONFIG,
    "internal": ExitCode.SOFTWARE,
    "unknown-run": ExitCode.USAGE,
}

DESCRIPTION = """\
Run a job on the jobrunner socket and stream its output. The job runs on the
server, with credentials you cannot read; you see what it prints, live, and
jobctl exits with its exit status."""

EPILOG = """\
examples:
  jobctl list
  jobctl run backup
  jobctl run deploy -- --branch main   (job arguments starting with '-' go
                                        after '--')
  jobctl run --detach nightly-report
  jobctl --json run deploy > events.jsonl
  jobctl history deploy -n 5           (runs you may see, newest first)
  jobctl logs --follow RUN_ID          (a run's output, live until it ends)
  jobctl status                        (the runs in progress)

output:
  run       the job's stdout and stderr, byte for byte, on jobctl's stdout
            and stderr; if the job was killed by a signal or timed out, one
            'jobctl:' line on stderr says so
  --detach  three 'key: value' lines on stdout: run_id, output_dir, log
  --json    the server's events (JSON Lines, docs/protocol.md) on stdout,
            exactly as received; stderr only has jobctl's own errors
            (connecting, lost connection, malformed reply)
  list      a table on stdout: name, whether the job takes arguments, its
            concurrency, timeout and network, and its description (cut to
            the width of a terminal, whole otherwise)
  history   a table on stdout (status: of the runs in progress)
  logs      the run's output on stdout (stdout and stderr interleaved, as
            its run log has them), then how it ended on stderr
  errors    'jobctl: error: ...' and 'jobctl: hint: ...' lines on stderr
  terminal  while a run is silent, a 'jobctl: JOB (run ID) running, N s'
            line on stderr, erased when output comes; 'error:' in colour;
            neither with --json, nor when stderr is not a terminal or
            TERM is dumb

exit status:
  N     run: the job's exit status; 128+N if it was killed by signal N, 124
        if it timed out (a job can exit with any code below itself: --json
        tells them apart)
  0     list succeeded; run --detach: the run started and keeps running;
        history, status and logs (without --follow) succeeded
  N     logs --follow: the run's exit status, as for run; 255 if it never
        finished (its runner was stopped); 70 if it never started
  64    usage error; server error bad-request, unknown-job, bad-arguments,
        unknown-run
  69    cannot connect: the socket does not exist or nothing listens on it
  70    server error internal or an unknown code; a malformed reply
  74    cannot write our output (other than a closed pipe)
  75    server error busy: this job is already running, try again later
  77    permission denied on the socket (not in its group); server error
        forbidden (not in the job's allowed_groups)
  78    server error config or credential: the service is misconfigured
  129   SIGHUP, 130 SIGINT (Ctrl-C), 143 SIGTERM: jobctl closed the
        connection, which cancels the run (a --detach run keeps running)
  141   our stdout or stderr was closed (jobctl run x | head): jobctl closed
        the connection, which cancels the run, and prints nothing
  255   the connection was lost before the final event (exit, error, jobs)

sockets:
  run connects to the job's own socket, /run/job/NAME.sock, when it exists
  (PATH/NAME.sock for --socket PATH.sock), else to the main one; if the
  job's socket closes without a reply, run asks the main one once more,
  which says why; list always uses the main one

busy:
  a socket at its connection limit closes new connections without a
  reply: the run never started, so jobctl tries again after a random wait
  (up to 0.1 s, doubling to 2 s) for up to 30 s, saying so once on a
  terminal, then fails as above (255, or 75 when the main socket says the
  job's did not start); never once a reply has begun; --no-retry: at once

environment:
  JOBCTL_SOCKET  the socket when --socket is not given (default
                 /run/job.sock)
  NO_COLOR       when set and not empty: no colour (https://no-color.org)"""


class ClientError(Exception):
    """A failure jobctl reports as 'jobctl: error: MESSAGE' (and a hint) and maps to an exit status."""

    def __init__(self, message: str, hint: str = "", exit_code: int = ExitCode.SOFTWARE) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


class ServerError(ClientError):
    """The server's `error` event: already on stdout with --json, so only rendered without it."""


class Interrupted(BaseException):
    """A cancelling signal arrived (a BaseException, like KeyboardInterrupt, so nothing swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class OutputClosed(Exception):
    """Our stdout or stderr is a pipe whose reader went away."""


class NotStarted(Exception):
    """The main socket's `error` saying that the job's unit did not start, at its socket's connection
    limit: the run may be tried again. `line`: the event as received, for --json if jobctl gives up."""

    def __init__(self, error: ServerError, line: bytes) -> None:
        super().__init__(error.message)
        self.error = error
        self.line = line


def malformed(what: str, line: bytes = b"") -> ClientError:
    excerpt = f": {line[:200]!r}" if line else ""
    return ClientError(f"malformed reply from the server: {what}{excerpt}", JOURNAL_HINT)


# --- command line ----------------------------------------------------------------------------------


def terminal_width() -> int:
    """shutil.get_terminal_size().columns, without importing shutil: $COLUMNS if it is a positive
    number, else the width of the terminal on stdout, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (OSError, ValueError, AttributeError):  # not a terminal, closed, or no stdout at all
        return 80


# argparse passes each of its messages through gettext, and gettext looks for a message catalog on disk
# at every call (a few stat()s per language in $LANGUAGE/$LC_*/$LANG): building jobctl's parser makes
# some twenty such calls, ~1-1.5 ms of every start. CPython ships no catalog for argparse and jobctl's
# own messages are English, so argparse's are taken unchanged. Not with str(): argparse also passes it
# the None of a group without a description, which str() would print ("None" under "commands:").
def _untranslated(message: str) -> str:
    return message


argparse._ = _untranslated  # type: ignore[attr-defined]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter with the width given: without one, its __init__ imports shutil for
    shutil.get_terminal_size(), and argparse builds formatters in add_argument() too, so every start,
    --help or not, would pay ~2 ms for shutil (and the bz2, lzma, zlib and fnmatch it imports)."""

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        if width is None:
            width = terminal_width() - 2  # what argparse takes off the terminal's width
        super().__init__(prog, indent_increment, max_help_position, width)


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors exit 64 (EX_USAGE), not argparse's 2, and look like every other jobctl error."""

    def error(self, message: str) -> NoReturn:
        hint = ""
        if message.startswith("unrecognized arguments"):
            hint = "job arguments that start with '-' go after '--': jobctl run NAME -- ARG ..."
        self.print_usage(sys.stderr)
        raise ClientError(message, hint, ExitCode.USAGE)


def add_common_options(parser: argparse.ArgumentParser, *, command: bool) -> None:
    """Options accepted before and after the command: on a command they default to SUPPRESS, so that
    leaving them out there does not undo them being given before it."""
    suppress = argparse.SUPPRESS
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=suppress if command else None,
        help=f"the job runner's socket (default: ${SOCKET_ENV}, else {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=suppress if command else False,
        help="print the server's events exactly as received (JSON Lines) instead of rendering them; "
        "the exit status is the same",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=suppress if command else False,
        help="show a traceback for unexpected errors, and the request sent",
    )
    parser.add_argument(
        "--no-retry",
        action="store_true",
        default=suppress if command else False,
        help="when the runner is busy (its socket closed the connection without a reply), fail at "
        "once instead of trying again for up to 30 s",
    )


def build_parser() -> ArgumentParser:
    formatter = HelpFormatter
    parser = ArgumentParser(
        prog="jobctl", description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter, allow_abbrev=False
    )
    add_common_options(parser, command=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    run = commands.add_parser(
        "run",
        help="run a job, stream its output and exit with its exit status",
        description="Run job NAME with arguments ARG ... and stream its output; exit with its exit\nstatus.",
        epilog=EPILOG,
        formatter_class=formatter,
        allow_abbrev=False,
    )
    run.add_argument(
        "--detach",
        action="store_true",
        help="only start the run: print run_id, output_dir and log as 'key: value' lines on stdout and "
        "exit 0 once the server accepted it; the job keeps running on the server",
    )
    add_common_options(run, command=True)
    run.add_argument("name", metavar="NAME", help="the job's name (see 'jobctl list')")
    run.add_argument(
        "args", metavar="ARG", nargs="*", help="arguments for the job (after '--' if any starts with '-')"
    )
    listing = commands.add_parser(
        "list",
        help="list the jobs you may run",
        description="List the jobs you may run: the name of each, whether it takes arguments, its\n"
        "concurrency, timeout and network, and its description.",
        epilog=EPILOG,
        formatter_class=formatter,
        allow_abbrev=False,
    )
    add_common_options(listing, command=True)
    add_runs_commands(commands, formatter)
    return parser


# Served from the run logs by the main socket; their session is trigger.runs', imported only for them.
RUNS_COMMANDS = ("history", "logs", "status")


def add_runs_commands(commands: Any, formatter: type[HelpFormatter]) -> None:
    """`history`, `logs` and `status` (trigger/runs.py)."""
    options = {"epilog": EPILOG, "formatter_class": formatter, "allow_abbrev": False}
    history = commands.add_parser(
        "history",
        help="the newest runs you may see, newest first",
        description="The newest runs of the jobs you may run (of job NAME only, if given), newest\n"
        "first: run id, job, who ran it, start, duration and exit status.",
        **options,
    )
    history.add_argument("name", metavar="NAME", nargs="?", help="only this job's runs")
    history.add_argument(
        "-n", "--limit", type=int, default=20, metavar="N", help="at most N runs (default 20, at most 1000)"
    )
    add_common_options(history, command=True)
    logs = commands.add_parser(
        "logs",
        help="a run's output, from its run log",
        description="Print the output of run RUN_ID (see 'jobctl history') as its run log has it:\n"
        "stdout and stderr interleaved, redacted; then how the run ended, on stderr.",
        **options,
    )
    logs.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    logs.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="while the run is in progress, go on printing its output until it ends, then exit with "
        "its exit status",
    )
    add_common_options(logs, command=True)
    status = commands.add_parser(
        "status", help="the runs in progress now", description="List the runs in progress now.", **options
    )
    add_common_options(status, command=True)


def parse_arguments(parser: ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Everything after the first '--' is a job argument, verbatim (argparse's own '--' handling
    differs between Python versions and drops later '--')."""
    argv = list(argv)
    tail: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, tail = argv[:split], argv[split + 1 :]
    ns = parser.parse_args(argv)
    if ns.command == "run":
        ns.args = [*ns.args, *tail]
    elif tail:
        parser.error(f"'{ns.command}' takes no arguments")
    ns.socket = ns.socket or default_socket()
    return ns


def encode_request(ns: argparse.Namespace) -> bytes:
    request: dict[str, Any]
    if ns.command == "run":
        request = {"op": "run", "job": ns.name, "args": ns.args, "detach": ns.detach}
        for index, value in enumerate([ns.name, *ns.args]):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                what = "the job name" if index == 0 else f"argument {index}"
                raise ClientError(f"{what} is not valid UTF-8: {value!r}", "", ExitCode.USAGE) from None
    elif ns.command in RUNS_COMMANDS:
        from trigger.runs import encode  # lazily: only history, logs and status need it

        request = encode(ns)
    else:
        request = {"op": "list"}
    line = json.dumps(request, ensure_ascii=False).encode("utf-8") + b"\n"
    if len(line) > MAX_REQUEST:
        raise ClientError(
            f"the request is {len(line)} bytes, the server takes at most {MAX_REQUEST}",
            "pass fewer or shorter arguments",
            ExitCode.USAGE,
        )
    return line


# --- the connection --------------------------------------------------------------------------------


def socket_group(path: str) -> str:
    try:
        import grp  # lazily: only this hint needs it

        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError, ImportError):
        return DEFAULT_GROUP


def connect_error(path: str, exc: OSError) -> ClientError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        group = socket_group(path)
        return ClientError(
            f"permission denied connecting to {path}",
            f"you need to be in the group that owns the socket: sudo usermod -aG {group} $USER, "
            "then log in again",
            ExitCode.NOPERM,
        )
    if exc.errno == errno.ENOENT:
        return ClientError(f"{path} does not exist", START_HINT, ExitCode.UNAVAILABLE)
    if exc.errno == errno.ECONNREFUSED:
        return ClientError(f"nothing is listening on {path}", START_HINT, ExitCode.UNAVAILABLE)
    return ClientError(f"cannot connect to {path}: {exc.strerror or exc}", START_HINT, ExitCode.UNAVAILABLE)


def open_socket(path: str) -> _socket.socket:
    """A connection to `path`; raises OSError."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(path: str) -> _socket.socket:
    """A connection to `path`; raises ClientError."""
    try:
        return open_socket(path)
    except OSError as exc:
        raise connect_error(path, exc) from None


def send_request(sock: _socket.socket, request: bytes) -> None:
    try:
        sock.sendall(request)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may have replied (an error) and closed before reading everything: read it


def read_lines(sock: _socket.socket, idle: Callable[[], None] | None = None) -> Iterator[bytes]:
    """The reply's lines, each with its newline (the last one may lack it). Memory stays at one line
    plus one recv() buffer however long the reply is. `idle` is called whenever the socket's timeout
    (if it has one) passes without a byte."""
    buffer = bytearray()
    while True:
        try:
            chunk = sock.recv(RECV_SIZE)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        except TimeoutError:
            if idle is not None:
                idle()
            continue
        if not chunk:
            break
        scanned = len(buffer)
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", scanned)) != -1:
            yield bytes(buffer[start : end + 1])
            start = scanned = end + 1
        del buffer[:start]
        if len(buffer) > MAX_LINE:
            raise malformed(f"a line longer than {MAX_LINE} bytes", bytes(buffer[:200]))
    if buffer:
        yield bytes(buffer)


def parse_event(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:  # also UnicodeDecodeError
        raise malformed("not JSON", line) from None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        raise malformed("not an object with an 'event' field", line)
    return event


# --- rendering -------------------------------------------------------------------------------------


def output_data(event: dict[str, Any]) -> bytes:
    text, encoded = event.get("text"), event.get("base64")
    if isinstance(text, str) and encoded is None:
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            raise malformed("an output event's text is not UTF-8") from None
    if isinstance(encoded, str) and text is None:
        import base64  # lazily: only non-UTF-8 output needs it
        import binascii

        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise malformed("an output event's base64 does not decode") from None
    raise malformed("an output event needs exactly one of 'text' and 'base64'")


def exit_status(event: dict[str, Any]) -> int:
    code = event.get("exit_code")
    if type(code) is not int or not 0 <= code <= 255:  # bool is not an exit code
        raise malformed(f"exit_code {code!r} is not a number from 0 to 255")
    return code


def server_error(event: dict[str, Any]) -> ServerError:
    code = event.get("code")
    if not isinstance(code, str):
        raise malformed(f"error code {code!r} is not a string")
    message, hint, run_id = event.get("message"), event.get("hint"), event.get("run_id")
    text = f"{code}: {message if isinstance(message, str) and message else '(no message)'}"
    if isinstance(run_id, str):
        text += f" (run {run_id})"
    return ServerError(
        text, hint if isinstance(hint, str) else "", ERROR_EXIT_CODES.get(code, ExitCode.SOFTWARE)
    )


def signal_name(number: int) -> str:
    import signal  # lazily: only an interrupted run names its signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_note(event: dict[str, Any]) -> str:
    """One line when a shell would not say it by itself: the job timed out or was killed."""
    job, run_id, log = event.get("job"), event.get("run_id"), event.get("log")
    where = f" (run {run_id}" + (f", log {log})" if isinstance(log, str) else ")")
    if event.get("timed_out") is True:
        return f"jobctl: job {job!r} timed out and was stopped{where}\n"
    number = event.get("signal")
    if type(number) is int:
        return f"jobctl: job {job!r} was killed by {signal_name(number)}{where}\n"
    return ""


def format_jobs(jobs: object, width: int | None = None, bold: bool = False) -> str:
    """The `jobs` event's list as a table (trigger.terminal.jobs_table()), "" when it is empty."""
    if not isinstance(jobs, list) or not all(
        isinstance(job, dict) and isinstance(job.get("name"), str) for job in jobs
    ):
        raise malformed("'jobs' is not a list of objects with a 'name'")
    from trigger.terminal import jobs_table  # lazily: only `list` needs it

    return jobs_table(jobs, width, bold)


def is_terminal(stream: BinaryIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):  # closed
        return False


class Terminal:
    """Where jobctl writes: the job's bytes and our own messages, each flushed at once so they
    interleave in order and stream live."""

    def __init__(self, stdout: BinaryIO, stderr: BinaryIO) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.plain = False  # --json: no colour, no status line
        self.status: StatusLine | None = None  # a run's status line (trigger.terminal), when it may show

    def write(self, stream: BinaryIO, data: bytes) -> None:
        status = self.status
        if status is not None:
            status.clear()  # before anything else is written, so that nothing is written over it
        try:
            stream.write(data)
            stream.flush()
        except BrokenPipeError:
            raise OutputClosed from None
        except OSError as exc:
            name = "stdout" if stream is self.stdout else "stderr"
            raise ClientError(f"cannot write to {name}: {exc.strerror or exc}", "", ExitCode.IOERR) from None
        if status is not None:
            status.wrote(stream, data)

    def out(self, data: bytes) -> None:
        self.write(self.stdout, data)

    def say(self, text: str) -> None:
        """Our own messages: when stderr is gone there is nowhere left to complain."""
        try:
            self.write(self.stderr, text.encode("utf-8", "backslashreplace"))
        except (OutputClosed, ClientError):
            pass

    def report(self, error: ClientError) -> None:
        from trigger.terminal import DIM, RED, colour, paint  # lazily: only errors need it

        said, hinted = "error:", "hint:"
        if colour(self.stderr, self.plain):
            said, hinted = paint(said, RED), paint(hinted, DIM)
        self.say(
            f"jobctl: {said} {error.message}\n" + (f"jobctl: {hinted} {error.hint}\n" if error.hint else "")
        )

    def end_status(self) -> None:
        """Erase the status line if it is on screen, and show none again."""
        if self.status is not None:
            self.status.clear()
            self.status = None


# --- the conversation ------------------------------------------------------------------------------


class Session:
    """One request and its reply: sends, reads events until the final one, renders them (or, with
    --json, passes them through) and returns the exit status; raises for every failure.

    A run goes to the job's own socket (trigger.preconnect.job_socket()) when it can, else to the main
    socket (ns.socket), which hands it on to the job's units. When the job's socket closes the
    connection without a byte of reply, its unit could not start (systemd says nothing then: a
    credential of the job's is corrupt or expired, or the socket is at its connection limit), so the run
    never started: the request goes once more to the main socket, which replies with why (an `error`).

    A socket at its connection limit closes new connections without a word: when the last try got no
    byte back, or the main socket answered that the job's socket did not take the run (NotStarted),
    the run never started, and run_retrying() tries again after a while (trigger.terminal.Backoff),
    from the job's socket on. The main socket is asked why once only: asked again, under such load, it
    would start a runner of its own for each try. Never once anything else has arrived: the run may
    have started."""

    def __init__(self, ns: argparse.Namespace, term: Terminal, early: EarlyConnection | None = None) -> None:
        self.ns = ns
        self.term = term
        self.early = early  # made before the options were parsed (trigger.preconnect)
        self.raw: bool = ns.json
        self.finals = ("exit", "error") if ns.command == "run" else ("jobs", "error")
        self.sock: _socket.socket | None = None
        self.direct = False  # whether self.sock goes to the job's own socket
        self.received = False  # whether a byte of reply has arrived on self.sock
        self.accepted: dict[str, Any] = {}
        self.refusal: NotStarted | None = None  # the main socket said the job's unit did not start
        self.asked_why = False  # whether the main socket was asked why the job's socket said nothing

    def run(self) -> int:
        request = encode_request(self.ns)
        self.sock = self.connect(request)
        status = self.converse(self.sock, request)
        if status is None and self.direct and not self.received and not self.asked_why:
            self.asked_why = True
            self.close()
            self.sock = None
            if self.ns.debug:
                self.term.say(
                    "jobctl: debug: the job's socket closed the connection without a reply (its unit did "
                    f"not start): sending the request to {self.ns.socket} instead\n"
                )
            self.sock, self.direct = self.connect_main(), False
            status = self.converse(self.sock, request)
        if status is None:
            raise self.lost()
        return status

    def run_retrying(self) -> int:
        """run(), tried again while the run never started because a socket was at its connection limit
        (see the class's docstring), unless --no-retry; then the last try's failure."""
        backoff: Backoff | None = None
        failure: ClientError
        if self.early is not None and (age := self.early.age()) > EARLY_MAX_AGE_S:
            if self.ns.debug:
                self.term.say(f"jobctl: debug: not using the connection made {age:.1f} s ago, at start-up\n")
            self.early.close()
            self.early = None
        while True:
            try:
                return self.run()
            except NotStarted as exc:
                self.refusal, failure = exc, exc.error
                why = f"the main socket says: {exc.error.message}"
            except ClientError as exc:
                retry = exc.exit_code == ExitCode.CONNECTION_LOST and not self.received and not self.accepted
                if self.ns.no_retry or not retry:
                    raise
                failure, why = exc, "the connection was closed without a reply"
            self.close()
            self.sock, self.early = None, None  # the next try connects afresh, to the job's socket first
            if backoff is None:
                from trigger.terminal import Backoff  # lazily: only a busy runner needs it

                backoff = Backoff()
            wait = backoff.next_wait()
            if wait is None:
                raise self.given_up(failure, backoff)
            if self.ns.debug:
                self.term.say(
                    f"jobctl: debug: {why}: trying again in {wait:.2f} s (try {backoff.retries + 1})\n"
                )
            elif backoff.retries == 1 and not self.raw and is_terminal(self.term.stderr):
                from trigger.terminal import RETRY_NOTICE

                self.term.say(RETRY_NOTICE)
            backoff.sleep(wait)

    def given_up(self, failure: ClientError, backoff: Backoff) -> ClientError:
        """The last try's failure, once the tries are over: the main socket's error if it said why."""
        if self.refusal is not None:
            if self.raw:
                self.term.out(self.refusal.line)
            return self.refusal.error
        tries = f"jobctl tried {backoff.retries + 1} times in {backoff.elapsed():.0f} s"
        failure.hint = f"{tries}; {failure.hint}" if failure.hint else tries
        return failure

    def direct_socket(self) -> str | None:
        """The job's own socket, for a run; None for a list, or a name that is no job's (the main socket
        says so)."""
        if self.ns.command == "run" and valid_job_name(self.ns.name):
            return job_socket(self.ns.socket, self.ns.name)
        return None

    def connect(self, request: bytes) -> _socket.socket:
        """A connection to the job's own socket if there is one for us, else to the main socket."""
        sock, note = None, ""
        early, direct = self.early, self.direct_socket()
        if direct is None:
            pass
        elif early is not None and early.path == self.ns.socket and early.instead_of == direct:
            note = f" (no connection to {direct} at start-up)"  # trigger.preconnect tried it already
        else:
            sock, note = self.connect_direct(direct)
        self.direct = sock is not None
        if self.ns.debug:
            path = direct if self.direct else self.ns.socket
            self.term.say(f"jobctl: debug: sending {request!r} to {path}{note}\n")
        return sock if sock is not None else self.connect_main()

    def connect_direct(self, path: str) -> tuple[_socket.socket | None, str]:
        """A connection to the job's own socket `path`, or None and why (for --debug) when it is not
        there for us; raises ClientError for other failures."""
        early = self.early
        if early is not None and early.path == path and (sock := early.take(path)) is not None:
            return sock, ""
        try:
            sock = open_socket(path)
        except OSError as exc:
            if exc.errno not in NO_DIRECT_SOCKET:
                raise connect_error(path, exc) from None
            return None, f" (not {path}: {exc.strerror or exc})"
        if early is not None:
            early.close()  # made to the main socket: close it now rather than leave it idle for the run
        return sock, ""

    def connect_main(self) -> _socket.socket:
        sock = self.early.take(self.ns.socket) if self.early is not None else None
        return sock if sock is not None else connect(self.ns.socket)

    def converse(self, sock: _socket.socket, request: bytes) -> int | None:
        """Send the request on `sock` and handle the reply: the exit status once the final event has
        arrived, None if the connection ended before it."""
        self.received = False
        send_request(sock, request)
        for line in read_lines(sock, self.tick):
            self.received = True
            try:
                event = parse_event(line)
            except ClientError:
                if not line.endswith(b"\n"):  # cut off by the end of the connection, not malformed
                    break
                raise
            status = self.handle(event, line)
            if status is not None:
                return status
        return None

    def close(self) -> None:
        """Closing the connection is how a run that was not detached is cancelled."""
        if self.sock is not None:
            self.sock.close()

    def handle(self, event: dict[str, Any], line: bytes) -> int | None:
        kind = event["event"]
        if kind in ("exit", "error", "jobs") and kind not in self.finals:
            raise malformed(f"an unexpected {kind!r} event in reply to {self.ns.command!r}", line)
        if kind == "error" and self.not_started(event):
            raise NotStarted(server_error(event), line)  # before --json prints it: it may be tried again
        if self.raw:
            self.term.out(line)
        if kind == "output":
            self.on_output(event)
        elif kind == "accepted" and self.ns.command == "run":
            return self.on_accepted(event)
        elif kind == "exit":
            return self.on_exit(event)
        elif kind == "error":
            raise server_error(event)
        elif kind == "jobs":
            return self.on_jobs(event)
        return None  # anything else is a newer server's event: ignore it

    def not_started(self, event: dict[str, Any]) -> bool:
        """Whether the `error` event is the main socket's word that the job's socket did not take the run
        (a `busy` that says it did not start), for a run that may be tried again. Not the `credential`
        error that says the same for a job with credentials: a key that cannot be decrypted, which no
        retry mends, looks the same there, and is said at once."""
        message = event.get("message")
        return (
            not self.ns.no_retry
            and not self.accepted
            and event.get("code") == "busy"
            and "run_id" not in event
            and isinstance(message, str)
            and NOT_STARTED in message
        )

    def on_output(self, event: dict[str, Any]) -> None:
        stream = event.get("stream")
        if self.raw or stream not in ("stdout", "stderr"):
            return
        self.term.write(self.term.stdout if stream == "stdout" else self.term.stderr, output_data(event))

    def on_accepted(self, event: dict[str, Any]) -> int | None:
        self.accepted = event
        if self.ns.debug:
            self.term.say(f"jobctl: debug: accepted {event!r}\n")
        if not self.ns.detach:
            self.show_status(event)
            return None
        if not self.raw:
            fields = ("run_id", "output_dir", "log")
            self.term.out("".join(f"{field}: {event.get(field, '')}\n" for field in fields).encode())
        return ExitCode.OK

    def show_status(self, event: dict[str, Any]) -> None:
        """On a terminal, without --json: a status line whenever the job has been silent for TICK_S,
        which the socket's timeout measures."""
        if self.raw or self.sock is None or not is_terminal(self.term.stderr):
            return
        from trigger.terminal import StatusLine, dumb  # lazily: only a run on a terminal needs it

        if dumb():
            return
        job, run_id = event.get("job"), event.get("run_id")
        self.term.status = StatusLine(
            self.term.stdout,
            self.term.stderr,
            job if isinstance(job, str) else self.ns.name,
            run_id if isinstance(run_id, str) else "?",
        )
        self.sock.settimeout(TICK_S)

    def tick(self) -> None:
        """The connection was quiet for TICK_S."""
        if self.term.status is not None:
            self.term.status.tick()

    def on_exit(self, event: dict[str, Any]) -> int:
        status = exit_status(event)
        if not self.raw:
            warnings = event.get("warnings")
            for warning in warnings if isinstance(warnings, list) else ():
                self.term.say(f"jobctl: warning: {warning}\n")
            if note := exit_note(event):
                self.term.say(note)
        return status

    def on_jobs(self, event: dict[str, Any]) -> int:
        from trigger.terminal import colour  # lazily, as format_jobs() imports the rest

        stdout = self.term.stdout  # a terminal: descriptions cut to its width, the heading in bold
        width = terminal_width() if is_terminal(stdout) else None
        table = format_jobs(event.get("jobs"), width, colour(stdout, self.term.plain))
        if self.raw:
            pass
        elif table:
            self.term.out(table.encode("utf-8", "backslashreplace"))
        else:
            self.term.say("jobctl: there are no jobs you may run\n")
        return ExitCode.OK

    def lost(self) -> ClientError:
        if self.accepted:
            run_id, log = self.accepted.get("run_id"), self.accepted.get("log")
            hint = f"run {run_id} was cancelled or is still running; its log: {log}"
        elif not self.received:
            # On the main socket (a job's own socket is retried there): systemd closes a connection
            # without a word when it cannot start the service for it, mostly because the socket is at
            # its connection limit. The front door reports what it finds wrong with a job's units.
            hint = (
                f"the server closed the connection without a reply: {self.ns.socket} may be at its "
                f"connection limit (try again); {JOURNAL_HINT}"
            )
        else:
            hint = f"the reply was cut off; {JOURNAL_HINT}"
        message = "the connection to the job runner was lost before the final event"
        return ClientError(message, hint, ExitCode.CONNECTION_LOST)


def raise_interrupted(signum: int, frame: FrameType | None) -> NoReturn:
    for number in CANCEL_SIGNALS:  # a second Ctrl-C must not interrupt the clean-up
        _signal.signal(number, _signal.SIG_IGN)
    raise Interrupted(signum)


def catch_signals() -> dict[int, Any]:
    """Turn SIGINT, SIGTERM and SIGHUP into Interrupted; leave ignored ones ignored (nohup, '&')."""
    previous: dict[int, Any] = {}
    for number in CANCEL_SIGNALS:
        handler = _signal.getsignal(number)
        if handler == _signal.SIG_IGN:
            continue
        try:
            _signal.signal(number, raise_interrupted)
        except ValueError:  # not the main thread (jobctl used as a library): no signal handling
            break
        previous[number] = handler
    return previous


def silence_stdout() -> None:
    """After EPIPE, keep Python from failing again when it flushes stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def flush_help(term: Terminal) -> int:
    """argparse prints --help to sys.stdout, which buffers it when it is not a terminal: write it out
    now, and fail like a run would (rather than in the interpreter's teardown, which run() skips)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
        return ExitCode.BROKEN_PIPE
    except OSError as exc:
        term.report(ClientError(f"cannot write to stdout: {exc.strerror or exc}", "", ExitCode.IOERR))
        return ExitCode.IOERR
    return ExitCode.OK


def make_session(ns: argparse.Namespace, term: Terminal, early: EarlyConnection | None) -> Session:
    """The session for the command: history, logs and status have theirs in trigger.runs."""
    if ns.command in RUNS_COMMANDS:
        from trigger.runs import RunsSession  # lazily: `jobctl run` does not pay for it

        return RunsSession(ns, term, early)
    return Session(ns, term, early)


def execute(ns: argparse.Namespace, term: Terminal, early: EarlyConnection | None = None) -> int:
    """Run the session and map every way it can end to an exit status: the only place that does."""
    session = make_session(ns, term, early)
    try:
        return session.run_retrying()
    except Interrupted as exc:
        session.close()  # first, so that the cancel does not wait for the message
        if session.sock is not None and ns.command == "run" and not ns.detach:
            term.say(f"jobctl: {signal_name(exc.signum)}: closed the connection, which cancels the run\n")
        return 128 + exc.signum
    except OutputClosed:
        session.close()
        silence_stdout()
        return ExitCode.BROKEN_PIPE
    except ClientError as exc:
        if not (ns.json and isinstance(exc, ServerError)):  # with --json the event is on stdout
            term.report(exc)
        return exc.exit_code
    except Exception as exc:
        if ns.debug:
            import traceback

            traceback.print_exc()
        term.report(ClientError(f"unexpected {type(exc).__name__}: {exc}", "rerun with --debug for details"))
        return ExitCode.SOFTWARE
    finally:
        session.close()
        term.end_status()


def main(argv: list[str] | None = None, early: EarlyConnection | None = None) -> int:
    """jobctl with `argv` (default: the command line); `early`: a connection made before the options
    were known (trigger.preconnect), used if they name its socket and closed in any case."""
    try:
        return _main(sys.argv[1:] if argv is None else argv, early)
    finally:
        if early is not None:
            early.close()


def _main(argv: list[str], early: EarlyConnection | None) -> int:
    term = Terminal(sys.stdout.buffer, sys.stderr.buffer)
    term.plain = "--json" in argv  # for usage errors; the options say it once they are parsed
    try:
        ns = parse_arguments(build_parser(), argv)
    except ClientError as exc:
        term.report(exc)
        return exc.exit_code
    except SystemExit as exc:  # --help
        return flush_help(term) or (exc.code if isinstance(exc.code, int) else ExitCode.USAGE)
    term.plain = ns.json
    previous = catch_signals()
    try:
        return int(execute(ns, term, early))
    finally:
        for number, handler in previous.items():
            _signal.signal(number, handler)


def run(early: EarlyConnection | None = None) -> NoReturn:
    """The `jobctl` command: main(), then exit without the interpreter's teardown, which frees every
    module and object one by one (a few ms for memory the kernel reclaims at once anyway). Nothing of
    jobctl's needs it: the connection is closed by then, nothing is registered with atexit, and our
    output is flushed as it is written (--help by main()); this flushes whatever text is left.

    Callers may disable the garbage collector while they import this module (the installed script and
    `python3 -m trigger` do: ~0.7 ms of collections otherwise, over objects that live as long as the
    process); it is on again from here. `early`: see main()."""
    gc.enable()
    status = main(early=early)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # nobody to read it: main() has already turned its own write errors into its status
    os._exit(status)
