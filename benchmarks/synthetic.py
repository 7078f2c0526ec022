"""Synthetic nodes for the benchmarks: N functions as Turing-style 4-function GPU groups."""

from __future__ import annotations

from deviceplugin.fakenode import FakeNode, Fn

FUNCTIONS = (("1e84", "030000"), ("10f8", "040300"), ("1ad8", "0c0330"), ("1ad9", "0c8000"))


def gpu_node(root: str, functions: int, numa_nodes: int = 2) -> FakeNode:
    """functions/4 GPU groups, all on vfio-pci, spread over NUMA nodes."""
    node = FakeNode(root).host()
    for g in range(functions // 4):
        bus, dev = 1 + g // 32, g % 32
        for fn, (device, cls) in enumerate(FUNCTIONS):
            node.add(Fn(f"0000:{bus:02x}:{dev:02x}.{fn}", "10de", device, cls, "vfio-pci", str(100 + g), g % numa_nodes))
    return node
