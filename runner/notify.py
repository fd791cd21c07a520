"""Progress for `systemctl status` through sd_notify STATUS=, a no-op outside systemd.

libsystemd's own sd_notify(3) sends it, through python-systemd's C module (`systemd._daemon.notify`,
which is what `systemd.daemon.notify` is): both the Python module `systemd.daemon` and sdnotify import
`socket` (with selectors, array and math) for one datagram, ~1.5 ms of every connection. sdnotify is the
fallback for a python-systemd laid out differently.
"""

from __future__ import annotations

import os

from runner import journal


def status(text: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        _notify(f"STATUS={text}")
    except OSError as e:
        journal.log(f"sd_notify failed: {e}", journal.PRIORITY_DEBUG)


def _notify(state: str) -> None:
    """Send `state`; raise OSError when it cannot be sent."""
    try:
        from systemd._daemon import notify
    except ImportError:
        import sdnotify

        # debug=True makes sdnotify raise instead of silently swallowing a failed send.
        sdnotify.SystemdNotifier(debug=True).notify(state)
        return
    notify(state)
