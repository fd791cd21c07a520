"""`jobctl history`, `jobctl logs` and `jobctl status`: the front door's `history`, `logs` and `status`
requests (docs/protocol.md), and how jobctl shows their replies.

Standard library only, like the rest of jobctl, and imported only for these three commands
(trigger.jobctl.make_session()): `jobctl run` does not pay for it.

- history: a table of the newest runs on stdout, newest first; exit 0.
- status: a table of the runs in progress; exit 0 (also when there are none).
- logs RUN_ID: the run's transcript on stdout (stdout and stderr as the run log has them, interleaved,
  redacted), then one 'jobctl:' line on stderr saying how the run ended, or that it is still running;
  exit 0. With --follow, the transcript streams until the run is over, and jobctl exits like `jobctl
  run` would have: with the job's exit status (128+N if killed by signal N, 124 on timeout); 255 when
  the run never finished (its runner was stopped before it wrote the log's end, or it ran past its
  timeout); 70 for a run that was never started.
"""

from __future__ import annotations

from trigger.jobctl import ExitCode, Session, malformed, output_data

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import argparse
    from typing import Any


def encode(ns: argparse.Namespace) -> dict[str, Any]:
    """The JSON request for `history`, `logs` or `status`."""
    if ns.command == "history":
        request: dict[str, Any] = {"op": "history", "limit": ns.limit}
        if ns.name:
            request["job"] = ns.name
        return request
    if ns.command == "logs":
        return {"op": "logs", "run_id": ns.run_id, "follow": ns.follow}
    return {"op": "status"}


class RunsSession(Session):
    """A jobctl Session for `history` and `status` (final event `runs`) and `logs` (`log` events, then
    the final `run`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finals = ("run", "error") if self.ns.command == "logs" else ("runs", "error")

    def handle(self, event: dict[str, Any], line: bytes) -> int | None:
        kind = event["event"]
        if kind not in ("runs", "run", "log"):
            return super().handle(event, line)  # errors; and what newer servers may add, ignored
        if kind != "log" and kind not in self.finals:
            raise malformed(f"an unexpected {kind!r} event in reply to {self.ns.command!r}", line)
        if self.raw:
            self.term.out(line)
        if kind == "log":
            if not self.raw:
                self.term.out(output_data(event))
            return None
        if kind == "runs":
            return self.on_runs(event)
        return self.on_run(event)

    def on_runs(self, event: dict[str, Any]) -> int:
        runs = event.get("runs")
        if not isinstance(runs, list) or not all(
            isinstance(run, dict) and isinstance(run.get("run_id"), str) and isinstance(run.get("job"), str)
            for run in runs
        ):
            raise malformed("'runs' is not a list of objects with a 'run_id' and a 'job'")
        if self.raw:
            return ExitCode.OK
        if not runs:
            what = "in progress " if self.ns.command == "status" else ""
            self.term.say(f"jobctl: there are no runs {what}that you may see\n")
            return ExitCode.OK
        table = runs_table(runs, status=self.ns.command == "status")
        self.term.out(table.encode("utf-8", "backslashreplace"))
        return ExitCode.OK

    def on_run(self, event: dict[str, Any]) -> int:
        if not self.raw:
            self.term.say(f"jobctl: {describe(event)}\n")
        if not self.ns.follow:
            return ExitCode.OK
        code = event.get("exit_code")
        if event.get("state") != "finished":
            return ExitCode.CONNECTION_LOST  # the runner was stopped before the log's end: as a lost `run`
        if code is None:
            return ExitCode.SOFTWARE  # never started
        if type(code) is not int or not 0 <= code <= 255:
            raise malformed(f"exit_code {code!r} is not a number from 0 to 255")
        return code


def describe(run: dict[str, Any]) -> str:
    """What became of a run, in a line: `build (run ID) exited with 0 after 6.9 s`."""
    name = f"{run.get('job')} (run {run.get('run_id')})"
    state, duration = run.get("state"), run.get("duration_s")
    seconds = duration if isinstance(duration, int | float) else None
    took = "" if seconds is None else f" after {duration_text(seconds)}"
    if state == "running":
        so_far = "" if seconds is None else f" ({duration_text(seconds)} so far)"
        return f"{name} is still running{so_far}; jobctl logs --follow {run.get('run_id')} shows the rest"
    if state == "unfinished":
        return f"{name} never finished: its log has no end section (its runner was stopped)"
    result = run.get("result")
    return f"{name} {result if isinstance(result, str) and result else 'ended'}{took}"


def runs_table(runs: list[dict[str, Any]], *, status: bool) -> str:
    """One line per run under a heading; the start in local time."""
    heading = ("RUN ID", "JOB", "USER", "STARTED", "RUNNING FOR" if status else "DURATION")
    rows = [heading if status else (*heading, "EXIT")]
    for run in runs:
        duration = run.get("duration_s")
        row = (
            str(run["run_id"]),
            str(run["job"]),
            str(run.get("user") or run.get("uid") or "?"),
            local_time(run.get("started")),
            duration_text(duration) if isinstance(duration, int | float) else "",
        )
        rows.append(row if status else (*row, exit_text(run)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)
    return "".join(line.rstrip() + "\n" for line in lines)


def exit_text(run: dict[str, Any]) -> str:
    state, code = run.get("state"), run.get("exit_code")
    if state != "finished":
        return str(state)
    return str(code) if type(code) is int else "-"  # "-": never started


def duration_text(seconds: float) -> str:
    """6.9 s, 12 min 03 s, 2 h 05 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def local_time(started: object) -> str:
    """The run log's UTC time (2026-11-28T15:44:02.123Z) in local time: 2026-11-28 16:44:02."""
    if not isinstance(started, str):
        return ""
    try:
        import calendar
        import time

        utc = time.strptime(started[:19], "%Y-%m-%dT%H:%M:%S")
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(calendar.timegm(utc)))
    except (ValueError, OverflowError):
        return started
