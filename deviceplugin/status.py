"""The HTTP status endpoint of `serve`: /metrics (Prometheus), /status (JSON) and /healthz (probes).

By default it listens on every address of both families (one IPv6 socket that also takes IPv4), so
the kubelet's probes reach it in IPv4, IPv6 and dual-stack clusters alike; on a host without IPv6
it falls back to IPv4.

Whoever reaches the port must not be able to take the pod past its memory limit or its threads, nor
keep the probes from an answer (the liveness probe would restart the pod). So each connection gets
one request, whose request line and headers must arrive whole within a deadline and a few KiB;
at most `max_connections` are served at once, each on its own thread. When all are taken, a new
connection pushes out the oldest one still waiting for its request (a client that connects and
sends nothing, or a header at a time), so a probe, which sends its request at once, still gets
in; when every one is busy answering, the new connection is closed at once, without a thread.
"""

from __future__ import annotations

import errno
import io
import logging
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from deviceplugin import jsontext
from deviceplugin.daemon import Daemon
from deviceplugin.report import inventory_json

log = logging.getLogger(__name__)


def status_document(daemon: Daemon) -> dict[str, Any]:
    inventory = daemon.inventory
    holdings = daemon.pool.holdings()
    doc: dict[str, Any] = inventory_json(inventory, daemon.pci_ids, daemon.config.naming, holdings) if inventory else {}
    doc["mode"] = daemon.frontend.mode
    doc.update(daemon.frontend.status())
    return doc


def health(daemon: Daemon) -> tuple[bool, str]:
    return daemon.health()


@dataclass(frozen=True)
class Limits:
    request_timeout: float = 5.0  # seconds for the whole request line and headers; a probe sends them at once
    write_timeout: float = 5.0  # seconds to hand over the whole answer
    max_connections: int = 16  # served at once, one thread each
    max_head: int = 8192  # bytes of request line and headers together (http.server allows 100 lines of 64 KiB)
    max_headers: int = 32


