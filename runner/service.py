"""One request, start to finish: who is asking, for what, may they, then run the job and report.

The same code serves two kinds of unit (runner.units writes them from jobs.toml):
- the front door, job@.service, started by job.socket for each connection to /run/job.sock: it holds
  no credential, answers `list`, refuses what it can, and hands `run NAME` to the job's own socket
  (runner.handoff);
- a job's own units, job-NAME@.service (job-NAME.socket: a connection, direct or handed over) and
  job@NAME.service (an operator's `systemctl start job@NAME`): they load that job's credentials and
  no other, and run that job and no other.
Both kinds of run share `run_job`. Every failure is a RunnerError that becomes one final `error` event
(redacted) and a sysexits status; nothing here prints a traceback to a client.
"""

from __future__ import annotations

import os
import time

from runner import credentials, execute, handoff, journal, limits, lock, notify
from runner.channel import ClientChannel, ConsoleChannel
from runner.config import Network, load_config
from runner.errors import (
    ArgumentsError,
    BusyError,
    ConfigError,
    CredentialError,
    InternalError,
    RequestError,
    RunnerError,
    UnknownJobError,
    quoted,
)
from runner.peer import check_allowed, operator_peer, read_peer, user_name
from runner.protocol import (
    HISTORY_OPS,
    ExitReport,
    Form,
    NoRequest,
    Reply,
    guess_form,
    parse_request,
    read_request_line,
)
from runner.redact import Redactor, encoded_forms
from runner.runs import RunLog, create_run_paths, iso_time, new_run_id
from runner.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms on every connection)
if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable, Mapping

    from runner.config import Config, Job
    from runner.endpoint import Endpoints
    from runner.execute import Channel, Outcome
    from runner.peer import Peer
    from runner.protocol import Request
    from runner.runs import RunPaths

    SendFunction = Callable[[bytes], None]


class Context(Value):
    """What every request needs: the loaded credentials and a redactor built from them."""

    __slots__ = ("redactor", "secrets")

    def __init__(self, secrets: Mapping[str, bytes], redactor: Redactor) -> None:
        self.secrets = secrets
        self.redactor = redactor

    @classmethod
    def load(cls) -> Context:
        secrets = credentials.load_credentials(credentials.credentials_directory())
        plain = [form for value in secrets.values() for form in credentials.secret_forms(value)]
        encoded = [form for value in plain for form in encoded_forms(value)]
        return cls(secrets=secrets, redactor=Redactor(plain + encoded))


def serve_connection(conn: _socket.socket, job_name: str | None) -> int:
    """Serve one connection; return the runner's exit status. `job_name`: the job whose unit this is
    (job-NAME.socket), or None for the front door (job.socket)."""
    context = Context.load()
    received = bytearray()
    reply = Reply(Form.TEXT)
    channel: ClientChannel | None = None
    started = time.monotonic()  # one request deadline, whoever's connection it turns out to be
    try:
        if job_name is not None:
            conn = handoff.receive(conn, received)  # the client's own connection, if handed over
        line = read_request_line(conn, received, started=started)
        reply = Reply(guess_form(line))
        request = parse_request(line)
        peer = read_peer(conn)
        config = load_config()
        if request.op == "list" and job_name is None:
            channel = ClientChannel(conn, reply)
            channel.send_final(reply.jobs(_visible_jobs(config, peer)))
            return 0
        if request.op in HISTORY_OPS and job_name is None:
            from runner import history  # `history`, `logs`, `status`: only these requests pay for it

            channel = ClientChannel(conn, reply)
            history.serve(config, request, peer, channel)
            return 0
        if job_name is None:
            _hand_over(config, request, peer, conn, line)
            return 0
        _check_own_job(request, job_name)
        channel = ClientChannel(conn, reply)
        return run_job(config, request, peer, context, channel).outcome.exit_code
    except NoRequest:
        journal.log("the client closed the connection without a request", journal.PRIORITY_DEBUG)
        return 0  # not a failed unit: nothing was asked
    except Exception as e:
        error = e if isinstance(e, RunnerError) else _internal_error(context.redactor)
        if channel is None:
            reply = Reply(guess_form(bytes(received)))
            channel = ClientChannel(conn, reply)
        _report_error(error, context.redactor, channel.send_final, reply)  # EOF before the journal entry
        return error.exit_status
    finally:
        if channel is not None:
            channel.close()
        else:
            conn.close()


