"""The kubelet's PodResources side for tests: serves `List` and `GetAllocatableResources` over a real unix socket.

Fed by the test kubelet (`sim.kubelet.FakeKubelet.admit`/`remove_pod`), so what it lists is exactly what
was allocated through the device-plugin protocol. `rate_limit` makes it answer RESOURCE_EXHAUSTED like
the kubelet's limiter; `hang` makes it accept calls and never answer.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc

from deviceplugin.api.podresources.v1 import api_pb2 as pr
from deviceplugin.api.podresources.v1 import api_pb2_grpc as pr_grpc

# (namespace, pod) -> container -> resource -> device IDs
Pods = dict[tuple[str, str], dict[str, dict[str, list[str]]]]


class PodResourcesServer(pr_grpc.PodResourcesListerServicer):
    def __init__(self, socket: str, pods: Callable[[], Pods], allocatable: Callable[[], dict[str, list[str]]]) -> None:
        self.socket = socket
        self.pods = pods
        self.allocatable_devices = allocatable
        self.calls = 0
        self.rate_limit = False
        self.hang = threading.Event()  # set: calls block until cleared (or the server stops)
        self._server: grpc.Server | None = None

    def start(self) -> PodResourcesServer:
        os.makedirs(os.path.dirname(self.socket), exist_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="podresources"))
        pr_grpc.add_PodResourcesListerServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        self.hang.clear()
        if self._server is not None:
            self._server.stop(grace=0).wait()
            self._server = None
        if os.path.exists(self.socket):
            os.unlink(self.socket)

    def _gate(self, context: grpc.ServicerContext) -> None:
        self.calls += 1
        while self.hang.is_set() and context.is_active() and self._server is not None:
            time.sleep(0.02)
        if self.rate_limit:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rejected by rate limit")

    def List(self, request: pr.ListPodResourcesRequest, context: grpc.ServicerContext) -> pr.ListPodResourcesResponse:
        self._gate(context)
        response = pr.ListPodResourcesResponse()
        for (namespace, name), containers in sorted(self.pods().items()):
            pod = response.pod_resources.add(name=name, namespace=namespace)
            for container_name, resources in sorted(containers.items()):
                container = pod.containers.add(name=container_name)
                for resource, ids in sorted(resources.items()):
                    container.devices.add(resource_name=resource, device_ids=ids)
        return response

    def GetAllocatableResources(
        self, request: pr.AllocatableResourcesRequest, context: grpc.ServicerContext
    ) -> pr.AllocatableResourcesResponse:
        self._gate(context)
        response = pr.AllocatableResourcesResponse()
        for resource, ids in sorted(self.allocatable_devices().items()):
            response.devices.add(resource_name=resource, device_ids=ids)
        return response
