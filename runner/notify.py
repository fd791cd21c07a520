"""Progress for `systemctl status` through sd_notify STATUS=, a no-op outside systemd.

The datagram is sent here directly (what sdnotify and sd_notify(3) do: one datagram to the socket
named by $NOTIFY_SOCKET, a leading '@' meaning the abstract namespace), through the C `_socket`
module: importing sdnotify pulls in `socket`, whose enum conversions and `selectors` cost every
connection ~1.5 ms, for one sendto().
"""

from __future__ import annotations

import os

from runner import journal


def status(text: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import _socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
            sock.sendall(f"STATUS={text}".encode())
        finally:
            sock.close()
    except OSError as e:
        # Not swallowed (sdnotify hides every error unless asked): said at debug level.
        journal.log(f"sd_notify failed: {e}", journal.PRIORITY_DEBUG)
