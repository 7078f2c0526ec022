"""The HTTP status endpoint of `serve`: /metrics (Prometheus), /status (JSON) and /healthz (probes)."""

from __future__ import annotations

import logging
import threading
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


class _Handler(BaseHTTPRequestHandler):
    daemon_ref: Daemon

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


class StatusServer:
    def __init__(self, daemon: Daemon, port: int, host: str = "0.0.0.0") -> None:
        handler = type("Handler", (_Handler,), {"daemon_ref": daemon})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="status", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("status endpoint on port %d (/metrics, /status, /healthz)", self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
