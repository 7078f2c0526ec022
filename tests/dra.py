"""Test helpers for the DRA mode: a real API server (the shared kube-apiserver tool), the real daemon in
DRA mode on a fake node, and the test DRA kubelet on the same registry dir, all over real sockets.

A test that needs the API server takes the `kube_apiserver` fixture (session-scoped: one API server for
the run, about 3 s); each test uses its own node name, so their ResourceSlices never meet. Where the tool
is missing the tests skip and say where it should be.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

from conftest import wait

from deviceplugin.config import Config
from deviceplugin.daemon import Daemon, Options
from deviceplugin.dra.kube import KubeApi
from deviceplugin.dra.options import DraOptions
from deviceplugin.dra.run import dra_frontend_factory
from deviceplugin.naming import PciIds
from deviceplugin.sim.drakubelet import DraKubelet
from deviceplugin.sim.node import FakeNode

SHARED = Path(os.environ.get("VFIO_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
APISERVER_TOOL = SHARED / "tools" / "kube-apiserver"
DRIVER = "vfio-device-plugin.github.io"


def start_apiserver(state: str) -> str:
    """Starts the shared tool's kube-apiserver + etcd; returns the kubeconfig path."""
    out = subprocess.run([str(APISERVER_TOOL / "up"), state], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"kube-apiserver tool failed: {out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


def stop_apiserver(state: str) -> None:
    subprocess.run([str(APISERVER_TOOL / "down"), state], capture_output=True, timeout=60)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Cluster:
    """The test's view of the API server: slices of a node, claims with an allocation written as the
    scheduler would."""

    def __init__(self, kubeconfig: str) -> None:
        from lightkube import Client, KubeConfig

        self.kubeconfig = kubeconfig
        self.api = KubeApi(kubeconfig)
        self.client = Client(KubeConfig.from_file(kubeconfig), field_manager="tests")

    def slices(self, node: str) -> list[dict[str, Any]]:
        return self.api.list_slices(node, DRIVER)[0]

    def devices(self, node: str) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for s in self.slices(node) for d in (s["spec"].get("devices") or [])}

    def generation(self, node: str) -> int:
        return max((s["spec"]["pool"]["generation"] for s in self.slices(node)), default=0)

    def create_claim(
        self, node: str, results: list[tuple[str, str]], pod_claim_name: str | None = None, namespace: str = "default"
    ) -> tuple[str, str, str]:
        """A ResourceClaim allocated (status written as the scheduler would) with (request, device) results
        from this node's pool. Returns (namespace, name, uid)."""
        from lightkube.codecs import from_dict
        from lightkube.resources.resource_v1 import ResourceClaim

        name = unique("claim")
        requests = sorted({r for r, _ in results}) or ["gpu"]
        annotations = {"resource.kubernetes.io/pod-claim-name": pod_claim_name} if pod_claim_name else {}
        doc = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
            "spec": {"devices": {"requests": [{"name": r, "exactly": {"deviceClassName": "vfio-tests"}} for r in requests]}},
        }
        created = self.client.create(from_dict(doc))
        status = {
            "allocation": {
                "devices": {"results": [{"request": r, "driver": DRIVER, "pool": node, "device": d} for r, d in results]},
                "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]},
            }
        }
        self.client.patch(ResourceClaim.Status, name, {"status": status}, namespace=namespace)
        return namespace, name, created.metadata.uid

    def delete_claim(self, namespace: str, name: str) -> None:
        from lightkube.resources.resource_v1 import ResourceClaim

        self.client.delete(ResourceClaim, name, namespace=namespace)

    def ensure_device_class(self) -> None:
        from lightkube.codecs import from_dict
        from lightkube.core.exceptions import ApiError

        doc = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": "vfio-tests"},
            "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{DRIVER}"'}}]},
        }
        try:
            self.client.create(from_dict(doc))
        except ApiError as exc:
            if exc.status.code != 409:
                raise


class DraHarness:
    """The real Daemon in DRA mode in a thread, and a DraKubelet on the same registry dir."""

    def __init__(self, node: FakeNode, pci_ids: PciIds, cluster: Cluster, node_name: str | None = None, rescan: float = 0.2) -> None:
        self.node = node
        self.pci_ids = pci_ids
        self.cluster = cluster
        self.node_name = node_name or unique("node")
        self.options = DraOptions(
            driver=DRIVER,
            node=self.node_name,
            kubeconfig=cluster.kubeconfig,
            plugins_dir=str(node.root / "plugins"),
            registry_dir=str(node.root / "registry"),
            cdi_dir=str(node.root / "cdi"),
            sysfs_root=str(node.sys),
        )
        self.rescan = rescan
        self.kubelet = DraKubelet(self.options.registry_dir, self.node_name, KubeApi(cluster.kubeconfig))
        self.daemon: Daemon | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, kubelet: bool = True) -> DraHarness:
        if kubelet:
            self.kubelet.start()
        self.start_daemon()
        return self

    def start_daemon(self) -> Daemon:
        options = Options(str(self.node.sys), str(self.node.dev), str(self.node.proc), str(self.node.plugins), self.rescan)
        self.daemon = Daemon(options, Config(), self.pci_ids, make_frontend=dra_frontend_factory(self.options))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.daemon.run, args=(self._stop,), daemon=True, name="dra-daemon")
        self._thread.start()
        return self.daemon

    def stop_daemon(self) -> None:
        if self.daemon is not None and self._thread is not None:
            self._stop.set()
            self.daemon.notify("stop")
            self._thread.join(timeout=10)
            self.daemon = None

    def close(self) -> None:
        self.stop_daemon()
        self.kubelet.stop()

    # --- conveniences ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        assert self.daemon is not None
        return self.daemon.frontend.status()["dra"]

    def wait_devices(self, expected: set[str], timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        def settled() -> dict[str, dict[str, Any]] | None:
            devices = self.cluster.devices(self.node_name)
            return devices if set(devices) == expected and self._one_generation() else None

        return wait(settled, timeout, lambda: f"slice devices {set(self.cluster.devices(self.node_name))}, expected {expected}")

    def _one_generation(self) -> bool:
        slices = self.cluster.slices(self.node_name)
        return bool(slices) and len({s["spec"]["pool"]["generation"] for s in slices}) == 1

    def wait_registered(self, timeout: float = 10.0) -> None:
        assert self.kubelet.wait_for(lambda k: k.registered(DRIVER), timeout), f"not registered: {self.kubelet.rejections}"

    def prepare(self, *claims: tuple[str, str, str]) -> Any:
        return self.kubelet.prepare(DRIVER, *claims)

    def unprepare(self, *claims: tuple[str, str, str]) -> Any:
        return self.kubelet.unprepare(DRIVER, *claims)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
