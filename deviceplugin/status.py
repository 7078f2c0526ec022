"""The HTTP status endpoint of `serve`: /metrics (Prometheus), /status (JSON) and /healthz (probes).

By default it listens on every address of both families (one IPv6 socket that also takes IPv4), so
the kubelet's probes reach it in IPv4, IPv6 and dual-stack clusters alike; on a host without IPv6
it falls back to IPv4.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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


class _Handler(BaseHTTPRequestHandler):
    daemon_ref: Daemon

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.daemon_ref.recorder.exposition(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/status":
            body = json.dumps(status_document(self.daemon_ref), indent=2).encode()
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

    def __init__(self, address: tuple[Any, ...], handler: type[BaseHTTPRequestHandler], family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # "::" takes IPv4 too (as ::ffff:a.b.c.d) unless IPV6_V6ONLY is set, which some hosts
            # make the default (net.ipv6.bindv6only=1): clear it.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Not HTTPServer.server_bind: it resolves the address's name (a DNS lookup at start) for CGI only.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]


def _listen(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> _HTTPServer:
    """Binds `host` (a name, an IPv4 or IPv6 address; ANY_ADDRESS: every address of both families)."""
    if host == ANY_ADDRESS:
        try:
            return _HTTPServer(("::", port), handler, socket.AF_INET6)
        except OSError as exc:
            if exc.errno not in _NO_IPV6:
                raise
            log.info("no IPv6 on this host (%s): the status endpoint listens on IPv4 only", exc.strerror)
            return _HTTPServer(("0.0.0.0", port), handler, socket.AF_INET)
    family, _, _, _, sockaddr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return _HTTPServer(sockaddr, handler, family)  # as given: an IPv6 sockaddr keeps its scope (fe80::...%eth0)


class StatusServer:
    def __init__(self, daemon: Daemon, port: int, host: str = ANY_ADDRESS) -> None:
        handler = type("Handler", (_Handler,), {"daemon_ref": daemon})
        self.httpd = _listen(host, port, handler)
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
