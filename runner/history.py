"""`history`, `logs` and `status`: what ran, what it printed, what is running now, read from the run logs.

Who answers, and why there. The run logs (LOGS/JOB/RUN_ID.log, runner.runs) are the record: every run
writes one, redacted, as it goes. Developers may read them all in the logs directory already (2770
root:GROUP, files 0660: install.sh's tmpfiles.d and the jobs' UMask=0007), so a client could list and
read them itself; but then nothing would check `allowed_groups`. So the front door answers these
requests (job@.service, started for each connection to /run/job.sock with the caller's SO_PEERCRED):
like `list`, it holds no credential and starts no job's unit, and it shows only the runs of jobs the
caller may run. The cheapest way that keeps that rule: no index, no daemon, no journal query, one
process per request reading the files that are already there. That the files stay readable by the
whole group is said in README.md; making a restricted job's logs unreadable to the group (a group of
its own for its logs directory) is left for later: it touches install.sh, the generator and every
job's units, and developers would lose direct access to the logs they may see.

The front door sees the logs directory read-only: install.sh's drop-in for job@.service binds it at
/tmp/.jobrunner-logs ($JOBRUNNER_LOGS_VIEW), since ProtectHome=yes hides it where it is when the
project lives under /home. Without that variable (tests, a hand-made install) it reads config.logs.

The cost is bounded. Run ids sort by start time (runner.runs.new_run_id), so `history` lists each
visible job's directory (names only), keeps the newest LIMIT names of each, merges them and reads only
the first LIMIT of those: one 4 KiB read at the head of each log (job, run, start, caller: a log whose
header names another job or run, a copy, is left out) and one of 8 KiB at its tail (the `# ---- end`
section), whatever the size of the logs; only listing the names grows with their number.

Running, finished, or neither. A run is in progress while its runner holds the flock it takes on the
run log (runner.runs.mark_in_progress): the kernel drops it when the runner closes the log, after
writing the end section, or dies, even by SIGKILL, which systemd follows by killing the job's whole
unit. The front door does not ask systemd whether `job-NAME@*.service` is active (that would take a
D-Bus client, and the log does not name the unit), nor look for the runner's process (ProtectProc=
invisible hides it), but it can test that lock for a moment (LOCK_SH | LOCK_NB). So, for a log of a
job in jobs.toml:
- running: the lock is held and the run started less than the job's timeout (as jobs.toml says now)
  plus GRACE_S ago (a lock held longer is no runner's: no run outlives its timeout by more than its
  10 s to stop; a developer can open the log and lock it too);
- finished: otherwise, when the log has its end section (`exit_code`, `duration_s`, `result`);
- unfinished: otherwise: the runner was killed (or the disk was full) before it wrote the end; also
  the runs of a runner from before the lock, had they been in progress at the upgrade.
`status` lists the running ones; since a run cannot run longer than that bound, it lists only the names
newer than it and tests their locks, reading nothing of those that are over.

`logs RUN_ID` sends the log's output section (between `# ---- output` and the last `# ---- end` line),
as the runner wrote it: redacted, stdout and stderr interleaved, with the runner's `# api` lines. With
`follow`, it goes on while the run is in progress, polling the file every POLL_S (the standard library
has no inotify), until the run is over, the client leaves, or the bound above passes. Until the run is
over it holds back any line that could be the start of the end section (a job may print one), and a
UTF-8 character that is not complete yet.

What the files say is what is shown: developers may write into the logs directory (that is how they
delete logs), so a log there may be forged or deleted; a job's output can imitate the end section
of a run that then dies; the journal's entries (JOB_NAME, RUN_ID, EXIT_CODE) are the record no
developer can change.
"""

from __future__ import annotations

import fcntl
import os
import select
import stat
import time