class _Handler(BaseHTTPRequestHandler):
    daemon_ref: Daemon
    server: _HTTPServer

    def handle(self) -> None:
        """One request per connection: its head within the limits, then http.server's parsing and do_GET."""
        self.close_connection = True
        limits = self.server.limits
        head = self._read_head(limits)
        if head is None or not self.server.begin_answer(self.connection):
            return
        if head.count(b"\n") - 2 > limits.max_headers:  # the request line and the blank line are not headers
            self._refuse(431, "Request Header Fields Too Large")
            return
        self.connection.settimeout(limits.write_timeout)  # sendall: a total for the whole answer
        self.rfile.close()  # unread: the head came straight from the socket
        self.rfile = io.BytesIO(head)
        self.handle_one_request()

    def _read_head(self, limits: Limits) -> bytes | None:
        """The request line and headers, read straight from the socket against one deadline; None: hang up.

        (A socket timeout alone restarts with every byte: a header sent a byte at a time never ends.)
        """
        deadline = time.monotonic() + limits.request_timeout
        head = bytearray()
        while True:
            searched = max(len(head) - 3, 0)
            chunk = self._recv(deadline)
            if not chunk:
                return None  # the deadline passed, the client left, or it was pushed out
            head += chunk
            end = _end_of_head(head, searched)
            if end is not None and end <= limits.max_head:
                return bytes(head[:end])
            if len(head) > limits.max_head:
                self._refuse(431, "Request Header Fields Too Large")
                return None

    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b""
        self.connection.settimeout(remaining)
        try:
            return self.connection.recv(4096)
        except OSError:  # timed out, reset, or shut down by the server to make room
            return b""

    def _refuse(self, code: int, reason: str) -> None:
        body = f"{code} {reason}\n".encode()
        head = f"HTTP/1.0 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        try:
            self.connection.settimeout(self.server.limits.write_timeout)
            self.connection.sendall(head + body)
        except OSError:
            pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.daemon_ref.recorder.exposition(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/status":
            body = jsontext.dumps(status_document(self.daemon_ref)).encode()
            self._send(200, body, "application/json")
        elif path == "/healthz":
            ok, why = health(self.daemon_ref)
            self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
        else:
            self._send(404, b"not found: try /metrics, /status or /healthz\n", "text/plain")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: keep them out of the log
        pass


ANY_ADDRESS = ""  # every address, IPv6 and IPv4
# What the kernel answers when the host has no IPv6 at all (ipv6.disable=1, or no IPv6 support built in).
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of connections waits there, not in threads

    def __init__(
        self, address: tuple[Any, ...], handler: type[BaseHTTPRequestHandler], family: socket.AddressFamily, limits: Limits
    ) -> None:
        self.address_family = family
        self.limits = limits
        # Open connections, oldest first -> still waiting for their request (may be pushed out).
        self._open: dict[socket.socket, bool] = {}
        self._lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Gives the connection a thread if there is room, or makes room, or closes it now."""
        with self._lock:
            if len(self._open) >= self.limits.max_connections:
                waiting = next((conn for conn, idle in self._open.items() if idle), None)
                if waiting is None:
                    request.close()
                    return
                del self._open[waiting]
                _hang_up(waiting)  # its thread's recv returns at once and the thread ends
            self._open[request] = True
        super().process_request(request, client_address)

    def begin_answer(self, connection: socket.socket) -> bool:
        """The request arrived: no longer to be pushed out. False if it was pushed out meanwhile."""
        with self._lock:
            if connection not in self._open:
                return False
            self._open[connection] = False
            return True

    def answering(self) -> int:
        """Connections whose request arrived and are being answered."""
        with self._lock:
            return sum(not waiting for waiting in self._open.values())

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished mid-answer: not worth a traceback on stderr (socketserver's default).
        log.debug("status request from %s failed", client_address, exc_info=True)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # "::" takes IPv4 too (as ::ffff:a.b.c.d) unless IPV6_V6ONLY is set, which some hosts
            # make the default (net.ipv6.bindv6only=1): clear it.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Not HTTPServer.server_bind: it resolves the address's name (a DNS lookup at start) for CGI only.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]


def _listen(host: str, port: int, handler: type[BaseHTTPRequestHandler], limits: Limits) -> _HTTPServer:
    """Binds `host` (a name, an IPv4 or IPv6 address; ANY_ADDRESS: every address of both families)."""
    if host == ANY_ADDRESS:
        try:
            return _HTTPServer(("::", port), handler, socket.AF_INET6, limits)
        except OSError as exc:
            if exc.errno not in _NO_IPV6:
                raise
            log.info("no IPv6 on this host (%s): the status endpoint listens on IPv4 only", exc.strerror)
            return _HTTPServer(("0.0.0.0", port), handler, socket.AF_INET, limits)
    family, _, _, _, sockaddr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return _HTTPServer(sockaddr, handler, family, limits)  # as given: an IPv6 sockaddr keeps its scope (fe80::...%eth0)


def _end_of_head(data: bytearray, start: int) -> int | None:
    """Where the blank line that ends the headers ends (CRLF or bare LF), looking from `start` on."""
    ends = [i + len(sep) for sep in (b"\n\r\n", b"\n\n") if (i := data.find(sep, start)) >= 0]
    return min(ends, default=None)


def _hang_up(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


class StatusServer:
    def __init__(self, daemon: Daemon, port: int, host: str = ANY_ADDRESS, limits: Limits | None = None) -> None:
        handler = type("Handler", (_Handler,), {"daemon_ref": daemon})
        self.httpd = _listen(host, port, handler, limits or Limits())
        self.address = str(self.httpd.server_address[0])
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="status", daemon=True)

    def start(self) -> None:
        self._thread.start()
        shown = f"[{self.address}]" if ":" in self.address else self.address
        log.info("status endpoint on port %d (%s:%d; /metrics, /status, /healthz)", self.port, shown, self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
