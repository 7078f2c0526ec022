"""Turns a node snapshot into what the plugin offers, and says why for every IOMMU group.

A pure function: `discover(snapshot, config, pci_ids) -> Inventory`. The IOMMU group is the unit of
allocation (a VFIO group can be opened by one process only), so one group = one device offered to the
kubelet, identified by its primary function's address. `inspect`, `doctor`, the pool and the servers
all read the same Inventory, so they cannot disagree about whether a device is usable.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from deviceplugin.config import Config, Rule
from deviceplugin.naming import Naming, PciIds, auto_name
from deviceplugin.sysfs import FunctionProblem, HostInfo, NodeSnapshot, PciFunction, is_vfio_driver

CLASS_NAMES = {
    "0100": "SCSI storage",
    "0104": "RAID",
    "0106": "SATA",
    "0108": "NVMe",
    "0200": "Ethernet",
    "0207": "InfiniBand",
    "0280": "Network",
    "0300": "VGA",
    "0302": "3D controller",
    "0380": "Display controller",
    "0403": "Audio",
    "0600": "Host bridge",
    "0601": "ISA bridge",
    "0604": "PCI bridge",
    "0680": "Bridge",
    "0c03": "USB",
    "0c05": "SMBus",
    "0c80": "Serial bus",
    "1200": "Accelerator",
    "1180": "Signal processing",
}


@dataclass(frozen=True)
class Device:
    """One offerable unit: an IOMMU group, identified by its primary function's address."""

    id: str
    resource: str
    group: str
    numa_node: int
    ids: str  # vendor:device of the primary function
    addresses: tuple[str, ...]  # every function of the group
    drivers: tuple[tuple[str, str | None], ...]  # (address, driver) as scanned, for the Allocate recheck
    vfio_cdevs: tuple[str, ...]  # iommufd char devices (vfioN) of the group's vfio-bound functions
    healthy: bool
    reason: str = ""


@dataclass(frozen=True)
class GroupReport:
    id: str
    functions: tuple[PciFunction, ...]
    names: tuple[str | None, ...]  # pci.ids device name per function
    viable: bool
    offered: bool
    reasons: tuple[str, ...]
    primary: str | None
    resource: str | None
    naming: str | None
    numa_node: int | None
    selected_by: str | None


@dataclass(frozen=True)
class Inventory:
    host: HostInfo
    groups: tuple[GroupReport, ...]
    problems: tuple[FunctionProblem, ...]
    ungrouped: tuple[PciFunction, ...]
    notes: tuple[str, ...]
    devices: dict[str, tuple[Device, ...]]  # resource -> candidates, healthy or not
    pools: dict[str, tuple[str, ...]]  # resource -> vendor:device ids pooled under it

    def offered(self) -> dict[str, tuple[str, ...]]:
        """resource -> IDs of the devices offered as Healthy; resources with none are left out."""
        healthy = {r: tuple(d.id for d in devs if d.healthy) for r, devs in self.devices.items()}
        return {r: ids for r, ids in healthy.items() if ids}


def class_name(class_code: str) -> str:
    return CLASS_NAMES.get(class_code[:4], f"class {class_code[:4]}")


def describe(fn: PciFunction) -> str:
    return f"{fn.address} ({fn.ids} {class_name(fn.class_code)})"


IOMMU_OFF = (
    "IOMMU is off: /sys/kernel/iommu_groups is empty, so no device can be passed through. Enable "
    "VT-d (Intel) or AMD-Vi/IOMMU (AMD) in the firmware and add intel_iommu=on (Intel) to the kernel command line"
)


def bind_hint(address: str) -> str:
    return f"run `vfio-device-plugin bind {address}`: it binds the whole IOMMU group"


def stays_on_host(fn: PciFunction) -> bool:
    """Bridges and Root Complex Event Collectors (0807): pcieport may keep them inside a VM's group,
    and they are never passed through."""
    return fn.is_pci_bridge or fn.class_code.startswith("0807")


def foreign_functions(functions: tuple[PciFunction, ...], primary: PciFunction) -> list[PciFunction]:
    """The group's functions that are not part of the primary's card: another slot (bus:device), not a bridge.

    Poor ACS isolation puts chipset devices (SATA, NIC, USB) into a GPU's group; they can only go to
    the same VM, so binding the group would take them from the host.
    """
    return [fn for fn in functions if fn.address[:-1] != primary.address[:-1] and not stays_on_host(fn)]