from runner.config import JOB_NAME
from runner.errors import (
    ConfigError,
    InternalError,
    RequestError,
    RunnerError,
    UnknownJobError,
    UnknownRunError,
)
from runner.errors import quoted as _quoted
from runner.peer import check_allowed
from runner.protocol import Form, Request
from runner.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from runner.channel import ClientChannel
    from runner.config import Config, Job
    from runner.peer import Peer
    from runner.protocol import Reply

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
# After a job's timeout the runner sends SIGTERM, SIGKILL 10 s later, gives the API proxies 1 s for their
# last records and writes the end section: a lock held longer than this past the timeout is no runner's.
GRACE_S = 60.0
POLL_S = 0.1  # `logs ... follow`: how often the file is looked at while the run is in progress
HEAD_BYTES = 4096  # job, run, started and caller come first in the header
HEADER_MAX = 1 << 20  # where `# ---- output` must be by: args and command are escaped, at most a few x 64 KiB
TAIL_BYTES = 8192  # the end section, usually some 150 bytes
FOOTER_MAX = 64 << 10  # an end section is never longer: a `# ---- end` line further back is output
READ_SIZE = 64 << 10  # one `log` event at most, as the runner's `output` events
STATUS_SCAN_MAX = 1000  # `status`: run logs looked at per job, newest first
LOGS_VIEW_ENV = "JOBRUNNER_LOGS_VIEW"

OUTPUT_MARK = b"# ---- output\n"
END_MARK = b"# ---- end\n"

RUNNING = "running"
FINISHED = "finished"
UNFINISHED = "unfinished"

FIELDS = {
    "history": frozenset({"op", "job", "limit"}),
    "logs": frozenset({"op", "run_id", "follow"}),
    "status": frozenset({"op"}),
}
USAGE = {
    "history": "send 'history [NAME] [LIMIT]'",
    "logs": "send 'logs RUN_ID' or 'logs RUN_ID follow'",
    "status": "send 'status'",
}
RUN_ID_EXAMPLE = "20261128T154402-123456-3fa9c0de"


# ------------------------------------------------------------------------------------------- requests


def parse_text(op: str, words: list[str]) -> Request:
    """`history [NAME] [LIMIT]`, `logs RUN_ID [follow]`, `status` (the words after the op)."""
    if op == "status":
        if words:
            raise RequestError("'status' takes no arguments", USAGE[op])
        return Request(Form.TEXT, "status")
    if op == "logs":
        if not 1 <= len(words) <= 2 or words[1:] not in ([], ["follow"]):
            raise RequestError("'logs' needs a run id, and at most the word 'follow' after it", USAGE[op])
        return Request(Form.TEXT, "logs", run_id=_run_id(words[0]), follow=len(words) == 2)
    if len(words) > 2:
        raise RequestError("'history' takes at most a job name and a number", USAGE[op])
    job, limit = "", DEFAULT_LIMIT
    for index, word in enumerate(words):
        if _is_number(word):
            limit = _limit(int(word))
        elif index == 0:
            job = _job_name(word)
        else:
            raise RequestError(f"not a number of runs: {_quoted(word)}", USAGE[op])
    return Request(Form.TEXT, "history", job, limit=limit)


def parse_json(obj: dict[str, object]) -> Request:
    """`{"op": "history", "job": NAME, "limit": N}` (both optional), `{"op": "logs", "run_id": ID,
    "follow": false}` (`follow` optional), `{"op": "status"}`. Fields of other ops are unknown here."""
    op = str(obj["op"])
    unknown = set(obj) - FIELDS[op]
    if unknown:
        raise RequestError(
            f"unknown field {_quoted(str(sorted(unknown)[0]))} for op {op!r}",
            f"fields: {', '.join(sorted(FIELDS[op]))}",
        )
    if op == "status":
        return Request(Form.JSON, "status")
    if op == "logs":
        run_id, follow = obj.get("run_id"), obj.get("follow", False)
        if not isinstance(run_id, str):
            raise RequestError('"run_id" must be a string', f'e.g. "{RUN_ID_EXAMPLE}"')
        if not isinstance(follow, bool):
            raise RequestError('"follow" must be true or false', "")
        return Request(Form.JSON, "logs", run_id=_run_id(run_id), follow=follow)
    job, limit = obj.get("job", ""), obj.get("limit", DEFAULT_LIMIT)
    if not isinstance(job, str):
        raise RequestError('"job" must be a string', "")
    if type(limit) is not int:  # bool is no number of runs
        raise RequestError('"limit" must be a whole number', f"from 1 to {MAX_LIMIT}")
    return Request(Form.JSON, "history", _job_name(job) if job else "", limit=_limit(limit))


