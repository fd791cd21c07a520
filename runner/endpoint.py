"""A job's local endpoints for its HTTP APIs: where $JOB_API_<NAME>_URL points ([apis.NAME] in jobs.toml).

The job never holds an API's key. For each API in the job's `apis`, the runner listens on a loopback
TCP port in the job's own network (its private one with network = "none") and puts
http://ENDPOINT_HOST:PORT in the job's environment. Each connection the job opens there is handed, as
a file descriptor, to a fresh proxy started by systemd for it: the API's socket
(jobrunner-api-NAME.socket, Accept=yes) starts jobrunner-api-NAME@.service, which alone loads the
key, and speaks HTTP with the job directly (runner.apiproxy). The runner only passes the descriptor on
and writes what the proxy reports of each request into the run log.

Who may connect:
- the API's socket sits in a directory that only root can enter (/run/jobrunner-api, 0700); systemd
  binds it into the units of the jobs that list the API, and into no other (runner.units);
- on the loopback port, every connection is checked to come from a process of the job's own user
  (each job has a user of its own): another job or a developer on the same host is refused, which
  matters when the job shares the host's network.

The handshake on the API's socket, one line each way, then the descriptor:
    runner -> proxy   "jobrunner-api 1 JOB RUN_ID\\n"
    proxy  -> runner  "+\\n" once it has loaded its key ("-REASON\\n" when it cannot serve)
    runner -> proxy   one byte with the TCP connection (SCM_RIGHTS); the runner closes its copy
    proxy  -> runner  one JSON line per request (method, path, status, bytes, duration), until EOF.
The proxy exits when the job's connection closes or when the runner closes this socket (the run ended).
"""

from __future__ import annotations

import _socket
import json
import os
import select
import sys
import time

from runner.value import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from runner.config import Api

# The loopback address the runner listens on. (Another one, such as 127.0.0.77, would not keep a job
# with an address list away from the host's services on 127.0.0.1: the kernel still connects from
# 127.0.0.1, which its firewall, IPAddressAllow=, must then let in. So its units allow 127.0.0.1.)
ENDPOINT_HOST = "127.0.0.1"
# Where systemd binds each listed API's socket in the job's units (inside its private /tmp).
SOCKETS_IN_JOB = "/tmp/.jobrunner-api"  # noqa: S108 - the unit's own PrivateTmp=
HANDSHAKE = b"jobrunner-api 1"
# Connections one run may have open to one API at once; more wait in the listen queue (BACKLOG, then
# the kernel's SYN retries) until one closes. Each is a process holding the key (a unit of its own),
# so a job that opens thousands is limited here, not on the host.
MAX_CONNECTIONS = 32
BACKLOG = 64
READY_TIMEOUT_S = 30.0  # for the proxy's "+" (its unit's start: decrypting the key)
LINGER_S = 2.0  # after a refusal, how long to read what the job still sends (so it sees the answer)
FINISH_S = 1.0  # after the job exited, how long its proxies may take to report their last requests
TCP_ESTABLISHED = "01"


def socket_in_job(api: str) -> str:
    return f"{SOCKETS_IN_JOB}/{api}.sock"


class Record(Value):
    """What the proxy reports of one request."""

    __slots__ = ("api", "text")

    def __init__(self, api: str, text: str) -> None:
        self.api = api
        self.text = text


class _Listener(Value):
    __slots__ = ("api", "sock")

    def __init__(self, api: str, sock: _socket.socket) -> None:
        self.api = api
        self.sock = sock


class _Link:
    """One job connection on its way to, or served by, a proxy."""

    def __init__(self, api: str, client: _socket.socket, proxy: _socket.socket) -> None:
        self.api = api
        self.client: _socket.socket | None = client  # None once handed over
        self.proxy = proxy
        self.received = b""
        self.deadline = time.monotonic() + READY_TIMEOUT_S


