"""The DRAPlugin service the kubelet calls: prepare a claim's devices for a pod, and undo it.

NodePrepareResources, per claim: read the ResourceClaim (namespace, name and UID from the kubelet),
take the allocation results of our driver, re-check each group (offered and healthy in the pool, its
functions still on their drivers, /dev/vfio/<group> present: the pool's own Allocate check), write one
metadata file per request and one CDI spec per claim, record the claim in the checkpoint, and return the
CDI device IDs. A claim that cannot be prepared gets its reason in the response (the kubelet shows it as
a pod event and retries); it never fails the call for the other claims, and never stops the daemon.
Preparing a claim again returns what was recorded, re-writing a CDI spec or metadata file that went
missing (/var/run/cdi may be a tmpfs). NodeUnprepareResources removes both and forgets the claim; a claim
we do not know is a no-op. Calls are serialized, as in the upstream kubeletplugin helper.

Both API versions (v1, v1beta1) are served on the same socket by one implementation.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from deviceplugin.api.dra.v1 import api_pb2 as v1
from deviceplugin.api.dra.v1 import api_pb2_grpc as v1_grpc
from deviceplugin.api.dra.v1beta1 import api_pb2 as v1beta1
from deviceplugin.api.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from deviceplugin.dra import cdi, checkpoint, metadata
from deviceplugin.dra.checkpoint import PreparedClaim, PreparedDevice
from deviceplugin.dra.devices import DraDevice
from deviceplugin.dra.options import DraOptions
from deviceplugin.metrics import Recorder
from deviceplugin.pool import DevicePool, DeviceUnavailable, InvalidRequest, UnknownDevice

log = logging.getLogger(__name__)

ClaimGetter = Callable[[str, str], "dict[str, Any] | None"]  # (namespace, name) -> the claim, None if absent


class ClaimError(Exception):
    """This claim cannot be prepared; the message says why (the kubelet shows it in the pod's events)."""


def base_request(name: str) -> str:
    """`gpu/large` (a firstAvailable subrequest) -> `gpu`: metadata and responses use the request name."""
    return name.split("/", 1)[0]


class Preparer:
    def __init__(
        self,
        options: DraOptions,
        pool: DevicePool,
        view: Callable[[], Mapping[str, DraDevice]],
        get_claim: ClaimGetter,
        recorder: Recorder,
    ) -> None:
        self.options = options
        self.pool = pool
        self.view = view
        self.get_claim = get_claim
        self.recorder = recorder
        self.path = checkpoint.checkpoint_path(options.data_dir)
        self._lock = threading.Lock()
        self.claims: dict[str, PreparedClaim] = checkpoint.read(self.path)
        self._update_metrics()

    # --- prepare --------------------------------------------------------------------------------
    def prepare(self, namespace: str, name: str, uid: str) -> tuple[PreparedDevice, ...]:
        with self._lock:
            known = self.claims.get(uid)
            if known is not None:
                self._restore(known)
                return known.devices
        claim = self._read_claim(namespace, name, uid)  # the slow call, outside the lock
        with self._lock:
            known = self.claims.get(uid)
            if known is not None:
                return known.devices
            prepared = self._prepare(claim)
            self.claims[uid] = prepared
            self._save()
        log.info("prepared claim %s (%s): %s", prepared.ref, uid, ", ".join(d.device for d in prepared.devices) or "no device of ours")
        return prepared.devices

    def _read_claim(self, namespace: str, name: str, uid: str) -> dict[str, Any]:
        claim = self.get_claim(namespace, name)
        if claim is None:
            raise ClaimError(f"ResourceClaim {namespace}/{name} does not exist")
        if claim["metadata"].get("uid") != uid:
            raise ClaimError(f"ResourceClaim {namespace}/{name} got replaced (its uid is {claim['metadata'].get('uid')}, not {uid})")
        if not (claim.get("status") or {}).get("allocation"):
            raise ClaimError(f"ResourceClaim {namespace}/{name} is not allocated")
        return claim

    def _our_results(self, claim: dict[str, Any]) -> list[dict[str, Any]]:
        results = claim["status"]["allocation"].get("devices", {}).get("results") or []
        ours = [r for r in results if r.get("driver") == self.options.driver]
        for r in ours:
            if r.get("pool") != self.options.node:
                raise ClaimError(
                    f"device {r.get('device')} was allocated from pool {r.get('pool')!r}, but this is node {self.options.node!r}"
                )
        return ours

    def _prepare(self, claim: dict[str, Any]) -> PreparedClaim:
        meta = claim["metadata"]
        ref = f"{meta['namespace']}/{meta['name']}"
        view = self.view()
        busy = {d.device: c for c in self.claims.values() for d in c.devices}
        nodes: dict[str, tuple[str, ...]] = {}
        picked: list[tuple[dict[str, Any], DraDevice]] = []
        for result in self._our_results(claim):
            device = self._usable(result["device"], view)
            holder = busy.get(device.name)
            if holder is not None and not result.get("adminAccess"):
                raise ClaimError(
                    f"device {device.name} (IOMMU group {device.group}) is already prepared for claim {holder.ref} ({holder.uid}): "
                    "a VFIO group can be opened by one VM only"
                )
            nodes[device.name] = self._device_nodes(device)
            picked.append((result, device))
        return self._write(claim, ref, picked, nodes)

    def _usable(self, name: str, view: Mapping[str, DraDevice]) -> DraDevice:
        device = view.get(name)
        if device is None:
            raise ClaimError(f"device {name} is not offered by node {self.options.node} (it left the node or was never published)")
        if not device.healthy:
            raise ClaimError(f"device {name} (IOMMU group {device.group}) is unhealthy: {device.reason}")
        return device

    def _device_nodes(self, device: DraDevice) -> tuple[str, ...]:
        """The host device nodes of the group, from the pool, which re-checks the group right now."""
        by_resource: dict[str, list[str]] = {}
        for resource, device_id in device.members:
            by_resource.setdefault(resource, []).append(device_id)
        paths: dict[str, None] = {}
        for resource, ids in by_resource.items():
            try:
                specs = self.pool.device_nodes(resource, ids)
            except (UnknownDevice, DeviceUnavailable, InvalidRequest) as exc:
                raise ClaimError(f"device {device.name}: {exc}") from exc
            paths.update(dict.fromkeys(host for _container, host, _perms in specs))
        return tuple(paths)

    def _write(
        self, claim: dict[str, Any], ref: str, picked: list[tuple[dict[str, Any], DraDevice]], nodes: dict[str, tuple[str, ...]]
    ) -> PreparedClaim:
        meta = claim["metadata"]
        uid = meta["uid"]
        pod_claim = (meta.get("annotations") or {}).get(metadata.POD_CLAIM_NAME_ANNOTATION)
        driver, data_dir = self.options.driver, self.options.data_dir
        by_request: dict[str, list[DraDevice]] = {}
        for result, device in picked:
            by_request.setdefault(base_request(result["request"]), []).append(device)
        docs = {
            request: metadata.document(
                {"namespace": meta["namespace"], "name": meta["name"], "uid": uid},
                pod_claim,
                request,
                [{"driver": driver, "pool": self.options.node, "name": d.name, "attributes": d.attributes} for d in devices],
            )
            for request, devices in by_request.items()
        }
        entries, prepared = [], []
        for result, device in picked:
            request = base_request(result["request"])
            mount = (metadata.host_path(data_dir, driver, uid, request), metadata.container_path(driver, meta["name"], pod_claim, request))
            entries.append(cdi.device_entry(uid, device.name, nodes[device.name], mount))
            cdi_ids = (cdi.cdi_id(driver, uid, device.name),)
            prepared.append(PreparedDevice(request, self.options.node, device.name, device.group, device.pci_bus_id, cdi_ids))
        record = PreparedClaim(uid, meta["namespace"], meta["name"], tuple(prepared), cdi.spec(driver, entries), docs)
        self._write_files(record)
        return record

    def _write_files(self, claim: PreparedClaim, only_missing: bool = False) -> list[str]:
        written = []
        for request, doc in claim.metadata.items():
            path = metadata.host_path(self.options.data_dir, self.options.driver, claim.uid, request)
            if not (only_missing and os.path.exists(path)):
                metadata.write(path, doc)
                written.append(path)
        if claim.devices:
            path = cdi.spec_path(self.options.cdi_dir, self.options.driver, claim.uid)
            if not (only_missing and os.path.exists(path)):
                cdi.write_spec(self.options.cdi_dir, self.options.driver, claim.uid, claim.cdi_spec)
                written.append(path)
        return written

    def _restore(self, claim: PreparedClaim) -> None:
        """Already prepared: the same answer, and whatever file went missing (a tmpfs /var/run/cdi) again."""
        for path in self._write_files(claim, only_missing=True):
            log.warning("re-created %s for prepared claim %s (%s): it had gone missing", path, claim.ref, claim.uid)

    # --- unprepare ------------------------------------------------------------------------------
    def unprepare(self, namespace: str, name: str, uid: str) -> None:
        with self._lock:
            claim = self.claims.pop(uid, None)
            # Removed by path even for a claim we do not know (a lost checkpoint): both are named by UID.
            cdi.remove_spec(self.options.cdi_dir, self.options.driver, uid)
            metadata.remove_claim(self.options.data_dir, uid)
            if claim is not None:
                self._save()
        if claim is not None:
            log.info("unprepared claim %s (%s)", claim.ref, uid)

    # --- state ----------------------------------------------------------------------------------
    def _save(self) -> None:
        checkpoint.write(self.path, self.claims)
        self._update_metrics()

    def _update_metrics(self) -> None:
        self.recorder.dra_prepared(checkpoint.claims_per_device(self.claims))

    def snapshot(self) -> dict[str, PreparedClaim]:
        with self._lock:
            return dict(self.claims)


class _Servicer:
    """NodePrepareResources / NodeUnprepareResources for one API version (`api` is its pb2 module)."""

    def __init__(self, preparer: Preparer, api: Any, recorder: Recorder) -> None:
        self.preparer = preparer
        self.api = api
        self.recorder = recorder

    def NodePrepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = self.api.NodePrepareResourcesResponse()
        for claim in request.claims:
            entry = response.claims[claim.uid]
            try:
                for d in self.preparer.prepare(claim.namespace, claim.name, claim.uid):
                    entry.devices.add(request_names=[d.request], pool_name=d.pool, device_name=d.device, cdi_device_ids=list(d.cdi_ids))
                self.recorder.dra_prepare(True)
            except Exception as exc:
                if not isinstance(exc, ClaimError):
                    log.exception("preparing claim %s/%s (%s) failed", claim.namespace, claim.name, claim.uid)
                del entry.devices[:]
                entry.error = f"{claim.namespace}/{claim.name}: {exc}"
                self.recorder.dra_prepare(False)
                log.warning("cannot prepare claim %s/%s (%s): %s", claim.namespace, claim.name, claim.uid, exc)
        return response

    def NodeUnprepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = self.api.NodeUnprepareResourcesResponse()
        for claim in request.claims:
            entry = response.claims[claim.uid]
            try:
                self.preparer.unprepare(claim.namespace, claim.name, claim.uid)
            except Exception as exc:
                log.exception("unpreparing claim %s/%s (%s) failed", claim.namespace, claim.name, claim.uid)
                entry.error = f"{claim.namespace}/{claim.name}: {exc}"
        return response


def add_services(server: grpc.Server, preparer: Preparer, recorder: Recorder) -> None:
    """Both DRAPlugin versions the kubelet may choose (see registration.SUPPORTED_SERVICES)."""
    v1_grpc.add_DRAPluginServicer_to_server(_Servicer(preparer, v1, recorder), server)
    v1beta1_grpc.add_DRAPluginServicer_to_server(_Servicer(preparer, v1beta1, recorder), server)
