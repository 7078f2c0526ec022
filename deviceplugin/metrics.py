"""Prometheus metrics and the small facts /status reports (last Allocate per device, registrations).

Each daemon owns its own registry, so tests and the demo can run several without clashing.
Recording is a dictionary update under a lock: cheap enough for the Allocate path.

The values live here, in plain dictionaries; prometheus_client is imported only when someone reads
them (`registry`, `exposition`: the status endpoint, which `serve` starts only with --status-port).
Its import (http.server, email, urllib, ...) was 4.7 MB of the daemon's 48 MB. The registry holds one
collector that hands out the same metric families, samples and `_created` series the library's own
Counter and Gauge objects would (tests/test_metrics.py compares the exposition text).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

PREFIX = "vfio_device_plugin"
COUNTER, GAUGE = "counter", "gauge"


class _Metric:
    """One counter or gauge: label values -> value (and, for a counter, when that child was created)."""

    def __init__(self, kind: str, name: str, documentation: str, labels: tuple[str, ...] = ()) -> None:
        self.kind, self.name, self.documentation, self.labels = kind, name, documentation, labels
        self.values: dict[tuple[str, ...], float] = {}
        self.created: dict[tuple[str, ...], float] = {}
        if not labels:  # a metric without labels exists from the start, as the library's does
            self._child(())

    def _child(self, key: tuple[str, ...]) -> None:
        if key not in self.values:
            self.values[key] = 0.0
            if self.kind == COUNTER:
                self.created[key] = time.time()

    def inc(self, *key: str) -> None:
        self._child(key)
        self.values[key] += 1.0

    def set(self, value: float, *key: str) -> None:
        self._child(key)
        self.values[key] = float(value)

    def clear(self) -> None:
        self.values.clear()
        self.created.clear()


class Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards every _Metric and last_allocate; collect() copies under it
        self._metrics: list[_Metric] = []
        self._registry: Any = None
        m = self._metric
        self.devices = m(GAUGE, f"{PREFIX}_devices", "Devices published per resource and health", "resource", "health")
        self.allocations = m(COUNTER, f"{PREFIX}_allocations", "Successful Allocate container requests", "resource")
        self.allocation_errors = m(COUNTER, f"{PREFIX}_allocation_errors", "Refused Allocate container requests", "resource", "reason")
        self.registrations = m(COUNTER, f"{PREFIX}_registrations", "Successful registrations with the kubelet", "resource")
        self.registration_failures = m(COUNTER, f"{PREFIX}_registration_failures", "Failed registration attempts", "resource")
        self.rescan_seconds = m(GAUGE, f"{PREFIX}_rescan_duration_seconds", "Duration of the last sysfs rescan")
        self.rescans = m(COUNTER, f"{PREFIX}_rescans", "sysfs rescans (timer, inotify events and stale allocations)")
        self.rescan_time = m(GAUGE, f"{PREFIX}_last_rescan_timestamp_seconds", "Unix time of the last sysfs rescan")
        # Who holds what comes from the kubelet's PodResources API; no pod labels, so cardinality stays bounded.
        self.device_allocated = m(
            GAUGE, "vfio_device_allocated", "1 while the kubelet has the device allocated to a pod", "resource", "device"
        )
        self.in_use = m(GAUGE, f"{PREFIX}_devices_in_use", "Devices the kubelet has allocated to pods, per resource", "resource")
        self.pod_resources_up = m(GAUGE, f"{PREFIX}_pod_resources_up", "1 when the last PodResources call answered")
        self.companions = m(GAUGE, f"{PREFIX}_companions", "Healthy companion tokens per companion resource and role", "resource", "role")
        # DRA mode (serve --mode dra)
        self.dra_devices = m(GAUGE, f"{PREFIX}_dra_devices", "DRA devices (IOMMU groups) by state: published or withdrawn", "state")
        self.dra_prepared_claims = m(GAUGE, f"{PREFIX}_dra_prepared_claims", "Prepared ResourceClaims per DRA device", "device")
        self.dra_prepares = m(COUNTER, f"{PREFIX}_dra_prepare_requests", "Claims in NodePrepareResources calls by result", "result")
        self.dra_slice_writes = m(COUNTER, f"{PREFIX}_dra_slice_writes", "ResourceSlice writes by operation", "op")
        self.dra_slice_errors = m(COUNTER, f"{PREFIX}_dra_slice_errors", "Failed attempts to publish ResourceSlices")
        self.last_allocate: dict[str, dict[str, object]] = {}

    def _metric(self, kind: str, name: str, documentation: str, *labels: str) -> _Metric:
        metric = _Metric(kind, name, documentation, labels)
        self._metrics.append(metric)
        return metric

    def allocated(self, resource: str, ids: list[str]) -> None:
        now = time.time()
        with self._lock:
            self.allocations.inc(resource)
            for device_id in ids:
                self.last_allocate[device_id] = {"resource": resource, "time": now}

    def allocation_failed(self, resource: str, reason: str) -> None:
        with self._lock:
            self.allocation_errors.inc(resource, reason)

    def last_allocations(self) -> dict[str, dict[str, object]]:
        with self._lock:
            return dict(self.last_allocate)

    def registration(self, resource: str, ok: bool) -> None:
        with self._lock:
            (self.registrations if ok else self.registration_failures).inc(resource)

    def rescanned(self, seconds: float) -> None:
        with self._lock:
            self.rescans.inc()
            self.rescan_seconds.set(seconds)
            self.rescan_time.set(time.time())

    @property
    def rescan_count(self) -> int:
        with self._lock:
            return int(self.rescans.values[()])

    def set_devices(self, counts: dict[str, tuple[int, int]]) -> None:
        """counts: resource -> (healthy, unhealthy)."""
        with self._lock:
            for resource, (healthy, unhealthy) in counts.items():
                self.devices.set(healthy, resource, "Healthy")
                self.devices.set(unhealthy, resource, "Unhealthy")

    def set_allocations(self, known: bool, held: dict[str, dict[str, bool]]) -> None:
        """held: resource -> device -> allocated to a pod, from PodResources; kept as they were while it is unknown."""
        with self._lock:
            self.pod_resources_up.set(1 if known else 0)
            if not known:
                return
            self.device_allocated.clear()  # devices that left the node drop out
            for resource, devices in held.items():
                for device, is_held in devices.items():
                    self.device_allocated.set(1 if is_held else 0, resource, device)
                self.in_use.set(sum(devices.values()), resource)

    def set_companions(self, counts: dict[tuple[str, str], int]) -> None:
        """(companion resource, role) -> healthy tokens."""
        with self._lock:
            self.companions.clear()
            for (resource, role), n in counts.items():
                self.companions.set(n, resource, role)

    # --- DRA ----------------------------------------------------------------------------------------
    def dra_published(self, published: int, withdrawn: int) -> None:
        with self._lock:
            self.dra_devices.set(published, "published")
            self.dra_devices.set(withdrawn, "withdrawn")

    def dra_prepared(self, per_device: dict[str, list[str]]) -> None:
        """per_device: DRA device name -> the claims prepared with it."""
        with self._lock:
            self.dra_prepared_claims.clear()
            for device, claims in per_device.items():
                self.dra_prepared_claims.set(len(claims), device)

    def dra_prepare(self, ok: bool) -> None:
        with self._lock:
            self.dra_prepares.inc("ok" if ok else "error")

    def dra_slice_write(self, op: str) -> None:
        with self._lock:
            self.dra_slice_writes.inc(op)

    def dra_slice_error(self) -> None:
        with self._lock:
            self.dra_slice_errors.inc()

    # --- reading (prometheus_client from here on) ---------------------------------------------------
    @property
    def registry(self) -> Any:
        """A prometheus_client CollectorRegistry holding these metrics (imported on first use)."""
        with self._lock:
            if self._registry is None:
                from prometheus_client import CollectorRegistry

                registry = CollectorRegistry()
                registry.register(_Collector(self))
                self._registry = registry
            return self._registry

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))

    def families(self) -> Iterator[Any]:
        """The metric families, as the library's Counter and Gauge would collect them."""
        from prometheus_client import metrics as library
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        created = getattr(library, "_use_created", True)  # PROMETHEUS_DISABLE_CREATED_SERIES, as the library reads it
        with self._lock:
            snapshot = [(m, dict(m.values), dict(m.created)) for m in self._metrics]
        for metric, values, born in snapshot:
            family: Any
            if metric.kind == COUNTER:
                family = CounterMetricFamily(metric.name, metric.documentation, labels=metric.labels)
                for key, value in values.items():
                    family.add_metric(key, value, created=born[key] if created else None)
            else:
                family = GaugeMetricFamily(metric.name, metric.documentation, labels=metric.labels)
                for key, value in values.items():
                    family.add_metric(key, value)
            yield family


class _Collector:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[Any]:
        return self.recorder.families()