def serve_operator(job_name: str, *, front_door: bool = False) -> int:
    """`systemctl start job@NAME`: run the job with output to the journal; exit with the job's status.
    `front_door`: the template job@.service was started, not the job's own job@NAME.service, so there
    is no such job (or its units were not generated yet): say which."""
    context = Context.load()
    reply = Reply(Form.TEXT)

    def to_stderr(data: bytes) -> None:
        os.write(2, data)

    try:
        request = parse_request(f"run {job_name}".encode())
        config = load_config()
        if front_door:
            _missing_units(config, request.job, f"job@{request.job}.service")
        result = run_job(config, request, operator_peer(), context, ConsoleChannel())
        to_stderr(reply.exit(_exit_report(request.job, result)))
        return result.outcome.exit_code
    except Exception as e:
        error = e if isinstance(e, RunnerError) else _internal_error(context.redactor)
        _report_error(error, context.redactor, to_stderr, reply)
        return error.exit_status


def _hand_over(config: Config, request: Request, peer: Peer, client: _socket.socket, line: bytes) -> None:
    """The front door's `run NAME`: refuse an unknown job or a caller outside its allowed_groups without
    starting the job's unit (no credential is decrypted for them), then hand the connection over."""
    job = config.jobs.get(request.job)
    if job is None:
        raise _unknown_job(request.job)
    check_allowed(peer, job.name, job.allowed_groups)
    # Arguments are checked by the job's unit, whose error can quote them redacted with its keys: this
    # process holds none, and an argument may be a key pasted by mistake.
    path = handoff.job_socket(job.name)
    try:
        handoff.hand_over(client, line, path)
    except handoff.HandoffRefused as refused:
        if not refused.reachable:
            _missing_units(config, job.name, path)
        _hand_over_again(job, client, line, path)
    journal.log(f"handed a run of job {job.name} to job-{job.name}.socket", journal.PRIORITY_DEBUG)


def _hand_over_again(job: Job, client: _socket.socket, line: bytes, path: str) -> None:
    """The job's socket closed without taking the run: it is at its connection limit (a burst), or the
    job's unit failed to start (for a job with credentials, most likely one that systemd cannot
    decrypt). Try once more, which a burst may let through, and tell the two apart by whether systemd
    counted a refusal at the limit meanwhile: a client told "credential" in a burst would not try again."""
    before = handoff.socket_refusals(job.name)
    try:
        handoff.hand_over(client, line, path)
        return
    except handoff.HandoffRefused:
        pass
    after = handoff.socket_refusals(job.name)
    at_limit = None if before is None or after is None else after > before
    raise _not_started(job, at_limit)


def _unknown_job(name: str) -> UnknownJobError:
    return UnknownJobError(f"no job named {quoted(name)}", "see the jobs you may run with: jobctl list")


def _not_started(job: Job, at_limit: bool | None = None) -> RunnerError:
    """What to tell a client whose run systemd would not start in the job's unit; `at_limit`: whether
    the job's socket refused it at its connection limit (None: systemd could not say)."""
    units = f"journalctl -u 'job-{job.name}@*' -n 20"
    if at_limit:
        return BusyError(
            f"job '{job.name}' did not start: its socket is at its connection limit",
            "try again in a moment (jobctl does, for up to 30 s)",
        )
    if not job.credentials and at_limit is False:
        return ConfigError(
            f"job '{job.name}' did not start: its unit failed", f"an administrator can see why with: {units}"
        )
    if not job.credentials:
        return BusyError(
            f"job '{job.name}' did not start: its socket is at its connection limit, or its unit failed",
            f"try again; if it persists, an administrator can see why with: {units}",
        )
    names = ", ".join(repr(name) for name in job.credentials)
    which = f"its credential {names}" if len(job.credentials) == 1 else f"one of its credentials ({names})"
    maybe_limit = " (or the job's socket is at its connection limit)" if at_limit is None else ""
    return CredentialError(
        f"job '{job.name}' did not start: systemd could not load {which}: corrupt, expired, or "
        f"encrypted for another machine{maybe_limit}",
        f"an administrator can see which with: {units}; then store it again: "
        f"sudo jobrunner creds set {job.credentials[0] if len(job.credentials) == 1 else 'NAME'}",
    )


