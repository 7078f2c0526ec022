"""`serve --mode dra` and the DRA view of `inspect`, as an operator runs them: real processes, signals,
a real API server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from conftest import PCI_IDS_PATH
from dra import DRIVER, unique, wait

from deviceplugin.sim.node import gpu

CLI = [sys.executable, "-m", "deviceplugin"]
GPU = "pci-0000-01-00-0"


def dra_args(node, kubeconfig: str, node_name: str) -> list[str]:
    return [
        *node.cli_args(PCI_IDS_PATH),
        "--mode=dra",
        f"--kubeconfig={kubeconfig}",
        f"--node-name={node_name}",
        f"--kubelet-plugins-dir={node.root / 'plugins'}",
        f"--kubelet-registry-dir={node.root / 'registry'}",
        f"--cdi-dir={node.root / 'cdi'}",
        "--rescan-interval=0.5",
    ]


def test_sigterm_leaves_the_slices_and_cleanup_deletes_them(node, cluster, kube_apiserver):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    name = unique("node")
    proc = subprocess.Popen([*CLI, "serve", *dra_args(node, kube_apiserver, name)], stderr=subprocess.PIPE, text=True)
    try:
        assert wait(lambda: set(cluster.devices(name)) == {GPU}, 20), "no slice published"
        assert os.path.exists(node.root / "registry" / f"{DRIVER}-reg.sock")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stderr.read() if proc.stderr else ""
    assert "published ResourceSlice pool" in log, log
    assert set(cluster.devices(name)) == {GPU}  # a restart must not make the scheduler forget the node
    assert not os.path.exists(node.root / "registry" / f"{DRIVER}-reg.sock")  # the kubelet deregisters us
    cleanup_cmd = [*CLI, "serve", *dra_args(node, kube_apiserver, name), "--cleanup"]
    cleanup = subprocess.run(cleanup_cmd, capture_output=True, text=True, timeout=30)
    assert cleanup.returncode == 0, cleanup.stderr
    assert "deleted 1 ResourceSlice(s)" in cleanup.stderr
    assert cluster.slices(name) == []


def test_dra_mode_needs_a_node_name_and_a_valid_driver_name(node):
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    base = [*CLI, "serve", *node.cli_args(PCI_IDS_PATH), "--mode=dra", "--kubeconfig=/nonexistent"]
    no_node = subprocess.run(base, capture_output=True, text=True, timeout=30, env=env)
    assert no_node.returncode == 2 and "--node-name or $NODE_NAME" in no_node.stderr
    bad = subprocess.run([*base, "--node-name=n1", "--driver-name=Not_A_Domain"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "not a DNS subdomain" in bad.stderr
    no_config = subprocess.run([*base, "--node-name=n1"], capture_output=True, text=True, timeout=30)
    assert no_config.returncode == 2 and "/nonexistent" in no_config.stderr
    wrong_mode = subprocess.run([*CLI, "serve", *node.cli_args(PCI_IDS_PATH), "--cleanup"], capture_output=True, text=True, timeout=30)
    assert wrong_mode.returncode == 2 and "--cleanup is for --mode dra" in wrong_mode.stderr


def test_inspect_shows_what_dra_would_publish_without_loading_the_api_client(node):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", numa_node=0))
    node.add_all(gpu("0000:02:00.0", "1b06", "10ef", "14", audio_driver="snd_hda_intel"))
    code = (  # main() itself: the console script would end the process with the command
        "import sys\nfrom deviceplugin.cli import main\nmain(sys.argv[1:])\n"
        "print('LOADED' if any(m.split('.')[0] in ('lightkube', 'httpx2') for m in sys.modules) else 'CLEAN', file=sys.stderr)\n"
    )
    args = ["inspect", "--json", *node.cli_args(PCI_IDS_PATH), f"--kubelet-plugins-dir={node.root / 'plugins'}"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().endswith("CLEAN")
    dra = json.loads(result.stdout)["dra"]
    assert dra["driver"] == DRIVER
    assert [d["name"] for d in dra["published"]] == [GPU]
    assert dra["published"][0]["attributes"]["resource.kubernetes.io/pciBusID"] == {"string": "0000:01:00.0"}
    (withdrawn,) = dra["withdrawn"]
    assert withdrawn["name"] == "pci-0000-02-00-0" and "snd_hda_intel" in withdrawn["reason"]
    text = subprocess.run([*CLI, "inspect", *node.cli_args(PCI_IDS_PATH)], capture_output=True, text=True, timeout=60).stdout
    assert f"DRA (serve --mode dra, driver {DRIVER}):" in text
    assert f"{GPU}: IOMMU group 13, nvidia.com/GA104, pciBusID 0000:01:00.0" in text
    assert "pci-0000-02-00-0: WITHDRAWN (IOMMU group 14)" in text
