"""How the pool's devices reach the kubelet: the `Frontend` interface and its device-plugin API implementation.

The daemon owns the one discovery, the one pool and the one health loop; a front end only turns what
the pool publishes into the kubelet's API. `DevicePluginFrontend` (this module) serves one
`v1beta1.DevicePlugin` socket per resource and registers it; the DRA front end (`deviceplugin.dra`)
publishes ResourceSlices and prepares claims instead. Exactly one runs per node.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Protocol

from deviceplugin.metrics import Recorder
from deviceplugin.naming import KUBELET_SOCKET, SOCKET_PREFIX
from deviceplugin.pool import DevicePool
from deviceplugin.registration import BACKOFF, Registrar
from deviceplugin.server import HEALTHY, UNHEALTHY, PluginServer

log = logging.getLogger(__name__)


class Frontend(Protocol):
    """What the daemon asks of a front end. Every method runs on the daemon's control thread,
    except `health` and `status`, which the status endpoint calls from its own threads."""

    mode: str

    def watch_dirs(self) -> dict[str, str]:
        """Event kind -> directory to watch with inotify; events of these kinds reach `handle`."""
        ...

    def start(self) -> None:
        """Once, before the first reconcile."""
        ...

    def sync(self) -> None:
        """After every reconcile, changed or not: offer what is new, retry what failed before."""
        ...

    def handle(self, kinds: set[str]) -> None:
        """Its own watch events, and "timer" on every rescan tick (to notice a restarted kubelet)."""
        ...

    def shutdown(self) -> None: ...

    def health(self) -> tuple[bool, str]:
        """For /healthz: False (and why) while something offered does not reach the kubelet."""
        ...

    def status(self) -> dict[str, Any]:
        """The front end's part of /status."""
        ...


