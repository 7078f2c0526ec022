"""A stand-in kubelet that speaks the real device-plugin protocol over real unix sockets.

It does what the kubelet's device manager does: serves `Registration` on kubelet.sock, validates
the request (API version, extended resource name), dials the plugin back synchronously, asks for
its options, then reads ListAndWatch in the background; capacity counts every device, allocatable
only the healthy ones, and a stream that ends marks the resource's devices unhealthy. `restart()`
deletes every socket in the directory and recreates kubelet.sock, as a restarting kubelet does.
Each start is a new generation, as each kubelet process is: a call that an older generation was still
handling when it stopped (a Register waiting on its dial-back) is dropped, never counted by the new
one, because a kubelet that died mid-call keeps nothing of it; registrations and endpoints say which
generation accepted them.
`admit()` admits a pod like the device manager (pick healthy free devices, GetPreferredAllocation when
there is a choice, Allocate) and records it, so the PodResources API it also serves lists it.
Used by `demo`, the tests and the benchmarks.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc

from deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as api
from deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc as api_grpc
from deviceplugin.naming import resource_name_error
from deviceplugin.sim.podresources import PodResourcesServer, Pods

SUPPORTED_VERSIONS = ("v1beta1",)
DIAL_TIMEOUT = 10.0


class Registration(NamedTuple):
    time: float
    resource: str
    endpoint: str
    generation: int  # the kubelet start that accepted it


@dataclass
class Endpoint:
    resource: str
    socket: str
    channel: grpc.Channel
    stub: api_grpc.DevicePluginStub
    options: api.DevicePluginOptions
    generation: int
    devices: dict[str, str] = field(default_factory=dict)  # id -> health
    topology: dict[str, list[int]] = field(default_factory=dict)
    updates: int = 0
    connected: bool = True
    stream: object | None = None


class _Registration(api_grpc.RegistrationServicer):
    """The Registration service of one start of the kubelet: its calls carry that start's generation."""

    def __init__(self, kubelet: FakeKubelet, generation: int) -> None:
        self.kubelet = kubelet
        self.generation = generation

    def Register(self, request: api.RegisterRequest, context: grpc.ServicerContext) -> api.Empty:
        return self.kubelet.register(request, context, self.generation)


