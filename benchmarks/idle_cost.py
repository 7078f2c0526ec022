"""What the daemon costs while nothing happens: one rescan, idle CPU and resident memory.

1. One rescan (in-process) of 1,024 and 4,096 functions: the timer's path (sysfs scan, and discovery
   skipped because nothing changed) and a full reconcile (scan + discovery + pool diff).
2. `serve` on a 1,024-function node with the default 5 s interval and a test kubelet holding the
   ListAndWatch streams: CPU over 60 s (target <= 0.3 % of one core) and RSS at the end (target <= 45 MB).

Both on nodes laid out like a server's sysfs (benchmarks/synthetic.py `sysfs_node`); `--flat` uses the
flat `gpu_node` of earlier figures. The node's pci.ids is a two-line file, as before; `--bundled-pci-ids`
lets serve use the newest of the bundled and the system's copy, as a DaemonSet does.

    python benchmarks/idle_cost.py [--seconds 60] [--flat] [--bundled-pci-ids]
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
    sysfs_node,
)

from deviceplugin.config import Config
from deviceplugin.daemon import Daemon, Options
from deviceplugin.naming import parse_pci_ids

TICKS = os.sysconf("SC_CLK_TCK")


def rescan_cost(functions: int, flat: bool, repeat: int = 15) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="vdp", dir=TMP) as root:
        node = gpu_node(root, functions) if flat else sysfs_node(root, functions).node
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


def run_seconds(pid: int) -> float:
    """Time on a CPU, from the scheduler (ns, every thread): utime/stime are sampled at the timer tick,
    and the 20-odd ticks an idle minute holds make them +-20 % figures."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue
    return total / 1e9


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--flat", action="store_true", help="the flat gpu_node tree instead of a server's layout")
    parser.add_argument("--bundled-pci-ids", action="store_true", help="serve reads the bundled pci.ids, as a DaemonSet does")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; {'flat' if args.flat else 'server-like'} tree")
    for functions in (1024, 4096):
        unchanged, full = rescan_cost(functions, args.flat)
        print(f"one rescan, {functions} functions: unchanged {unchanged * 1e3:.1f} ms, full reconcile {full * 1e3:.1f} ms")
    if args.bundled_pci_ids:
        os.environ["VDP_BENCH_BUNDLED_PCI_IDS"] = "1"
    with serving(1024, real=not args.flat) as (_, _, proc):
        time.sleep(2)  # let start-up settle
        c0, r0, t0 = cpu_seconds(proc.pid), run_seconds(proc.pid), time.monotonic()
        time.sleep(args.seconds)
        c1, r1, t1 = cpu_seconds(proc.pid), run_seconds(proc.pid), time.monotonic()
        rss = rss_mb(proc.pid)
    cpu, run = 100 * (c1 - c0) / (t1 - t0), 100 * (r1 - r0) / (t1 - t0)
    print(
        f"serve idle on 1024 functions, {t1 - t0:.0f} s: CPU {run:.3f} % of one core ({r1 - r0:.3f} s on a CPU, schedstat; "
        f"utime+stime {cpu:.2f} %, {c1 - c0:.2f} s), RSS {rss:.1f} MB"
    )
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
