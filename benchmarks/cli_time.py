"""Whole-process time of the commands people run by hand, on a one-GPU node and on 4,096 functions.

1. `inspect`, `inspect --json`, `doctor` and `kubevirt-config` on a one-GPU node (a GPU and its audio
   function below a root port, the chipset, every attribute file present): median and best of 7 runs
   of the installed console script, as a new user runs it. Target: median <= 120 ms.
2. `inspect --json` on 4,096 functions laid out like real sysfs (benchmarks/synthetic.py `sysfs_node`):
   best of 5, minus the best of 5 on the one-GPU node. Target: <= 150 ms more.
3. Where the 4,096-function run goes, in-process (median of 7): the cold scan (every function read;
   `inspect` keeps no cache, the daemon's first scan fills one), a warm rescan (the daemon's timer:
   cached attributes), discovery, building the document (inventory + DRA view) and writing it as JSON
   (and what json.dumps(indent=2) takes for the same text).

Both nodes use the pci.ids a user gets (the newest of the bundled and the system's copy). The figures
include Python's own start (printed first); run on a quiet machine, or read them next to the load
average printed with them.

    python benchmarks/cli_time.py [--runs 7] [--functions 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import TMP, sysfs_node

from deviceplugin.config import Config
from deviceplugin.discovery import discover
from deviceplugin.dra.options import DEFAULT_DRIVER
from deviceplugin.dra.view import inspect_view
from deviceplugin.jsontext import dumps
from deviceplugin.naming import load_pci_ids
from deviceplugin.pool import Holdings
from deviceplugin.report import inventory_json
from deviceplugin.sim.node import FakeNode, Fn
from deviceplugin.sysfs import SysfsScanner

COMMANDS = (("inspect",), ("inspect", "--json"), ("doctor",), ("kubevirt-config",))


def one_gpu_node(root: str) -> FakeNode:
    """An RTX 3070 and its audio function below a root port, the host bridge and the chipset."""
    node = FakeNode(root, full=True).host()
    node.add_all(
        [
            Fn("0000:00:00.0", "8086", "4660", "060000", None, "0", 0),
            Fn("0000:00:01.0", "8086", "460d", "060400", "pcieport", "1", 0),
            Fn("0000:00:14.0", "8086", "7ae0", "0c0330", "xhci_hcd", "4", 0),
            Fn("0000:00:17.0", "8086", "7ae2", "010601", "ahci", "5", 0),
            Fn("0000:00:1f.0", "8086", "7a84", "060100", None, "6", 0),
            Fn("0000:00:1f.3", "8086", "7ad0", "040300", "snd_hda_intel", "6", 0),
            Fn("0000:00:1f.4", "8086", "7aa3", "0c0500", "i801_smbus", "6", 0),
            Fn("0000:01:00.0", "10de", "2484", "030000", "vfio-pci", "13", 0, parent="0000:00:01.0"),
            Fn("0000:01:00.1", "10de", "228b", "040300", "vfio-pci", "13", 0, parent="0000:00:01.0"),
        ]
    )
    return node


def console_script() -> list[str]:
    script = Path(sys.executable).parent / "vfio-device-plugin"
    return [str(script)] if script.exists() else [sys.executable, "-m", "deviceplugin"]


def run_times(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - t0)
        if result.returncode not in (0, 1):  # doctor exits 1 when a check fails
            raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.decode()}")
    return times


def node_args(node: FakeNode, command: tuple[str, ...] = ("inspect",)) -> list[str]:
    args = [*node.cli_args(), f"--pod-resources-socket={node.root / 'pr.sock'}"]
    return args if command[0] == "kubevirt-config" else [*args, f"--kubelet-plugins-dir={node.root / 'plugins'}"]


def median_of(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def split(node: FakeNode, runs: int) -> None:
    """The in-process parts of `inspect --json` on this node."""
    sysfs, dev = str(node.sys), str(node.dev)
    config, pci_ids = Config(), load_pci_ids()
    once = median_of(lambda: SysfsScanner(sysfs, dev, once=True).scan(), runs)
    cold = median_of(lambda: SysfsScanner(sysfs, dev).scan(), runs)
    scanner = SysfsScanner(sysfs, dev)
    snapshot = scanner.scan()
    warm = median_of(scanner.scan, runs)
    inventory = discover(snapshot, config, pci_ids)
    disc = median_of(lambda: discover(snapshot, config, pci_ids), runs)
    held = Holdings(ok=False, error="no socket")
    plugins = str(node.root / "plugins")

    def document() -> dict[str, object]:
        dra = inspect_view(inventory, sysfs, DEFAULT_DRIVER, plugins, None)
        return {**inventory_json(inventory, pci_ids, config.naming, held), "dra": dra}

    build = median_of(document, runs)
    doc = document()
    text = dumps(doc)
    assert text == json.dumps(doc, indent=2)
    encode = median_of(lambda: dumps(doc), runs)
    stdlib = median_of(lambda: json.dumps(doc, indent=2), runs)
    print(f"  cold scan {once * 1e3:.1f} ms (inspect's; the daemon's first, which fills its cache: {cold * 1e3:.1f} ms),")
    print(f"  warm rescan {warm * 1e3:.1f} ms, discovery {disc * 1e3:.1f} ms,")
    print(f"  document (inventory + DRA view) {build * 1e3:.1f} ms, JSON output {encode * 1e3:.1f} ms ({len(text) / 1e6:.2f} MB;")
    print(f"  json.dumps(indent=2) takes {stdlib * 1e3:.1f} ms for the same text)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per one-GPU command (median); the 4,096 node gets 5 (best)")
    parser.add_argument("--functions", type=int, default=4096)
    args = parser.parse_args()
    cli = console_script()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; command {' '.join(cli)}")
    floor = run_times([sys.executable, "-c", "pass"], args.runs)
    print(f"python -c pass: median {statistics.median(floor) * 1e3:.0f} ms, best {min(floor) * 1e3:.0f} ms")
    with tempfile.TemporaryDirectory(prefix="vdp-cli-", dir=TMP) as root:
        one = one_gpu_node(f"{root}/one")
        print(f"one-GPU node ({len(os.listdir(one.sys / 'bus' / 'pci' / 'devices'))} functions), {args.runs} runs:")
        best_one = 0.0
        for command in COMMANDS:
            times = run_times([*cli, *command, *node_args(one, command)], args.runs)
            print(f"  {' '.join(command):<16} median {statistics.median(times) * 1e3:5.0f} ms, best {min(times) * 1e3:5.0f} ms")
            if command == ("inspect", "--json"):
                best_one = min(run_times([*cli, *command, *node_args(one)], 5))
        big = sysfs_node(f"{root}/big", args.functions).node
        times = run_times([*cli, "inspect", "--json", *node_args(big)], 5)
        print(
            f"{args.functions} functions: inspect --json best of 5 {min(times) * 1e3:.0f} ms "
            f"(median {statistics.median(times) * 1e3:.0f} ms), {(min(times) - best_one) * 1e3:.0f} ms more than "
            f"on the one-GPU node (best of 5 {best_one * 1e3:.0f} ms)"
        )
        split(big, args.runs)
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
