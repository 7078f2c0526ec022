"""Renders an Inventory for people (`inspect`) and for programs (`inspect --json`, `/status`).

The JSON document is a stable interface (schema in the README); add keys, never rename them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from deviceplugin import __version__
from deviceplugin.discovery import GroupReport, Inventory, class_name
from deviceplugin.naming import PciIds
from deviceplugin.pool import Holder, Holdings

NOT_ASKED = Holdings(ok=False, error="the PodResources API was not asked")


def _holder_json(holder: Holder | None) -> dict[str, str] | None:
    return {"namespace": holder.namespace, "pod": holder.pod, "container": holder.container} if holder else None


def holders(inv: Inventory, holdings: Holdings) -> tuple[dict[str, Holder], dict[str, dict[str, Holder]]]:
    """(IOMMU group -> who holds it, companion resource -> token -> who holds it), in one pass over the devices.

    A group's holder is that of the first of its held devices (a group goes to one pod only). Tokens are
    fungible: who holds one says nothing about whose function it is, so they are listed per resource.
    """
    groups: dict[str, Holder] = {}
    tokens: dict[str, dict[str, Holder]] = {}
    if not holdings.devices:
        return groups, tokens
    for resource, devices in inv.devices.items():
        for d in devices:
            h = holdings.holder(resource, d.id)
            if h is None:
                continue
            if d.role:
                tokens.setdefault(resource, {})[d.id] = h
            else:
                groups.setdefault(d.group, h)
    return groups, tokens


def _pod_resources_json(holdings: Holdings) -> dict[str, Any]:
    return {"ok": holdings.ok, "error": holdings.error, "at": holdings.at or None}


def inventory_json(inv: Inventory, pci_ids: PciIds, naming: str, holdings: Holdings = NOT_ASKED) -> dict[str, Any]:
    by_group, by_token = holders(inv, holdings)
    return {
        "version": __version__,
        "host": {
            "iommu_enabled": inv.host.iommu_enabled,
            "iommu_groups": inv.host.iommu_groups,
            "iommu_units": list(inv.host.iommu_units),
            "vfio_modules": dict(inv.host.modules),
            "vfio_container": inv.host.vfio_container,
            "iommufd": inv.host.iommufd,
            "pci_ids": pci_ids.path,
            "pci_ids_version": pci_ids.version,
            "naming": naming,
            "notes": list(inv.notes),
        },
        "groups": [_group_json(g, by_group.get(g.id)) for g in inv.groups],
        "resources": {r: list(ids) for r, ids in inv.offered().items()},
        "pod_resources": _pod_resources_json(holdings),
        "token_holders": {r: {t: _holder_json(h) for t, h in tokens.items()} for r, tokens in by_token.items()},
        "pools": {r: list(ids) for r, ids in inv.pools.items()},
        "problems": [{"address": p.address, "reason": p.reason, "iommu_group": p.iommu_group} for p in inv.problems],
        "ungrouped": [fn.address for fn in inv.ungrouped],
    }


def _companions_json(g: GroupReport) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for device, role, address, _ in g.companions:
        out.setdefault(device, {})[role] = address
    return out


def _group_json(g: GroupReport, holder: Holder | None) -> dict[str, Any]:
    return {
        "id": g.id,
        "viable": g.viable,
        "offered": g.offered,
        "resource": g.resource,
        "device_id": g.primary if g.resource else None,
        "holder": _holder_json(holder),
        "devices": list(g.devices),
        "companions": _companions_json(g),
        "primary": g.primary,
        "numa_node": g.numa_node,
        "naming": g.naming,
        "selected_by": g.selected_by,
        "reasons": list(g.reasons),
        "notes": list(g.notes),
        "functions": [
            {
                "address": fn.address,
                "vendor": fn.vendor,
                "device": fn.device,
                "class": fn.class_code,
                "class_name": class_name(fn.class_code),
                "driver": fn.driver,
                "name": name,
                "numa_node": fn.numa_node,
                "boot_vga": fn.boot_vga,
            }
            for fn, name in zip(g.functions, g.names, strict=True)
        ],
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def inventory_text(inv: Inventory, pci_ids: PciIds, naming: str, holdings: Holdings = NOT_ASKED) -> str:
    h = inv.host
    lines = [
        f"Host: IOMMU {'on' if h.iommu_enabled else 'OFF'} ({h.iommu_groups} groups"
        f"{'; ' + ', '.join(h.iommu_units) if h.iommu_units else ''}); "
        + ", ".join(f"{m} {_yes(v)}" for m, v in h.modules.items())
        + f"; /dev/vfio/vfio {_yes(h.vfio_container)}",
        f"Names: {naming} naming from "
        + (
            f"{pci_ids.path} (version {pci_ids.version or 'unknown'})"
            if pci_ids.path
            else "no pci.ids database (names fall back to device ids)"
        ),
    ]
    lines += [f"NOTE: {n}" for n in inv.notes]
    if not holdings.ok:
        lines.append(f"Holders: holder unknown: {holdings.error}")
    lines.append("")
    offered = inv.offered()
    lines.append("Offered resources:" if offered else "Offered resources: none")
    for resource, ids in offered.items():
        pooled = f" (pools {', '.join(inv.pools[resource])})" if len(inv.pools[resource]) > 1 else ""
        lines.append(f"  {resource}: {len(ids)} -> {', '.join(ids)}{pooled}")
    by_group, by_token = holders(inv, holdings)
    for resource, tokens in by_token.items():
        by_pod = Counter(f"{holder.name} ({holder.container})" for holder in tokens.values())
        held = ", ".join(f"{n} by {pod}" for pod, n in sorted(by_pod.items()))
        lines.append(f"  {resource} tokens held: {held}")
    others = []
    for g in inv.groups:
        if g.primary is None:
            members = ", ".join(f"{fn.address[5:]} {class_name(fn.class_code)} {fn.driver or '-'}" for fn in g.functions)
            others.append(f"{g.id} [{members}]")
            continue
        lines.append("")
        lines.extend(_group_text(g, by_group.get(g.id)))
    if others:
        lines += ["", "Groups with no display controller and nothing on vfio-pci (not candidates):"]
        lines += [f"  group {o}" for o in others]
    if inv.problems:
        lines += ["", "Functions skipped because sysfs looks wrong:"]
        lines += [f"  {p.address}: {p.reason}" for p in inv.problems]
    return "\n".join(lines) + "\n"


def _group_text(g: GroupReport, holder: Holder | None) -> list[str]:
    if g.offered:
        ids = f"device IDs {', '.join(g.devices)}" if len(g.devices) > 1 else f"device ID {g.primary}"
        head = f"IOMMU group {g.id}: OFFERED as {g.resource}, {ids}, NUMA node {g.numa_node}"
    elif g.resource:
        head = f"IOMMU group {g.id}: NOT OFFERED (would be {g.resource}); viable: {_yes(g.viable).lower()}"
    else:
        head = f"IOMMU group {g.id}: NOT OFFERED; viable: {_yes(g.viable).lower()}"
    if holder is not None:
        head += f", held by {holder.name} ({holder.container})"
    lines = [head]
    for fn, name in zip(g.functions, g.names, strict=True):
        lines.append(
            f"    {fn.address}  {fn.ids}  {class_name(fn.class_code):<14} {fn.driver or '(no driver)':<16} {name or '(not in pci.ids)'}"
        )
    if g.naming:
        lines.append(f"    name: {g.naming}")
    for device, role, address, resource in g.companions:
        lines.append(f"    companion: {address} is the {role} function of {device} (offered as {resource})")
    lines += [f"    note: {n}" for n in g.notes]
    lines += [f"    why: {r}" for r in g.reasons]
    return lines
