"""Prometheus metrics and the small facts /status reports (last Allocate per device, registrations).

Each daemon owns its own registry, so tests and the demo can run several without clashing.
Recording is a counter increment: cheap enough for the Allocate path.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

PREFIX = "vfio_device_plugin"


class Recorder:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.devices = Gauge(f"{PREFIX}_devices", "Devices published per resource and health", ["resource", "health"], registry=r)
        self.allocations = Counter(f"{PREFIX}_allocations", "Successful Allocate container requests", ["resource"], registry=r)
        self.allocation_errors = Counter(
            f"{PREFIX}_allocation_errors", "Refused Allocate container requests", ["resource", "reason"], registry=r
        )
        self.registrations = Counter(f"{PREFIX}_registrations", "Successful registrations with the kubelet", ["resource"], registry=r)
        self.registration_failures = Counter(f"{PREFIX}_registration_failures", "Failed registration attempts", ["resource"], registry=r)
        self.rescan_seconds = Gauge(f"{PREFIX}_rescan_duration_seconds", "Duration of the last sysfs rescan", registry=r)
        self.rescans = Counter(f"{PREFIX}_rescans", "sysfs rescans (timer, inotify events and stale allocations)", registry=r)
        self.rescan_time = Gauge(f"{PREFIX}_last_rescan_timestamp_seconds", "Unix time of the last sysfs rescan", registry=r)
        # Who holds what comes from the kubelet's PodResources API; no pod labels, so cardinality stays bounded.
        self.device_allocated = Gauge(
            "vfio_device_allocated", "1 while the kubelet has the device allocated to a pod", ["resource", "device"], registry=r
        )
        self.in_use = Gauge(f"{PREFIX}_devices_in_use", "Devices the kubelet has allocated to pods, per resource", ["resource"], registry=r)
        self.pod_resources_up = Gauge(f"{PREFIX}_pod_resources_up", "1 when the last PodResources call answered", registry=r)
        self.companions = Gauge(
            f"{PREFIX}_companions", "Healthy companion tokens per companion resource and role", ["resource", "role"], registry=r
        )
        # DRA mode (serve --mode dra)
        self.dra_devices = Gauge(
            f"{PREFIX}_dra_devices", "DRA devices (IOMMU groups) by state: published or withdrawn", ["state"], registry=r
        )
        self.dra_prepared_claims = Gauge(f"{PREFIX}_dra_prepared_claims", "Prepared ResourceClaims per DRA device", ["device"], registry=r)
        self.dra_prepares = Counter(
            f"{PREFIX}_dra_prepare_requests", "Claims in NodePrepareResources calls by result", ["result"], registry=r
        )
        self.dra_slice_writes = Counter(f"{PREFIX}_dra_slice_writes", "ResourceSlice writes by operation", ["op"], registry=r)
        self.dra_slice_errors = Counter(f"{PREFIX}_dra_slice_errors", "Failed attempts to publish ResourceSlices", registry=r)
        self._lock = threading.Lock()
        self.last_allocate: dict[str, dict[str, object]] = {}

    def allocated(self, resource: str, ids: list[str]) -> None:
        self.allocations.labels(resource).inc()
        now = time.time()
        with self._lock:
            for device_id in ids:
                self.last_allocate[device_id] = {"resource": resource, "time": now}

    def allocation_failed(self, resource: str, reason: str) -> None:
        self.allocation_errors.labels(resource, reason).inc()

    def last_allocations(self) -> dict[str, dict[str, object]]:
        with self._lock:
            return dict(self.last_allocate)

    def registration(self, resource: str, ok: bool) -> None:
        (self.registrations if ok else self.registration_failures).labels(resource).inc()

    def rescanned(self, seconds: float) -> None:
        self.rescans.inc()
        self.rescan_seconds.set(seconds)
        self.rescan_time.set(time.time())

    @property
    def rescan_count(self) -> int:
        return int(self.registry.get_sample_value(f"{PREFIX}_rescans_total") or 0)

    def set_devices(self, counts: dict[str, tuple[int, int]]) -> None:
        """counts: resource -> (healthy, unhealthy)."""
        for resource, (healthy, unhealthy) in counts.items():
            self.devices.labels(resource, "Healthy").set(healthy)
            self.devices.labels(resource, "Unhealthy").set(unhealthy)

    def set_allocations(self, known: bool, held: dict[str, dict[str, bool]]) -> None:
        """held: resource -> device -> allocated to a pod, from PodResources; kept as they were while it is unknown."""
        self.pod_resources_up.set(1 if known else 0)
        if not known:
            return
        self.device_allocated.clear()  # devices that left the node drop out
        for resource, devices in held.items():
            for device, is_held in devices.items():
                self.device_allocated.labels(resource, device).set(1 if is_held else 0)
            self.in_use.labels(resource).set(sum(devices.values()))

    def set_companions(self, counts: dict[tuple[str, str], int]) -> None:
        """(companion resource, role) -> healthy tokens."""
        self.companions.clear()
        for (resource, role), n in counts.items():
            self.companions.labels(resource, role).set(n)

    # --- DRA ----------------------------------------------------------------------------------------
    def dra_published(self, published: int, withdrawn: int) -> None:
        self.dra_devices.labels("published").set(published)
        self.dra_devices.labels("withdrawn").set(withdrawn)

    def dra_prepared(self, per_device: dict[str, list[str]]) -> None:
        """per_device: DRA device name -> the claims prepared with it."""
        self.dra_prepared_claims.clear()
        for device, claims in per_device.items():
            self.dra_prepared_claims.labels(device).set(len(claims))

    def dra_prepare(self, ok: bool) -> None:
        self.dra_prepares.labels("ok" if ok else "error").inc()

    def dra_slice_write(self, op: str) -> None:
        self.dra_slice_writes.labels(op).inc()

    def dra_slice_error(self) -> None:
        self.dra_slice_errors.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
