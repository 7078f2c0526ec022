"""The kubelet side of the DRA mode, through the test DRA kubelet over the plugin's real sockets and a
real API server: registration, NodePrepareResources / NodeUnprepareResources in both API versions, the
CDI spec and the KEP-5304 metadata file read back as the runtime and KubeVirt would, idempotence,
restarts, and claims that must fail with the reason."""

from __future__ import annotations

import json
import os

import pytest
from dra import DRIVER, DraHarness, read_json, wait

from deviceplugin.sim.drakubelet import DraKubelet
from deviceplugin.sim.node import gpu

GPU = "pci-0000-01-00-0"
OTHER = "pci-0000-02-00-0"
CONTAINER_DIR = "/var/run/kubernetes.io/dra-device-attributes"


@pytest.fixture
def dra(node, pci_ids, cluster):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", numa_node=0) + gpu("0000:02:00.0", "2484", "228b", "14"))
    h = DraHarness(node, pci_ids, cluster).start()
    h.wait_registered()
    h.wait_devices({GPU, OTHER})
    try:
        yield h
    finally:
        h.close()


def cdi_spec_of(dra, uid):
    return read_json(os.path.join(dra.options.cdi_dir, f"{DRIVER}-{uid}.json"))


def kubevirt_reads(path):
    """What virt-launcher does (pkg/dra/utils.go): decode the stream's first supported object and take the
    single device's resource.kubernetes.io/pciBusID string."""
    with open(path, encoding="utf-8") as f:
        decoder, text, pos = json.JSONDecoder(), f.read(), 0
    while pos < len(text.rstrip()):
        doc, end = decoder.raw_decode(text, pos)
        pos = end + (len(text[end:]) - len(text[end:].lstrip()))
        if doc.get("apiVersion") == "metadata.resource.k8s.io/v1alpha1":
            return doc
    raise AssertionError(f"no metadata.resource.k8s.io/v1alpha1 object in {path}")


def test_prepare_writes_a_cdi_spec_and_the_metadata_kubevirt_reads(dra, cluster):
    claim = cluster.create_claim(dra.node_name, [("gpu", GPU)])
    ns, name, uid = claim
    response = dra.prepare(claim)
    result = response.claims[uid]
    assert result.error == ""
    (device,) = result.devices
    assert (list(device.request_names), device.pool_name, device.device_name) == (["gpu"], dra.node_name, GPU)
    assert list(device.cdi_device_ids) == [f"{DRIVER}/vfio={uid}-{GPU}"]

    spec = cdi_spec_of(dra, uid)
    assert spec["cdiVersion"] == "0.5.0" and spec["kind"] == f"{DRIVER}/vfio"
    (entry,) = spec["devices"]
    assert f"{spec['kind']}={entry['name']}" == device.cdi_device_ids[0]
    nodes = [n["path"] for n in entry["containerEdits"]["deviceNodes"]]
    assert nodes == ["/dev/vfio/vfio", "/dev/vfio/13"]
    (mount,) = entry["containerEdits"]["mounts"]
    assert mount["containerPath"] == f"{CONTAINER_DIR}/resourceclaims/{name}/gpu/{DRIVER}-metadata.json"
    assert mount["options"] == ["ro", "bind"]
    assert mount["hostPath"].startswith(dra.options.data_dir + "/")

    doc = kubevirt_reads(mount["hostPath"])
    assert doc["kind"] == "DeviceMetadata" and doc["metadata"] == {"name": name, "namespace": ns, "uid": uid, "generation": 1}
    assert "podClaimName" not in doc
    (request,) = doc["requests"]
    assert request["name"] == "gpu"
    (dev,) = request["devices"]
    assert (dev["driver"], dev["pool"], dev["name"]) == (DRIVER, dra.node_name, GPU)
    assert dev["attributes"]["resource.kubernetes.io/pciBusID"] == {"string": "0000:01:00.0"}
    assert dra.status()["published"][0]["prepared_claims"] == [f"{ns}/{name} ({uid})"]