def _missing_units(config: Config, job_name: str, what: str) -> None:
    """A job without units of its own: unknown, or added to jobs.toml since they were generated."""
    if job_name not in config.jobs:
        raise _unknown_job(job_name)
    raise ConfigError(
        f"job '{job_name}' has no units of its own yet ({what} is missing)",
        "an administrator generates them: sudo jobrunner check (jobrunner-config.path does it on "
        "every edit of jobs.toml)",
    )


def _check_own_job(request: Request, job_name: str) -> None:
    """A job's socket runs that job only; `list` and other jobs are the front door's."""
    if request.op != "run" or request.job != job_name:
        raise RequestError(
            f"this is job '{job_name}''s own socket: it runs '{job_name}' and nothing else",
            "send other requests to the front door, /run/job.sock (jobctl does)",
        )


class RunResult(Value):
    __slots__ = ("limit_warnings", "log_error", "outcome", "paths", "run_id")

    def __init__(
        self,
        run_id: str,
        paths: RunPaths,
        outcome: Outcome,
        log_error: OSError | None,
        limit_warnings: tuple[str, ...] = (),
    ) -> None:
        self.run_id = run_id
        self.paths = paths
        self.outcome = outcome
        self.log_error = log_error  # the run log could not be written whole (e.g. the disk is full)
        self.limit_warnings = limit_warnings  # TasksMax=/MemoryMax= reached (runner/limits.py)


def run_job(config: Config, request: Request, peer: Peer, context: Context, channel: Channel) -> RunResult:
    """Check the request, run the job, and report its end on the channel (when it is a client)."""
    job = config.jobs.get(request.job)
    if job is None:
        raise _unknown_job(request.job)
    check_allowed(peer, job.name, job.allowed_groups)
    _check_arguments(job, request.args)
    credentials.require(job.credentials, context.secrets, job.name)
    lock_dir = lock.lock_directory(config.logs)
    user_slot = lock.acquire_user_slot(lock_dir, peer.uid, config.max_runs_per_user)
    try:
        job_lock = lock.acquire(lock_dir, job.name, job.concurrency, _waiter(channel))
    except RunnerError:
        lock.release(user_slot)
        raise
    run_id = new_run_id()
    try:
        result = _run(config, Run(job, request, peer, run_id), context, channel)
    except Exception as e:
        error = e if isinstance(e, RunnerError) else _internal_error(context.redactor)
        error.run_id = run_id
        raise error from None
    finally:
        # Before reporting, so that a queued run can start.
        for fd in (job_lock, user_slot):
            if fd is not None:
                lock.release(fd)
    if isinstance(channel, ClientChannel):
        # The client has its answer: EOF now, not after the journal entry and status below.
        channel.send_final(channel.reply.exit(_exit_report(job.name, result)))
    _log_end(job, peer, result)
    return result


class Run(Value):
    """One accepted request to run a job."""

    __slots__ = ("job", "peer", "request", "run_id")

    def __init__(self, job: Job, request: Request, peer: Peer, run_id: str) -> None:
        self.job = job
        self.request = request
        self.peer = peer
        self.run_id = run_id


