"""The devices currently published per resource, with their health: the ONE place state changes.

`update(inventory)` is the single reconcile step (start-up, rescans, inotify events and kubelet
restarts all end here). It publishes healthy candidates, keeps devices it already published as
Unhealthy (with the reason) while they still exist on the node, and drops devices that left the node.
The published state is an immutable mapping swapped under a lock, so the gRPC handlers read a
consistent snapshot without locking; ListAndWatch streams wait on a per-resource version.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from deviceplugin.discovery import Device, Inventory
from deviceplugin.naming import env_var_name
from deviceplugin.sysfs import current_driver

log = logging.getLogger(__name__)

HOST_DEV = "/dev"  # paths handed to the runtime are host paths, whatever --dev-root we read from


class UnknownDevice(LookupError):
    """The kubelet asked for an ID this plugin never offered for that resource."""


class DeviceUnavailable(RuntimeError):
    """The device is known but cannot be handed out now (unhealthy or no longer viable)."""


@dataclass(frozen=True)
class Allocation:
    devices: tuple[tuple[str, str, str], ...]  # (container_path, host_path, permissions)
    envs: dict[str, str]


@dataclass(frozen=True)
class Change:
    resource: str
    device: Device
    what: str  # "added", "removed", "healthy", "unhealthy"


@dataclass(frozen=True)
class _Published:
    devices: dict[str, dict[str, Device]]  # resource -> id -> device (insertion = id order)
    versions: dict[str, int]
    specs: dict[str, tuple[tuple[str, str, str], ...]]  # device id -> its DeviceSpecs, built once per scan


class DevicePool:
    def __init__(self, sysfs_root: str = "/sys", dev_root: str = "/dev") -> None:
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root
        self._cond = threading.Condition()
        self._state = _Published({}, {}, {})
        self._stopped = False
        self.on_stale: Callable[[], None] = lambda: None  # asks the daemon for a rescan

    # --- the reconcile step ---------------------------------------------------------------------
    def update(self, inventory: Inventory) -> list[Change]:
        with self._cond:
            old = self._state
            present = {fn.address for g in inventory.groups for fn in g.functions}
            new_devices = _merge(old.devices, inventory, present)
            changes = _diff(old.devices, new_devices)
            versions = dict(old.versions)
            for resource in {c.resource for c in changes} | (new_devices.keys() - old.versions.keys()):
                versions[resource] = versions.get(resource, 0) + 1
            specs = {d.id: _device_specs(d, inventory.host.iommufd) for devs in new_devices.values() for d in devs.values()}
            self._state = _Published(new_devices, versions, specs)
            if changes or versions != old.versions:
                self._cond.notify_all()
        return changes

    # --- readers --------------------------------------------------------------------------------
    def resources(self) -> list[str]:
        return sorted(self._state.devices)

    def devices(self, resource: str) -> tuple[int, tuple[Device, ...]]:
        state = self._state
        return state.versions.get(resource, 0), tuple(state.devices.get(resource, {}).values())

    def wait_for_change(self, resource: str, version: int, timeout: float, cancelled: Callable[[], bool]) -> bool:
        """Blocks until the resource's version moves past `version`; False on timeout, stop or cancel."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._stopped or cancelled() or self._state.versions.get(resource, 0) != version,
                timeout=timeout,
            )
            return not self._stopped and not cancelled() and self._state.versions.get(resource, 0) != version

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopped

    # --- allocation -----------------------------------------------------------------------------
    def allocate(self, resource: str, ids: Iterable[str]) -> Allocation:
        state = self._state
        published = state.devices.get(resource, {})
        specs: dict[tuple[str, str, str], None] = {(f"{HOST_DEV}/vfio/vfio", f"{HOST_DEV}/vfio/vfio", "mrw"): None}
        order: list[str] = []
        for device_id in ids:
            device = published.get(device_id)
            if device is None:
                raise UnknownDevice(f"{device_id} is not a {resource} device on this node (offered: {', '.join(published) or 'none'})")
            if not device.healthy:
                raise DeviceUnavailable(f"{resource} device {device_id} (IOMMU group {device.group}) is unhealthy: {device.reason}")
            problem = self._recheck(device)
            if problem:
                self.on_stale()
                raise DeviceUnavailable(f"{resource} device {device_id} (IOMMU group {device.group}) is no longer usable: {problem}")
            specs.update(dict.fromkeys(state.specs[device_id]))
            order.append(device_id)
        return Allocation(tuple(specs), {env_var_name(resource): ",".join(order)})

    def _recheck(self, device: Device) -> str | None:
        """A few syscalls, not a rescan: each function's driver link and the group's device node."""
        for address, driver in device.drivers:
            now = current_driver(self.sysfs_root, address)
            if now != driver:
                return f"{address} is now bound to {now or 'no driver (or removed)'}, was {driver or 'no driver'}"
        if not os.path.exists(os.path.join(self.dev_root, "vfio", device.group)):
            return f"/dev/vfio/{device.group} is gone"
        return None

    def preferred(self, resource: str, available: list[str], must_include: list[str], size: int) -> list[str]:
        numa = {d.id: d.numa_node for d in self._state.devices.get(resource, {}).values()}
        return preferred_allocation(available, must_include, size, numa)