def test_a_claim_from_a_template_is_mounted_under_the_pod_claim_name(dra, cluster):
    claim = cluster.create_claim(dra.node_name, [("gpu", GPU)], pod_claim_name="vm-gpu")
    result = dra.prepare(claim).claims[claim[2]]
    assert result.error == ""
    (entry,) = cdi_spec_of(dra, claim[2])["devices"]
    (mount,) = entry["containerEdits"]["mounts"]
    assert mount["containerPath"] == f"{CONTAINER_DIR}/resourceclaimtemplates/vm-gpu/gpu/{DRIVER}-metadata.json"
    assert kubevirt_reads(mount["hostPath"])["podClaimName"] == "vm-gpu"


def test_iommufd_nodes_are_added_where_the_host_has_them(node, pci_ids, cluster):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    node.add_vfio_cdev("0000:01:00.0", "vfio0")
    node.add_vfio_cdev("0000:01:00.1", "vfio1")
    h = DraHarness(node, pci_ids, cluster).start()
    try:
        h.wait_registered()
        h.wait_devices({GPU})
        claim = cluster.create_claim(h.node_name, [("gpu", GPU)])
        assert h.prepare(claim).claims[claim[2]].error == ""
        (entry,) = cdi_spec_of(h, claim[2])["devices"]
        nodes = [n["path"] for n in entry["containerEdits"]["deviceNodes"]]
        assert nodes == ["/dev/vfio/vfio", "/dev/vfio/13", "/dev/iommu", "/dev/vfio/devices/vfio0", "/dev/vfio/devices/vfio1"]
    finally:
        h.close()


def test_preparing_again_returns_the_same_ids_and_rewrites_a_lost_cdi_spec(dra, cluster):
    claim = cluster.create_claim(dra.node_name, [("gpu", GPU)])
    first = dra.prepare(claim).claims[claim[2]]
    spec_path = os.path.join(dra.options.cdi_dir, f"{DRIVER}-{claim[2]}.json")
    spec = read_json(spec_path)
    metadata_path = spec["devices"][0]["containerEdits"]["mounts"][0]["hostPath"]
    os.unlink(spec_path)  # /var/run/cdi is a tmpfs: gone after a node reboot
    os.unlink(metadata_path)
    again = dra.prepare(claim).claims[claim[2]]
    assert again.error == "" and list(again.devices) == list(first.devices)
    assert read_json(spec_path) == spec and os.path.exists(metadata_path)


def test_unprepare_removes_spec_and_metadata_and_ignores_unknown_claims(dra, cluster):
    claim = cluster.create_claim(dra.node_name, [("gpu", GPU)])
    dra.prepare(claim)
    spec_path = os.path.join(dra.options.cdi_dir, f"{DRIVER}-{claim[2]}.json")
    metadata_path = read_json(spec_path)["devices"][0]["containerEdits"]["mounts"][0]["hostPath"]
    response = dra.unprepare(claim)
    assert response.claims[claim[2]].error == ""
    assert not os.path.exists(spec_path) and not os.path.exists(metadata_path)
    unknown = ("default", "never-prepared", "00000000-0000-0000-0000-000000000000")
    assert dra.unprepare(unknown).claims[unknown[2]].error == ""
    assert dra.status()["claims"] == {}


def test_prepared_claims_survive_a_plugin_restart_through_the_checkpoint(dra, cluster):
    claim = cluster.create_claim(dra.node_name, [("gpu", GPU)])
    first = dra.prepare(claim).claims[claim[2]]
    dra.stop_daemon()
    cluster.delete_claim(claim[0], claim[1])  # the answer must now come from the checkpoint alone
    registrations = len(dra.kubelet.registrations)
    dra.start_daemon()
    assert dra.kubelet.wait_for(lambda k: len(k.registrations) > registrations and k.registered(DRIVER), 10)
    again = dra.prepare(claim).claims[claim[2]]
    assert again.error == "" and list(again.devices) == list(first.devices)
    other = cluster.create_claim(dra.node_name, [("gpu", GPU)])
    busy = dra.prepare(other).claims[other[2]]
    assert "already prepared for claim" in busy.error and "one VM only" in busy.error
    assert dra.unprepare(claim).claims[claim[2]].error == ""
    assert dra.prepare(other).claims[other[2]].error == ""