def _is_number(word: str) -> bool:
    return 0 < len(word) <= 9 and all(c in "0123456789" for c in word)


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise RequestError(f"the number of runs must be from 1 to {MAX_LIMIT}, not {limit}", "")
    return limit


def _job_name(name: str) -> str:
    if not JOB_NAME.fullmatch(name):
        raise UnknownJobError(
            f"no job named {_quoted(name)}", f"job names match {JOB_NAME.pattern}; try 'list'"
        )
    return name


def valid_run_id(text: str) -> bool:
    """`YYYYMMDDTHHMMSS-UUUUUU-XXXXXXXX` (docs/protocol.md), checked without a regular expression."""
    if len(text) != len(RUN_ID_EXAMPLE) or text[8] != "T" or text[15] != "-" or text[22] != "-":
        return False
    digits = text[:8] + text[9:15] + text[16:22]
    return all(c in "0123456789" for c in digits) and all(c in "0123456789abcdef" for c in text[23:])


def _run_id(text: str) -> str:
    if not valid_run_id(text):
        raise UnknownRunError(
            f"no run {_quoted(text)}", f"run ids look like {RUN_ID_EXAMPLE}: see jobctl history"
        )
    return text


def run_started(run_id: str) -> float:
    """The start time a (valid) run id carries, in seconds since the epoch."""
    year, month, day = int(run_id[0:4]), int(run_id[4:6]), int(run_id[6:8])
    clock = int(run_id[9:11]) * 3600 + int(run_id[11:13]) * 60 + int(run_id[13:15])
    return _days_from_civil(year, month, day) * 86400 + clock + int(run_id[16:22]) / 1e6


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm): calendar.timegm()
    without importing calendar (and with it datetime and locale)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


# ------------------------------------------------------------------------------------------ run logs


class RunLogFile:
    """One run log, open for reading: only a regular file, and never through a symbolic link (the logs
    directory is the developers' to write in)."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IsADirectoryError(path)  # any OSError: not a run log
        self.fd = fd
        self.path = path

    def __enter__(self) -> RunLogFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, max(size, 0), offset)

    def in_progress(self) -> bool:
        """Whether the runner's lock on it is held (runner.runs.mark_in_progress): tested, not kept."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False  # no flock here: the runner could not take it either
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False

    def header(self) -> dict[str, str]:
        return _fields(self.read(HEAD_BYTES, 0).partition(b"\n" + OUTPUT_MARK)[0])

    def output_start(self) -> int:
        """Where the output section begins: right after the `# ---- output` line."""
        data = b""
        while len(data) < HEADER_MAX:
            chunk = self.read(READ_SIZE, len(data))
            if not chunk:
                break
            data += chunk
            at = data.find(b"\n" + OUTPUT_MARK)
            if at != -1:
                return at + 1 + len(OUTPUT_MARK)
        raise InternalError(f"run log {self.path} has no '# ---- output' line", "it is not a run log")

    def end_section(self, after: int = 0) -> tuple[int, dict[str, str]] | None:
        """Where the end section (the last `# ---- end` line) begins, and its fields; None without one.
        `after`: where the output section begins, if known (the end section cannot begin before it)."""
        size = self.size()
        for span in (TAIL_BYTES, FOOTER_MAX):
            start = max(size - span, after - 1, 0)
            data = self.read(size - start, start)
            at = data.rfind(b"\n" + END_MARK)
            if at != -1:
                return start + at + 1, _fields(data[at + 1 + len(END_MARK) :])
            if start == max(after - 1, 0):
                break
        return None


