"""The test kubelet itself: a restart is a new kubelet process, and what the old one was still doing is lost.

Restart tests trust `registrations` and `endpoints`; a Register that the stopped instance was still
handling (waiting on its dial-back) must not show up as a registration with the new one.
"""

from __future__ import annotations

import os
import threading
from concurrent import futures

import grpc

from deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as api
from deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc as api_grpc
from deviceplugin.registration import RegistrationError, register
from deviceplugin.sim.kubelet import FakeKubelet

R = "example.com/gpu"


class Plugin(api_grpc.DevicePluginServicer):
    """A plugin whose GetDevicePluginOptions (the kubelet's dial-back) can wait until the test releases it."""

    def __init__(self, stall: bool = False) -> None:
        self.dialled = threading.Event()
        self.release = threading.Event()
        if not stall:
            self.release.set()

    def GetDevicePluginOptions(self, request, context):
        self.dialled.set()
        self.release.wait(10)
        return api.DevicePluginOptions()

    def ListAndWatch(self, request, context):
        yield api.ListAndWatchResponse(devices=[api.Device(ID="dev0", health="Healthy")])
        threading.Event().wait(5)


def serve(plugin_dir: str, name: str, servicer: api_grpc.DevicePluginServicer) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    api_grpc.add_DevicePluginServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{os.path.join(plugin_dir, name)}")
    server.start()
    return server


def test_a_register_that_outlives_its_kubelet_is_dropped_not_counted(node):
    plugin_dir = str(node.plugins)
    kubelet = FakeKubelet(plugin_dir).start()
    stalling = Plugin(stall=True)
    servers = [serve(plugin_dir, "stall.sock", stalling)]
    errors: list[str] = []

    def call() -> None:
        try:
            register(plugin_dir, R, "stall.sock", timeout=10)
        except RegistrationError as exc:
            errors.append(str(exc))

    caller = threading.Thread(target=call)
    try:
        caller.start()
        assert stalling.dialled.wait(10), "the kubelet never dialled back"
        kubelet.restart()  # the first instance dies with its Register still waiting on the dial-back
        caller.join(10)
        assert errors, "the plugin's Register should have failed with its kubelet"
        stalling.release.set()  # the first instance's handler thread now finishes its dial-back
        assert kubelet.wait_for(lambda k: bool(k.dropped) or R in k.endpoints, 10)
        assert kubelet.dropped == [(1, R)]
        assert R not in kubelet.endpoints and kubelet.registrations == [], "the new kubelet never got a Register"

        servers.append(serve(plugin_dir, "good.sock", Plugin()))
        register(plugin_dir, R, "good.sock")  # what the plugin must do: register with the new instance
        assert [(r.resource, r.endpoint, r.generation) for r in kubelet.registrations] == [(R, "good.sock", 2)]
        assert kubelet.endpoints[R].generation == 2
        assert kubelet.wait_for(lambda k: k.devices(R) == {"dev0": "Healthy"}, 10)
    finally:
        stalling.release.set()
        caller.join(10)
        for server in servers:
            server.stop(0)
        kubelet.stop()