class DevicePluginFrontend:
    """One gRPC server per resource on `<plugin_dir>/vfio-dp-*.sock`, registered with the kubelet."""

    mode = "device-plugin"

    def __init__(self, pool: DevicePool, plugin_dir: str, recorder: Recorder, backoff: tuple[float, ...] = BACKOFF) -> None:
        self.pool = pool
        self.plugin_dir = plugin_dir
        self.recorder = recorder
        self.servers: dict[str, PluginServer] = {}
        self.registered: dict[str, float] = {}  # resource -> unix time of the last successful Register
        self.registration_errors: dict[str, str] = {}
        self.serve_errors: dict[str, str] = {}  # resource -> why its socket could not be served
        self.registrar = Registrar(plugin_dir, self._on_registration, backoff)
        self._kubelet_inode: int | None = None
        self._dir_gone = False
        self._lock = threading.Lock()  # guards the three dicts above for /status and /healthz readers

    def watch_dirs(self) -> dict[str, str]:
        return {"plugins": self.plugin_dir}

    def start(self) -> None:
        os.makedirs(self.plugin_dir, exist_ok=True)
        self._remove_stale_sockets()
        self._kubelet_inode = _inode(os.path.join(self.plugin_dir, KUBELET_SOCKET))
        self.registrar.start()

    def sync(self) -> None:
        for resource in self.pool.resources():
            if resource not in self.servers:  # new, or its server failed to start last time
                self._serve(resource)

    def handle(self, kinds: set[str]) -> None:
        if kinds & {"plugins", "timer"}:
            self.check_kubelet()
            if os.path.isdir(self.plugin_dir):
                self.sync()  # a server that could not start (its dir was going away) is retried at once

    def _serve(self, resource: str) -> None:
        server = PluginServer(resource, self.pool, self.plugin_dir, self.recorder)
        try:
            server.start()
        except Exception as exc:
            first = resource not in self.serve_errors
            with self._lock:
                self.serve_errors[resource] = f"cannot serve {server.socket_path}: {exc}"
            (log.error if first else log.debug)(
                "cannot serve %s on %s (will retry on the next rescan): %s", resource, server.socket_path, exc
            )
            return
        with self._lock:
            self.serve_errors.pop(resource, None)
        self.servers[resource] = server
        log.info("serving %s on %s", resource, server.socket_path)
        self.registrar.request(resource, server.endpoint)

    def check_kubelet(self) -> None:
        """A restarted kubelet deletes our sockets and recreates kubelet.sock: serve again and re-register."""
        if not os.path.isdir(self.plugin_dir):
            if not self._dir_gone:
                log.warning("%s is gone: waiting for the kubelet to recreate it", self.plugin_dir)
                self._dir_gone = True
            return
        self._dir_gone = False
        inode = _inode(os.path.join(self.plugin_dir, KUBELET_SOCKET))
        kubelet_changed = inode is not None and inode != self._kubelet_inode
        self._kubelet_inode = inode
        for resource, server in list(self.servers.items()):
            if not server.socket_alive():
                log.info("socket %s was removed (kubelet restart?): serving %s again", server.socket_path, resource)
                self._forget_registration(resource)
                server.stop(farewell=False)
                del self.servers[resource]
                self._serve(resource)  # on failure it is retried by the next sync
            elif kubelet_changed:
                self._forget_registration(resource)
                self.registrar.request(resource, server.endpoint)
        if kubelet_changed:
            self.registrar.retry_now()

    def _forget_registration(self, resource: str) -> None:
        with self._lock:
            self.registered.pop(resource, None)

    def _on_registration(self, resource: str, endpoint: str, error: str | None) -> None:
        self.recorder.registration(resource, error is None)
        with self._lock:
            if error is None:
                self.registered[resource] = time.time()
                self.registration_errors.pop(resource, None)
                log.info("registered %s with the kubelet (endpoint %s)", resource, endpoint)
            else:
                first = resource not in self.registration_errors
                self.registration_errors[resource] = error
                (log.warning if first else log.debug)("registering %s failed, will retry: %s", resource, error)

    def registration_state(self) -> tuple[dict[str, float], dict[str, str]]:
        with self._lock:
            return dict(self.registered), dict(self.registration_errors)

    def shutdown(self) -> None:
        """Every open ListAndWatch sends an empty list, servers stop, our sockets are removed."""
        self.registrar.stop()
        stopping = [(s, s.begin_stop(farewell=True)) for s in self.servers.values()]
        self.pool.stop()
        for server, done in stopping:
            if done is not None:
                done.wait(1.5)
            server.finish_stop()
        self.servers.clear()

    def health(self) -> tuple[bool, str]:
        """Healthy when every resource that has devices is served and registered with the kubelet."""
        registered, errors = self.registration_state()
        with self._lock:
            serve_errors = dict(self.serve_errors)
        missing = []
        for resource in self.pool.resources():
            if not self.pool.devices(resource)[1]:
                continue
            if resource in serve_errors or resource not in self.servers:
                missing.append(f"{resource}: not served ({serve_errors.get(resource, 'server not started yet')})")
            elif resource not in registered:
                missing.append(f"{resource}: not registered with the kubelet ({errors.get(resource, 'registration pending')})")
        if missing:
            return False, "; ".join(missing)
        return True, "ok"

    def status(self) -> dict[str, Any]:
        registered, errors = self.registration_state()
        with self._lock:
            serve_errors = dict(self.serve_errors)
        last_allocate = self.recorder.last_allocations()
        servers = dict(self.servers)
        return {
            "registration": {
                resource: {
                    "registered": resource in registered,
                    "since": registered.get(resource),
                    "error": errors.get(resource) or serve_errors.get(resource),
                    "socket": servers[resource].socket_path if resource in servers else None,
                    "devices": [
                        {
                            "id": d.id,
                            "health": HEALTHY if d.healthy else UNHEALTHY,
                            "reason": d.reason,
                            "last_allocate": last_allocate.get(d.id),
                        }
                        for d in self.pool.devices(resource)[1]
                    ],
                }
                for resource in self.pool.resources()
            }
        }

    def _remove_stale_sockets(self) -> None:
        for name in os.listdir(self.plugin_dir):
            if name.startswith(SOCKET_PREFIX) and name.endswith(".sock"):
                log.info("removing stale socket %s left by an earlier instance", name)
                try:
                    os.unlink(os.path.join(self.plugin_dir, name))
                except OSError as exc:
                    log.warning("cannot remove stale socket %s: %s", name, exc)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