def _fields(data: bytes) -> dict[str, str]:
    """`# key: value` lines (runner.runs' header and end section), the first of each key."""
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, colon, value = line.removeprefix("# ").partition(":")
        if line.startswith("# ") and colon and key.replace("_", "a").isalpha() and key.islower():
            fields.setdefault(key, value.removeprefix(" "))
    return fields


class RunRecord(Value):
    """One run as `history`, `status` and `logs` report it (docs/protocol.md, the `runs` event)."""

    __slots__ = (
        "duration_s",
        "exit_code",
        "job",
        "log",
        "result",
        "run_id",
        "started",
        "state",
        "uid",
        "user",
    )

    def __init__(  # noqa: PLR0917 - built in one place, with keywords
        self,
        job: str,
        run_id: str,
        user: str,
        uid: int | None,
        started: str,
        state: str,
        exit_code: int | None,
        duration_s: float | None,
        result: str,
        log: str,
    ) -> None:
        self.job = job
        self.run_id = run_id
        self.user = user  # who ran it: the caller's name (or uid), "root" for an operator's start
        self.uid = uid
        self.started = started  # the header's ISO 8601 time, UTC
        self.state = state  # RUNNING, FINISHED or UNFINISHED
        self.exit_code = exit_code  # finished runs that started
        self.duration_s = duration_s  # finished: the run's; running: so far
        self.result = result  # the end section's `result` ("exited with 0", "timed out, killed by ...")
        self.log = log  # the run log's path as developers see it

    def event_fields(self) -> dict[str, object]:
        return {
            "job": self.job,
            "run_id": self.run_id,
            "user": self.user,
            "uid": self.uid,
            "started": self.started,
            "state": self.state,
            "exit_code": self.exit_code,
            "duration_s": self.duration_s,
            "result": self.result,
            "log": self.log,
        }


