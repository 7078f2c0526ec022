"""The node agent: one control loop that keeps the kubelet's view equal to the node.

Every trigger (start, the rescan timer, an inotify event, a stale Allocate, the kubelet restarting)
ends in the same path: take a snapshot, let the pool diff it, then let the front end offer what the
pool publishes (serve and register a new resource, re-register what a restarted kubelet forgot).
Only this thread changes state. The front end is the only part that differs between modes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from deviceplugin.config import Config
from deviceplugin.discovery import Inventory, discover
from deviceplugin.frontend import DevicePluginFrontend, Frontend
from deviceplugin.metrics import Recorder
from deviceplugin.naming import PciIds
from deviceplugin.podresources import DEFAULT_SOCKET, Poller
from deviceplugin.pool import Change, DevicePool, Holdings
from deviceplugin.registration import BACKOFF
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
    pod_resources_socket: str = DEFAULT_SOCKET


# Events the daemon handles itself; every other kind belongs to the front end (its watch dirs).
DAEMON_EVENTS = frozenset({"dev", "stale", "holders"})


class Daemon:
    def __init__(
        self,
        options: Options,
        config: Config,
        pci_ids: PciIds,
        recorder: Recorder | None = None,
        frontend: Frontend | None = None,
        make_frontend: Callable[[Daemon], Frontend] | None = None,
    ) -> None:
        """make_frontend builds a front end that needs the daemon's pool, inventory or notify (the DRA mode)."""
        self.options = options
        self.config = config
        self.pci_ids = pci_ids
        self.recorder = recorder or Recorder()
        self.scanner = SysfsScanner(options.sysfs_root, options.dev_root)
        self.pool = DevicePool(options.sysfs_root, options.dev_root)
        self.pool.on_stale = lambda: self.notify("stale")
        self.holders = Poller(options.pod_resources_socket, self._on_holdings)
        self.pool.on_allocated = self.holders.request
        self._holdings: Holdings | None = None  # the latest PodResources answer, applied on the control thread
        self.inventory: Inventory | None = None
        self._events: queue.SimpleQueue[str] = queue.SimpleQueue()
        if frontend is None and make_frontend is not None:
            frontend = make_frontend(self)
        self.frontend: Frontend = frontend or DevicePluginFrontend(
            self.pool, options.plugin_dir, self.recorder, options.registration_backoff
        )
        self.watcher = DirWatcher({"dev": os.path.join(options.dev_root, "vfio"), **self.frontend.watch_dirs()}, self.notify)
        self._last_snapshot: NodeSnapshot | None = None

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
        self.frontend.start()
        self.holders.start()
        # Watch before the first scan: a change between the scan and the watch would otherwise
        # go unseen until the next timer rescan.
        self.watcher.start()
        self.reconcile()

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
        self.watcher.ensure()  # a watched directory that was deleted, came back or was replaced is watched again
        own = kinds - DAEMON_EVENTS
        if own:
            self.frontend.handle(own)
        if "holders" in kinds:
            self._apply_holdings()
        if kinds & {"dev", "stale", "timer"}:
            self.reconcile()

    def _on_holdings(self, holdings: Holdings) -> None:
        """The PodResources poller's answer (its own thread): hand it to the control thread."""
        self._holdings = holdings
        self.notify("holders")

    def _apply_holdings(self) -> None:
        holdings = self._holdings
        if holdings is None:
            return
        previous = self.pool.holdings()
        if previous.ok != holdings.ok:
            if holdings.ok:
                log.info("PodResources API answers: holders are known")
            else:
                log.warning("holder unknown: %s", holdings.error)
        changes = self.pool.set_holdings(holdings)
        for change in changes:
            _log_change(change)
        if changes or holdings.ok or previous.ok:  # still unanswered: no metric can have moved
            self._record()

    def _record(self) -> None:
        """Metrics from the pool: health counts, companion tokens, and who holds what."""
        self.recorder.set_devices(self.device_counts())
        holdings = self.pool.holdings()
        held: dict[str, dict[str, bool]] = {}
        companions: dict[tuple[str, str], int] = {}
        for resource in self.pool.resources():
            devices = self.pool.devices(resource)[1]
            held[resource] = {d.id: holdings.holder(resource, d.id) is not None for d in devices}
            for d in devices:
                if d.role:
                    companions[(resource, d.role)] = companions.get((resource, d.role), 0) + d.healthy
        self.recorder.set_allocations(holdings.ok, held)
        self.recorder.set_companions(companions)

    # --- the one reconcile path ----------------------------------------------------------------
    def reconcile(self) -> list[Change]:
        started = time.perf_counter()
        snapshot = self.scanner.scan()
        changes: list[Change] = []
        if snapshot != self._last_snapshot:  # usually equal: unchanged records compare by identity
            self._last_snapshot = snapshot
            inventory = discover(snapshot, self.config, self.pci_ids)
            self.pci_ids.release()  # its answers are kept; the 1.6 MB text is read again only for a new id
            changes = self.pool.update(inventory)
            self.inventory = inventory
            for change in changes:
                _log_change(change)
            self._record()
        self.recorder.rescanned(time.perf_counter() - started)
        self.frontend.sync()
        self.holders.request()  # every reconcile: a pod that went away releases its hold within one rescan
        return changes

    def device_counts(self) -> dict[str, tuple[int, int]]:
        counts = {}
        for resource in self.pool.resources():
            devices = self.pool.devices(resource)[1]
            healthy = sum(1 for d in devices if d.healthy)
            counts[resource] = (healthy, len(devices) - healthy)
        return counts

    def health(self) -> tuple[bool, str]:
        """For /healthz: not before the first scan, then whatever the front end says."""
        if self.inventory is None:
            return False, "starting: the first scan of the node has not finished"
        return self.frontend.health()

    # --- stopping -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self.watcher.stop()
        self.holders.stop()
        self.frontend.shutdown()
        self.pool.stop()


def _log_change(change: Change) -> None:
    device = change.device
    what = f"group {device.group} ({device.id} {device.ids}) of {change.resource}"
    if change.what in ("added", "healthy"):
        log.info("%s %s", what, "offered" if change.what == "added" else "healthy again")
    else:
        log.warning("%s %s: %s", what, change.what, device.reason or "removed from the node")
