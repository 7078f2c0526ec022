"""The DRA view for people and programs: what this node publishes, what it withdraws and why, and which
claims are prepared on which device. `/status` shows it for the running daemon, `inspect` for what
`serve --mode dra` would publish (from the same inventory and the checkpoint file), with the same keys.
"""

from __future__ import annotations

from typing import Any

from deviceplugin.discovery import Inventory
from deviceplugin.dra import checkpoint
from deviceplugin.dra.devices import DraDevice, inventory_devices
from deviceplugin.dra.options import DraOptions


def view_json(devices: list[DraDevice], driver: str, node: str | None, prepared: dict[str, list[str]]) -> dict[str, Any]:
    def one(d: DraDevice) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": d.name,
            "iommu_group": d.group,
            "resource": d.resource,
            "pci_bus_id": d.pci_bus_id,
            "attributes": d.attributes,
            "prepared_claims": prepared.get(d.name, []),
        }
        if not d.healthy:
            doc["reason"] = d.reason
        return doc

    known = {d.name for d in devices}
    return {
        "driver": driver,
        "pool": node or None,
        "published": [one(d) for d in devices if d.healthy],
        "withdrawn": [one(d) for d in devices if not d.healthy],
        # claims still prepared on devices that are no longer on the node at all
        "prepared_elsewhere": {name: claims for name, claims in sorted(prepared.items()) if name not in known},
    }


def inspect_view(inventory: Inventory, sysfs_root: str, driver: str, plugins_dir: str, node: str | None) -> dict[str, Any]:
    data_dir = DraOptions(driver=driver, plugins_dir=plugins_dir).data_dir
    prepared = checkpoint.read(checkpoint.checkpoint_path(data_dir))
    return view_json(inventory_devices(inventory, sysfs_root), driver, node, checkpoint.claims_per_device(prepared))


def view_text(view: dict[str, Any]) -> str:
    lines = [f"DRA (serve --mode dra, driver {view['driver']}):"]
    if not view["published"]:
        lines.append("  would publish no device")
    for d in view["published"]:
        claims = f"; prepared for {', '.join(d['prepared_claims'])}" if d["prepared_claims"] else ""
        lines.append(f"  {d['name']}: IOMMU group {d['iommu_group']}, {d['resource']}, pciBusID {d['pci_bus_id']}{claims}")
    for d in view["withdrawn"]:
        lines.append(f"  {d['name']}: WITHDRAWN (IOMMU group {d['iommu_group']}): {d['reason']}")
    for name, claims in view["prepared_elsewhere"].items():
        lines.append(f"  {name}: not on this node, still prepared for {', '.join(claims)}")
    return "\n".join(lines) + "\n"