def blocks_group(fn: PciFunction) -> bool:
    """True when this function's driver makes its VFIO group non-viable.

    Since Linux 5.19 the IOMMU core decides (DMA ownership): a user-owned group may only share with
    devices that are unbound or on a driver that manages no DMA of its own: vfio drivers, pci-stub,
    and pcieport (on bridges and event collectors). Older kernels let bridges keep any driver; the
    stricter rule holds on both.
    """
    if fn.driver is None or fn.driver == "pci-stub" or is_vfio_driver(fn.driver):
        return False
    return not (fn.driver == "pcieport" and stays_on_host(fn))


def blocker_reason(fn: PciFunction) -> str:
    return (
        f"{describe(fn)} is bound to host driver {fn.driver}: the group is not viable until it is bound "
        f"to vfio-pci ({bind_hint(fn.address)})"
    )


def pick_primary(functions: tuple[PciFunction, ...]) -> PciFunction | None:
    """The lowest-addressed display function, else the lowest-addressed vfio-bound function."""
    for fn in functions:
        if fn.is_display:
            return fn
    for fn in functions:
        if is_vfio_driver(fn.driver):
            return fn
    return None


def match_rule(rules: tuple[Rule, ...], functions: tuple[PciFunction, ...], primary: PciFunction | None) -> Rule | None:
    for rule in rules:
        if rule.exclude and any(rule.matches(fn) for fn in functions):
            return rule
        if not rule.exclude and primary is not None and rule.matches(primary):
            return rule
    return None


def _naming(primary: PciFunction, rule: Rule | None, config: Config, db: PciIds) -> Naming:
    if rule is not None and rule.resource:
        return Naming(rule.resource, rule.describe())
    return auto_name(primary.vendor, primary.device, db, config.naming)


def _health_reasons(
    group: str, functions: tuple[PciFunction, ...], unreadable: list[FunctionProblem], primary: PciFunction, snapshot: NodeSnapshot
) -> list[str]:
    reasons = [blocker_reason(fn) for fn in functions if blocks_group(fn)]
    reasons += [f"{p.address} in this group could not be read ({p.reason}), so the group cannot be checked" for p in unreadable]
    if not is_vfio_driver(primary.driver) and not blocks_group(primary):
        bound = f"bound to {primary.driver}" if primary.driver else "bound to no driver"
        reasons.append(f"{describe(primary)} is {bound}, so a VM cannot open it: bind it to vfio-pci ({bind_hint(primary.address)})")
    if not reasons and f"noiommu-{group}" in snapshot.devnodes:
        reasons.append(
            f"group {group} is in VFIO no-IOMMU mode (/dev/vfio/noiommu-{group}): DMA is not isolated and KubeVirt cannot "
            "use it; enable the IOMMU instead of vfio.enable_unsafe_noiommu_mode"
        )
    elif not reasons and group not in snapshot.devnodes:
        reasons.append(
            f"/dev/vfio/{group} is missing although the group is bound to vfio-pci (is the vfio module loaded and /dev mounted?)"
        )
    return reasons


def _not_selected_reason(primary: PciFunction, cards: dict[str, PciFunction]) -> str:
    card = cards.get(primary.address[:-1])
    if card is not None and card.iommu_group != primary.iommu_group:
        # ACS split the card's functions into separate groups (e.g. Navi: VGA and audio apart)
        return (
            f"{describe(primary)} is a function of the card at {card.address} but sits in its own IOMMU group, so it does "
            f"not travel with it (group {card.iommu_group}): a VM gets {card.address} alone. To pass this function too, "
            f'offer it with the config rule {{class: "{primary.class_code[:4]}"}} and request it under hostDevices'
        )
    return (
        f"{describe(primary)} is bound to vfio-pci but no rule selects it: add the config rule "
        f'{{class: "{primary.class_code[:4]}"}} (or {{vendor: "{primary.vendor}", device: "{primary.device}"}}) to offer it'
    )


@dataclass(frozen=True)
class _NodeIndex:
    """What a group's verdict needs from the rest of the node, indexed once per discovery."""

    snapshot: NodeSnapshot
    unreadable: dict[str, list[FunctionProblem]]  # group -> its members that could not be read
    cards: dict[str, PciFunction]  # bus:device slot -> its display function


