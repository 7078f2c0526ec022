"""Synthetic nodes for the benchmarks: N functions as Turing-style 4-function GPU groups."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def write_pci_ids(node: FakeNode) -> Path:
    path = node.root / "pci.ids"
    path.write_text(PCI_IDS_TEXT)
    return path


def start_serve(node: FakeNode, *extra: str) -> subprocess.Popen[bytes]:
    """`vfio-device-plugin serve` on the node, as its own process (as on a real node)."""
    return subprocess.Popen(
        [sys.executable, "-m", "deviceplugin", "serve", "--log-level", "error", *node.cli_args(write_pci_ids(node)), *extra],
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
def serving(functions: int, *extra: str) -> Iterator[tuple[FakeNode, FakeKubelet, subprocess.Popen[bytes]]]:
    """A synthetic node served by `serve` (with `extra` options) in its own process and registered with a test kubelet."""
    with tempfile.TemporaryDirectory(prefix="vdp", dir=TMP) as root:
        node = gpu_node(root, functions)
        kubelet = FakeKubelet(str(node.plugins)).start()
        proc = start_serve(node, *extra)
        try:
            wait_until(lambda: kubelet.allocatable().get(RESOURCE) == functions // 4, 60, "registration")
            yield node, kubelet, proc
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            kubelet.stop()
