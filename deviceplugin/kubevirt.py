"""`kubevirt-config`: the KubeVirt CR patch and a VM fragment for exactly the names `serve` registers.

KubeVirt only hands a device to a VM when its resource is listed under
`permittedHostDevices.pciHostDevices`; `externalResourceProvider: true` tells virt-handler that this
plugin provides it (otherwise virt-handler starts a plugin of its own for the same name).
"""

from __future__ import annotations

import yaml

from deviceplugin.discovery import Device, Inventory


def pci_host_devices(inv: Inventory) -> list[dict[str, str | bool]]:
    """One entry per (vendor:device, resource) among the devices offered: two names for one id both need one."""
    entries = {(d.ids.upper(), resource) for resource, devices in inv.devices.items() for d in devices if d.healthy}
    return [
        {"pciVendorSelector": selector, "resourceName": resource, "externalResourceProvider": True}
        for selector, resource in sorted(entries, key=lambda e: (e[1], e[0]))
    ]


def _vm_devices(inv: Inventory) -> dict[str, list[dict[str, str]]]:
    """gpus for display devices, hostDevices for the rest; each companion right after its GPU, named after it."""
    displays = {fn.address for g in inv.groups for fn in g.functions if fn.is_display}
    offered = {r: [d for d in devs if d.healthy] for r, devs in inv.devices.items()}
    primaries = [r for r, devs in offered.items() if devs and not devs[0].role]
    roles: dict[str, list[tuple[str, str]]] = {}  # primary resource -> (role, companion resource)
    for resource, devs in offered.items():
        if devs and devs[0].role:
            roles.setdefault(_owner_resource(inv, devs[0]), []).append((devs[0].role, resource))
    out: dict[str, list[dict[str, str]]] = {"gpus": [], "hostDevices": []}
    for i, resource in enumerate(primaries, 1):
        kind = "gpus" if offered[resource][0].id in displays else "hostDevices"
        name = f"{'gpu' if kind == 'gpus' else 'dev'}{i}"
        out[kind].append({"name": name, "deviceName": resource})
        for role, companion in sorted(roles.get(resource, [])):
            out["hostDevices"].append({"name": f"{name}-{role}", "deviceName": companion})
    return {k: v for k, v in out.items() if v}


def _owner_resource(inv: Inventory, token: Device) -> str:
    return next(r for r, devs in inv.devices.items() for d in devs if d.id == token.owner and not d.role)


def kubevirt_config(inv: Inventory) -> str:
    entries = pci_host_devices(inv)
    if not entries:
        return "# This node offers no device yet: run `vfio-device-plugin doctor` to see why.\n"
    patch = {"spec": {"configuration": {"permittedHostDevices": {"pciHostDevices": entries}}}}
    vm = {"spec": {"template": {"spec": {"domain": {"devices": _vm_devices(inv)}}}}}
    return (
        "# KubeVirt CR patch for what this node offers. Apply with:\n"
        "#   kubectl patch kubevirt kubevirt -n kubevirt --type merge --patch-file kubevirt-patch.yaml\n"
        "# A merge patch replaces the whole pciHostDevices list: merge these entries with any you already have.\n"
        "# hostDevices/gpus also need the HostDevices (and, on releases that still have it, GPU) feature gate in\n"
        "# spec.configuration.developerConfiguration.featureGates.\n" + yaml.safe_dump(patch, sort_keys=False) + "---\n"
        "# VirtualMachine fragment: one entry per device the VM should get. A companion (_AUDIO, _USB, _SERIAL)\n"
        "# goes under hostDevices next to its GPU, one per GPU: the function it gets is always its GPU's own.\n"
        + yaml.safe_dump(vm, sort_keys=False)
    )
