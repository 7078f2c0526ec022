"""Kubelet restart -> every resource re-registered and its full list delivered: p50/p99 over 50 restarts.

The test kubelet restarts as the real one does (deletes every socket in the device-plugin dir,
recreates kubelet.sock); the plugin is `serve` in its own process. Target p99 <= 1 s.

    python benchmarks/kubelet_restart.py [--restarts 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import RESOURCE, percentile, serving, wait_until


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=50)
    args = parser.parse_args()
    with serving(32) as (_, kubelet, _):
        samples = []
        for _ in range(args.restarts):
            kubelet.restart()
            t0 = time.monotonic()
            wait_until(lambda: kubelet.allocatable().get(RESOURCE) == 8, 15, "re-registration")
            samples.append(time.monotonic() - t0)
    print(
        f"{len(samples)} kubelet restarts -> re-registered with the full list: "
        f"p50 {statistics.median(samples) * 1e3:.0f} ms, p99 {percentile(samples, 99) * 1e3:.0f} ms, "
        f"max {max(samples) * 1e3:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
