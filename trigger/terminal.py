"""jobctl at the terminal: the status line of a silent run, colour, the `list` table, and the waits
between tries when the runner is busy.

trigger.jobctl imports this module only on the paths that need it (a terminal on stderr, an error, a
`list`, a retry): a run whose output goes to a pipe or a file, as in CI, never does. Like jobctl, it
uses the standard library only, and only modules that every interpreter has loaded or built in.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any, BinaryIO

ERASE = b"\r\x1b[K"  # back to the start of the line, and erase it
BOLD, DIM, RED = "1", "2", "31"  # SGR parameters
RETRY_NOTICE = "jobctl: the runner is busy, retrying\u2026\n"
ELLIPSIS = "\u2026"


def is_terminal(stream: BinaryIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):  # closed
        return False


def dumb() -> bool:
    """A terminal that knows no escape sequences ($TERM=dumb: Emacs' shell, some CI consoles)."""
    return os.environ.get("TERM") == "dumb"


def colour(stream: BinaryIO, plain: bool) -> bool:
    """Whether to colour what goes to `stream`: only a terminal that is not dumb, never with `plain`
    (--json), never with $NO_COLOR set to anything but "" (https://no-color.org)."""
    return not plain and not os.environ.get("NO_COLOR") and not dumb() and is_terminal(stream)


def paint(text: str, style: str) -> str:
    return f"\x1b[{style}m{text}\x1b[0m"


def width_of(stream: BinaryIO) -> int:
    """The width of the terminal `stream` writes to, else 80."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80


def duration(seconds: float) -> str:
    """A run's elapsed time, to the second: `12 s`, `2 min 5 s`, `1 h 2 min`."""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


class StatusLine:
    """`jobctl: JOB (run RUN_ID) running, 12 s` on the last line of the terminal while the job is silent.

    tick() draws it (jobctl calls it after each quiet second); jobctl's Terminal calls clear() before it
    writes anything, and wrote() after. It is drawn over an empty line only: never over a line the job
    has begun without ending it (a prompt, a progress bar), which erasing it would erase too. It is cut
    to the terminal's width, so that it never wraps onto a second line that erasing would leave behind.
    A failure to write it only stops it."""

    def __init__(self, stdout: BinaryIO, stderr: BinaryIO, job: str, run_id: str) -> None:
        self.stderr = stderr
        self.stdout = stdout if is_terminal(stdout) else None  # the job's stdout shares the screen
        self.label = f"jobctl: {job} (run {run_id}) running, "
        self.started = time.monotonic()
        self.shown = False
        self.line_open = False  # the job's last output on the terminal did not end its line
        self.broken = False

    def tick(self) -> None:
        if self.line_open or self.broken:
            return
        text = self.label + duration(time.monotonic() - self.started)
        room = width_of(self.stderr) - 1  # not the last column: some terminals wrap there
        if len(text) > room:
            text = text[: max(room - 1, 0)] + ELLIPSIS
        self.shown = True  # first: interrupted half-way, it is still erased
        self._write(ERASE + text.encode("utf-8", "replace"))

    def clear(self) -> None:
        if self.shown:
            self.shown = False
            self._write(ERASE)

    def wrote(self, stream: BinaryIO, data: bytes) -> None:
        if data and (stream is self.stderr or stream is self.stdout):
            self.line_open = not data.endswith(b"\n")

    def _write(self, data: bytes) -> None:
        try:
            self.stderr.write(data)
            self.stderr.flush()
        except (OSError, ValueError):
            self.broken, self.shown = True, False


# --- jobctl list ------------------------------------------------------------------------------------

# The table's columns: a heading and the `jobs` event's field. A column no job has a field for (a server
# older than the field) is left out; DESCRIPTION comes last, as the one cut to the terminal's width.
COLUMNS = (
    ("NAME", "name"),
    ("ARGS", "args"),
    ("CONCURRENCY", "concurrency"),
    ("TIMEOUT", "timeout_s"),
    ("NETWORK", "network"),
    ("DESCRIPTION", "description"),
)
MIN_DESCRIPTION = 10  # cut no shorter than this, however narrow the terminal


def timeout_text(seconds: float) -> str:
    """`1h`, `30m`, `90s`, `1.5s`: as short as jobs.toml's `timeout` (seconds) allows."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


def cell(field: str, value: Any) -> str:
    """One cell: the field's value as a person reads it, `-` when it is missing or not understood."""
    if field == "args":
        return ("yes" if value else "no") if isinstance(value, bool) else "-"
    if field == "timeout_s":
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        return timeout_text(value) if is_number and value >= 0 else "-"
    if field == "network" and isinstance(value, list):  # the addresses it may reach: --json has them all
        first = cell("", value[0]) if value else "-"
        return first if len(value) <= 1 else f"{first} +{len(value) - 1}"
    if isinstance(value, str):
        text = " ".join(value.split())  # a description's newlines and runs of spaces
        return "".join(char if char.isprintable() else "?" for char in text)
    return "-"


def cut(text: str, room: int) -> str:
    return text if len(text) <= room else text[: room - 1] + ELLIPSIS


def jobs_table(jobs: list[dict[str, Any]], width: int | None = None, bold: bool = False) -> str:
    """The jobs as an aligned table with a heading, or "" for none; `width`: cut each description so
    that its line fits (a terminal's width), None: never cut (not a terminal: a pipe gets it all)."""
    if not jobs:
        return ""
    columns = [
        (heading, field)
        for heading, field in COLUMNS
        if field in ("name", "description") or any(field in job for job in jobs)
    ]
    rows = [[heading for heading, _ in columns]]
    for job in jobs:
        cells = [cell(field, job[field]) if field in job else "-" for _, field in columns[:-1]]
        description = job.get("description")
        rows.append([*cells, cell("description", description) if isinstance(description, str) else ""])
    widths = [max(len(row[index]) for row in rows) for index in range(len(columns) - 1)]
    lines = []
    for row in rows:
        start = "".join(f"{text:<{size}}  " for text, size in zip(row, widths, strict=False))
        description = row[-1]
        if width is not None:
            description = cut(description, max(width - len(start), MIN_DESCRIPTION))
        lines.append((start + description).rstrip())
    if bold:
        lines[0] = paint(lines[0], BOLD)
    return "".join(line + "\n" for line in lines)


# --- trying again -------------------------------------------------------------------------------------


def fraction() -> float:
    """A random number in [0, 1), without importing `random` (and the hashlib it imports)."""
    return int.from_bytes(os.urandom(7), "big") / (1 << 56)


class Backoff:
    """The waits between tries of a request whose run never started (the socket closed the connection
    without a byte, at its connection limit): exponential backoff with full jitter, so that a burst of
    clients refused together does not come back together. The n-th wait is random in
    [0, min(CAP_S, BASE_S * 2**n)); no wait is started that would end more than BUDGET_S after the
    first try."""

    BASE_S = 0.1
    CAP_S = 2.0
    BUDGET_S = 30.0

    def __init__(self) -> None:
        self.started = time.monotonic()  # the first failed try's end: the tries before it were quick
        self.retries = 0

    def next_wait(self) -> float | None:
        """How long to wait before the next try, or None: give up."""
        wait = min(self.CAP_S, self.BASE_S * 2.0**self.retries) * fraction()
        if time.monotonic() + wait - self.started > self.BUDGET_S:
            return None
        self.retries += 1
        return wait

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)  # a signal's handler (Ctrl-C) interrupts it with its exception
