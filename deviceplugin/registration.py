"""Registers each resource with the kubelet on `<plugin_dir>/kubelet.sock`, retrying with backoff.

The kubelet is often late (node boot) or restarting; the plugin never gives up and never exits
because of it. One worker thread handles every pending registration so that a slow kubelet never
blocks rescans or health updates.

Exactly one Register per served socket and kubelet instance: the kubelet keeps a client (and a
ListAndWatch stream) per Register, and when any of them ends it marks the resource's devices
unhealthy. A kubelet restart is seen as several events and timer ticks, so the Registrar remembers
which kubelet instance (kubelet.sock's identity) each registration reached, and a request that the
registration in flight or already made answers is not sent again.
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


KubeletId = tuple[int, int, int]


def kubelet_identity(plugin_dir: str) -> KubeletId | None:
    """Which kubelet instance serves kubelet.sock (None: none does): every start creates a new socket file.

    The inode alone can be reused at once by a file system after the old socket is deleted; with the
    creation time (ctime) a new socket never looks like the old one.
    """
    try:
        st = os.stat(os.path.join(plugin_dir, KUBELET_SOCKET))
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


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
    server: int  # which start of the resource's server: a new socket needs a Register of its own
    attempts: int = 0
    due: float = 0.0


@dataclass
class _Done:
    endpoint: str
    server: int
    kubelet: KubeletId | None  # the instance that took the Register; None when it restarted during the call
    since: float


class Registrar:
    """Keeps trying to register every requested resource until it succeeds, once per kubelet instance."""

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
        self._done: dict[str, _Done] = {}  # resource -> its last successful Register
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

    def request(self, resource: str, endpoint: str, server: int) -> None:
        """Makes sure `resource`, served by start `server` of its server, is registered with the kubelet running now.

        Cheap and idempotent: call it on every event and tick. A request that an attempt already
        queued or in flight answers keeps that attempt (and its backoff); one that the kubelet
        running now already took is done.
        """
        with self._cond:
            pending = self._pending.get(resource)
            if pending is not None and (pending.endpoint, pending.server) == (endpoint, server):
                return
            done = self._done.get(resource)
            if done is not None and (done.endpoint, done.server) == (endpoint, server):
                if done.kubelet is not None and done.kubelet == kubelet_identity(self.plugin_dir):
                    return
            self._done.pop(resource, None)
            self._pending[resource] = _Pending(endpoint, server)
            self._cond.notify_all()

    def forget(self, resource: str) -> None:
        """Its server stopped: whatever was registered or pending for it is void."""
        with self._cond:
            self._pending.pop(resource, None)
            self._done.pop(resource, None)

    def registered(self) -> dict[str, float]:
        """Resource -> unix time of its Register, for those the kubelet running now took."""
        kubelet = kubelet_identity(self.plugin_dir)
        with self._cond:
            return {r: d.since for r, d in self._done.items() if kubelet is not None and d.kubelet == kubelet}

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
            before = kubelet_identity(self.plugin_dir)
            error = self._attempt(resource, pending.endpoint)
            after = kubelet_identity(self.plugin_dir)
            with self._cond:
                if self._pending.get(resource) is not pending:
                    continue  # a new server for the resource was requested meanwhile: that request wins
                if error is None:
                    del self._pending[resource]
                    # Seen the same before and after the call: that instance took it. None before: the
                    # socket appeared just before the call, so the one after took it. Otherwise the
                    # kubelet restarted during the call, and the next request registers again.
                    taken = after if before in (None, after) else None
                    self._done[resource] = _Done(pending.endpoint, pending.server, taken, time.time())
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
