"""Allocate latency over a real unix socket, next to the transport's floor and with vs without companions.

Three servers run as processes of their own, on the same machine, in the same run:
- bare: a grpcio server whose Allocate answers an empty AllocateResponse (the floor: grpcio's own cost,
  the same version and server setup as the plugin);
- plain: `vfio-device-plugin serve` on a synthetic node with `companions: []` in its config;
- companions: the same node served with the default config (each GPU also offers its audio function:
  Allocate answers one more variable, and a second resource is served).
The clients call a one-device Allocate as the kubelet makes it (one ContainerAllocateRequest), including
the plugin's per-call sysfs recheck: grpc-go like the kubelet (benchmarks/goclient, built from Debian's
golang-google-grpc-dev: `apt-get install golang-go golang-google-grpc-dev`), one process per client, and
Python threads (whose own cost is a large part of their figures). Rounds alternate the servers, so a
busy machine slows all three alike. Also prints the handler's own cost (pool.allocate in-process).
Targets: p99 <= 1 ms with one client; companions within 10 % of plain.

    python benchmarks/allocate_latency.py [--calls 20000] [--rounds 2]
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


def report(server: str, label: str, clients: int, samples: list[float], wall: float) -> None:
    print(
        f"{server:>10} {label:>8} {clients:>7} {len(samples):>6} {statistics.median(samples) * 1e3:>6.3f} ms "
        f"{percentile(samples, 99) * 1e3:>6.3f} ms {max(samples) * 1e3:>6.3f} ms {len(samples) / wall:>8.0f}"
    )


class BareServicer(api_grpc.DevicePluginServicer):
    def Allocate(self, request, context):
        return api.AllocateResponse()


def serve_bare(socket: str) -> None:
    """The floor: grpcio with the plugin's server setup, and an Allocate that does nothing."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    api_grpc.add_DevicePluginServicer_to_server(BareServicer(), server)
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    server.wait_for_termination()


def start(argv: list[str], socket: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not socket.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"{argv[3:5]} did not start serving")
        time.sleep(0.05)
    return proc


def handler_cost(node) -> list[str]:
    pool = DevicePool(str(node.sys), str(node.dev))
    pool.update(discover(SysfsScanner(str(node.sys), str(node.dev)).scan(), Config(), PCI_IDS))
    ids = [d.id for d in pool.devices(RESOURCE)[1]]
    assert len(ids) == 8, ids
    n = 20000
    t0 = time.perf_counter()
    for i in range(n):
        pool.allocate(RESOURCE, [ids[i % 8]])
    print(f"handler cost (pool.allocate incl. sysfs recheck, in-process): {(time.perf_counter() - t0) / n * 1e6:.1f} us/call")
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the three servers; samples are pooled")
    parser.add_argument("--bare-server", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        serve_bare(args.bare_server)
        return 0
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    with tempfile.TemporaryDirectory(prefix="vdp-", dir="/tmp") as root:
        nodes = {name: gpu_node(f"{root}/{name}", 32) for name in ("plain", "companions")}  # 8 devices of 4 functions
        ids = handler_cost(nodes["plain"])
        config = Path(root) / "no-companions.yaml"
        config.write_text("companions: []\n")
        sockets = {name: node.plugins / socket_name(RESOURCE, str(node.plugins)) for name, node in nodes.items()}
        sockets["bare"] = Path(root) / "bare.sock"
        procs = []
        try:
            procs.append(start([sys.executable, __file__, "--bare-server", str(sockets["bare"])], sockets["bare"]))
            for name, node in nodes.items():
                pci_ids = node.root / "pci.ids"
                pci_ids.write_text(PCI_IDS_TEXT)
                extra = ["--config", str(config)] if name == "plain" else []
                serve = [sys.executable, "-m", "deviceplugin", "serve", "--log-level", "error", *node.cli_args(pci_ids), *extra]
                procs.append(start(serve, sockets[name]))
            go_client = build_go_client(root)
            results: dict[tuple[str, str, int], tuple[list[float], float]] = {}
            for _ in range(args.rounds):
                for clients in (1, 8):
                    for server in ("bare", "plain", "companions"):
                        runs = [("grpc-go", run_go, go_client)] if go_client else []
                        runs.append(("python", None, None))
                        for label, fn, binary in runs:
                            if fn is not None:
                                samples, wall = run_go(binary, str(sockets[server]), ids, args.calls, clients)
                            else:
                                samples, wall = run(str(sockets[server]), ids, args.calls, clients)
                            pooled, walls = results.get((server, label, clients), ([], 0.0))
                            results[(server, label, clients)] = (pooled + samples, walls + wall)
            print(f"{'server':>10} {'client':>8} {'clients':>7} {'calls':>6} {'p50':>9} {'p99':>9} {'max':>9} {'calls/s':>8}")
            for (server, label, clients), (samples, wall) in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2])):
                report(server, label, clients, samples, wall)
            for label in ("grpc-go", "python"):
                for clients in (1, 8):
                    if (("plain", label, clients)) in results:
                        plain, comp = results[("plain", label, clients)][0], results[("companions", label, clients)][0]
                        print(
                            f"companions vs plain, {label}, {clients} client(s): p50 "
                            f"{(statistics.median(comp) / statistics.median(plain) - 1) * 100:+.1f} %, p99 "
                            f"{(percentile(comp, 99) / percentile(plain, 99) - 1) * 100:+.1f} %"
                        )
            if not go_client:
                print("(no Go toolchain with grpc-go here: only the Python client was measured)")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=10)
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
