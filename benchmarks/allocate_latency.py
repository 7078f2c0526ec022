"""Allocate latency over a real unix socket: 20,000 calls with 1 and with 8 concurrent clients, 8 devices.

The plugin runs as its own process (`vfio-device-plugin serve` on a synthetic node, as on a real
node where the kubelet is another process); the clients are threads here, one channel each. Each
call is a one-device Allocate as the kubelet makes it (one ContainerAllocateRequest), including the
per-call sysfs recheck. Also prints the handler's own cost (pool.allocate in-process).
Target: p99 <= 1 ms with one client.

Two clients: Python threads (always), and, where a Go toolchain with Debian's grpc-go is installed
(`apt-get install golang-go golang-google-grpc-dev`), benchmarks/goclient: grpc-go like the kubelet,
one process per client. The Python client's own cost is a large part of its figures.

    python benchmarks/allocate_latency.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import gpu_node

from deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as api
from deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc as api_grpc
from deviceplugin.config import Config
from deviceplugin.discovery import discover
from deviceplugin.naming import (
    parse_pci_ids,
    socket_name,
)
from deviceplugin.pool import DevicePool
from deviceplugin.sysfs import SysfsScanner

PCI_IDS_TEXT = "10de  NVIDIA Corporation\n\t1e84  TU104 [GeForce RTX 2070 SUPER]\n"
PCI_IDS = parse_pci_ids(PCI_IDS_TEXT)
RESOURCE = "nvidia.com/TU104"


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def client(socket: str, ids: list[str], calls: int, out: list[float], start: threading.Barrier) -> None:
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = api_grpc.DevicePluginStub(channel)
        requests = [api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=[i])]) for i in ids]
        stub.Allocate(requests[0], timeout=5)  # connect outside the measurement
        start.wait()
        for n in range(calls):
            t0 = time.perf_counter()
            stub.Allocate(requests[n % len(requests)], timeout=5)
            out.append(time.perf_counter() - t0)


def run(socket: str, ids: list[str], total: int, clients: int) -> tuple[list[float], float]:
    results: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=client, args=(socket, ids, total // clients, results[c], barrier)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return [s for r in results for s in r], time.perf_counter() - t0


GO_CLIENT = Path(__file__).parent / "goclient" / "main.go"
GOPATH = "/usr/share/gocode"  # Debian's golang-google-grpc-dev


def build_go_client(out_dir: str) -> str | None:
    if shutil.which("go") is None or not os.path.isdir(f"{GOPATH}/src/google.golang.org/grpc"):
        return None
    binary = os.path.join(out_dir, "allocclient")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOCACHE": os.path.join(out_dir, "gocache")}
    result = subprocess.run(["go", "build", "-o", binary, str(GO_CLIENT)], env=env, capture_output=True, text=True)
    return binary if result.returncode == 0 else None


def run_go(binary: str, socket: str, ids: list[str], total: int, clients: int) -> tuple[list[float], float]:
    requests = [
        api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=[i])]).SerializeToString().hex() for i in ids
    ]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([binary, socket, str(total // clients), *requests], stdout=subprocess.PIPE, text=True) for _ in range(clients)
    ]
    samples = [int(line) / 1e6 for proc in procs for line in proc.communicate()[0].split()]
    return samples, time.perf_counter() - t0


def report(label: str, clients: int, samples: list[float], wall: float) -> None:
    print(
        f"{label:>8} {clients:>7} {len(samples):>6} {statistics.median(samples) * 1e3:>6.3f} ms {percentile(samples, 99) * 1e3:>6.3f} ms "
        f"{max(samples) * 1e3:>6.3f} ms {len(samples) / wall:>8.0f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vdp-", dir="/tmp") as root:
        node = gpu_node(root, 32)  # 8 devices of 4 functions
        pool = DevicePool(str(node.sys), str(node.dev))
        pool.update(discover(SysfsScanner(str(node.sys), str(node.dev)).scan(), Config(), PCI_IDS))
        ids = [d.id for d in pool.devices(RESOURCE)[1]]
        assert len(ids) == 8, ids
        n = 20000
        t0 = time.perf_counter()
        for i in range(n):
            pool.allocate(RESOURCE, [ids[i % 8]])
        print(f"handler cost (pool.allocate incl. sysfs recheck, in-process): {(time.perf_counter() - t0) / n * 1e6:.1f} us/call")
        pci_ids = node.root / "pci.ids"
        pci_ids.write_text(PCI_IDS_TEXT)
        socket = node.plugins / socket_name(RESOURCE, str(node.plugins))
        server = subprocess.Popen(
            [sys.executable, "-m", "deviceplugin", "serve", "--log-level", "error", *node.cli_args(pci_ids)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while not socket.exists():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the plugin did not start serving")
                time.sleep(0.05)
            go_client = build_go_client(root)
            print(f"{'client':>8} {'clients':>7} {'calls':>6} {'p50':>9} {'p99':>9} {'max':>9} {'calls/s':>8}")
            for clients in (1, 8):
                if go_client:
                    report("grpc-go", clients, *run_go(go_client, str(socket), ids, args.calls, clients))
                report("python", clients, *run(str(socket), ids, args.calls, clients))
            if not go_client:
                print("(no Go toolchain with grpc-go here: only the Python client was measured)")
        finally:
            server.terminate()
            server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