def _merge(old: dict[str, dict[str, Device]], inventory: Inventory, present: set[str]) -> dict[str, dict[str, Device]]:
    merged: dict[str, dict[str, Device]] = {}
    for resource, candidates in inventory.devices.items():
        known = old.get(resource, {})
        # Never advertise a device a VM could not use: an unhealthy candidate is only kept (as
        # Unhealthy) when we already published it, so the kubelet learns it went bad.
        kept = {d.id: d for d in candidates if d.healthy or d.id in known}
        if kept:
            merged[resource] = kept
    for resource, devices in old.items():
        for device in devices.values():
            if device.id in merged.get(resource, {}) or device.id not in present:
                continue
            why = _why_not_candidate(inventory, device)
            merged.setdefault(resource, {})[device.id] = replace(device, healthy=False, reason=why)
    for resource in old:
        merged.setdefault(resource, {})  # a resource that lost every device still streams an empty list
    return {r: dict(sorted(d.items())) for r, d in sorted(merged.items())}


def _why_not_candidate(inventory: Inventory, device: Device) -> str:
    for group in inventory.groups:
        if any(fn.address == device.id for fn in group.functions):
            return "; ".join(group.reasons) or f"now offered as {group.resource}"
    return "no longer offered"


def _diff(old: dict[str, dict[str, Device]], new: dict[str, dict[str, Device]]) -> list[Change]:
    changes = []
    for resource in sorted(old.keys() | new.keys()):
        before, after = old.get(resource, {}), new.get(resource, {})
        for device_id in sorted(before.keys() | after.keys()):
            a, b = before.get(device_id), after.get(device_id)
            if a is None and b is not None:
                changes.append(Change(resource, b, "added"))
            elif b is None and a is not None:
                changes.append(Change(resource, a, "removed"))
            elif a is not None and b is not None and (a.healthy, a.numa_node) != (b.healthy, b.numa_node):
                changes.append(Change(resource, b, "healthy" if b.healthy else "unhealthy"))
    return changes


def _device_specs(device: Device, iommufd: bool) -> tuple[tuple[str, str, str], ...]:
    paths = [f"{HOST_DEV}/vfio/{device.group}"]
    if iommufd and device.vfio_cdevs:
        paths.append(f"{HOST_DEV}/iommu")
        paths.extend(f"{HOST_DEV}/vfio/devices/{c}" for c in device.vfio_cdevs)
    return tuple((p, p, "mrw") for p in paths)


def preferred_allocation(available: list[str], must_include: list[str], size: int, numa: dict[str, int]) -> list[str]:
    """must_include first, then devices on the NUMA node(s) already chosen (or the node that can hold the
    whole request), then a stable address order. Only IDs from `available` are returned."""
    avail = list(dict.fromkeys(available))
    chosen = [d for d in dict.fromkeys(must_include) if d in avail]
    need = max(size - len(chosen), 0)
    rest = sorted((d for d in avail if d not in chosen), key=lambda d: (numa.get(d, -1) < 0, d))
    if need == 0 or not rest:
        return chosen[: max(size, len(chosen))]
    nodes = {numa.get(d, -1) for d in chosen} - {-1}
    if not nodes:
        counts: dict[int, int] = {}
        for d in rest:
            counts[numa.get(d, -1)] = counts.get(numa.get(d, -1), 0) + 1
        fits = sorted(n for n, c in counts.items() if c >= need and n >= 0)
        nodes = {fits[0]} if fits else {max(counts, key=lambda n: (counts[n], -n))}
    rest.sort(key=lambda d: (numa.get(d, -1) not in nodes, d))
    return chosen + rest[:need]
