"""Turns a node snapshot into what the plugin offers, and says why for every IOMMU group.

A pure function: `discover(snapshot, config, pci_ids) -> Inventory`. The IOMMU group is the unit of
isolation (a VFIO group can be opened by one process only), so a group travels whole; but KubeVirt
hands out one address per `gpus` entry, so the unit the kubelet counts is a GPU: every display
endpoint of a viable group is a device (ID = its address), and a group without one offers its primary
function. The pool keeps a multi-GPU group from being split across pods. A card's own audio/USB/UCSI
functions become *companion tokens* under `<resource>_AUDIO` etc.; the function a VM gets is always the
one on its GPU's card. `inspect`, `doctor`, the pool and the servers all read the same Inventory, so
they cannot disagree about whether a device is usable.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass

from deviceplugin.config import COMPANION_ROLES, Config, Rule
from deviceplugin.naming import Naming, PciIds, auto_name, companion_resource
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
    """What the kubelet counts: a GPU (or a group's primary function), or a companion token of one.

    A companion token (role set) stands for one of a card's own functions; its health is its GPU's,
    and which function a VM gets is decided by the GPU it was allocated (see pool.allocate).
    """

    id: str
    resource: str
    group: str
    numa_node: int
    ids: str  # vendor:device of this device's own function
    addresses: tuple[str, ...]  # every function of the group
    drivers: tuple[tuple[str, str | None], ...]  # (address, driver) as scanned, for the Allocate recheck
    vfio_cdevs: tuple[str, ...]  # iommufd char devices (vfioN) of the group's vfio-bound functions
    healthy: bool
    reason: str = ""
    mates: tuple[str, ...] = ()  # the other devices of the same IOMMU group (any resource)
    companions: tuple[tuple[str, str], ...] = ()  # (role, address) of this card's own functions, offered roles only
    role: str = ""  # a companion token: "audio", "usb" or "serial"
    owner: str = ""  # a companion token: the device whose card the function is on


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
    devices: tuple[str, ...] = ()  # IDs of the group's devices (candidates, healthy or not), in address order
    companions: tuple[tuple[str, str, str, str], ...] = ()  # (device, role, address, companion resource)
    notes: tuple[str, ...] = ()  # facts about the group that are not reasons against it


@dataclass(frozen=True)
class Inventory:
    host: HostInfo
    groups: tuple[GroupReport, ...]
    problems: tuple[FunctionProblem, ...]
    ungrouped: tuple[PciFunction, ...]
    notes: tuple[str, ...]
    devices: dict[str, tuple[Device, ...]]  # resource -> candidates, healthy or not (companion tokens included)
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
    return [fn for fn in functions if not _same_card(fn, primary) and not stays_on_host(fn)]


def _same_card(fn: PciFunction, primary: PciFunction) -> bool:
    """One slot (bus:device), or an SR-IOV VF and its PF: VFs sit at other device numbers of the same card."""
    slots = {fn.address[:-1], (fn.physfn or "")[:-1]}
    return primary.address[:-1] in slots or (primary.physfn or "")[:-1] in slots - {""}


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


def blocker_reason(fn: PciFunction, vfs: tuple[str, ...] = ()) -> str:
    """Why this function makes its group not viable, and the fix; `vfs`: its SR-IOV VFs in the same group."""
    if vfs:
        return (
            f"{describe(fn)} is the SR-IOV physical function of {', '.join(vfs)}, on {fn.driver or 'no driver'}: "
            "a VF cannot be assigned while it shares its IOMMU group with a PF the host uses. Do not unbind the PF: that "
            "destroys every VF and takes the host's device (its network) down. Use a platform or slot whose ACS puts each "
            "VF in its own IOMMU group"
        )
    return (
        f"{describe(fn)} is bound to host driver {fn.driver}: the group is not viable until it is bound "
        f"to vfio-pci ({bind_hint(fn.address)})"
    )


def vfs_of(fn: PciFunction, functions: tuple[PciFunction, ...]) -> tuple[str, ...]:
    """The SR-IOV virtual functions of `fn` among `functions` (a PF with VFs must never be unbound)."""
    return tuple(f.address for f in functions if f.physfn == fn.address)


def pick_primary(functions: tuple[PciFunction, ...]) -> PciFunction | None:
    """The lowest-addressed display function, else the lowest-addressed vfio-bound function."""
    for fn in functions:
        if fn.is_display:
            return fn
    for fn in functions:
        if is_vfio_driver(fn.driver):
            return fn
    return None


def match_rule(rules: tuple[Rule, ...], functions: tuple[PciFunction, ...], candidate: PciFunction | None) -> Rule | None:
    """The first rule that excludes the group (any of its functions) or selects this candidate."""
    for rule in rules:
        if rule.exclude and any(rule.matches(fn) for fn in functions):
            return rule
        if not rule.exclude and candidate is not None and rule.matches(candidate):
            return rule
    return None


def _naming(primary: PciFunction, rule: Rule | None, config: Config, db: PciIds) -> Naming:
    if rule is not None and rule.resource:
        return Naming(rule.resource, rule.describe())
    return auto_name(primary.vendor, primary.device, db, config.naming)


def _group_reasons(group: str, functions: tuple[PciFunction, ...], unreadable: list[FunctionProblem], snapshot: NodeSnapshot) -> list[str]:
    """Why no device of this group can be used (empty: the group itself is fine)."""
    reasons = [blocker_reason(fn, vfs_of(fn, functions)) for fn in functions if blocks_group(fn)]
    reasons += [f"{p.address} in this group could not be read ({p.reason}), so the group cannot be checked" for p in unreadable]
    if reasons:
        return reasons
    if f"noiommu-{group}" in snapshot.devnodes:
        return [
            f"group {group} is in VFIO no-IOMMU mode (/dev/vfio/noiommu-{group}): DMA is not isolated and KubeVirt cannot "
            "use it; enable the IOMMU instead of vfio.enable_unsafe_noiommu_mode"
        ]
    if group not in snapshot.devnodes and any(is_vfio_driver(fn.driver) for fn in functions):
        return [f"/dev/vfio/{group} is missing although the group is bound to vfio-pci (is the vfio module loaded and /dev mounted?)"]
    return []


def _device_reason(fn: PciFunction) -> str | None:
    """Why this one function cannot be opened by a VM although its group may be fine."""
    if is_vfio_driver(fn.driver) or blocks_group(fn):
        return None  # a blocking host driver is already a group reason
    bound = f"bound to {fn.driver}" if fn.driver else "bound to no driver"
    return f"{describe(fn)} is {bound}, so a VM cannot open it: bind it to vfio-pci ({bind_hint(fn.address)})"


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
    slots: dict[str, list[PciFunction]]  # bus:device slot -> every function on it


def _index(snapshot: NodeSnapshot) -> _NodeIndex:
    unreadable: dict[str, list[FunctionProblem]] = defaultdict(list)
    for p in snapshot.problems:
        if p.iommu_group is not None:
            unreadable[p.iommu_group].append(p)
    cards = {fn.address[:-1]: fn for fn in reversed(snapshot.functions) if fn.is_display}
    slots: dict[str, list[PciFunction]] = defaultdict(list)
    for fn in snapshot.functions:
        slots[fn.address[:-1]].append(fn)
    return _NodeIndex(snapshot, unreadable, cards, slots)


def role_of(fn: PciFunction) -> str | None:
    """The companion role a card function can play, by its class: audio, usb or serial (UCSI)."""
    return _role_of_class(fn.class_code)


@functools.cache
def _role_of_class(class_code: str) -> str | None:
    for role, prefixes in COMPANION_ROLES.items():
        if any(class_code.startswith(p) for p in prefixes):
            return role
    return None


def _card_companions(
    device: PciFunction, group: str, node: _NodeIndex, roles: tuple[str, ...]
) -> tuple[list[tuple[str, PciFunction]], list[str]]:
    """(role, function) of the card's own functions that can travel with this GPU, and notes on the rest.

    Only the card's own slot counts (never a chipset device that merely shares the group), only one
    function per role, and only functions a VM can open (on a vfio driver).
    """
    found: dict[str, PciFunction] = {}
    notes: list[str] = []
    for fn in node.slots.get(device.address[:-1], []):
        role = role_of(fn)
        if fn is device or fn.is_pci_bridge or role is None or role in found:
            continue
        if fn.iommu_group != group:
            notes.append(
                f"the card's {role} function {fn.address} sits in its own IOMMU group {fn.iommu_group} (ACS split), so it is "
                f"not a companion of {device.address}: a VM gets it only as a device of its own "
                f'(offer it with the config rule {{class: "{fn.class_code[:4]}"}} and request it under hostDevices)'
            )
        elif role not in roles:
            continue
        elif not is_vfio_driver(fn.driver):
            notes.append(f"the card's {role} function {fn.address} is on {fn.driver or 'no driver'}, so it is not offered as a companion")
        else:
            found[role] = fn
    return sorted(found.items(), key=lambda item: item[1].address), notes


@dataclass(frozen=True)
class _Candidate:
    fn: PciFunction
    rule: Rule | None
    selected_by: str


def _candidates(functions: tuple[PciFunction, ...], primary: PciFunction, config: Config) -> tuple[list[_Candidate], Rule | None]:
    """The functions the kubelet will count: every display endpoint, else the primary; and an exclude rule."""
    displays = [fn for fn in functions if fn.is_display] or [primary]
    selected = []
    for fn in displays:
        rule = match_rule(config.rules, functions, fn)
        if rule is not None and rule.exclude:
            return [], rule
        if rule is not None:
            selected.append(_Candidate(fn, rule, rule.describe()))
        elif any(fn.class_code.startswith(c) for c in config.classes):
            selected.append(_Candidate(fn, None, f"class {fn.class_code[:4]} is offered by default"))
    return selected, None


def _report_group(
    group: str, functions: tuple[PciFunction, ...], node: _NodeIndex, config: Config, db: PciIds
) -> tuple[GroupReport, list[Device]]:
    names = tuple(db.device_name(fn.vendor, fn.device) for fn in functions)
    unreadable = node.unreadable.get(group, [])
    viable = not any(blocks_group(fn) for fn in functions) and not unreadable
    primary = pick_primary(functions)

    def unoffered(reasons: list[str]) -> tuple[GroupReport, list[Device]]:
        report = GroupReport(
            group, functions, names, viable, False, tuple(reasons), primary.address if primary else None, None, None, None, None
        )
        return report, []

    if primary is None:
        excluded = match_rule(config.rules, functions, None)
        if excluded is not None:
            return unoffered([f"excluded by {excluded.describe()}"])
        return unoffered(["not a passthrough candidate: no display controller and no function bound to vfio-pci"])
    candidates, excluded = _candidates(functions, primary, config)
    if excluded is not None:
        return unoffered([f"excluded by {excluded.describe()}"])
    if not candidates:
        return unoffered([_not_selected_reason(primary, node.cards)])
    group_reasons = _group_reasons(group, functions, unreadable, node.snapshot)
    devices, reasons, notes, companions = _group_devices(group, functions, candidates, group_reasons, node, config, db)
    first = candidates[0]
    report = GroupReport(
        id=group,
        functions=functions,
        names=names,
        viable=viable,
        offered=any(d.healthy for d in devices if not d.role),
        reasons=tuple(reasons),
        primary=first.fn.address,
        resource=devices[0].resource,
        naming=_naming(first.fn, first.rule, config, db).source,
        numa_node=first.fn.numa_node,
        selected_by=first.selected_by,
        devices=tuple(d.id for d in devices if not d.role),
        companions=tuple(companions),
        notes=tuple(notes),
    )
    return report, devices


def _group_devices(
    group: str,
    functions: tuple[PciFunction, ...],
    candidates: list[_Candidate],
    group_reasons: list[str],
    node: _NodeIndex,
    config: Config,
    db: PciIds,
) -> tuple[list[Device], list[str], list[str], list[tuple[str, str, str, str]]]:
    """The group's devices and companion tokens, with the group's reasons and notes."""
    addresses = tuple(fn.address for fn in functions)
    drivers = tuple((fn.address, fn.driver) for fn in functions)
    cdevs = tuple(fn.vfio_cdev for fn in functions if fn.vfio_cdev)
    ids = tuple(c.fn.address for c in candidates)
    devices: list[Device] = []
    reasons = list(group_reasons)
    notes: list[str] = []
    companions: list[tuple[str, str, str, str]] = []
    if len(candidates) > 1:
        notes.append(
            f"IOMMU group {group} holds {len(candidates)} GPUs ({', '.join(ids)}): each is a device, but the group can only "
            "be opened by one VM, so once a pod holds one of them the others turn Unhealthy until it is gone (ACS isolation "
            "or another slot would split the group)"
        )
    for cand in candidates:
        own = _device_reason(cand.fn)
        if own:
            reasons.append(own)
        why = "; ".join([*group_reasons, *([own] if own else [])])
        found, card_notes = _card_companions(cand.fn, group, node, config.companions)
        notes += card_notes
        resource = _naming(cand.fn, cand.rule, config, db).resource
        device = Device(
            id=cand.fn.address,
            resource=resource,
            group=group,
            numa_node=cand.fn.numa_node,
            ids=cand.fn.ids,
            addresses=addresses,
            drivers=drivers,
            vfio_cdevs=cdevs,
            healthy=not why,
            reason=why,
            mates=tuple(i for i in ids if i != cand.fn.address),
            companions=tuple((role, fn.address) for role, fn in found),
        )
        devices.append(device)
        for role, fn in found:
            token = _token(device, role, fn)
            companions.append((device.id, role, fn.address, token.resource))
            devices.append(token)
    return devices, reasons, notes, companions


def _token(owner: Device, role: str, fn: PciFunction) -> Device:
    return Device(
        id=fn.address,
        resource=companion_resource(owner.resource, role),
        group=owner.group,
        numa_node=owner.numa_node,
        ids=fn.ids,
        addresses=owner.addresses,
        drivers=owner.drivers,
        vfio_cdevs=owner.vfio_cdevs,
        healthy=owner.healthy,
        reason=owner.reason,
        role=role,
        owner=owner.id,
    )


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
        report, found = _report_group(group, tuple(sorted(by_group[group], key=lambda f: f.address)), node, config, db)
        reports.append(report)
        for device in found:
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