class Logs:
    """The run logs of the jobs one caller may see."""

    def __init__(self, config: Config, peer: Peer, now: float | None = None) -> None:
        self.config = config
        self.peer = peer
        self.directory = os.environ.get(LOGS_VIEW_ENV) or config.logs
        self.now = time.time() if now is None else now
        self.jobs: list[Job] = []
        for job in config.jobs.values():
            try:
                check_allowed(peer, job.name, job.allowed_groups)
            except RunnerError:
                continue
            self.jobs.append(job)
        if not os.path.isdir(self.directory):
            raise ConfigError(
                f"the run logs are not there: {self.directory} is missing",
                "an administrator runs install.sh again (it creates the logs directory, and makes it "
                "visible to the front door)",
            )

    def path(self, job: str, run_id: str) -> str:
        return os.path.join(self.directory, job, f"{run_id}.log")

    def run_ids(self, job: str) -> list[str]:
        """The ids of the job's run logs, newest first (names only: nothing is read)."""
        try:
            names = os.listdir(os.path.join(self.directory, job))
        except (FileNotFoundError, NotADirectoryError):
            return []  # no run yet
        except OSError as e:
            raise ConfigError(
                f"cannot read the run logs of job '{job}': {e.strerror}",
                "the front door reads them as a member of the developer group: run install.sh again",
            ) from None
        ids = [name[:-4] for name in names if name.endswith(".log") and valid_run_id(name[:-4])]
        ids.sort(reverse=True)
        return ids

    def bound(self, job: Job, run_id: str) -> float:
        """When a run of `job` that started as `run_id` says is over at the latest."""
        return run_started(run_id) + job.timeout_s + GRACE_S

    def open(
        self, job: Job, run_id: str, *, in_progress: bool = False
    ) -> tuple[RunLogFile, dict[str, str]] | None:
        """The run's log and its header, or None when it is not there or not this run's (or, with
        `in_progress`, when its lock is free: then nothing is read)."""
        try:
            log = RunLogFile(self.path(job.name, run_id))
        except OSError:
            return None
        if in_progress and not log.in_progress():
            log.close()
            return None
        try:
            header = log.header()
        except OSError:
            header = {}
        if header.get("job") != job.name or header.get("run") != run_id:  # a copy, or not a run log
            log.close()
            return None
        return log, header

    def record(self, job: Job, run_id: str, log: RunLogFile, header: dict[str, str]) -> RunRecord:
        running = self.now < self.bound(job, run_id) and log.in_progress()
        end = None if running else log.end_section()
        return self.make_record(job, run_id, header, RUNNING if running else end[1] if end else None)

    def make_record(
        self, job: Job, run_id: str, header: dict[str, str], end: dict[str, str] | str | None
    ) -> RunRecord:
        """`end`: the end section's fields (finished), RUNNING, or None (unfinished)."""
        user, uid = _caller(header.get("caller", ""))
        exit_code, duration, result = None, None, ""
        if end == RUNNING:
            state, duration = RUNNING, round(max(self.now - run_started(run_id), 0.0), 3)
        elif isinstance(end, dict):
            state, result = FINISHED, end.get("result", "")
            exit_code = _number(end.get("exit_code"), int)
            duration = _number(end.get("duration_s"), float)
        else:
            state = UNFINISHED
        return RunRecord(
            job=job.name,
            run_id=run_id,
            user=user,
            uid=uid,
            started=header.get("started", ""),
            state=state,
            exit_code=exit_code if isinstance(exit_code, int) else None,
            duration_s=duration,
            result=result,
            log=os.path.join(self.config.logs, job.name, f"{run_id}.log"),
        )

    def job(self, name: str) -> Job:
        """A job the caller names: unknown-job, or forbidden as for `run`."""
        job = self.config.jobs.get(name)
        if job is None:
            raise UnknownJobError(
                f"no job named {_quoted(name)}", "see the jobs you may run with: jobctl list"
            )
        check_allowed(self.peer, job.name, job.allowed_groups)
        return job

    # --- the three requests

    def history(self, job_name: str, limit: int) -> list[RunRecord]:
        """The newest `limit` runs of the job (or of every job the caller may see), newest first."""
        jobs = [self.job(job_name)] if job_name else self.jobs
        candidates = [(run_id, job) for job in jobs for run_id in self.run_ids(job.name)[:limit]]
        candidates.sort(key=lambda candidate: candidate[0], reverse=True)
        records = []
        for run_id, job in candidates:
            opened = self.open(job, run_id)
            if opened is None:
                continue
            with opened[0] as log:
                records.append(self.record(job, run_id, log, opened[1]))
            if len(records) == limit:
                break
        return records

    def status(self) -> list[RunRecord]:
        """The runs in progress, newest first: only logs newer than their job's bound are looked at."""
        records = []
        for job in self.jobs:
            for run_id in self.run_ids(job.name)[:STATUS_SCAN_MAX]:
                if self.bound(job, run_id) <= self.now:
                    break  # older ones are over
                opened = self.open(job, run_id, in_progress=True)
                if opened is not None:
                    opened[0].close()
                    records.append(self.make_record(job, run_id, opened[1], RUNNING))
        records.sort(key=lambda record: record.run_id, reverse=True)
        return records

    def find(self, run_id: str) -> tuple[Job, RunLogFile, dict[str, str]]:
        """The run `run_id` of a job the caller may see; unknown-run otherwise (whether there is one)."""
        for job in self.jobs:
            opened = self.open(job, run_id)
            if opened is not None:
                return job, *opened
        raise UnknownRunError(
            f"no run {run_id} that you may see", "jobctl history lists the runs you may see"
        )


