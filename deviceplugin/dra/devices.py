"""What this node offers through DRA: one device per IOMMU group, with its name and attributes.

A pure function of the pool's devices (or, for `inspect`, of the inventory's candidates), shared by the
ResourceSlice publisher, the claim preparer, /status and `inspect`, so they cannot disagree. The group
stays the unit, as in the device-plugin mode: a VFIO group can be opened by one VM only. Where a group
holds several devices of the pool (several GPUs behind one bridge), they become one DRA device that is
healthy only when all of them are, identified by the lowest of their addresses.

Naming rule: `pci-` + the primary PCI address with `:` and `.` turned into `-` (`0000:01:00.0` ->
`pci-0000-01-00-0`), a DNS label as ResourceSlice device names must be, stable across restarts and
readable next to `lspci`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from deviceplugin.discovery import Device, GroupReport, Inventory
from deviceplugin.sysfs import device_dir

PCI_BUS_ID = "resource.kubernetes.io/pciBusID"  # what KubeVirt reads (from the metadata file)
PCIE_ROOT = "resource.kubernetes.io/pcieRoot"  # for matchAttribute constraints with NICs on the same root
MAX_STRING = 64  # resource.k8s.io/v1: a string attribute holds at most 64 characters

Attributes = dict[str, dict[str, Any]]  # qualified name -> DeviceAttribute ({"string": ...} or {"int": ...})


@dataclass(frozen=True)
class DraDevice:
    name: str
    group: str
    resource: str
    pci_bus_id: str
    members: tuple[tuple[str, str], ...]  # (resource, id) of the pool's devices it stands for, lowest id first
    healthy: bool
    reason: str  # why it is withdrawn (empty when healthy)
    attributes: Attributes


def device_name(address: str) -> str:
    return "pci-" + address.replace(":", "-").replace(".", "-")


def pcie_root(sysfs_root: str, address: str) -> str | None:
    """`pci0000:00`: the root complex the function hangs below, read as the upstream helper does
    (k8s.io/dynamic-resource-allocation/deviceattribute): the first component of the function's
    /sys/devices path.

    The kernel's bus/pci/devices links are relative (`../../../devices/pci0000:00/0000:00:01.0/...`):
    one readlink names the root complex. realpath() costs an lstat per path component, a millisecond
    per GPU behind a PCIe switch; it is kept for a link of another shape.
    """
    link = device_dir(sysfs_root, address)
    try:
        target = os.readlink(link)
    except OSError:
        return None
    root, sep, below = target.removeprefix(_KERNEL_LINK).partition("/")
    if target.startswith(_KERNEL_LINK) and sep and "/.." not in f"/{below}":
        return root if root.startswith("pci") and os.path.exists(link) else None
    return _resolved_root(sysfs_root, address)


_KERNEL_LINK = "../../../devices/"  # bus/pci/devices/<address> -> ../../../devices/pci0000:00/...


def _resolved_root(sysfs_root: str, address: str) -> str | None:
    devices = os.path.realpath(os.path.join(sysfs_root, "devices"))
    try:
        path = os.path.realpath(device_dir(sysfs_root, address), strict=True)
    except OSError:
        return None
    rel = os.path.relpath(path, devices)
    first = rel.split(os.sep, 1)[0]
    return first if first.startswith("pci") and not rel.startswith("..") else None


def group_devices(devices: Iterable[Device], groups: Mapping[str, GroupReport], root_of: Callable[[str], str | None]) -> list[DraDevice]:
    """One DraDevice per IOMMU group among `devices`, in group order.

    Companion tokens are left out: they exist for the device-plugin API's counting; a DRA device is the
    whole group, every function of it included.
    """
    by_group: dict[str, list[Device]] = defaultdict(list)
    for device in devices:
        if not device.role:
            by_group[device.group].append(device)
    return [
        _one(sorted(members, key=lambda d: d.id), groups.get(group), root_of)
        for group, members in sorted(by_group.items(), key=lambda item: int(item[0]))  # sysfs only reads numeric groups
    ]


def _one(members: list[Device], report: GroupReport | None, root_of: Callable[[str], str | None]) -> DraDevice:
    primary = members[0]
    vendor, _, device = primary.ids.partition(":")
    functions = {a for m in members for a in m.addresses}
    attributes: Attributes = {
        PCI_BUS_ID: {"string": primary.id},
        "vendorID": {"string": vendor},
        "deviceID": {"string": device},
        "resourceName": {"string": primary.resource},
        "iommuGroup": {"int": int(primary.group)},
        "numaNode": {"int": primary.numa_node},
        "functions": {"int": len(functions)},
    }
    product = _product_name(primary.id, report)
    if product:
        attributes["productName"] = {"string": product[:MAX_STRING]}
    root = root_of(primary.id)
    if root:
        attributes[PCIE_ROOT] = {"string": root}
    sick = [m for m in members if not m.healthy]
    reason = "; ".join(m.reason or f"{m.id} is unhealthy" for m in sick)
    return DraDevice(
        name=device_name(primary.id),
        group=primary.group,
        resource=primary.resource,
        pci_bus_id=primary.id,
        members=tuple((m.resource, m.id) for m in members),
        healthy=not sick,
        reason=reason,
        attributes=attributes,
    )


def _product_name(address: str, report: GroupReport | None) -> str | None:
    if report is None:
        return None
    for fn, name in zip(report.functions, report.names, strict=True):
        if fn.address == address:
            return name
    return None


def reports_by_group(inventory: Inventory | None) -> dict[str, GroupReport]:
    return {g.id: g for g in inventory.groups} if inventory is not None else {}


def inventory_devices(inventory: Inventory, sysfs_root: str) -> list[DraDevice]:
    """What `serve --mode dra` would publish for this inventory (healthy) and withhold (unhealthy)."""
    candidates = [d for devices in inventory.devices.values() for d in devices]
    return group_devices(candidates, reports_by_group(inventory), lambda a: pcie_root(sysfs_root, a))
