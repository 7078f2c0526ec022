"""Health event latency: /dev/vfio/<group> removed or recreated -> the kubelet receives the new list.

The plugin runs as its own process (`serve`, default 5 s rescan: the inotify watch must deliver);
the test kubelet here timestamps each ListAndWatch message. p50/p99 over 200 events (100 removals,
100 re-creations). Target p99 <= 100 ms.

    python benchmarks/health_latency.py [--events 200] [--functions 64]
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
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--functions", type=int, default=64)
    args = parser.parse_args()
    with serving(args.functions) as (node, kubelet, _):
        first = sorted(kubelet.devices(RESOURCE))[0]
        devnode = node.dev / "vfio" / "100"  # synthetic.gpu_node numbers groups from 100, in address order
        samples = []
        for n in range(args.events):
            want = "Unhealthy" if n % 2 == 0 else "Healthy"
            seen = len(kubelet.update_log)
            t0 = time.monotonic()
            if want == "Unhealthy":
                devnode.unlink()
            else:
                devnode.touch()
            wait_until(lambda want=want: kubelet.devices(RESOURCE).get(first) == want, 5, f"{first} {want}")
            arrived = next(t for t, r, d in kubelet.update_log[seen:] if r == RESOURCE and d.get(first) == want)
            samples.append(arrived - t0)
    print(f"node: {args.functions} functions ({args.functions // 4} devices); {len(samples)} events")
    print(
        f"health event -> kubelet update: p50 {statistics.median(samples) * 1e3:.1f} ms, "
        f"p99 {percentile(samples, 99) * 1e3:.1f} ms, max {max(samples) * 1e3:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