def test_a_claim_for_a_group_that_went_unhealthy_after_allocation_fails_with_the_reason(dra, cluster):
    claim = cluster.create_claim(dra.node_name, [("gpu", GPU)])
    dra.node.bind("0000:01:00.1", "snd_hda_intel")
    dra.wait_devices({OTHER})
    result = dra.prepare(claim).claims[claim[2]]
    assert not result.devices
    assert GPU in result.error and "unhealthy" in result.error and "snd_hda_intel" in result.error
    assert not os.path.exists(os.path.join(dra.options.cdi_dir, f"{DRIVER}-{claim[2]}.json"))


def test_a_group_whose_device_node_vanished_since_the_last_rescan_fails_at_once(node, pci_ids, cluster):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    h = DraHarness(node, pci_ids, cluster, rescan=60).start()  # no timer rescan during the test
    try:
        h.wait_registered()
        h.wait_devices({GPU})
        h.daemon.watcher.stop()  # and no inotify event: only Prepare's own re-check can notice
        os.unlink(node.dev / "vfio" / "13")
        claim = cluster.create_claim(h.node_name, [("gpu", GPU)])
        error = h.prepare(claim).claims[claim[2]].error
        assert "/dev/vfio/13 is gone" in error
    finally:
        h.close()


def test_claims_the_node_cannot_prepare_fail_one_by_one(dra, cluster):
    ok = cluster.create_claim(dra.node_name, [("gpu", GPU)])
    elsewhere = cluster.create_claim("some-other-node", [("gpu", GPU)])
    unknown_device = cluster.create_claim(dra.node_name, [("gpu", "pci-0000-09-00-0")])
    missing = ("default", "no-such-claim", "11111111-1111-1111-1111-111111111111")
    replaced = (ok[0], ok[1], "22222222-2222-2222-2222-222222222222")
    response = dra.prepare(ok, elsewhere, unknown_device, missing, replaced)
    assert response.claims[ok[2]].error == ""
    assert "allocated from pool 'some-other-node'" in response.claims[elsewhere[2]].error
    assert "pci-0000-09-00-0 is not offered" in response.claims[unknown_device[2]].error
    assert "does not exist" in response.claims[missing[2]].error
    assert "got replaced" in response.claims[replaced[2]].error


def test_both_api_versions_are_served(dra, cluster):
    old = DraKubelet(dra.options.registry_dir, dra.node_name, services=["v1beta1.DRAPlugin"]).start(wipe=False)
    try:
        assert old.wait_for(lambda k: k.registered(DRIVER), 10), old.rejections
        assert old.plugins[DRIVER].service == "v1beta1.DRAPlugin"
        assert dra.kubelet.plugins[DRIVER].service == "v1.DRAPlugin"  # the newest both sides know
        claim = cluster.create_claim(dra.node_name, [("gpu", GPU)])
        result = old.prepare(DRIVER, claim).claims[claim[2]]
        assert result.error == "" and result.devices[0].device_name == GPU
        assert old.unprepare(DRIVER, claim).claims[claim[2]].error == ""
    finally:
        old.stop()


def test_a_kubelet_without_a_common_api_version_is_told_why(dra):
    ancient = DraKubelet(dra.options.registry_dir, dra.node_name, services=["v1alpha4.NodeServer"]).start(wipe=False)
    try:
        assert ancient.wait_for(lambda k: bool(k.rejections), 10)
        assert "none of services supported by the plugin" in ancient.rejections[0][1]
        assert wait(lambda: dra.daemon.frontend.registration.state()[1] is not None)
    finally:
        ancient.stop()