def _run(config: Config, run: Run, context: Context, channel: Channel) -> RunResult:
    job, request, run_id = run.job, run.request, run.run_id
    paths = create_run_paths(config.outputs, config.logs, job.name, run_id)
    log = RunLog(paths.log)
    endpoints = None
    try:
        log.header(_header_fields(run, time.time(), context.redactor))
        try:
            endpoints = _endpoints(config, job, run_id, log)
            argv = [*job.command, *request.args]
            env = _environment(job, run_id, paths, context)
            if endpoints is not None:
                env.update(endpoints.urls)
            process = execute.start(argv, env, job.workdir)
        except RunnerError as e:
            log.footer(
                {
                    "finished": iso_time(time.time()),
                    "result": f"not started: {context.redactor.redact_text(e.message)}",
                }
            )
            raise
        _send_accepted(channel, request, job, run_id, paths)
        _log_start(run, process.pid)
        outcome = execute.Supervisor(
            process,
            job.timeout_s,
            context.redactor,
            log,
            channel,
            cancel_when_client_leaves=not request.detach,
            endpoints=endpoints,
        ).run()
        if endpoints is not None:
            endpoints.finish()  # the last requests' records, before the log's end
        warned = limits.warnings()  # TasksMax=/MemoryMax= reached: the outcome alone would not say why
        log.footer(
            {
                "finished": iso_time(time.time()),
                "result": outcome.describe(),
                "exit_code": outcome.exit_code,
                "duration_s": f"{outcome.duration_s:.3f}",
                **({"warnings": warned} if warned else {}),
            }
        )
    finally:
        if endpoints is not None:
            endpoints.close()
        log.close()
    return RunResult(run_id, paths, outcome, log.write_error, tuple(warned))


def _endpoints(config: Config, job: Job, run_id: str, log: RunLog) -> Endpoints | None:
    """The job's local endpoints for its APIs (runner.endpoint), or None for a job that lists none."""
    if not job.apis:
        return None
    from runner import endpoint  # only jobs with APIs pay for it

    try:
        return endpoint.Endpoints(
            job.name,
            run_id,
            [config.apis[name] for name in job.apis],
            lambda record: log.note(f"api {record.api}: {record.text}"),
        )
    except OSError as e:
        raise InternalError(
            f"cannot listen for job '{job.name}''s API requests: {e.strerror}",
            "the job's unit needs AF_INET and the loopback address "
            f"{endpoint.ENDPOINT_HOST} (jobrunner check rewrites its units)",
        ) from None


def _check_arguments(job: Job, args: tuple[str, ...]) -> None:
    if not args:
        return
    if job.args_pattern is None:
        raise ArgumentsError(f"job '{job.name}' takes no arguments", "run it without arguments")
    for arg in args:
        if "\0" in arg or not job.argument_matches(arg):
            shown = repr(arg) if len(repr(arg)) <= 80 else repr(arg)[:80] + "..."
            raise ArgumentsError(
                f"argument {shown} is not accepted by job '{job.name}'",
                f"every argument must match {job.args_pattern!r} in full",
            )


def _environment(job: Job, run_id: str, paths: RunPaths, context: Context) -> dict[str, str]:
    base = {
        "PATH": execute.JOB_PATH,
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        # The unit's private /tmp (PrivateTmp=yes): the one writable place that is the job's own.
        "HOME": "/tmp",  # noqa: S108
        "JOB_NAME": job.name,
        "JOB_RUN_ID": run_id,
        "JOB_OUTPUT_DIR": paths.output_dir,
    }
    if "CREDENTIALS_DIRECTORY" in os.environ:
        base["CREDENTIALS_DIRECTORY"] = os.environ["CREDENTIALS_DIRECTORY"]
    values = {name: credentials.env_value(context.secrets[name]) for name in job.credentials}
    return execute.job_environment(base, job.env, values)


def _waiter(channel: Channel) -> lock.Waiter:
    """For a queued run: wait, and tell the lock whether the client is still there."""

    def wait(seconds: float) -> bool:
        fd = channel.fileno()
        if fd is None:
            time.sleep(seconds)
            return True
        import select

        poller = select.poll()
        poller.register(fd, 0)  # only hang-ups
        for _, revents in poller.poll(seconds * 1000):
            channel.on_ready(revents)
        return not channel.gone

    return wait


def _send_accepted(channel: Channel, request: Request, job: Job, run_id: str, paths: RunPaths) -> None:
    if isinstance(channel, ClientChannel):
        channel.send(channel.reply.accepted(job.name, run_id, paths.output_dir, paths.log, request.detach))
        if request.detach:
            channel.streaming = False  # output goes to the run log only; the final event is still sent


