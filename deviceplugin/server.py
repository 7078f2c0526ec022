"""The kubelet-facing gRPC DevicePlugin service: one servicer and one unix socket per resource name.

Handlers only read the pool; they never change state. ListAndWatch sends the full list at once and
again whenever the pool's version for its resource moves; when the plugin stops it sends an empty
list first, so the kubelet's allocatable drops to 0 at once instead of after the 5-minute grace.

Each open stream holds one of the server's worker threads for as long as it is open, and Allocate
(which the kubelet calls without a deadline) needs a free one. So at most MAX_STREAMS streams are
open per resource; one more is refused at once, and the rest of the workers always serve unary calls.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc

from deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as api
from deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc as api_grpc
from deviceplugin.discovery import Device
from deviceplugin.files import inode, remove
from deviceplugin.metrics import Recorder
from deviceplugin.naming import socket_name
from deviceplugin.pool import DevicePool, DeviceUnavailable, InvalidRequest, UnknownDevice

log = logging.getLogger(__name__)

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
WAKE_INTERVAL = 30.0  # a safety net only: a cancelled stream or a pool change wakes the stream at once
_starts = itertools.count(1)  # numbers every server start: the registrar registers each start once per kubelet
# The kubelet holds one stream per resource (two for a moment if it was sent a second Register); the
# rest is room for a diagnostic client. A stream beyond it is refused rather than ending an older one:
# the kubelet never reopens a stream by itself, and when any of its streams for a resource ends it
# marks all of the resource's devices unhealthy. A restarted kubelet's streams end with its
# connections, so a new kubelet never finds the slots taken by its predecessor.
MAX_STREAMS = 4
WORKERS = 32  # MAX_STREAMS for streams, the rest for Allocate bursts; threads start on demand


def device_message(device: Device) -> api.Device:
    msg = api.Device(ID=device.id, health=HEALTHY if device.healthy else UNHEALTHY)
    if device.numa_node >= 0:
        msg.topology.nodes.add(ID=device.numa_node)
    return msg


class DevicePluginServicer(api_grpc.DevicePluginServicer):
    def __init__(self, resource: str, pool: DevicePool, recorder: Recorder | None = None) -> None:
        self.resource = resource
        self.pool = pool
        self.recorder = recorder or Recorder()
        self.closing = threading.Event()
        self.farewell = False  # on closing, send an empty list first (a real stop, not a socket restart)
        self.streams = _Slots(MAX_STREAMS)

    def GetDevicePluginOptions(self, request: api.Empty, context: grpc.ServicerContext) -> api.DevicePluginOptions:
        return api.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

    def ListAndWatch(self, request: api.Empty, context: grpc.ServicerContext) -> Iterator[api.ListAndWatchResponse]:
        acquired, first_refusal = self.streams.acquire()
        if not acquired:
            (log.warning if first_refusal else log.debug)(
                "refusing a ListAndWatch stream of %s: %d are open already", self.resource, self.streams.limit
            )
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.streams.limit} ListAndWatch streams of {self.resource} are open")
        gone = threading.Event()

        def on_done() -> None:  # the stream ended, however it ended: its slot is free again
            gone.set()
            self.streams.release()
            self.pool.wake()

        if not context.add_callback(on_done):
            on_done()  # already over
            return
        version, devices = self.pool.devices(self.resource)
        yield api.ListAndWatchResponse(devices=[device_message(d) for d in devices])
        while True:
            changed = self.pool.wait_for_change(self.resource, version, WAKE_INTERVAL, lambda: gone.is_set() or self.closing.is_set())
            if self.closing.is_set() or self.pool.stopped:
                if self.farewell or self.pool.stopped:
                    yield api.ListAndWatchResponse(devices=[])
                return
            if gone.is_set() or not context.is_active():
                return
            if changed:
                version, devices = self.pool.devices(self.resource)
                yield api.ListAndWatchResponse(devices=[device_message(d) for d in devices])

    def GetPreferredAllocation(
        self, request: api.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api.PreferredAllocationResponse:
        response = api.PreferredAllocationResponse()
        for req in request.container_requests:
            ids = self.pool.preferred(self.resource, list(req.available_deviceIDs), list(req.must_include_deviceIDs), req.allocation_size)
            response.container_responses.add(deviceIDs=ids)
        return response

    def Allocate(self, request: api.AllocateRequest, context: grpc.ServicerContext) -> api.AllocateResponse:
        response = api.AllocateResponse()
        for req in request.container_requests:
            try:
                allocation = self.pool.allocate(self.resource, req.devices_ids)
            except UnknownDevice as exc:
                self.recorder.allocation_failed(self.resource, "unknown_device")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except InvalidRequest as exc:
                self.recorder.allocation_failed(self.resource, "invalid_request")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except DeviceUnavailable as exc:
                self.recorder.allocation_failed(self.resource, "unavailable")
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            container = response.container_responses.add()
            for container_path, host_path, permissions in allocation.devices:
                container.devices.add(container_path=container_path, host_path=host_path, permissions=permissions)
            container.envs.update(allocation.envs)
            self.recorder.allocated(self.resource, list(req.devices_ids))
        return response

    def PreStartContainer(self, request: api.PreStartContainerRequest, context: grpc.ServicerContext) -> api.PreStartContainerResponse:
        return api.PreStartContainerResponse()


class _Slots:
    """A count of open streams with a limit; remembers whether a refusal was already reported."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._refusing = False
        self._lock = threading.Lock()

    def acquire(self) -> tuple[bool, bool]:
        """(acquired, first refusal since a slot was last free)."""
        with self._lock:
            if self.open < self.limit:
                self.open += 1
                return True, False
            first, self._refusing = not self._refusing, True
            return False, first

    def release(self) -> None:
        with self._lock:
            self.open -= 1
            self._refusing = False


