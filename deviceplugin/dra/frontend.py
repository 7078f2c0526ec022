"""`serve --mode dra`: the daemon's second front end, offering the pool's IOMMU groups through DRA.

Runs on the daemon's control thread like the device-plugin front end: every reconcile ends in `sync`,
which rebuilds the DRA view from the pool (one device per group, withdrawn while unhealthy) and asks the
publisher to bring the ResourceSlices in line. The publisher works on a thread of its own: an API server
that is slow or hung (every call may wait for its timeout) must never hold up the health loop, and
requests made meanwhile coalesce into one sync of the latest view. Its own events come through `handle`: "slices" (the watcher
saw our slices change, e.g. the kubelet wiped them), "registered" (the kubelet confirmed a registration,
after which it may have wiped them too), and the inotify events of the registry and plugin directories
(our sockets deleted: serve them again). The kubelet's gRPC calls run in the servers' threads and only
read the pool and the view, both swapped atomically.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from deviceplugin.api.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from deviceplugin.discovery import Inventory
from deviceplugin.dra.checkpoint import claims_per_device
from deviceplugin.dra.devices import DraDevice, group_devices, pcie_root, reports_by_group
from deviceplugin.dra.driver import Preparer, add_services
from deviceplugin.dra.kube import KubeApi
from deviceplugin.dra.options import DraOptions
from deviceplugin.dra.registration import RegistrationServicer
from deviceplugin.dra.slices import SlicePublisher, SliceWatcher
from deviceplugin.dra.sockets import UnixServer
from deviceplugin.dra.view import view_json
from deviceplugin.metrics import Recorder
from deviceplugin.pool import DevicePool

log = logging.getLogger(__name__)


class DraFrontend:
    mode = "dra"

    def __init__(
        self,
        options: DraOptions,
        pool: DevicePool,
        inventory: Callable[[], Inventory | None],
        notify: Callable[[str], None],
        recorder: Recorder,
        api: KubeApi,
    ) -> None:
        self.options = options
        self.pool = pool
        self.inventory = inventory
        self.notify = notify
        self.recorder = recorder
        self.api = api
        self.publisher = SlicePublisher(self.api, options.driver, options.node, recorder)
        self.watcher = SliceWatcher(self.api.clone(), options.node, options.driver, notify)
        self.view: dict[str, DraDevice] = {}  # device name -> device; replaced, never changed in place
        self._view_key: object = None
        self._roots: dict[str, str | None] = {}
        self.preparer = Preparer(options, pool, lambda: self.view, self.api.clone().get_claim, recorder)
        self.registration = RegistrationServicer(options.driver, options.plugin_socket, self._on_registration)
        self.servers = (
            UnixServer(options.plugin_socket, lambda s: add_services(s, self.preparer, recorder), "dra-plugin"),
            UnixServer(options.registration_socket, lambda s: reg_grpc.add_RegistrationServicer_to_server(self.registration, s), "dra-reg"),
        )
        self._lock = threading.Lock()
        self.socket_errors: dict[str, str] = {}  # socket path -> why it is not served
        self._publish = threading.Condition()
        self._wanted: tuple[list[DraDevice], bool] | None = None  # (devices, compare with the API server first)
        self._stopping = False
        self._publisher_thread = threading.Thread(target=self._publish_loop, name="dra-slices", daemon=True)

    # --- Frontend -------------------------------------------------------------------------------
    def watch_dirs(self) -> dict[str, str]:
        return {"registry": self.options.registry_dir, "draplugin": self.options.data_dir}

    def start(self) -> None:
        for path in (self.options.data_dir, self.options.registry_dir, self.options.cdi_dir):
            os.makedirs(path, exist_ok=True)
        # dra.sock first: the kubelet dials the endpoint as soon as GetInfo has named it.
        self._serve_missing()
        self._publisher_thread.start()
        self.watcher.start()
        log.info(
            "DRA driver %s on node %s: plugin socket %s, registration socket %s, CDI specs in %s",
            self.options.driver,
            self.options.node,
            self.options.plugin_socket,
            self.options.registration_socket,
            self.options.cdi_dir,
        )

    def sync(self) -> None:
        self._refresh_view()
        self._serve_missing()
        self._request_publish(compare=False)

    def handle(self, kinds: set[str]) -> None:
        if kinds & {"registry", "draplugin", "timer"}:
            self._check_sockets()
        if kinds & {"slices", "registered"}:
            self._request_publish(compare=True)  # compare with what the API server holds now

    def shutdown(self) -> None:
        """Sockets go (the kubelet deregisters us); the ResourceSlices stay for the next instance."""
        self.watcher.stop()
        with self._publish:
            self._stopping = True
            self._publish.notify_all()
        self._publisher_thread.join(timeout=0.5)  # a call in flight ends by its own timeout; the thread is a daemon
        for server in reversed(self.servers):
            server.stop()

    # --- publishing, on its own thread ------------------------------------------------------------
    def _request_publish(self, compare: bool) -> None:
        with self._publish:
            pending = self._wanted[1] if self._wanted is not None else False
            self._wanted = (list(self.view.values()), compare or pending)
            self._publish.notify_all()

    def _publish_loop(self) -> None:
        while True:
            with self._publish:
                self._publish.wait_for(lambda: self._wanted is not None or self._stopping)
                if self._stopping:
                    return
                assert self._wanted is not None
                devices, compare = self._wanted
                self._wanted = None
            if compare:
                self.publisher.dirty = True
            try:
                self.publisher.sync(devices)
            except Exception:  # never let one odd failure end the thread; the next request retries
                log.exception("publishing ResourceSlices failed")

    # --- the view -------------------------------------------------------------------------------
    def _refresh_view(self) -> None:
        inventory = self.inventory()
        published = [(r, *self.pool.devices(r)) for r in self.pool.resources()]
        # The pool's versions say whether a device changed; the inventory only adds product names, which
        # a device keeps while it is on the node.
        key = (inventory is not None, tuple((r, version) for r, version, _ in published))
        if key == self._view_key:
            return  # the common rescan: nothing changed
        self._view_key = key
        devices = [d for _, _, devs in published for d in devs]
        view = {d.name: d for d in group_devices(devices, reports_by_group(inventory), self._root)}
        _log_changes(self.view, view)
        self.view = view
        healthy = sum(1 for d in view.values() if d.healthy)
        self.recorder.dra_published(healthy, len(view) - healthy)

    def _root(self, address: str) -> str | None:
        if address not in self._roots:
            self._roots[address] = pcie_root(self.options.sysfs_root, address)
        return self._roots[address]

    # --- sockets --------------------------------------------------------------------------------
    def _serve_missing(self) -> None:
        for server in self.servers:
            if not server.serving:
                self._serve(server)

    def _serve(self, server: UnixServer) -> None:
        try:
            server.start()
        except Exception as exc:
            first = server.path not in self.socket_errors
            with self._lock:
                self.socket_errors[server.path] = f"cannot serve {server.path}: {exc}"
            (log.error if first else log.debug)("cannot serve %s (will retry): %s", server.path, exc)
            return
        with self._lock:
            self.socket_errors.pop(server.path, None)

    def _check_sockets(self) -> None:
        for server in self.servers:
            if server.serving and not server.alive():
                log.info("socket %s was removed: serving it again", server.path)
                if server.path == self.options.registration_socket:
                    self.registration.forget()
                server.stop()
                self._serve(server)

    def _on_registration(self, registered: bool, error: str) -> None:
        if registered:
            self.notify("registered")

    # --- status ---------------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        problems: list[str] = []
        with self._lock:
            problems.extend(self.socket_errors.values())
        if self.publisher.last_error:
            problems.append(f"ResourceSlices not published: {self.publisher.last_error}")
        elif self.publisher.last_sync is None:
            problems.append("ResourceSlices not published yet")
        since, error = self.registration.state()
        if since is None:
            problems.append(f"not registered with the kubelet ({error or 'waiting for the kubelet to call GetInfo'})")
        return (not problems, "; ".join(problems) or "ok")

    def status(self) -> dict[str, Any]:
        prepared = self.preparer.snapshot()
        doc = view_json(list(self.view.values()), self.options.driver, self.options.node, claims_per_device(prepared))
        since, error = self.registration.state()
        with self._lock:
            socket_errors = dict(self.socket_errors)
        doc["slices"] = {
            "in_sync": self.publisher.in_sync,
            "generation": self.publisher.generation,
            "last_sync": self.publisher.last_sync,
            "error": self.publisher.last_error,
        }
        doc["registration"] = {
            "registered": since is not None,
            "since": since,
            "error": error,
            "socket": self.options.registration_socket,
            "endpoint": self.options.plugin_socket,
            "socket_errors": socket_errors,
        }
        doc["claims"] = {
            uid: {"namespace": c.namespace, "name": c.name, "devices": [d.device for d in c.devices]} for uid, c in sorted(prepared.items())
        }
        return {"dra": doc}


def _log_changes(old: dict[str, DraDevice], new: dict[str, DraDevice]) -> None:
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        was = a is not None and a.healthy
        now = b is not None and b.healthy
        if was and not now and a is not None:
            why = b.reason if b is not None else "it left the node"
            log.warning("withdrawing DRA device %s (IOMMU group %s) from the ResourceSlice: %s", name, a.group, why)
        elif now and not was and b is not None:
            log.info("offering DRA device %s (IOMMU group %s, %s, %s)", name, b.group, b.resource, b.pci_bus_id)


def cleanup(options: DraOptions) -> int:
    """`serve --mode dra --cleanup`: delete this node's ResourceSlices of the driver. Returns how many."""
    publisher = SlicePublisher(KubeApi(options.kubeconfig), options.driver, options.node, Recorder())
    deleted = publisher.delete_all()
    log.info("deleted %d ResourceSlice(s) of driver %s on node %s", deleted, options.driver, options.node)
    return deleted