def _header_fields(run: Run, started: float, redactor: Redactor) -> dict[str, object]:
    job, request, peer = run.job, run.request, run.peer
    return {
        "job": job.name,
        "run": run.run_id,
        "started": iso_time(started),
        "caller": peer.describe(),
        "args": [redactor.redact_text(a) for a in request.args],
        "command": [redactor.redact_text(a) for a in job.command],
        "detach": request.detach,
    }


def _exit_report(job: str, result: RunResult) -> ExitReport:
    outcome = result.outcome
    return ExitReport(
        job=job,
        run_id=result.run_id,
        exit_code=outcome.exit_code,
        signal=outcome.signal,
        timed_out=outcome.timed_out,
        cancelled=outcome.cancelled,
        duration_s=outcome.duration_s,
        log=result.paths.log,
        output_dir=result.paths.output_dir,
        warnings=(
            *((f"the run log is incomplete: {result.log_error.strerror}",) if result.log_error else ()),
            *result.limit_warnings,
        ),
    )


def _log_start(run: Run, pid: int) -> None:
    job, peer, run_id = run.job, run.peer, run.run_id
    notify.status(f"running {job.name} (run {run_id}) for {user_name(peer.uid)}")
    journal.log(
        f"run {run_id} of job {job.name} started for {user_name(peer.uid)}",
        JOB_NAME=job.name,
        RUN_ID=run_id,
        CALLER_UID=peer.uid,
        CALLER_GID=peer.gid,
        CALLER_PID=peer.pid,
        JOB_PID=pid,
        DETACH=int(run.request.detach),
    )


def _log_end(job: Job, peer: Peer, result: RunResult) -> None:
    outcome, run_id = result.outcome, result.run_id
    notify.status(f"{job.name} (run {run_id}): {outcome.describe()}")
    priority = journal.PRIORITY_INFO if outcome.exit_code == 0 else journal.PRIORITY_WARNING
    journal.log(
        f"run {run_id} of job {job.name} {outcome.describe()} after {outcome.duration_s:.1f} s",
        priority,
        JOB_NAME=job.name,
        RUN_ID=run_id,
        CALLER_UID=peer.uid,
        EXIT_CODE=outcome.exit_code,
        EXIT_SIGNAL=outcome.signal,
        TIMED_OUT=int(outcome.timed_out),
        CANCELLED=int(outcome.cancelled),
        DURATION_S=f"{outcome.duration_s:.3f}",
        RUN_LOG=result.paths.log,
    )
    if result.log_error is not None:
        journal.log(
            f"run log {result.paths.log} is incomplete: {result.log_error.strerror}",
            journal.PRIORITY_ERR,
            JOB_NAME=job.name,
            RUN_ID=run_id,
        )


def _visible_jobs(config: Config, peer: Peer) -> list[dict[str, object]]:
    visible = []
    for job in config.jobs.values():
        try:
            check_allowed(peer, job.name, job.allowed_groups)
        except RunnerError:
            continue
        network = job.sandbox.network
        visible.append(
            {
                "name": job.name,
                "description": job.description,
                "args": job.accepts_arguments(),
                "concurrency": job.concurrency.value,
                "timeout_s": job.timeout_s,
                "network": list(job.sandbox.addresses) if network is Network.LISTED else network.value,
            }
        )
    return visible


def _report_error(error: RunnerError, redactor: Redactor, send: SendFunction, reply: Reply) -> None:
    message, hint = redactor.redact_text(error.message), redactor.redact_text(error.hint)
    send(reply.error(error.code, message, hint, error.run_id))
    journal.log(f"request failed: {error.code}: {message}", journal.PRIORITY_WARNING, ERROR_CODE=error.code)


def _internal_error(redactor: Redactor) -> InternalError:
    # The traceback goes to the journal (redacted), never to the client.
    import traceback

    journal.log(f"internal error: {redactor.redact_text(traceback.format_exc())}", journal.PRIORITY_ERR)
    return InternalError(
        "the runner failed unexpectedly", "the journal has the details: journalctl -u 'job@*'"
    )
