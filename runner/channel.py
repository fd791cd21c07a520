"""Where a run's output goes besides the run log: the client's connection, or the journal (operator mode).

The client channel never buffers more than one read's worth of output: while it has bytes pending,
the supervisor stops reading the job's pipes, so a slow or stalled client slows the job down
(back-pressure) instead of growing the runner's memory.
"""

from __future__ import annotations

import _socket
import os
import select
import time

from runner.protocol import Reply

FINAL_SEND_TIMEOUT_S = 30.0
DRAIN_ON_CLOSE_S = 1.0
HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL


class ClientChannel:
    """The connection to `jobctl`, `socat` or a CI hook."""

    def __init__(self, conn: _socket.socket, reply: Reply) -> None:
        conn.setblocking(False)  # the supervisor polls it along with the job's pipes
        self.conn = conn
        self.reply = reply
        self.streaming = True  # False once a detached run's client has its `accepted` event
        self.gone = False  # the client closed the connection (or it broke)
        self._half_closed = False  # the client shut down its sending side: that is not leaving
        self._ended = False  # our sending side is shut down: the client has seen the end of the reply
        self._pending = memoryview(b"")

    # The supervisor's view ----------------------------------------------------------------------

    def fileno(self) -> int | None:
        return None if self.gone else self.conn.fileno()

    def has_pending(self) -> bool:
        return bool(self._pending)

    def poll_events(self) -> int:
        return (select.POLLOUT if self._pending else 0) | (0 if self._half_closed else select.POLLIN)

    def output(self, stream: str, data: bytes) -> None:
        if data and self.streaming and not self.gone:
            framed = self.reply.output(stream, data)
            # Nothing is pending when the supervisor reads output (back-pressure): no copy to append.
            pending = bytes(self._pending) + framed if self._pending else framed
            self._pending = memoryview(pending)
            # Send what the socket takes now, without waiting for the next poll: the client reads it
            # while the supervisor writes the same bytes to the run log (two CPUs at work, not one).
            self.on_ready(select.POLLOUT)

    def on_ready(self, revents: int) -> None:
        try:
            if revents & select.POLLIN:
                self._read_and_discard()
            if revents & select.POLLOUT and self._pending:
                sent = self.conn.send(self._pending)
                self._pending = self._pending[sent:]
            if revents & HANGUP:
                self._lose()
        except BlockingIOError:
            pass
        except OSError:
            self._lose()

    # Whole events, sent outside the supervisor's loop -------------------------------------------------

    def send(self, data: bytes, timeout_s: float = FINAL_SEND_TIMEOUT_S) -> None:
        """Send what is pending and then `data`, waiting at most `timeout_s` for a slow client."""
        if self.gone:
            return
        give_up_at = time.monotonic() + timeout_s
        self._pending = memoryview(bytes(self._pending) + data)
        poller = select.poll()
        poller.register(self.conn, select.POLLOUT)
        while self._pending and not self.gone:
            remaining = give_up_at - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                self._lose()
                break
            self.on_ready(select.POLLOUT)

    def send_final(self, data: bytes) -> None:
        """Send the reply's final event (`exit`, `error`, `jobs`) and end the reply at once."""
        self.send(data)
        self.end()

    def end(self) -> None:
        """End the reply: the client reads EOF now, right after the final event, instead of waiting for
        what the runner still does before close() (the journal entry, the unit's status). Idempotent."""
        if self._ended:
            return
        self._ended = True
        try:
            self.conn.shutdown(_socket.SHUT_WR)
        except OSError:
            pass  # the client is gone already

    def close(self) -> None:
        """End the reply (unless end() did), then read away what the client still sends before closing:
        closing a unix socket with unread data makes the client's next read fail (ECONNRESET) and lose
        the reply."""
        self.end()
        try:
            self.conn.settimeout(DRAIN_ON_CLOSE_S)
            give_up_at = time.monotonic() + DRAIN_ON_CLOSE_S
            while time.monotonic() < give_up_at and self.conn.recv(1 << 16):
                pass
        except OSError:
            pass
        self.conn.close()

    def _read_and_discard(self) -> None:
        # Nothing is expected after the request line; read it away so that poll() does not spin on it.
        if not self.conn.recv(4096):
            self._half_closed = True

    def give_up(self) -> None:
        self._lose()

    def _lose(self) -> None:
        self.gone = True
        self._pending = memoryview(b"")


class ConsoleChannel:
    """Operator mode: output to the runner's own stdout/stderr, which systemd connects to the journal."""

    gone = False
    streaming = True

    def fileno(self) -> int | None:
        return None

    def has_pending(self) -> bool:
        return False

    def poll_events(self) -> int:
        return 0

    def on_ready(self, revents: int) -> None:
        pass

    def give_up(self) -> None:
        pass

    def output(self, stream: str, data: bytes) -> None:
        fd = 2 if stream == "stderr" else 1
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
