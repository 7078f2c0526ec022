"""What clients that misuse the status endpoint cost `serve`: resident memory, threads, and /healthz meanwhile.

`serve` runs in its own process (32 functions, registered with a test kubelet, --status-port); this
script measures its VmRSS and thread count (/proc/<pid>/status) and times /healthz:

1. at rest;
2. while 20 clients send endless headers (64,000-byte lines, reconnecting whenever the server hangs up);
3. while 1,000 idle connections are held open (connected, nothing sent);
4. after every client left.

The pod's memory limit is 128 Mi (manifests/base/daemonset.yaml).

    python benchmarks/status_limits.py [--seconds 10] [--idle 1000] [--header-clients 20]
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import serving

LINE = b"X-Pad: " + b"a" * 64_000 + b"\r\n"


def proc_status(pid: int) -> tuple[float, int]:
    """(VmRSS in MB, threads) of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthz(port: int) -> str:
    """The answer and how long it took, or why there was none (2 s timeout, as a probe's few seconds)."""
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            code = response.status
    except urllib.error.HTTPError as err:
        code = err.code
    except OSError as err:
        return f"no answer ({err.__class__.__name__})"
    return f"{code} in {(time.monotonic() - t0) * 1e3:.0f} ms"


class Sampler:
    """Peak RSS and threads of a process, sampled every 50 ms in the background."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss, self.threads = proc_status(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rss, threads = proc_status(self.pid)
            self.rss, self.threads = max(self.rss, rss), max(self.threads, threads)

    def stop(self) -> tuple[float, int]:
        self._stop.set()
        self._thread.join()
        return self.rss, self.threads


def endless_headers(port: int, until: float) -> None:
    while time.monotonic() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                while time.monotonic() < until:
                    s.sendall(LINE)
        except OSError:
            time.sleep(0.01)  # hung up on, refused or timed out: come back


def report(what: str, pid: int, port: int, peak: tuple[float, int] | None = None) -> None:
    rss, threads = peak or proc_status(pid)
    print(f"{what:<42} RSS {rss:6.1f} MB  threads {threads:5d}  /healthz {healthz(port)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--header-clients", type=int, default=20)
    args = parser.parse_args()
    port = free_port()
    with serving(32, "--status-port", str(port)) as (_, _, proc):
        time.sleep(1)  # let start-up settle
        report("at rest", proc.pid, port)

        sampler = Sampler(proc.pid)
        until = time.monotonic() + args.seconds
        clients = [threading.Thread(target=endless_headers, args=(port, until), daemon=True) for _ in range(args.header_clients)]
        for t in clients:
            t.start()
        time.sleep(args.seconds / 2)
        during = healthz(port)
        for t in clients:
            t.join()
        rss, threads = sampler.stop()
        print(f"{f'{args.header_clients} clients, endless headers (peak)':<42} RSS {rss:6.1f} MB  threads {threads:5d}  /healthz {during}")

        sampler = Sampler(proc.pid)
        idle = []
        for _ in range(args.idle):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        time.sleep(1)  # let the server accept them all
        during = healthz(port)
        rss, threads = sampler.stop()
        print(f"{f'{len(idle)} idle connections (peak)':<42} RSS {rss:6.1f} MB  threads {threads:5d}  /healthz {during}")
        for s in idle:
            s.close()
        time.sleep(1)
        report("after the clients left", proc.pid, port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