def _caller(text: str) -> tuple[str, int | None]:
    """`uid=1000 (alice) gid=1000 pid=4242` -> ("alice", 1000)."""
    uid_text = text.partition("uid=")[2].partition(" ")[0]
    name = text.partition("(")[2].partition(")")[0]
    uid = int(uid_text) if _is_number(uid_text) else None
    return name or uid_text, uid


def _number(text: str | None, kind: type[int] | type[float]) -> int | float | None:
    try:
        return kind(text) if text is not None else None
    except ValueError:
        return None


# -------------------------------------------------------------------------------------------- replies


def serve(config: Config, request: Request, peer: Peer, channel: ClientChannel) -> None:
    """Answer `history`, `logs` or `status` on the front door, ending with one final event; or raise."""
    logs = Logs(config, peer)
    if request.op == "history":
        channel.send_final(runs_reply(channel.reply, logs.history(request.job, request.limit)))
    elif request.op == "status":
        channel.send_final(runs_reply(channel.reply, logs.status()))
    else:
        send_logs(logs, request, channel)


def send_logs(logs: Logs, request: Request, channel: ClientChannel) -> None:
    """The run's output section; with `follow`, until the run is over (or the client leaves)."""
    job, log, header = logs.find(request.run_id)
    with log:
        start = log.output_start()
        transcript = Transcript(log, start, channel)
        bound = logs.bound(job, request.run_id)
        while log.in_progress() and time.time() < bound:
            sent = transcript.send_written()
            if channel.gone:
                return
            if not request.follow:
                logs.now = time.time()
                record = logs.make_record(job, request.run_id, header, RUNNING)
                channel.send_final(run_reply(channel.reply, record, transcript.at_line_start))
                return
            if not sent:
                _wait(channel, POLL_S)
                if channel.gone:
                    return
        end = log.end_section(start)
        transcript.send_until(end[0] if end else log.size())
        if channel.gone:
            return
        logs.now = time.time()
        record = logs.make_record(job, request.run_id, header, end[1] if end else None)
        channel.send_final(run_reply(channel.reply, record, transcript.at_line_start))


class Transcript:
    """Sends a run log's output section from `start` on, as `log` events (or raw, in the text form)."""

    def __init__(self, log: RunLogFile, start: int, channel: ClientChannel) -> None:
        self.log = log
        self.pos = start  # the first byte not sent yet
        self.channel = channel
        self.at_line_start = True  # whether what was sent so far ends with a newline (or is nothing)

    def send_written(self) -> bool:
        """While the run is in progress: send what it has written so far, but for a line that may
        begin its end section and an incomplete character. Whether anything was sent."""
        sent = False
        size = self.log.size()
        while self.pos < size and not self.channel.gone:
            data = self.log.read(min(READ_SIZE, size - self.pos), self.pos)
            if not data:
                break
            count = sendable(data, self.at_line_start, size - FOOTER_MAX - self.pos)
            if count > 0:
                self._send(data[:count])
                sent = True
            if count < len(data):
                break
        return sent

    def send_until(self, stop: int) -> None:
        """The run is over: send the rest of the output section, up to `stop`."""
        while self.pos < stop and not self.channel.gone:
            data = self.log.read(min(READ_SIZE, stop - self.pos), self.pos)
            if not data:
                break  # the file was cut short meanwhile
            count = len(data) if self.pos + len(data) >= stop else len(data) - _incomplete_utf8(data)
            self._send(data[: count or len(data)])

    def _send(self, data: bytes) -> None:
        self.channel.send(log_event(self.channel.reply, data))
        self.pos += len(data)
        self.at_line_start = data.endswith(b"\n")


