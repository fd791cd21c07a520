"""Structured log entries: one when a run starts, one when it ends (journald fields), never a secret.

To the journal through python-systemd when the runner runs under systemd (`JOURNAL_STREAM` is set),
else one line on stderr. python-systemd is imported on first use, not at start-up: every connection
would pay for the import before its job could start. And only its C half (`systemd._journal.sendv`,
what `systemd.journal.send` ends in): the Python module `systemd.journal` also imports logging, uuid,
traceback and platform, about 5 ms on every connection, none of which sending an entry needs.
"""

from __future__ import annotations

import os
import sys

PRIORITY_ERR = 3
PRIORITY_WARNING = 4
PRIORITY_INFO = 6
PRIORITY_DEBUG = 7


def log(message: str, priority: int = PRIORITY_INFO, **fields: object) -> None:
    """Send one entry; `fields` become uppercase journal fields (JOB_NAME=..., EXIT_CODE=...)."""
    if priority >= PRIORITY_DEBUG and not os.environ.get("JOBRUNNER_DEBUG"):
        return
    values = {key.upper(): str(value) for key, value in fields.items() if value is not None}
    if os.environ.get("JOURNAL_STREAM"):
        try:
            _send_to_journal(message, priority, values)
            return
        except OSError:
            pass  # the journal socket is not reachable (e.g. not bound into the sandbox): fall back
    details = " ".join(f"{k}={v}" for k, v in values.items())
    sys.stderr.write(f"<{priority}>jobrunner: {message}{' [' + details + ']' if details else ''}\n")
    sys.stderr.flush()


def _send_to_journal(message: str, priority: int, fields: dict[str, str]) -> None:
    try:
        from systemd._journal import sendv
    except ImportError:  # a python-systemd laid out differently: the public module, slower to import
        from systemd import journal

        journal.send(message, PRIORITY=str(priority), SYSLOG_IDENTIFIER="jobrunner", **fields)
        return
    # The entry systemd.journal.send() would make: CODE_* name its caller (this function), then the fields.
    frame = sys._getframe()
    sendv(
        f"MESSAGE={message}",
        f"CODE_FILE={frame.f_code.co_filename}",
        f"CODE_LINE={frame.f_lineno}",
        f"CODE_FUNC={frame.f_code.co_name}",
        f"PRIORITY={priority}",
        "SYSLOG_IDENTIFIER=jobrunner",
        *(f"{key}={value}" for key, value in fields.items()),
    )
