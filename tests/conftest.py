"""Shared fixtures: fake nodes in short temp dirs (unix socket paths must stay under 108 bytes),
the pci.ids fixture, and a harness that runs the real daemon against the test kubelet."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deviceplugin.config import Config
from deviceplugin.daemon import Daemon, Options
from deviceplugin.discovery import Inventory, discover
from deviceplugin.naming import PciIds, load_pci_ids
from deviceplugin.sim.kubelet import FakeKubelet
from deviceplugin.sim.node import FakeNode
from deviceplugin.sysfs import SysfsScanner

FIXTURES = Path(__file__).parent / "fixtures"
PCI_IDS_PATH = FIXTURES / "pci.ids"


@pytest.fixture(scope="session")
def pci_ids() -> PciIds:
    return load_pci_ids(str(PCI_IDS_PATH))


@pytest.fixture
def node() -> Iterator[FakeNode]:
    root = tempfile.mkdtemp(prefix="vdp", dir="/tmp")
    try:
        yield FakeNode(root).host()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def inventory_of(node: FakeNode, pci_ids: PciIds, config: Config | None = None) -> Inventory:
    return discover(SysfsScanner(str(node.sys), str(node.dev)).scan(), config or Config(), pci_ids)


class Harness:
    """The real Daemon in a thread plus a FakeKubelet on the same device-plugin dir."""

    def __init__(self, node: FakeNode, pci_ids: PciIds, config: Config | None = None, rescan_interval: float = 0.2) -> None:
        self.node = node
        self.pod_resources = str(node.root / "pod-resources" / "kubelet.sock")
        self.kubelet = FakeKubelet(str(node.plugins), self.pod_resources)
        options = Options(
            str(node.sys), str(node.dev), str(node.proc), str(node.plugins), rescan_interval, pod_resources_socket=self.pod_resources
        )
        self.daemon = Daemon(options, config or Config(), pci_ids)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.daemon.run, args=(self.stop_event,), daemon=True, name="daemon")

    def start(self, kubelet: bool = True) -> Harness:
        if kubelet:
            self.kubelet.start()
        self.thread.start()
        return self

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ready(self) -> Harness:
        """start() and wait until every published resource is registered and streamed."""
        self.start()
        self.wait_ready()
        return self

    def close(self) -> None:
        self.stop_event.set()
        self.daemon.notify("stop")
        self.thread.join(timeout=10)
        self.kubelet.stop()

    def wait_devices(self, resource: str, expected: dict[str, str], timeout: float = 10.0) -> None:
        ok = self.kubelet.wait_for(lambda k: k.devices(resource) == expected, timeout)
        assert ok, f"kubelet sees {self.kubelet.devices(resource)} for {resource}, expected {expected}"

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Every resource the pool publishes is served, registered and streamed to the kubelet."""
        wait(lambda: self.daemon.health()[0], timeout, lambda: self.daemon.health()[1])
        resources = set(self.daemon.pool.resources())
        assert self.kubelet.wait_for(lambda k: set(k.endpoints) >= resources and all(k.endpoints[r].updates for r in resources), timeout)


def wait(predicate, timeout: float = 10.0, what=lambda: "condition"):
    """Polls a condition until a deadline and returns its (truthy) value; the message says what never happened."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for: {what() if callable(what) else what}"
        time.sleep(0.01)
    return value


@pytest.fixture
def harness(node: FakeNode, pci_ids: PciIds) -> Iterator[Harness]:
    h = Harness(node, pci_ids)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="session")
def kube_apiserver() -> Iterator[str]:
    """A real kube-apiserver v1.36 + etcd (../shared/tools/kube-apiserver) for the run; yields its kubeconfig."""
    from dra import APISERVER_TOOL, start_apiserver, stop_apiserver

    if not (APISERVER_TOOL / "up").exists():
        pytest.skip(f"the kube-apiserver tool is missing: expected {APISERVER_TOOL}/up (see shared/tools/kube-apiserver/README.md)")
    state = tempfile.mkdtemp(prefix="kapi", dir="/tmp")
    try:
        yield start_apiserver(state)
    finally:
        stop_apiserver(state)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(kube_apiserver: str):
    from dra import Cluster

    c = Cluster(kube_apiserver)
    c.ensure_device_class()
    return c


def tree_of(root: str | Path) -> dict[str, str]:
    """Every path under root with its content or link target: compare two to prove nothing changed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                out[rel] = "dir"
            else:
                out[rel] = Path(path).read_text(errors="replace")
    return out


@contextmanager
def silent_server(sock: socket.socket) -> Iterator[None]:
    """Accepts every connection on a bound socket and never says a word: a hung kubelet or API server."""
    sock.listen(64)
    sock.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        sock.close()
