"""Progress for `systemctl status` through sd_notify STATUS= (sdnotify), a no-op outside systemd."""

from __future__ import annotations

import os

from runner import journal


def status(text: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    # sdnotify rather than a hand-made datagram (the protocol has corner cases sdnotify knows); its
    # import of `socket` costs each connection ~1.5 ms, measured by bench/run.py.
    import sdnotify

    try:
        # debug=True makes sdnotify raise instead of silently swallowing a failed send.
        sdnotify.SystemdNotifier(debug=True).notify(f"STATUS={text}")
    except OSError as e:
        journal.log(f"sd_notify failed: {e}", journal.PRIORITY_DEBUG)
