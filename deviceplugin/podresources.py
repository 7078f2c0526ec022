"""Who holds which device: a client of the kubelet's PodResources API (v1, read-only).

The kubelet serves `List` (per pod and container: resource names and the device IDs this plugin
offered) and `GetAllocatableResources` on /var/lib/kubelet/pod-resources/kubelet.sock. The plugin
joins that to its own view so every device shows its holder next to its health, and so a multi-GPU
group's mates can be held back while a pod uses part of it.

The API is a courtesy, never a dependency: a missing socket, a refusal, a hung kubelet or its rate
limit (burst 10, 100/s, then RESOURCE_EXHAUSTED) each give an answer with `ok=False` and the reason,
within the deadline. The daemon asks through `Poller`, which coalesces requests on its own thread,
so no gRPC handler ever waits for the kubelet.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from deviceplugin.pool import Holder, Holdings

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEADLINE = 1.0  # seconds; the kubelet answers from memory in milliseconds
MIN_INTERVAL = 0.5  # between two calls: far under the kubelet's 100/s, and bursts of Allocates coalesce


def fetch(socket: str, timeout: float = DEADLINE) -> Holdings:
    """One `List` (and `GetAllocatableResources` where served); never raises.

    grpc is imported only when there is a socket to call: `inspect` on a node without one stays light.
    """
    if not os.path.exists(socket):
        return Holdings(ok=False, error=f"{socket} does not exist (is /var/lib/kubelet/pod-resources mounted?)", at=time.time())
    import grpc

    from deviceplugin.api.podresources.v1 import api_pb2 as pr
    from deviceplugin.api.podresources.v1 import api_pb2_grpc as pr_grpc

    try:
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            stub = pr_grpc.PodResourcesListerStub(channel)
            listed = stub.List(pr.ListPodResourcesRequest(), timeout=timeout)
            allocatable = _allocatable(stub, pr, timeout)
    except grpc.RpcError as exc:
        return Holdings(ok=False, error=f"{socket}: {_why(exc, timeout)}", at=time.time())
    devices: dict[tuple[str, str], Holder] = {}
    for pod in listed.pod_resources:
        for container in pod.containers:
            for dev in container.devices:
                for device_id in dev.device_ids:
                    devices[(dev.resource_name, device_id)] = Holder(pod.namespace, pod.name, container.name)
    return Holdings(ok=True, devices=devices, at=time.time(), allocatable=allocatable)


def _allocatable(stub: Any, pr: Any, timeout: float) -> dict[str, frozenset[str]] | None:
    """resource -> the device IDs the kubelet counts as allocatable; None where the kubelet does not serve it."""
    import grpc

    try:
        response = stub.GetAllocatableResources(pr.AllocatableResourcesRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNKNOWN):
            return None  # older kubelets, or the feature gate off
        raise
    out: dict[str, set[str]] = {}
    for dev in response.devices:
        out.setdefault(dev.resource_name, set()).update(dev.device_ids)
    return {r: frozenset(ids) for r, ids in out.items()}


def _why(exc: Any, timeout: float) -> str:
    import grpc

    code = exc.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "rate-limited by the kubelet (RESOURCE_EXHAUSTED); will ask again on the next rescan"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout:g} s (kubelet hung?)"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot connect ({exc.details()})"
    return f"{code.name}: {exc.details()}"


class Poller:
    """Asks the kubelet on its own thread: requests coalesce, calls are spaced by `min_interval`."""

    def __init__(
        self, socket: str, on_result: Callable[[Holdings], None], min_interval: float = MIN_INTERVAL, timeout: float = DEADLINE
    ) -> None:
        self.socket = socket
        self.on_result = on_result
        self.min_interval = min_interval
        self.timeout = timeout
        self._cond = threading.Condition()
        self._wanted = False
        self._stop = False
        self._last = 0.0
        self._thread = threading.Thread(target=self._run, name="podresources", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=0.2)  # a call in flight ends by its deadline; the thread is a daemon

    def request(self) -> None:
        with self._cond:
            if self._wanted:
                return  # one is pending already: waking the thread again (on every Allocate) only costs the caller
            self._wanted = True
            self._cond.notify_all()

    def _next(self) -> bool:
        """Waits for a request and the spacing; False once stopped. Call with the lock held."""
        while not self._stop:
            wait = self._last + self.min_interval - time.monotonic()
            if self._wanted and wait <= 0:
                self._wanted = False
                return True
            self._cond.wait(wait if self._wanted else None)
        return False

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._next():
                    return
            self._last = time.monotonic()
            try:
                holdings = fetch(self.socket, self.timeout)
            except Exception as exc:  # never let one odd failure end the thread
                log.exception("reading PodResources failed")
                holdings = Holdings(ok=False, error=repr(exc), at=time.time())
            self.on_result(holdings)
