"""Registers each resource with the kubelet on `<plugin_dir>/kubelet.sock`, retrying with backoff.

The kubelet is often late (node boot) or restarting; the plugin never gives up and never exits
because of it. One worker thread handles every pending registration so that a slow kubelet never
blocks rescans or health updates.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as api
from deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc as api_grpc
from deviceplugin.naming import KUBELET_SOCKET

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
BACKOFF = (1.0, 2.0, 5.0, 10.0)  # then every 10 s, forever
REGISTER_TIMEOUT = 12.0  # the kubelet dials us back synchronously with a 10 s timeout


class RegistrationError(RuntimeError):
    pass


def register(plugin_dir: str, resource: str, endpoint: str, timeout: float = REGISTER_TIMEOUT) -> None:
    """One Register call; raises RegistrationError with the kubelet's message on failure."""
    kubelet = os.path.join(plugin_dir, KUBELET_SOCKET)
    if not os.path.exists(kubelet):
        raise RegistrationError(f"{kubelet} does not exist yet (kubelet not running?)")
    request = api.RegisterRequest(
        version=API_VERSION,
        endpoint=endpoint,
        resource_name=resource,
        options=api.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True),
    )
    try:
        with grpc.insecure_channel(f"unix://{kubelet}") as channel:
            api_grpc.RegistrationStub(channel).Register(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise RegistrationError(f"{exc.code().name}: {exc.details()}") from exc


@dataclass
class _Pending:
    endpoint: str
    attempts: int = 0
    due: float = 0.0


class Registrar:
    """Keeps trying to register every requested resource until it succeeds."""

    def __init__(
        self,
        plugin_dir: str,
        on_result: Callable[[str, str, str | None], None],
        backoff: tuple[float, ...] = BACKOFF,
    ) -> None:
        self.plugin_dir = plugin_dir
        self.on_result = on_result  # (resource, endpoint, error or None)
        self.backoff = backoff
        self._pending: dict[str, _Pending] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="registrar", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        # A Register call in flight can take its full timeout; the thread is a daemon, so don't
        # let it eat the 2 s in which SIGTERM must finish (empty lists sent, sockets removed).
        self._thread.join(timeout=0.2)

    def request(self, resource: str, endpoint: str) -> None:
        with self._cond:
            self._pending[resource] = _Pending(endpoint)
            self._cond.notify_all()

    def retry_now(self) -> None:
        """The kubelet just appeared: forget the backoff."""
        with self._cond:
            for pending in self._pending.values():
                pending.due = 0.0
            self._cond.notify_all()

    def pending(self) -> list[str]:
        with self._cond:
            return sorted(self._pending)

    def _next_due(self) -> tuple[str, _Pending] | None:
        now = time.monotonic()
        due = [(p.due, r) for r, p in self._pending.items() if p.due <= now]
        if due:
            resource = min(due)[1]
            return resource, self._pending[resource]
        return None

    def _wait_for_due(self) -> tuple[str, _Pending] | None:
        """The next registration to attempt, or None once stopped. Call with the lock held."""
        while not self._stop:
            item = self._next_due()
            if item is not None:
                return item
            wake = min((p.due for p in self._pending.values()), default=None)
            self._cond.wait(None if wake is None else max(wake - time.monotonic(), 0.01))
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                item = self._wait_for_due()
            if item is None:
                return
            resource, pending = item
            error = self._attempt(resource, pending.endpoint)
            with self._cond:
                if self._pending.get(resource) is not pending:
                    continue  # re-requested meanwhile (kubelet restarted again): the new request wins
                if error is None:
                    del self._pending[resource]
                else:
                    pending.due = time.monotonic() + self.backoff[min(pending.attempts, len(self.backoff) - 1)]
                    pending.attempts += 1
            self.on_result(resource, pending.endpoint, error)

    def _attempt(self, resource: str, endpoint: str) -> str | None:
        try:
            register(self.plugin_dir, resource, endpoint)
        except RegistrationError as exc:
            return str(exc)
        except Exception as exc:  # never let one odd failure kill the worker
            log.exception("unexpected error registering %s", resource)
            return repr(exc)
        return None
