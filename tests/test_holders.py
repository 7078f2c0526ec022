"""Who holds which device: the kubelet's PodResources API, served by the test kubelet on a real socket,
joined to the plugin's view in `inspect`, `/status`, `doctor` and the metrics; and what happens when
that API is missing, hung or rate-limited (nothing else may degrade)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import PCI_IDS_PATH, Harness, silent_server, wait
from prometheus_client.parser import text_string_to_metric_families

from deviceplugin.podresources import fetch
from deviceplugin.sim.node import gpu
from deviceplugin.status import StatusServer, status_document

R = "nvidia.com/GA104"
GPU1, GPU2 = "0000:01:00.0", "0000:02:00.0"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deviceplugin", *args], capture_output=True, text=True, timeout=timeout)


def group_entry(doc: dict, gid: str) -> dict:
    return next(g for g in doc["groups"] if g["id"] == gid)


@pytest.fixture
def served(node, pci_ids):
    node.add_all(gpu(GPU1, "2484", "228b", "13") + gpu(GPU2, "2484", "228b", "14"))
    with Harness(node, pci_ids).ready() as h:
        yield h


def holder_of(doc: dict, gid: str):
    return group_entry(doc, gid)["holder"]


def test_a_holder_shows_in_status_and_inspect_and_clears_when_the_pod_is_gone(served):
    h = served
    h.kubelet.admit("vm1", {R: [GPU1]}, namespace="ns1")
    vm1 = {"namespace": "ns1", "pod": "vm1", "container": "compute"}
    wait(lambda: holder_of(status_document(h.daemon), "13") == vm1, 5, "the holder in /status")
    assert holder_of(status_document(h.daemon), "14") is None
    args = ["--pod-resources-socket", h.pod_resources, *h.node.cli_args(PCI_IDS_PATH)]
    doc = json.loads(cli("inspect", "--json", *args).stdout)
    assert holder_of(doc, "13") == vm1 and holder_of(doc, "14") is None
    assert doc["pod_resources"]["ok"] is True
    text = cli("inspect", *args).stdout
    assert "IOMMU group 13: OFFERED as nvidia.com/GA104, device ID 0000:01:00.0, NUMA node -1, held by ns1/vm1 (compute)" in text
    h.kubelet.remove_pod("vm1", namespace="ns1")
    wait(lambda: holder_of(status_document(h.daemon), "13") is None, 5, "the holder to clear within a rescan")
    assert holder_of(json.loads(cli("inspect", "--json", *args).stdout), "13") is None


def test_companion_tokens_say_which_pod_holds_tokens_of_which_resource(served):
    served.kubelet.admit("vm1", {R: [GPU1], R + "_AUDIO": ["0000:02:00.1"]})
    wait(lambda: status_document(served.daemon)["token_holders"], 5, "token holders")
    assert status_document(served.daemon)["token_holders"] == {
        R + "_AUDIO": {"0000:02:00.1": {"namespace": "default", "pod": "vm1", "container": "compute"}}
    }
    text = cli("inspect", "--pod-resources-socket", served.pod_resources, *served.node.cli_args(PCI_IDS_PATH)).stdout
    assert f"{R}_AUDIO tokens held: 1 by default/vm1 (compute)" in text


def test_metrics_count_allocated_devices_without_pod_labels(served):
    recorder = served.daemon.recorder
    served.kubelet.admit("vm1", {R: [GPU2]})
    wait(lambda: recorder.registry.get_sample_value("vfio_device_allocated", {"resource": R, "device": GPU2}) == 1, 5, "allocated=1")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(recorder.exposition().decode())
        for s in f.samples
    }
    assert samples[("vfio_device_allocated", (("device", GPU1), ("resource", R)))] == 0
    assert samples[("vfio_device_plugin_devices_in_use", (("resource", R),))] == 1
    assert samples[("vfio_device_plugin_pod_resources_up", ())] == 1
    assert samples[("vfio_device_plugin_companions", (("resource", R + "_AUDIO"), ("role", "audio")))] == 2
    assert not any("pod" in dict(labels) for _, labels in samples)


def test_doctor_fails_when_a_held_device_turns_unhealthy_naming_the_pod_and_the_reason(served):
    h = served
    h.kubelet.admit("vm1", {R: [GPU1]}, namespace="ns1")
    args = ["--pod-resources-socket", h.pod_resources, *h.node.cli_args(PCI_IDS_PATH)]
    assert cli("doctor", *args).returncode == 0
    h.node.bind("0000:01:00.1", "snd_hda_intel")
    result = cli("doctor", "--json", *args)
    assert result.returncode == 1
    held = next(c for c in json.loads(result.stdout)["checks"] if c["id"] == f"held.{R}.{GPU1}")
    assert held["verdict"] == "fail"
    assert (
        "held by ns1/vm1 (compute) but is Unhealthy: 0000:01:00.1 (10de:228b Audio) is bound to host driver snd_hda_intel" in held["found"]
    )
    assert "restart the VM" in held["fix"]


def test_doctor_names_a_held_device_that_left_the_node_and_an_id_never_offered(served):
    h = served
    h.kubelet.admit("vm1", {R: [GPU2]})
    with h.kubelet._cond:  # the kubelet's checkpoint still lists a device this node no longer has / never had
        h.kubelet.pods[("default", "old")] = {"compute": {R: ["0000:09:00.0", "GPU-ff00"]}}
        h.kubelet.pods[("default", "renamed")] = {"compute": {"nvidia.com/GA104_GEFORCE_RTX_3070": [GPU1]}}
    doc = json.loads(cli("doctor", "--json", "--pod-resources-socket", h.pod_resources, *h.node.cli_args(PCI_IDS_PATH)).stdout)
    checks = {c["id"]: c for c in doc["checks"]}
    assert checks[f"held.{R}.0000:09:00.0"]["verdict"] == "fail" and "no longer on this node" in checks[f"held.{R}.0000:09:00.0"]["found"]
    assert checks[f"held.{R}.GPU-ff00"]["verdict"] == "warn" and "never offered" in checks[f"held.{R}.GPU-ff00"]["found"]
    renamed = checks[f"held.nvidia.com/GA104_GEFORCE_RTX_3070.{GPU1}"]
    assert renamed["verdict"] == "warn" and f"this plugin offers it as {R}" in renamed["found"]
    assert "pin the old name" in renamed["fix"]


# --- the API missing, hung or rate-limited: nothing else degrades ------------------------------------
def test_a_missing_socket_is_a_reason_not_an_error(node, pci_ids):
    node.add_all(gpu(GPU1, "2484", "228b", "13"))
    gone = str(node.root / "nowhere" / "kubelet.sock")
    doc = json.loads(cli("inspect", "--json", "--pod-resources-socket", gone, *node.cli_args(PCI_IDS_PATH)).stdout)
    assert doc["resources"][R] == [GPU1] and holder_of(doc, "13") is None
    assert doc["pod_resources"]["ok"] is False and "does not exist" in doc["pod_resources"]["error"]
    text = cli("inspect", "--pod-resources-socket", gone, *node.cli_args(PCI_IDS_PATH)).stdout
    assert f"holder unknown: {gone} does not exist" in text
    result = cli("doctor", "--json", "--pod-resources-socket", gone, *node.cli_args(PCI_IDS_PATH))
    holders = next(c for c in json.loads(result.stdout)["checks"] if c["id"] == "holders")
    assert result.returncode == 0 and holders["verdict"] == "warn" and "holder unknown" in holders["found"]


@pytest.fixture
def silent_socket(node):
    """A unix socket that accepts connections and never says a word: a hung kubelet."""
    path = str(node.root / "hung.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    with silent_server(sock):
        yield path


def test_a_hung_kubelet_costs_inspect_one_deadline(node, silent_socket):
    node.add_all(gpu(GPU1, "2484", "228b", "13"))
    started = time.monotonic()
    result = cli("inspect", "--pod-resources-socket", silent_socket, *node.cli_args(PCI_IDS_PATH))
    assert result.returncode == 0 and "holder unknown" in result.stdout and "no answer within 1 s" in result.stdout
    assert time.monotonic() - started < 20  # bounded: the deadline, not a hang
    assert fetch(silent_socket, timeout=0.2).error.endswith("no answer within 0.2 s (kubelet hung?)")


def test_a_hung_podresources_never_blocks_allocate_or_listandwatch(served):
    h = served
    h.kubelet.pod_resources.hang.set()
    try:
        for _ in range(5):  # each Allocate asks for a refresh; none of them may wait for it
            started = time.monotonic()
            h.kubelet.allocate(R, GPU1)
            assert time.monotonic() - started < 0.5
        os.unlink(h.node.dev / "vfio" / "14")  # health still flows to the kubelet
        h.wait_devices(R, {GPU1: "Healthy", GPU2: "Unhealthy"}, timeout=5)
        wait(lambda: not h.daemon.pool.holdings().ok, 10, "the deadline to pass")
        assert "no answer within" in h.daemon.pool.holdings().error
        assert holder_of(status_document(h.daemon), "13") is None
    finally:
        h.kubelet.pod_resources.hang.clear()


def test_rate_limiting_is_a_miss_and_calls_are_coalesced(served):
    h = served
    server = h.kubelet.pod_resources
    server.rate_limit = True
    wait(lambda: "RESOURCE_EXHAUSTED" in (h.daemon.pool.holdings().error or ""), 5, "a rate-limited answer")
    server.rate_limit = False
    wait(lambda: h.daemon.pool.holdings().ok, 5, "a good answer again")
    before = server.calls
    started = time.monotonic()
    for _ in range(50):  # a burst of admissions: far fewer calls than Allocates
        h.kubelet.allocate(R, GPU1)
    time.sleep(1.0)
    elapsed = time.monotonic() - started
    assert server.calls - before <= 2 * (elapsed / 0.5 + 2)  # List + GetAllocatableResources per spaced refresh


def test_status_endpoint_shows_the_holder(served):
    server = StatusServer(served.daemon, 0, host="127.0.0.1")
    server.start()
    try:
        served.kubelet.admit("vm7", {R: [GPU2]}, namespace="team-a")
        import urllib.request

        def holder() -> object:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/status", timeout=5) as response:
                return holder_of(json.loads(response.read()), "14")

        wait(lambda: holder() == {"namespace": "team-a", "pod": "vm7", "container": "compute"}, 5, "the holder over HTTP")
    finally:
        server.stop()
