"""A stand-in kubelet for the DRA mode: its plugin watcher, its DRA client, and its ResourceSlice wipes.

It does what the kubelet (1.34+) does with a DRA driver, over the driver's real unix sockets:
- the plugin watcher: watches the registry dir (inotify), and for every socket calls GetInfo, checks the
  type (DRAPlugin) and picks the first advertised service it supports ("v1.DRAPlugin", then
  "v1beta1.DRAPlugin"), then reports NotifyRegistrationStatus; a deleted socket deregisters the driver;
- the DRA manager: calls NodePrepareResources / NodeUnprepareResources on the registered endpoint with the
  chosen API version;
- the wipes: on start it deletes every ResourceSlice of its node, and (if `disconnect_wipe_delay` is set)
  a driver's slices that long after the driver deregistered (30 s in the real kubelet).
`restart()` forgets every plugin and starts again, as a restarting kubelet does. Used by the tests.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from deviceplugin.api.dra.v1 import api_pb2 as v1
from deviceplugin.api.dra.v1 import api_pb2_grpc as v1_grpc
from deviceplugin.api.dra.v1beta1 import api_pb2 as v1beta1
from deviceplugin.api.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from deviceplugin.api.pluginregistration.v1 import api_pb2 as reg
from deviceplugin.api.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from deviceplugin.dra.kube import KubeApi
from deviceplugin.sim.kubelet import is_socket, wait_on
from deviceplugin.watch import IN_CREATE, IN_DELETE, Inotify

SERVICES: dict[str, tuple[Any, Any]] = {"v1.DRAPlugin": (v1, v1_grpc), "v1beta1.DRAPlugin": (v1beta1, v1beta1_grpc)}
DIAL_TIMEOUT = 10.0  # the plugin watcher's dial timeout
GET_INFO_TIMEOUT = 1.0  # the plugin watcher gives GetInfo one second


@dataclass
class Plugin:
    driver: str
    endpoint: str
    service: str
    socket: str
    channel: grpc.Channel
    registered_at: float


class _Events:
    def __init__(self, directory: str, created: Callable[[str], None], deleted: Callable[[str], None]) -> None:
        self.directory = directory
        self.created = created
        self.deleted = deleted

    def __call__(self, wd: int, mask: int, name: str) -> None:
        path = os.path.join(self.directory, name)
        if mask & IN_CREATE:  # dialled in a thread of its own, as the kubelet's operation executor does
            threading.Thread(target=self.created, args=(path,), daemon=True).start()
        elif mask & IN_DELETE:
            self.deleted(path)


class DraKubelet:
    def __init__(
        self,
        registry_dir: str,
        node: str,
        api: KubeApi | None = None,
        services: Iterable[str] = tuple(SERVICES),
        disconnect_wipe_delay: float | None = None,
    ) -> None:
        self.registry_dir = registry_dir
        self.node = node
        self.api = api
        self.services = tuple(services)  # the kubelet's supported services, most recent first
        self.disconnect_wipe_delay = disconnect_wipe_delay
        self.plugins: dict[str, Plugin] = {}
        self.registrations: list[tuple[float, str, str]] = []  # (time, driver, chosen service)
        self.rejections: list[tuple[str, str]] = []  # (socket, why)
        self.wipes: list[tuple[float, str | None, int]] = []  # (time, driver or None for all, slices deleted)
        self._cond = threading.Condition()
        self._observer: Any = None
        self._timers: list[threading.Timer] = []

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, wipe: bool = True) -> DraKubelet:
        os.makedirs(self.registry_dir, exist_ok=True)
        if wipe and self.api is not None:
            self.wipe()  # "no DRA driver has registered yet": the kubelet drops all of its node's slices
        inotify = Inotify(_Events(self.registry_dir, self._register, self._deregister))
        inotify.add(self.registry_dir)
        self._observer = inotify
        for name in sorted(os.listdir(self.registry_dir)):  # the watcher's initial walk
            self._register(os.path.join(self.registry_dir, name))
        return self

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.close()
            self._observer = None
        for timer in self._timers:
            timer.cancel()
        with self._cond:
            plugins, self.plugins = list(self.plugins.values()), {}
        for plugin in plugins:
            plugin.channel.close()

    def restart(self, wipe: bool = True) -> None:
        self.stop()
        self.start(wipe=wipe)

    # --- the plugin watcher ---------------------------------------------------------------------
    def _register(self, path: str) -> None:
        if not is_socket(path):
            return
        try:
            with grpc.insecure_channel(f"unix://{path}") as channel:
                grpc.channel_ready_future(channel).result(timeout=DIAL_TIMEOUT)
                stub = reg_grpc.RegistrationStub(channel)
                info = stub.GetInfo(reg.InfoRequest(), timeout=GET_INFO_TIMEOUT)
                error = self._validate(info)
                if error:
                    stub.NotifyRegistrationStatus(reg.RegistrationStatus(plugin_registered=False, error=error), timeout=5)
                    with self._cond:
                        self.rejections.append((path, error))
                        self._cond.notify_all()
                    return
                service = next(s for s in info.supported_versions if s in self.services)
                plugin = Plugin(info.name, info.endpoint, service, path, grpc.insecure_channel(f"unix://{info.endpoint}"), time.time())
                with self._cond:
                    old = self.plugins.get(info.name)
                    self.plugins[info.name] = plugin
                    self.registrations.append((time.time(), info.name, service))
                    self._cond.notify_all()
                if old is not None:
                    old.channel.close()
                stub.NotifyRegistrationStatus(reg.RegistrationStatus(plugin_registered=True), timeout=5)
        except grpc.RpcError as exc:
            with self._cond:
                self.rejections.append((path, f"{exc.code().name}: {exc.details()}"))
                self._cond.notify_all()
        except grpc.FutureTimeoutError:
            with self._cond:
                self.rejections.append((path, "dial timed out"))
                self._cond.notify_all()

    def _validate(self, info: reg.PluginInfo) -> str | None:
        if info.type != "DRAPlugin":
            return f"no handler registered for plugin type: {info.type}"
        if not info.supported_versions:
            return "empty list of supported gRPC services (aka supported versions)"
        if not any(s in self.services for s in info.supported_versions):
            offered = list(info.supported_versions)
            return f"none of services supported by the plugin ({offered}) are supported by the kubelet ({self.services})"
        return None

    def _deregister(self, path: str) -> None:
        with self._cond:
            gone = [p for p in self.plugins.values() if p.socket == path]
            for plugin in gone:
                del self.plugins[plugin.driver]
            self._cond.notify_all()
        for plugin in gone:
            plugin.channel.close()
            if self.disconnect_wipe_delay is not None and self.api is not None:
                timer = threading.Timer(self.disconnect_wipe_delay, self._wipe_if_gone, args=(plugin.driver,))
                timer.daemon = True
                self._timers.append(timer)
                timer.start()

    def _wipe_if_gone(self, driver: str) -> None:
        with self._cond:
            if driver in self.plugins:
                return
        self.wipe(driver)

    # --- ResourceSlices -------------------------------------------------------------------------
    def wipe(self, driver: str | None = None) -> int:
        """Deletes this node's ResourceSlices (of one driver, or all), as the kubelet does."""
        assert self.api is not None, "wiping needs an API client"
        slices, _ = self.api.list_slices(self.node, driver)
        for s in slices:
            self.api.delete_slice(s["metadata"]["name"])
        with self._cond:
            self.wipes.append((time.time(), driver, len(slices)))
        return len(slices)

    # --- the DRA calls --------------------------------------------------------------------------
    def _stub(self, driver: str) -> tuple[Any, Any]:
        with self._cond:
            plugin = self.plugins[driver]
        api, api_grpc = SERVICES[plugin.service]
        return api, api_grpc.DRAPluginStub(plugin.channel)

    def prepare(self, driver: str, *claims: tuple[str, str, str], timeout: float = 45.0) -> Any:
        """claims: (namespace, name, uid). Returns the NodePrepareResourcesResponse."""
        api, stub = self._stub(driver)
        request = api.NodePrepareResourcesRequest(claims=[api.Claim(namespace=ns, name=n, uid=u) for ns, n, u in claims])
        return stub.NodePrepareResources(request, timeout=timeout)

    def unprepare(self, driver: str, *claims: tuple[str, str, str], timeout: float = 45.0) -> Any:
        api, stub = self._stub(driver)
        request = api.NodeUnprepareResourcesRequest(claims=[api.Claim(namespace=ns, name=n, uid=u) for ns, n, u in claims])
        return stub.NodeUnprepareResources(request, timeout=timeout)

    # --- waiting --------------------------------------------------------------------------------
    def wait_for(self, predicate: Callable[[DraKubelet], bool], timeout: float = 10.0) -> bool:
        return wait_on(self._cond, lambda: predicate(self), timeout)

    def registered(self, driver: str) -> bool:
        with self._cond:
            return driver in self.plugins
