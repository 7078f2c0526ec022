"""`kubevirt-config`: the KubeVirt CR patch and a VM fragment for exactly the names `serve` registers.

KubeVirt only hands a device to a VM when its resource is listed under
`permittedHostDevices.pciHostDevices`; `externalResourceProvider: true` tells virt-handler that this
plugin provides it (otherwise virt-handler starts a plugin of its own for the same name).
"""

from __future__ import annotations

import yaml

from deviceplugin.discovery import Inventory


def pci_host_devices(inv: Inventory) -> list[dict[str, str | bool]]:
    """One entry per vendor:device id among the devices offered, with the resource it is offered as."""
    entries: dict[str, str] = {}
    for resource, devices in inv.devices.items():
        for device in devices:
            if device.healthy:
                entries.setdefault(device.ids.upper(), resource)
    return [
        {"pciVendorSelector": selector, "resourceName": resource, "externalResourceProvider": True}
        for selector, resource in sorted(entries.items(), key=lambda e: (e[1], e[0]))
    ]


def kubevirt_config(inv: Inventory) -> str:
    entries = pci_host_devices(inv)
    if not entries:
        return "# This node offers no device yet: run `vfio-device-plugin doctor` to see why.\n"
    patch = {"spec": {"configuration": {"permittedHostDevices": {"pciHostDevices": entries}}}}
    vm = {
        "spec": {
            "template": {
                "spec": {
                    "domain": {
                        "devices": {
                            "gpus": [
                                {"name": f"gpu{i}", "deviceName": r} for i, r in enumerate(sorted({e["resourceName"] for e in entries}), 1)
                            ]
                        }
                    }
                }
            }
        }
    }
    return (
        "# KubeVirt CR patch for what this node offers. Apply with:\n"
        "#   kubectl patch kubevirt kubevirt -n kubevirt --type merge --patch-file kubevirt-patch.yaml\n"
        "# A merge patch replaces the whole pciHostDevices list: merge these entries with any you already have.\n"
        "# hostDevices/gpus also need the HostDevices (and, on releases that still have it, GPU) feature gate in\n"
        "# spec.configuration.developerConfiguration.featureGates.\n" + yaml.safe_dump(patch, sort_keys=False) + "---\n"
        "# VirtualMachine fragment: one entry per device the VM should get (a non-GPU device goes under hostDevices).\n"
        + yaml.safe_dump(vm, sort_keys=False)
    )