class _Refusal:
    """A connection answered by the runner itself: sent, then read until the job closes (or LINGER_S),
    so that closing it does not reset the connection before the job has read the answer."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + LINGER_S


def plain_response(status: int, reason: str, text: str) -> bytes:
    """A complete HTTP/1.1 answer with a plain-text body, closing the connection (written, not parsed)."""
    body = f"jobrunner: {text}\n".encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    )
    return (head + "\r\n").encode() + body


class Endpoints:
    """The endpoints of one run: listeners, links to proxies, refusals. Driven by the runner's poll loop
    (runner.execute.Supervisor): `poll_fds`, `on_ready`, `next_timer`, then `close`."""

    def __init__(
        self,
        job: str,
        run_id: str,
        apis: Iterable[Api],
        record: Callable[[Record], None],
        *,
        sockets_dir: str = SOCKETS_IN_JOB,
        host: str = ENDPOINT_HOST,
    ) -> None:
        self.job = job
        self.run_id = run_id
        self.record = record
        self.sockets_dir = sockets_dir
        self.uid = os.getuid()
        self.listeners: dict[int, _Listener] = {}
        self.links: dict[int, _Link] = {}
        self.refusals: dict[int, _Refusal] = {}
        self.urls: dict[str, str] = {}  # env name -> URL
        try:
            for api in apis:
                sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
                self.listeners[sock.fileno()] = _Listener(api.name, sock)
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
                sock.bind((host, 0))
                sock.listen(BACKLOG)
                sock.setblocking(False)
                self.urls[api.env_name] = f"http://{host}:{sock.getsockname()[1]}"
        except OSError:
            self.close()
            raise

    # --- the poll loop's side

    def poll_fds(self) -> list[tuple[int, int]]:
        fds = [(fd, select.POLLIN) for fd, listener in self.listeners.items() if self._room(listener.api)]
        fds += [(fd, select.POLLIN) for fd in self.links]
        fds += [(fd, select.POLLIN) for fd in self.refusals]
        return fds

    def owns(self, fd: int) -> bool:
        return fd in self.listeners or fd in self.links or fd in self.refusals

    def on_ready(self, fd: int) -> None:
        if fd in self.listeners:
            self._accept(self.listeners[fd])
        elif fd in self.links:
            self._on_proxy(self.links[fd])
        elif fd in self.refusals:
            self._linger(fd)

    def next_timer(self) -> float | None:
        deadlines = [link.deadline for link in self.links.values() if link.client is not None]
        deadlines += [refusal.deadline for refusal in self.refusals.values()]
        return min(deadlines, default=None)

    def check_timers(self, now: float) -> None:
        for fd, link in list(self.links.items()):
            if link.client is not None and now >= link.deadline:
                self._fail(fd, 504, "Gateway Timeout", f"the proxy of API '{link.api}' did not start in time")
        for fd, refusal in list(self.refusals.items()):
            if now >= refusal.deadline:
                del self.refusals[fd]
                refusal.sock.close()

    def finish(self, timeout_s: float = FINISH_S) -> None:
        """After the job exited: the proxies still serving it report their last requests (the job's
        connections closed with it), for at most `timeout_s`; then `close`."""
        for listener in self.listeners.values():
            listener.sock.close()
        self.listeners.clear()
        for fd, link in list(self.links.items()):
            if link.client is not None:  # never handed over: the job is gone
                del self.links[fd]
                link.client.close()
                link.proxy.close()
        deadline = time.monotonic() + timeout_s
        while self.links and (left := deadline - time.monotonic()) > 0:
            poller = select.poll()
            for fd in self.links:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(int(left * 1000) + 1):
                if fd in self.links:
                    self._on_proxy(self.links[fd])
        self.close()

    def close(self) -> None:
        """End of the run: the proxies see their socket close and exit."""
        for sock in [x.sock for x in self.listeners.values()] + [x.sock for x in self.refusals.values()]:
            sock.close()
        for link in self.links.values():
            if link.client is not None:
                link.client.close()
            link.proxy.close()
        self.listeners.clear()
        self.links.clear()
        self.refusals.clear()

    # --- connections from the job

    def _room(self, api: str) -> bool:
        return sum(1 for link in self.links.values() if link.api == api) < MAX_CONNECTIONS

    def _accept(self, listener: _Listener) -> None:
        try:
            fd, peer = listener.sock._accept()  # type: ignore[attr-defined]  # the C type's: fd, address
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        client = _socket.socket(fileno=fd)
        owner = connection_owner(peer, listener.sock.getsockname())
        if owner != self.uid:
            self.record(Record(listener.api, f"refused a connection from {_who(owner)} (403)"))
            self._refuse(client, 403, "Forbidden", "this endpoint serves the job's own processes only")
            return
        proxy = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            proxy.connect(f"{self.sockets_dir}/{listener.api}.sock")
            proxy.sendall(b"%s %s %s\n" % (HANDSHAKE, self.job.encode(), self.run_id.encode()))
        except OSError as e:
            proxy.close()
            self._fail_client(
                listener.api,
                client,
                502,
                "Bad Gateway",
                f"API '{listener.api}' is not reachable: {e.strerror}",
            )
            return
        proxy.setblocking(False)
        self.links[proxy.fileno()] = _Link(listener.api, client, proxy)

    def _refuse(self, client: _socket.socket, status: int, reason: str, text: str) -> None:
        client.setblocking(False)
        try:
            client.send(plain_response(status, reason, text))
            client.shutdown(_socket.SHUT_WR)
        except OSError:
            client.close()
            return
        self.refusals[client.fileno()] = _Refusal(client)

    def _linger(self, fd: int) -> None:
        try:
            if self.refusals[fd].sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self.refusals.pop(fd).sock.close()

    # --- the proxy's side

    def _on_proxy(self, link: _Link) -> None:
        fd = link.proxy.fileno()
        try:
            data = link.proxy.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if link.client is not None:
                self._fail(fd, 502, "Bad Gateway", f"the proxy of API '{link.api}' {_gone_hint(link.api)}")
            else:
                del self.links[fd]
                link.proxy.close()
            return
        link.received += data
        *lines, link.received = link.received.split(b"\n")
        for line in lines:
            self._on_line(fd, link, line)

    def _on_line(self, fd: int, link: _Link, line: bytes) -> None:
        if link.client is not None:  # the handshake's answer
            if line == b"+":
                self._hand_over(fd, link, link.client)
            else:
                reason = line.removeprefix(b"-").decode("utf-8", "replace") or "refused the connection"
                self._fail(fd, 502, "Bad Gateway", f"API '{link.api}': {reason}")
            return
        try:
            fields = json.loads(line)
        except ValueError:
            return
        if isinstance(fields, dict):
            self.record(Record(link.api, describe_request(fields)))

    def _hand_over(self, fd: int, link: _Link, client: _socket.socket) -> None:
        try:
            link.proxy.setblocking(True)
            descriptor = client.fileno().to_bytes(4, sys.byteorder, signed=True)
            link.proxy.sendmsg([b"C"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, descriptor)])
            link.proxy.setblocking(False)
        except OSError as e:
            self._fail(
                fd, 502, "Bad Gateway", f"API '{link.api}': cannot hand over the connection: {e.strerror}"
            )
            return
        client.close()
        link.client = None

    def _fail(self, fd: int, status: int, reason: str, text: str) -> None:
        link = self.links.pop(fd)
        link.proxy.close()
        if link.client is not None:
            self._fail_client(link.api, link.client, status, reason, text)

    def _fail_client(self, api: str, client: _socket.socket, status: int, reason: str, text: str) -> None:
        self.record(Record(api, f"not served ({status}): {text}"))
        self._refuse(client, status, reason, text)


def _who(uid: int | None) -> str:
    return "an unknown socket" if uid is None else f"uid {uid}"


def _gone_hint(api: str) -> str:
    return f"closed before it was ready (its key could not be loaded?): journalctl -u 'jobrunner-api-{api}@*'"


def describe_request(fields: dict[str, object]) -> str:
    """One line of the run log for one proxied request (no header, no query string)."""
    text = (
        f"{fields.get('method', '?')} {fields.get('path', '?')} -> {fields.get('status', '-')}, "
        f"{fields.get('bytes', 0)} bytes, {fields.get('duration_ms', '?')} ms"
    )
    return text + (f" ({fields['error']})" if fields.get("error") else "")


def connection_owner(
    peer: tuple[str, int], local: tuple[str, int], table: str = "/proc/self/net/tcp"
) -> int | None:
    """The uid that owns the socket at `peer` connected to `local` (TCP over IPv4, in this network
    namespace), from the kernel's table: SO_PEERCRED exists for unix sockets only. None: not found."""
    want_local, want_remote = _hex_address(*peer), _hex_address(*local)
    try:
        with open(table, encoding="ascii") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] == want_local and fields[2] == want_remote and fields[3] == TCP_ESTABLISHED:
                    return int(fields[7])
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return None


def _hex_address(host: str, port: int) -> str:
    """An IPv4 address and port as /proc/net/tcp writes them: the address's 4 bytes in host order."""
    return f"{int.from_bytes(_socket.inet_aton(host), sys.byteorder):08X}:{port:04X}"
