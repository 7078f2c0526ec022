"""Discovery time for synthetic trees of 64, 1,024 and 4,096 functions laid out like a server's sysfs.

Prints, per size: a cold scan (new scanner: every attribute file read) plus discovery, and a warm
rescan (what the daemon's timer does: cached ids, an lstat per function and its driver) plus
discovery. The tree is benchmarks/synthetic.py `sysfs_node` (functions nested below their bridges,
every attribute file present); `--flat` uses the flat `gpu_node` of earlier figures.
Target: cold discovery of 4,096 functions <= 150 ms. `benchmarks/cli_time.py` times the whole command.

    python benchmarks/discovery.py [--repeat 7] [--flat]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import gpu_node, sysfs_node

from deviceplugin.config import Config
from deviceplugin.discovery import discover
from deviceplugin.naming import parse_pci_ids
from deviceplugin.sysfs import SysfsScanner

TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None
PCI_IDS = parse_pci_ids("10de  NVIDIA Corporation\n\t1e84  TU104 [GeForce RTX 2070 SUPER]\n")


def measure(root: str, repeat: int) -> tuple[float, float, int]:
    cold, warm = [], []
    devices = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        scanner = SysfsScanner(f"{root}/sys", f"{root}/dev")
        inv = discover(scanner.scan(), Config(), PCI_IDS)
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        inv = discover(scanner.scan(), Config(), PCI_IDS)
        warm.append(time.perf_counter() - t0)
        devices = sum(len(d) for d in inv.devices.values())
    return statistics.median(cold), statistics.median(warm), devices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--sizes", default="64,1024,4096")
    parser.add_argument("--flat", action="store_true", help="the flat gpu_node tree instead of a server's layout")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; {'flat' if args.flat else 'server-like'} tree")
    print(f"{'functions':>9} {'devices':>7} {'cold scan+discover':>19} {'warm rescan+discover':>21}")
    for size in (int(s) for s in args.sizes.split(",")):
        # tmpfs when there is one: sysfs is an in-memory filesystem, and disk-backed dentries
        # would measure the disk cache instead of the plugin.
        with tempfile.TemporaryDirectory(prefix="vdp-bench-", dir=TMP) as root:
            gpu_node(root, size) if args.flat else sysfs_node(root, size)
            cold, warm, devices = measure(root, args.repeat)
        print(f"{size:>9} {devices:>7} {cold * 1000:>16.1f} ms {warm * 1000:>18.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
