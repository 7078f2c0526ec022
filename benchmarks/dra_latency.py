"""DRA mode latencies against a real API server: p50/p99 of
- a kubelet wipe of the node's ResourceSlices -> published again;
- /dev/vfio/<group> removed -> the device withdrawn from the slice (inotify), and back when it returns;
- NodePrepareResources of a new claim (API read, re-check, CDI spec, metadata, checkpoint), and of a
  prepared one (the kubelet after a restart);
- a kubelet restart (wipe + GetInfo again) -> registered and published again.

`serve --mode dra` runs in its own process on a synthetic 8-GPU node; the test DRA kubelet drives it.
Needs ../shared/tools/kube-apiserver.

    python benchmarks/dra_latency.py [--samples 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import TMP, gpu_node, percentile, wait_until, write_pci_ids

from deviceplugin.dra.kube import KubeApi
from deviceplugin.sim.drakubelet import DraKubelet

TOOL = Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "kube-apiserver"
DRIVER = "vfio-device-plugin.github.io"
NODE = "bench-node"


def report(what: str, samples: list[float]) -> None:
    print(
        f"{what}: p50 {statistics.median(samples) * 1e3:.1f} ms, p99 {percentile(samples, 99) * 1e3:.1f} ms, "
        f"max {max(samples) * 1e3:.1f} ms ({len(samples)} samples)"
    )


def timed(action, done, what: str) -> float:
    t0 = time.monotonic()
    action()
    wait_until(done, 20, what)
    return time.monotonic() - t0


def create_claim(client, device: str) -> tuple[str, str, str]:
    from lightkube.codecs import from_dict
    from lightkube.resources.resource_v1 import ResourceClaim

    name = f"bench-{time.monotonic_ns()}"
    spec = {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "bench"}}]}}
    doc = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": name, "namespace": "default"}, "spec": spec}
    uid = client.create(from_dict(doc)).metadata.uid
    result = {"request": "gpu", "driver": DRIVER, "pool": NODE, "device": device}
    client.patch(ResourceClaim.Status, name, {"status": {"allocation": {"devices": {"results": [result]}}}}, namespace="default")
    return "default", name, uid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    from lightkube import Client, KubeConfig

    with tempfile.TemporaryDirectory(prefix="kapi", dir="/tmp") as state, tempfile.TemporaryDirectory(prefix="vdp", dir=TMP) as root:
        kubeconfig = subprocess.run([str(TOOL / "up"), state], capture_output=True, text=True, check=True).stdout.split()[-1]
        try:
            node = gpu_node(root, 32)
            api = KubeApi(kubeconfig)
            kubelet = DraKubelet(str(node.root / "registry"), NODE, api).start()
            cmd = [sys.executable, "-m", "deviceplugin", "serve", "--log-level=error", *node.cli_args(write_pci_ids(node))]
            cmd += ["--mode=dra", f"--kubeconfig={kubeconfig}", f"--node-name={NODE}", f"--cdi-dir={node.root / 'cdi'}"]
            cmd += [f"--kubelet-plugins-dir={node.root / 'plugins'}", f"--kubelet-registry-dir={node.root / 'registry'}"]
            proc = subprocess.Popen(cmd)
            try:
                run(args.samples, node, api, kubelet, Client(KubeConfig.from_file(kubeconfig)))
            finally:
                proc.terminate()
                proc.wait(timeout=10)
                kubelet.stop()
        finally:
            subprocess.run([str(TOOL / "down"), state], capture_output=True)
    return 0


def run(samples: int, node, api: KubeApi, kubelet: DraKubelet, client) -> None:
    def count() -> int:
        return sum(len(s["spec"].get("devices") or []) for s in api.list_slices(NODE, DRIVER)[0])

    wait_until(lambda: kubelet.registered(DRIVER) and count() == 8, 30, "registration and publishing")
    report("wipe -> published again", [timed(kubelet.wipe, lambda: count() == 8, "re-publish") for _ in range(samples)])
    withdraw, back = [], []
    devnode = node.dev / "vfio" / "100"
    for _ in range(samples):
        withdraw.append(timed(devnode.unlink, lambda: count() == 7, "withdrawal"))
        back.append(timed(devnode.touch, lambda: count() == 8, "return"))
    report("/dev/vfio/<group> removed -> withdrawn", withdraw)
    report("/dev/vfio/<group> back -> published", back)
    first, again = [], []
    for _ in range(samples):
        claim = create_claim(client, "pci-0000-01-00-0")
        t0 = time.monotonic()
        assert kubelet.prepare(DRIVER, claim).claims[claim[2]].error == ""
        first.append(time.monotonic() - t0)
        t0 = time.monotonic()
        kubelet.prepare(DRIVER, claim)
        again.append(time.monotonic() - t0)
        kubelet.unprepare(DRIVER, claim)
    report("NodePrepareResources, new claim", first)
    report("NodePrepareResources, prepared claim", again)
    restarts = []
    for _ in range(samples):
        n = len(kubelet.registrations)
        restarts.append(timed(kubelet.restart, lambda n=n: len(kubelet.registrations) > n and count() == 8, "restart"))
    report("kubelet restart -> registered and published again", restarts)


if __name__ == "__main__":
    sys.exit(main())
