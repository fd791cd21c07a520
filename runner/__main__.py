"""The runner's entry point, started by job@.service once per connection or per operator start.

job@.service calls run() through `python3 -c` rather than `python3 -m runner`: -m goes through runpy,
which imports importlib.util and contextlib first (~1 ms of every connection, A/B in a container).
`python3 -m runner [JOBNAME]` does the same by hand.

Kept tiny and lean: every connection pays for each import made before its job starts.
"""

from __future__ import annotations

import gc
import os
import sys

# No collections while the runner imports its modules (~1 ms per connection): what they allocate lives
# as long as the process. main() freezes it and turns the collector back on before any request data.
gc.disable()


def main(argv: list[str]) -> int:
    from runner import activation, service
    from runner.errors import RunnerError

    gc.freeze()  # what has been imported is never garbage: later collections skip it
    gc.enable()

    if argv[1:2] in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return 0
    front_door = argv[1:2] == [FRONT_DOOR]
    job = argv[2 if front_door else 1] if len(argv) > (2 if front_door else 1) else None
    try:
        mode = activation.detect_mode(job)
    except RunnerError as e:
        sys.stderr.write(f"jobrunner: {e.message}\njobrunner: hint: {e.hint}\n")
        return e.exit_status
    if mode is activation.Mode.SOCKET:
        return service.serve_connection(activation.take_connection(), None if front_door else job)
    return service.serve_operator(job or "", front_door=front_door)  # detect_mode: never without one


FRONT_DOOR = "--front-door"

USAGE = """\
usage: python3 -m runner JOBNAME
       python3 -m runner --front-door [INSTANCE]

The service side of jobrunner. It is started by systemd, never by hand:
  - JOBNAME: in the job's own units (generated from jobs.toml): by job-JOBNAME.socket for each
    connection, which arrives as fd 3 (LISTEN_FDS=1), or by `systemctl start job@JOBNAME`
    (operator mode: output to the journal). It runs JOBNAME and no other job.
  - --front-door: in job@.service, started by job.socket for each connection to /run/job.sock:
    answers `list`, and hands `run NAME` to job-NAME.socket. It holds no credential.
Run jobs with `jobctl run NAME` (see `jobctl --help`).

Exit status: the job's exit status (128+N if killed by signal N, 124 on timeout), or
  64 bad request, unknown job or rejected arguments; 75 busy; 77 forbidden;
  78 configuration or credential error, or not started by systemd; 70 internal error.
"""


def leave(status: int) -> None:
    """Exit without the interpreter's teardown, which frees every module and object one by one: a few
    ms of CPU per connection that the next connections wait for under load, for memory the kernel
    reclaims at once anyway. The runner has closed its files by now; only stdio may hold buffered text."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # nobody to read it (a closed pipe): what the normal exit would have ignored too
    os._exit(status)


def run() -> None:
    """What job@.service's ExecStart calls: main() with the command line, then leave()."""
    leave(main(sys.argv))


if __name__ == "__main__":
    run()