class PluginServer:
    """A gRPC server for one resource on `<plugin_dir>/vfio-dp-<resource>.sock`."""

    def __init__(self, resource: str, pool: DevicePool, plugin_dir: str, recorder: Recorder | None = None) -> None:
        self.resource = resource
        self.pool = pool
        self.recorder = recorder
        self.endpoint = socket_name(resource, plugin_dir)
        self.socket_path = os.path.join(plugin_dir, self.endpoint)
        self._server: grpc.Server | None = None
        self._servicer: DevicePluginServicer | None = None
        self._inode: int | None = None
        self.serial = 0  # set by start()

    def start(self) -> None:
        remove(self.socket_path)
        servicer = DevicePluginServicer(self.resource, self.pool, self.recorder)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=f"dp-{self.resource}"))
        api_grpc.add_DevicePluginServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix://{self.socket_path}")
        server.start()
        self._server, self._servicer = server, servicer
        self._inode = inode(self.socket_path)
        self.serial = next(_starts)

    def socket_alive(self) -> bool:
        """False once someone (a restarting kubelet) deleted or replaced our socket."""
        return self._inode is not None and inode(self.socket_path) == self._inode

    def begin_stop(self, farewell: bool) -> threading.Event | None:
        """Starts stopping; with farewell, open ListAndWatch streams first send an empty list."""
        server, servicer = self._server, self._servicer
        self._server = self._servicer = None
        if server is None or servicer is None:
            return None
        servicer.farewell = farewell
        servicer.closing.set()
        self.pool.wake()
        return server.stop(grace=1.0 if farewell else 0)

    def finish_stop(self) -> None:
        if self._inode is not None and inode(self.socket_path) == self._inode:
            remove(self.socket_path)
        self._inode = None

    def stop(self, farewell: bool = False) -> None:
        done = self.begin_stop(farewell)
        if done is not None:
            done.wait(2.0)
        self.finish_stop()