def _index(snapshot: NodeSnapshot) -> _NodeIndex:
    unreadable: dict[str, list[FunctionProblem]] = defaultdict(list)
    for p in snapshot.problems:
        if p.iommu_group is not None:
            unreadable[p.iommu_group].append(p)
    cards = {fn.address[:-1]: fn for fn in reversed(snapshot.functions) if fn.is_display}
    return _NodeIndex(snapshot, unreadable, cards)


def _report_group(
    group: str, functions: tuple[PciFunction, ...], node: _NodeIndex, config: Config, db: PciIds
) -> tuple[GroupReport, Device | None]:
    names = tuple(db.device_name(fn.vendor, fn.device) for fn in functions)
    unreadable = node.unreadable.get(group, [])
    viable = not any(blocks_group(fn) for fn in functions) and not unreadable
    primary = pick_primary(functions)
    rule = match_rule(config.rules, functions, primary)
    selected_by: str | None = None
    if rule is not None and rule.exclude:
        reasons = [f"excluded by {rule.describe()}"]
    elif primary is None:
        reasons = ["not a passthrough candidate: no display controller and no function bound to vfio-pci"]
    elif rule is not None or any(primary.class_code.startswith(c) for c in config.classes):
        selected_by = rule.describe() if rule is not None else f"class {primary.class_code[:4]} is offered by default"
        reasons = _health_reasons(group, functions, unreadable, primary, node.snapshot)
    else:
        reasons = [_not_selected_reason(primary, node.cards)]
    if selected_by is None or primary is None:
        report = GroupReport(
            group, functions, names, viable, False, tuple(reasons), primary.address if primary else None, None, None, None, None
        )
        return report, None
    naming = _naming(primary, rule, config, db)
    healthy = not reasons
    device = Device(
        id=primary.address,
        resource=naming.resource,
        group=group,
        numa_node=primary.numa_node,
        ids=primary.ids,
        addresses=tuple(fn.address for fn in functions),
        drivers=tuple((fn.address, fn.driver) for fn in functions),
        vfio_cdevs=tuple(fn.vfio_cdev for fn in functions if fn.vfio_cdev),
        healthy=healthy,
        reason="; ".join(reasons),
    )
    report = GroupReport(
        group,
        functions,
        names,
        viable,
        healthy,
        tuple(reasons),
        primary.address,
        naming.resource,
        naming.source,
        primary.numa_node,
        selected_by,
    )
    return report, device


def _host_notes(snapshot: NodeSnapshot, ungrouped: list[PciFunction]) -> list[str]:
    notes = []
    if not snapshot.host.iommu_enabled:
        notes.append(IOMMU_OFF)
    elif ungrouped:
        notes.append(f"{len(ungrouped)} function(s) have no iommu_group link and cannot be passed through")
    if not snapshot.functions and not snapshot.problems:
        notes.append("no PCI functions found under bus/pci/devices (is --sysfs-root right?)")
    return notes


def discover(snapshot: NodeSnapshot, config: Config, db: PciIds) -> Inventory:
    by_group: dict[str, list[PciFunction]] = defaultdict(list)
    ungrouped: list[PciFunction] = []
    for fn in snapshot.functions:
        (by_group[fn.iommu_group] if fn.iommu_group is not None else ungrouped).append(fn)
    reports: list[GroupReport] = []
    devices: dict[str, list[Device]] = defaultdict(list)
    pools: dict[str, set[str]] = defaultdict(set)
    node = _index(snapshot)
    for group in sorted(by_group, key=int):
        report, device = _report_group(group, tuple(sorted(by_group[group], key=lambda f: f.address)), node, config, db)
        reports.append(report)
        if device is not None:
            devices[device.resource].append(device)
            pools[device.resource].add(device.ids)
    return Inventory(
        host=snapshot.host,
        groups=tuple(reports),
        problems=snapshot.problems,
        ungrouped=tuple(ungrouped),
        notes=tuple(_host_notes(snapshot, ungrouped)),
        devices={r: tuple(sorted(d, key=lambda x: x.id)) for r, d in sorted(devices.items())},
        pools={r: tuple(sorted(ids)) for r, ids in sorted(pools.items())},
    )