class FakeKubelet:
    def __init__(self, plugin_dir: str, pod_resources_socket: str | None = None) -> None:
        self.plugin_dir = plugin_dir
        self.socket = os.path.join(plugin_dir, "kubelet.sock")
        self.pods: Pods = {}
        self.pod_resources = (
            PodResourcesServer(pod_resources_socket, self._pods_copy, self._allocatable_ids) if pod_resources_socket else None
        )
        self.endpoints: dict[str, Endpoint] = {}
        self.registrations: list[Registration] = []
        self.dropped: list[tuple[int, str]] = []  # (generation, resource) of Registers that outlived their kubelet
        self.generation = 0  # how many times it started: each start is a new kubelet process
        self._running = False
        self.update_log: list[tuple[float, str, dict[str, str]]] = []  # (monotonic, resource, devices)
        self.reject: dict[str, str] = {}  # resource -> error to answer Register with
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> FakeKubelet:
        os.makedirs(self.plugin_dir, exist_ok=True)
        if self.pod_resources is not None:
            self.pod_resources.start()
        with self._cond:
            self.generation += 1
            self._running = True
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="kubelet"))
        api_grpc.add_RegistrationServicer_to_server(_Registration(self, self.generation), server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        with self._cond:
            self._running = False  # from here on, whatever this generation still does is dropped
        if self.pod_resources is not None:
            self.pod_resources.stop()
        if self._server is not None:
            self._server.stop(grace=0).wait()
            self._server = None
        with self._cond:
            endpoints, self.endpoints = list(self.endpoints.values()), {}
        for ep in endpoints:
            _close(ep)
        if os.path.exists(self.socket):
            os.unlink(self.socket)

    def restart(self) -> None:
        """Like a kubelet restart: forget every plugin, delete every socket in the dir, serve anew."""
        self.stop()
        for name in os.listdir(self.plugin_dir):
            path = os.path.join(self.plugin_dir, name)
            if name.endswith(".sock") or is_socket(path):
                os.unlink(path)
        self.start()

    # --- Registration service -------------------------------------------------------------------
    def register(self, request: api.RegisterRequest, context: grpc.ServicerContext, generation: int) -> api.Empty:
        if request.version not in SUPPORTED_VERSIONS:
            context.abort(grpc.StatusCode.UNKNOWN, f"Unsupported version {request.version!r}, expected one of {SUPPORTED_VERSIONS}")
        if request.resource_name in self.reject:
            context.abort(grpc.StatusCode.UNKNOWN, self.reject[request.resource_name])
        error = resource_name_error(request.resource_name)
        if error:
            context.abort(grpc.StatusCode.UNKNOWN, f"invalid resource name {request.resource_name!r}: {error}")
        socket = os.path.join(self.plugin_dir, request.endpoint)
        try:
            endpoint = self._connect(request.resource_name, socket, generation)
        except Exception as exc:
            context.abort(grpc.StatusCode.UNKNOWN, f"cannot connect to device plugin at {socket}: {exc}")
        with self._cond:
            # The dial-back can take seconds: the kubelet that took this call may have stopped meanwhile.
            current = self._running and generation == self.generation
            if current:
                old = self.endpoints.get(request.resource_name)
                self.endpoints[request.resource_name] = endpoint
                self.registrations.append(Registration(time.time(), request.resource_name, request.endpoint, generation))
            else:
                self.dropped.append((generation, request.resource_name))
            self._cond.notify_all()
        if not current:
            _close(endpoint)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"kubelet (start {generation}) stopped during the registration")
        if old is not None:
            _close(old)
        threading.Thread(target=self._watch, args=(endpoint,), daemon=True, name=f"law-{request.resource_name}").start()
        return api.Empty()

    def _connect(self, resource: str, socket: str, generation: int) -> Endpoint:
        channel = grpc.insecure_channel(f"unix://{socket}")
        grpc.channel_ready_future(channel).result(timeout=DIAL_TIMEOUT)
        stub = api_grpc.DevicePluginStub(channel)
        options = stub.GetDevicePluginOptions(api.Empty(), timeout=DIAL_TIMEOUT)
        return Endpoint(resource, socket, channel, stub, options, generation)

    def _watch(self, ep: Endpoint) -> None:
        try:
            ep.stream = ep.stub.ListAndWatch(api.Empty())
            for response in ep.stream:  # type: ignore[attr-defined]
                devices = {d.ID: d.health for d in response.devices}
                with self._cond:
                    ep.devices = devices
                    ep.topology = {d.ID: [n.ID for n in d.topology.nodes] for d in response.devices}
                    ep.updates += 1
                    if self.endpoints.get(ep.resource) is ep:  # not a replaced endpoint's, nor a stopped kubelet's
                        self.update_log.append((time.monotonic(), ep.resource, devices))
                    self._cond.notify_all()
        except grpc.RpcError:
            pass
        with self._cond:
            ep.connected = False
            # The kubelet marks a disconnected plugin's devices unhealthy (and drops them after 5 min).
            ep.devices = {d: "Unhealthy" for d in ep.devices}
            self._cond.notify_all()

    # --- what the node status would show --------------------------------------------------------
    def capacity(self) -> dict[str, int]:
        with self._cond:
            return {r: len(ep.devices) for r, ep in self.endpoints.items()}

    def allocatable(self) -> dict[str, int]:
        with self._cond:
            return {r: sum(1 for h in ep.devices.values() if h == "Healthy") for r, ep in self.endpoints.items()}

    def devices(self, resource: str) -> dict[str, str]:
        with self._cond:
            ep = self.endpoints.get(resource)
            return dict(ep.devices) if ep else {}

    def wait_for(self, predicate: Callable[[FakeKubelet], bool], timeout: float = 10.0) -> bool:
        return wait_on(self._cond, lambda: predicate(self), timeout)

    # --- calls the kubelet makes on admission ---------------------------------------------------
    def stub(self, resource: str) -> api_grpc.DevicePluginStub:
        with self._cond:
            return self.endpoints[resource].stub

    def allocate(self, resource: str, *device_ids: str) -> api.AllocateResponse:
        request = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=list(device_ids))])
        return self.stub(resource).Allocate(request, timeout=10)

    def preferred(self, resource: str, available: list[str], must_include: list[str], size: int) -> list[str]:
        request = api.PreferredAllocationRequest(
            container_requests=[
                api.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available, must_include_deviceIDs=must_include, allocation_size=size
                )
            ]
        )
        return list(self.stub(resource).GetPreferredAllocation(request, timeout=10).container_responses[0].deviceIDs)

    # --- pods: admission as the device manager does it, and what PodResources lists -------------
    def in_use(self, resource: str) -> set[str]:
        with self._cond:
            return {d for containers in self.pods.values() for res in containers.values() for d in res.get(resource, [])}

    def admit(
        self, pod: str, requests: dict[str, int | list[str]], namespace: str = "default", container: str = "compute"
    ) -> dict[str, api.ContainerAllocateResponse]:
        """Allocates each resource (a count, or the exact IDs) for one container and records the pod."""
        responses = {}
        for resource, want in requests.items():
            ids = list(want) if isinstance(want, list) else self._pick(resource, want)
            responses[resource] = self.allocate(resource, *ids).container_responses[0]
            with self._cond:
                self.pods.setdefault((namespace, pod), {}).setdefault(container, {})[resource] = ids
        return responses

    def _pick(self, resource: str, count: int) -> list[str]:
        used = self.in_use(resource)
        free = sorted(d for d, h in self.devices(resource).items() if h == "Healthy" and d not in used)
        if len(free) < count:
            raise RuntimeError(f"{resource}: {count} requested, {len(free)} free")
        if len(free) == count or not self.endpoints[resource].options.get_preferred_allocation_available:
            return free[:count]
        return self.preferred(resource, free, [], count)

    def remove_pod(self, pod: str, namespace: str = "default") -> None:
        with self._cond:
            self.pods.pop((namespace, pod), None)

    def _pods_copy(self) -> Pods:
        with self._cond:
            return {k: {c: {r: list(i) for r, i in res.items()} for c, res in v.items()} for k, v in self.pods.items()}

    def _allocatable_ids(self) -> dict[str, list[str]]:
        with self._cond:
            return {r: sorted(d for d, h in ep.devices.items() if h == "Healthy") for r, ep in self.endpoints.items()}


def wait_on(cond: threading.Condition, ready: Callable[[], bool], timeout: float) -> bool:
    """Waits until ready() holding cond (an RLock: ready may call the accessors that take it)."""
    deadline = time.monotonic() + timeout
    with cond:
        while not ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            cond.wait(min(remaining, 0.05))
        return True


def _close(ep: Endpoint) -> None:
    if ep.stream is not None:
        ep.stream.cancel()  # type: ignore[attr-defined]
    ep.channel.close()


def is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False
