"""Parses the IOMMU group listings users posted (shared/real-iommu-layouts) into fake nodes.

The listings come in several formats (see that folder's README); lines that are not PCI functions
(mdev UUIDs, a truncated line) are skipped, like a real node's non-PCI group members.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deviceplugin.sim.node import FakeNode, Fn

LAYOUTS = Path(__file__).resolve().parent.parent.parent / "shared" / "real-iommu-layouts"

_GROUP = re.compile(r"^\s*(?:IOMMU\s+group|Group:)\s*(\d+)\s*:?\s*(.*)$", re.IGNORECASE)
_FUNCTION = re.compile(
    r"^\s*(?P<addr>(?:[0-9a-f]{4,5}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\s+[^\[]*?\[(?P<cls>[0-9a-f]{4})\]:"
    r"(?P<rest>.*)$",
    re.IGNORECASE,
)
_IDS = re.compile(r"\[([0-9a-f]{4}):([0-9a-f]{4})\]", re.IGNORECASE)
_DRIVER = re.compile(r"Driver:\s*(\S+)")

HOST_DRIVERS = {
    "0604": "pcieport",
    "0403": "snd_hda_intel",
    "0c03": "xhci_hcd",
    "0106": "ahci",
    "0108": "nvme",
    "0200": "r8169",
    "0280": "iwlwifi",
    "0c05": "piix4_smbus",
    "0c80": "i2c_designware",
}
GPU_DRIVERS = {"10de": "nouveau", "1002": "amdgpu", "8086": "i915"}


@dataclass(frozen=True)
class Listed:
    group: str
    address: str
    class_code: str  # 4 hex digits as lspci prints them
    vendor: str
    device: str
    driver: str | None  # only where the listing gives one


def layout_path(name: str) -> Path:
    """The listing in shared/ beside the checkout (where CI puts it), or $VFIO_LAYOUTS."""
    path = Path(os.environ.get("VFIO_LAYOUTS", LAYOUTS)) / name
    if not path.exists():
        import pytest

        pytest.skip(f"{path} not present: put shared/ beside the checkout or set VFIO_LAYOUTS")
    return path


def parse_listing(text: str) -> list[Listed]:
    out: list[Listed] = []
    group: str | None = None
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = _GROUP.match(line)
        if m:
            group, line = m.group(1), m.group(2)
        fm = _FUNCTION.match(line)
        ids = _IDS.findall(line)
        if not fm or not ids or group is None:
            continue  # a group header alone, an mdev UUID, or a line cut short in the source
        addr = fm.group("addr").lower()
        vendor, device = ids[-1]
        driver = _DRIVER.search(line)
        out.append(
            Listed(
                group,
                addr if addr.count(":") == 2 else "0000:" + addr,
                fm.group("cls").lower(),
                vendor.lower(),
                device.lower(),
                driver.group(1) if driver else None,
            )
        )
    return out


def host_driver(item: Listed) -> str | None:
    if item.class_code.startswith("03"):
        return GPU_DRIVERS.get(item.vendor, "hostgpu")
    if item.class_code.startswith("06") and item.class_code != "0604":
        return None  # host bridges, ISA bridges and NVSwitches usually have no driver in the listing
    return HOST_DRIVERS.get(item.class_code, "hostdrv")


def build(
    node: FakeNode,
    listing: list[Listed],
    vfio_groups: set[str],
    keep_host: set[str] = frozenset(),
    numa: Callable[[Listed], int] = lambda _: -1,
) -> None:
    """Lays the listing out; functions in vfio_groups go to vfio-pci (except bridges and `keep_host`
    addresses), the rest keep the driver the listing gives or a usual host driver. Listings carry no
    NUMA node: `numa` says which one each function gets."""
    for item in listing:
        if item.driver is not None and not vfio_groups:
            driver: str | None = item.driver
        elif item.group in vfio_groups and item.class_code != "0604" and item.address not in keep_host:
            driver = "vfio-pci"
        else:
            driver = item.driver or host_driver(item)
        node.add(Fn(item.address, item.vendor, item.device, item.class_code + "00", driver, item.group, numa(item)))
