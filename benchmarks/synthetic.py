"""Synthetic nodes for the benchmarks.

`gpu_node`: N functions as Turing-style 4-function GPU groups, flat below one root complex (small
latency benchmarks). `sysfs_node`: N functions laid out like a real server's sysfs, for the scale
benchmarks: per PCI domain a host bridge, root ports, PCIe switches (an upstream port and four
downstream ports) and a 4-function GPU below each downstream port, every directory nested below its
bridge (`devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0`), every attribute file
a real function has, the chipset's functions on domain 0 and uncore functions filling up the count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from deviceplugin.sim.kubelet import FakeKubelet
from deviceplugin.sim.node import FakeNode, Fn

PCI_IDS_TEXT = "10de  NVIDIA Corporation\n\t1e84  TU104 [GeForce RTX 2070 SUPER]\n"
RESOURCE = "nvidia.com/TU104"
# sysfs is an in-memory filesystem: build benchmark nodes on tmpfs when there is one.
TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None

FUNCTIONS = (("1e84", "030000"), ("10f8", "040300"), ("1ad8", "0c0330"), ("1ad9", "0c8000"))


def gpu_node(root: str, functions: int, numa_nodes: int = 2) -> FakeNode:
    """functions/4 GPU groups, all on vfio-pci, spread over NUMA nodes."""
    node = FakeNode(root).host()
    for g in range(functions // 4):
        bus, dev = 1 + g // 32, g % 32
        for fn, (device, cls) in enumerate(FUNCTIONS):
            node.add(Fn(f"0000:{bus:02x}:{dev:02x}.{fn}", "10de", device, cls, "vfio-pci", str(100 + g), g % numa_nodes))
    return node


@dataclass
class Layout:
    node: FakeNode
    gpus: list[str] = field(default_factory=list)  # the VGA functions' addresses, in address order
    groups: list[str] = field(default_factory=list)  # their IOMMU groups, in the same order

    @property
    def functions(self) -> int:
        return len(os.listdir(self.node.sys / "bus" / "pci" / "devices"))


# The chipset (PCH) functions of domain 0: one IOMMU group for the multi-function device at 1f (no ACS).
CHIPSET = (
    ("14.0", "8086", "a1af", "0c0330", "xhci_hcd"),
    ("16.0", "8086", "a1ba", "078000", "mei_me"),
    ("17.0", "8086", "a182", "010601", "ahci"),
    ("1f.0", "8086", "a1c8", "060100", None),
    ("1f.2", "8086", "a1a1", "058000", None),
    ("1f.4", "8086", "a1a3", "0c0500", "i801_smbus"),
    ("1f.5", "8086", "a1a4", "0c8000", "intel-spi"),
)
UNIT = 22  # a root port, a switch (1 upstream + 4 downstream ports) and 4 GPUs of 4 functions


def sysfs_node(root: str, functions: int, numa_nodes: int = 2, full: bool = True) -> Layout:
    """Exactly `functions` PCI functions laid out like a real server (see the module docstring)."""
    node = FakeNode(root, full=full).host()
    layout = Layout(node)
    groups = iter(range(1, 1 << 20))
    left = functions

    def add(fn: Fn) -> None:
        nonlocal left
        node.add(fn)
        left -= 1

    for domain in range(1 << 16):
        if left <= 0:
            break
        dom = f"{domain:04x}"
        rc, numa = f"pci{dom}:00", domain % numa_nodes
        add(Fn(f"{dom}:00:00.0", "8086", "09a2", "060000", None, str(next(groups)), numa, parent=rc))
        if domain == 0:
            chipset_group = str(next(groups))
            for slot, vendor, device, cls, driver in CHIPSET[: max(left - 1, 0)]:
                group = chipset_group if slot.startswith("1f") else str(next(groups))
                add(Fn(f"{dom}:00:{slot}", vendor, device, cls, driver, group, numa, parent=rc))
        bus = 1
        for port in range(32 * 8):
            if left < UNIT or bus + 6 > 0xFE:
                break
            rp = f"{dom}:00:{1 + port // 8:02x}.{port % 8}"
            add(Fn(rp, "8086", "347a", "060400", "pcieport", str(next(groups)), numa, parent=rc))
            up = f"{dom}:{bus:02x}:00.0"
            add(Fn(up, "1000", "c010", "060400", "pcieport", str(next(groups)), numa, parent=rp))
            for k in range(4):
                down = f"{dom}:{bus + 1:02x}:{k:02x}.0"
                add(Fn(down, "1000", "c010", "060400", "pcieport", str(next(groups)), numa, parent=up))
                card, group = f"{dom}:{bus + 2 + k:02x}:00", str(next(groups))
                for f, (device, cls) in enumerate(FUNCTIONS):
                    add(Fn(f"{card}.{f}", "10de", device, cls, "vfio-pci", group, numa, parent=down))
                layout.gpus.append(f"{card}.0")
                layout.groups.append(group)
            bus += 6
        if left < UNIT:
            break
    # Xeon uncore functions (class 0880, no driver) on their own root complex fill up the count.
    for n in range(max(left, 0)):
        add(Fn(f"0000:fe:{n // 8:02x}.{n % 8}", "8086", "344c", "088000", None, str(next(groups)), 0, parent="pci0000:fe"))
    return layout


def write_pci_ids(node: FakeNode) -> Path:
    path = node.root / "pci.ids"
    path.write_text(PCI_IDS_TEXT)
    return path


def start_serve(node: FakeNode, *extra: str) -> subprocess.Popen[bytes]:
    """`vfio-device-plugin serve` on the node, as its own process (as on a real node).

    Its pci.ids is the two-line PCI_IDS_TEXT, unless VDP_BENCH_BUNDLED_PCI_IDS is set: then the newest
    of the bundled and the system's copy, as on a node. VDP_BENCH_PYTHON names another interpreter (an
    install of another version) to serve with, on the same tree."""
    pci_ids = None if os.environ.get("VDP_BENCH_BUNDLED_PCI_IDS") else write_pci_ids(node)
    return subprocess.Popen(
        [
            os.environ.get("VDP_BENCH_PYTHON", sys.executable),
            "-m",
            "deviceplugin",
            "serve",
            "--log-level",
            "error",
            *node.cli_args(pci_ids),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.002)


@contextmanager
def serving(functions: int, *extra: str, real: bool = False) -> Iterator[tuple[FakeNode, FakeKubelet, subprocess.Popen[bytes]]]:
    """A synthetic node served by `serve` (with `extra` options) in its own process and registered with a test kubelet.

    real: laid out like a server's sysfs (`sysfs_node`), else the flat `gpu_node` (group 100 first)."""
    with tempfile.TemporaryDirectory(prefix="vdp", dir=TMP) as root:
        if real:
            layout = sysfs_node(root, functions)
            node, gpus = layout.node, len(layout.gpus)
        else:
            node, gpus = gpu_node(root, functions), functions // 4
        kubelet = FakeKubelet(str(node.plugins)).start()
        proc = start_serve(node, *extra)
        try:
            wait_until(lambda: kubelet.allocatable().get(RESOURCE) == gpus, 60, "registration")
            yield node, kubelet, proc
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            kubelet.stop()
