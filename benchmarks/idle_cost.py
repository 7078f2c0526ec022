"""What the daemon costs while nothing happens: one rescan, idle CPU and resident memory.

1. One rescan (in-process) of 1,024 and 4,096 functions: the timer's path (sysfs scan, and discovery
   skipped because nothing changed) and a full reconcile (scan + discovery + pool diff).
2. `serve` on a 1,024-function node with the default 5 s interval and a test kubelet holding the
   ListAndWatch stream: CPU over 60 s (target <= 0.5 % of one core) and RSS (target <= 60 MB).

    python benchmarks/idle_cost.py [--seconds 60]
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
from synthetic import (
    PCI_IDS_TEXT,
    TMP,
    gpu_node,
    serving,
)

from deviceplugin.config import Config
from deviceplugin.daemon import Daemon, Options
from deviceplugin.naming import parse_pci_ids

TICKS = os.sysconf("SC_CLK_TCK")


def rescan_cost(functions: int, repeat: int = 15) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="vdp", dir=TMP) as root:
        node = gpu_node(root, functions)
        daemon = Daemon(Options(str(node.sys), str(node.dev), str(node.proc), str(node.plugins)), Config(), parse_pci_ids(PCI_IDS_TEXT))
        daemon.reconcile()
        unchanged, full = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            daemon.reconcile()
            unchanged.append(time.perf_counter() - t0)
            daemon._last_snapshot = None  # forget: the next reconcile runs discovery and the diff
            t0 = time.perf_counter()
            daemon.reconcile()
            full.append(time.perf_counter() - t0)
        for server in daemon.frontend.servers.values():
            server.stop()
        return statistics.median(unchanged), statistics.median(full)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    for functions in (1024, 4096):
        unchanged, full = rescan_cost(functions)
        print(f"one rescan, {functions} functions: unchanged {unchanged * 1e3:.1f} ms, full reconcile {full * 1e3:.1f} ms")
    with serving(1024) as (_, _, proc):
        time.sleep(2)  # let start-up settle
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.seconds)
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
        rss = rss_mb(proc.pid)
    cpu = 100 * (c1 - c0) / (t1 - t0)
    print(f"serve idle on 1024 functions, {t1 - t0:.0f} s: CPU {cpu:.2f} % of one core ({c1 - c0:.2f} s), RSS {rss:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