def sendable(data: bytes, at_line_start: bool, window: int) -> int:
    """How much of `data`, the log from its first byte not sent yet, may be sent while the run is in
    progress: all of it but from the last line that is (or, still being written, may become) a
    `# ---- end` line, if that line begins at `window` or later (an end section is never longer than
    FOOTER_MAX, so one further back is output, and nothing follows the real one); and without an
    incomplete UTF-8 character at the end. `at_line_start`: whether data[0] begins a line."""
    window = max(window, 0)
    candidate = None
    at = data.rfind(b"\n" + END_MARK, max(window - 1, 0))
    if at != -1:
        candidate = at + 1
    elif window == 0 and at_line_start and data.startswith(END_MARK):
        candidate = 0
    last_newline = data.rfind(b"\n")
    tail = last_newline + 1 if last_newline != -1 else (0 if at_line_start else None)
    if tail is not None and window <= tail < len(data) and END_MARK.startswith(data[tail:]):
        candidate = tail if candidate is None else min(candidate, tail)
    if candidate is not None:
        return candidate
    return len(data) - _incomplete_utf8(data)


def _incomplete_utf8(data: bytes) -> int:
    """How many bytes at the end of `data` begin a UTF-8 character that is not complete yet."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for the lead byte
        if byte < 0xC0:
            return 0
        needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        return back if back < needed else 0
    return 0


def _wait(channel: ClientChannel, seconds: float) -> None:
    """Sleep up to `seconds`, noticing meanwhile that the client left (channel.gone)."""
    fd = channel.fileno()
    if fd is None:
        return
    poller = select.poll()
    poller.register(fd, channel.poll_events())  # hang-ups always; input while the client has not shut down
    for _, revents in poller.poll(seconds * 1000):
        channel.on_ready(revents)


def log_event(reply: Reply, data: bytes) -> bytes:
    """A piece of the transcript: raw in the text form, a `log` event (text or base64) in JSON."""
    if reply.form is Form.TEXT:
        return reply.output("stdout", data)
    try:
        return _event(event="log", text=data.decode("utf-8"))
    except UnicodeDecodeError:
        import binascii

        return _event(event="log", base64=binascii.b2a_base64(data, newline=False).decode("ascii"))


def runs_reply(reply: Reply, records: list[RunRecord]) -> bytes:
    """The final reply to `history` and `status`: a `runs` event, or a table with a heading."""
    if reply.form is Form.JSON:
        return _event(event="runs", runs=[record.event_fields() for record in records])
    if not records:
        return b""
    rows = [("RUN", "JOB", "USER", "STARTED (UTC)", "DURATION", "EXIT")]
    rows += [
        (r.run_id, r.job, r.user, r.started[:19].replace("T", " "), _duration(r.duration_s), _exit(r))
        for r in records
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    return "".join(line.rstrip() + "\n" for line in lines).encode("utf-8", "replace")


def run_reply(reply: Reply, record: RunRecord, at_line_start: bool) -> bytes:
    """The final reply to `logs`: a `run` event with the run's record, or one `jobrunner:` line."""
    if reply.form is Form.JSON:
        return _event(event="run", **record.event_fields())
    return (b"" if at_line_start else b"\n") + f"jobrunner: {run_line(record)}\n".encode("utf-8", "replace")


def run_line(record: RunRecord) -> str:
    """`NAME (run RUN_ID) exited with N after S s`, as a run's own last line, or what else became of it."""
    run = f"{record.job} (run {record.run_id})"
    if record.state == RUNNING:
        return f"{run} is still running ({_duration(record.duration_s)} so far)"
    if record.state == UNFINISHED:
        return f"{run} never finished: its log has no end section (its runner was stopped)"
    if record.exit_code is None:
        return f"{run} {record.result or 'ended'}"
    return f"{run} exited with {record.exit_code} after {record.duration_s or 0.0:.1f} s"


def _duration(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds:.1f} s"


def _exit(record: RunRecord) -> str:
    if record.state != FINISHED:
        return record.state
    return "-" if record.exit_code is None else str(record.exit_code)


def _event(**fields: object) -> bytes:
    import json

    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
