"""Progress for `systemctl status` through sd_notify STATUS= (sdnotify), a no-op outside systemd."""

from __future__ import annotations

import os

from runner import journal


def status(text: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    import sdnotify  # small, but only worth importing when there is somebody to notify

    try:
        # debug=True makes sdnotify raise instead of silently swallowing a failed send.
        sdnotify.SystemdNotifier(debug=True).notify(f"STATUS={text}")
    except OSError as e:
        journal.log(f"sd_notify failed: {e}", journal.PRIORITY_DEBUG)
