"""The node agent: one control loop that keeps the kubelet's view equal to the node.

Every trigger (start, the rescan timer, an inotify event, a stale Allocate, the kubelet restarting)
ends in the same path: take a snapshot, let the pool diff it, start a server for a resource seen
for the first time, and re-register what the kubelet forgot. Only this thread changes state.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

from deviceplugin.config import Config
from deviceplugin.discovery import Inventory, discover
from deviceplugin.metrics import Recorder
from deviceplugin.naming import SOCKET_PREFIX, PciIds
from deviceplugin.pool import Change, DevicePool
from deviceplugin.registration import BACKOFF, KUBELET_SOCKET, Registrar
from deviceplugin.server import PluginServer
from deviceplugin.sysfs import NodeSnapshot, SysfsScanner
from deviceplugin.watch import DirWatcher

log = logging.getLogger(__name__)


@dataclass
class Options:
    sysfs_root: str = "/sys"
    dev_root: str = "/dev"
    proc_root: str = "/proc"
    plugin_dir: str = "/var/lib/kubelet/device-plugins"
    rescan_interval: float = 5.0
    registration_backoff: tuple[float, ...] = BACKOFF


class Daemon:
    def __init__(self, options: Options, config: Config, pci_ids: PciIds, recorder: Recorder | None = None) -> None:
        self.options = options
        self.config = config
        self.pci_ids = pci_ids
        self.recorder = recorder or Recorder()
        self.scanner = SysfsScanner(options.sysfs_root, options.dev_root)
        self.pool = DevicePool(options.sysfs_root, options.dev_root)
        self.pool.on_stale = lambda: self.notify("stale")
        self.servers: dict[str, PluginServer] = {}
        self.registered: dict[str, float] = {}  # resource -> unix time of the last successful Register
        self.registration_errors: dict[str, str] = {}
        self.inventory: Inventory | None = None
        self.registrar = Registrar(options.plugin_dir, self._on_registration, options.registration_backoff)
        self.watcher = DirWatcher({"dev": os.path.join(options.dev_root, "vfio"), "plugins": options.plugin_dir}, self.notify)
        self._events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._kubelet_inode: int | None = None
        self._last_snapshot: NodeSnapshot | None = None
        self._lock = threading.Lock()  # guards registered/registration_errors for /status readers

    # --- triggers -------------------------------------------------------------------------------
    def notify(self, kind: str) -> None:
        self._events.put(kind)

    def run(self, stop: threading.Event) -> None:
        self.start()
        try:
            self.loop(stop)
        finally:
            self.shutdown()

    def start(self) -> None:
        os.makedirs(self.options.plugin_dir, exist_ok=True)
        self._remove_stale_sockets()
        self._kubelet_inode = _inode(os.path.join(self.options.plugin_dir, KUBELET_SOCKET))
        # Watch before the first scan: a change between the scan and the watch would otherwise
        # go unseen until the next timer rescan.
        self.watcher.start()
        self.reconcile()
        self.registrar.start()

    def loop(self, stop: threading.Event) -> None:
        interval = self.options.rescan_interval
        next_rescan = time.monotonic() + interval
        while not stop.is_set():
            kinds = self._next_events(max(next_rescan - time.monotonic(), 0.0))
            if "stop" in kinds or stop.is_set():
                return
            if time.monotonic() >= next_rescan:
                kinds.add("timer")
                next_rescan = time.monotonic() + interval
            try:
                self.handle(kinds)
            except Exception:  # the daemon never dies on one bad event
                log.exception("error handling %s", sorted(kinds))

    def _next_events(self, timeout: float) -> set[str]:
        kinds: set[str] = set()
        try:
            kinds.add(self._events.get(timeout=timeout))
        except queue.Empty:
            return kinds
        while True:  # coalesce a burst of events into one reconcile
            try:
                kinds.add(self._events.get_nowait())
            except queue.Empty:
                return kinds

    def handle(self, kinds: set[str]) -> None:
        if kinds & {"plugins", "timer"}:
            self.check_kubelet()
        if kinds & {"dev", "stale", "timer"}:
            self.reconcile()

    # --- the one reconcile path ----------------------------------------------------------------
    def reconcile(self) -> list[Change]:
        started = time.perf_counter()
        snapshot = self.scanner.scan()
        changes: list[Change] = []
        if snapshot != self._last_snapshot:  # usually equal: unchanged records compare by identity
            self._last_snapshot = snapshot
            inventory = discover(snapshot, self.config, self.pci_ids)
            changes = self.pool.update(inventory)
            self.inventory = inventory
            for change in changes:
                _log_change(change)
            self.recorder.set_devices(self.device_counts())
        self.recorder.rescanned(time.perf_counter() - started)
        for resource in self.pool.resources():
            if resource not in self.servers:  # new, or its server failed to start last time
                self._serve(resource)
        return changes

    def device_counts(self) -> dict[str, tuple[int, int]]:
        counts = {}
        for resource in self.pool.resources():
            devices = self.pool.devices(resource)[1]
            healthy = sum(1 for d in devices if d.healthy)
            counts[resource] = (healthy, len(devices) - healthy)
        return counts

    def _serve(self, resource: str) -> None:
        server = PluginServer(resource, self.pool, self.options.plugin_dir, self.recorder)
        try:
            server.start()
        except Exception:
            log.exception("cannot serve %s on %s; will retry on the next rescan", resource, server.socket_path)
            return
        self.servers[resource] = server
        log.info("serving %s on %s", resource, server.socket_path)
        self.registrar.request(resource, server.endpoint)

    def check_kubelet(self) -> None:
        """A restarted kubelet deletes our sockets and recreates kubelet.sock: serve again and re-register."""
        inode = _inode(os.path.join(self.options.plugin_dir, KUBELET_SOCKET))
        kubelet_changed = inode is not None and inode != self._kubelet_inode
        self._kubelet_inode = inode
        for resource, server in self.servers.items():
            if not server.socket_alive():
                log.info("socket %s was removed (kubelet restart?): serving %s again", server.socket_path, resource)
                self._forget_registration(resource)
                server.restart()
                self.registrar.request(resource, server.endpoint)
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

    # --- stopping -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Every open ListAndWatch sends an empty list, servers stop, our sockets are removed."""
        self.watcher.stop()
        self.registrar.stop()
        stopping = [(s, s.begin_stop(farewell=True)) for s in self.servers.values()]
        self.pool.stop()
        for server, done in stopping:
            if done is not None:
                done.wait(1.5)
            server.finish_stop()
        self.servers.clear()

    def _remove_stale_sockets(self) -> None:
        for name in os.listdir(self.options.plugin_dir):
            if name.startswith(SOCKET_PREFIX) and name.endswith(".sock"):
                log.info("removing stale socket %s left by an earlier instance", name)
                try:
                    os.unlink(os.path.join(self.options.plugin_dir, name))
                except OSError as exc:
                    log.warning("cannot remove stale socket %s: %s", name, exc)


def _log_change(change: Change) -> None:
    device = change.device
    what = f"group {device.group} ({device.id} {device.ids}) of {change.resource}"
    if change.what in ("added", "healthy"):
        log.info("%s %s", what, "offered" if change.what == "added" else "healthy again")
    else:
        log.warning("%s %s: %s", what, change.what, device.reason or "removed from the node")


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
