"""The pluginregistration.v1 Registration service: how the kubelet's plugin watcher finds this driver.

The kubelet watches its plugins_registry directory; for our socket `<driver>-reg.sock` it calls GetInfo,
learns the type (DRAPlugin), the driver name, the endpoint (dra.sock in `<plugins-dir>/<driver>/`) and
the gRPC services we serve, picks the newest it knows (the kubelet 1.34+ prefers "v1.DRAPlugin", older
ones "v1beta1.DRAPlugin") and reports back with NotifyRegistrationStatus. A restarted kubelet walks the
directory again and calls GetInfo anew, which is how we are registered again; every confirmed
registration asks the daemon to re-check our ResourceSlices, which a starting kubelet wipes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from deviceplugin.api.pluginregistration.v1 import api_pb2 as reg
from deviceplugin.api.pluginregistration.v1 import api_pb2_grpc as reg_grpc

log = logging.getLogger(__name__)

PLUGIN_TYPE = "DRAPlugin"
# "<gRPC package short name>.<service>", newest first: the kubelet takes the first one it supports.
SUPPORTED_SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")


class RegistrationServicer(reg_grpc.RegistrationServicer):
    def __init__(self, driver: str, endpoint: str, on_status: Callable[[bool, str], None]) -> None:
        self.driver = driver
        self.endpoint = endpoint
        self.on_status = on_status
        self._lock = threading.Lock()
        self.registered_since: float | None = None
        self.error: str | None = None

    def GetInfo(self, request: reg.InfoRequest, context: grpc.ServicerContext) -> reg.PluginInfo:
        log.debug("kubelet asked for plugin info")
        return reg.PluginInfo(type=PLUGIN_TYPE, name=self.driver, endpoint=self.endpoint, supported_versions=list(SUPPORTED_SERVICES))

    def NotifyRegistrationStatus(self, request: reg.RegistrationStatus, context: grpc.ServicerContext) -> reg.RegistrationStatusResponse:
        with self._lock:
            if request.plugin_registered:
                self.registered_since, self.error = time.time(), None
            else:
                self.registered_since, self.error = None, request.error or "registration failed"
        if request.plugin_registered:
            log.info("registered with the kubelet as DRA driver %s (endpoint %s)", self.driver, self.endpoint)
        else:
            log.error("the kubelet refused the registration of DRA driver %s: %s", self.driver, request.error)
        self.on_status(request.plugin_registered, request.error)
        return reg.RegistrationStatusResponse()

    def state(self) -> tuple[float | None, str | None]:
        with self._lock:
            return self.registered_since, self.error

    def forget(self) -> None:
        """Our socket was re-created: the kubelet has to register us again."""
        with self._lock:
            self.registered_since = None
