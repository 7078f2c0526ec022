"""DRA publishing against a real API server: the node's IOMMU groups as one ResourceSlice pool that
follows health, survives the kubelet's wipes, stays on SIGTERM and goes with --cleanup."""

from __future__ import annotations

import pytest
from dra import DRIVER, DraHarness, wait

from deviceplugin.sim.node import gpu

pytestmark = pytest.mark.usefixtures("cluster")

GPU = "pci-0000-01-00-0"
OTHER = "pci-0000-02-00-0"


@pytest.fixture
def dra(node, pci_ids, cluster):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", numa_node=0) + gpu("0000:02:00.0", "2484", "228b", "14", numa_node=1))
    h = DraHarness(node, pci_ids, cluster)
    try:
        yield h
    finally:
        h.close()


def test_one_device_per_group_with_the_attributes_kubevirt_and_cel_need(dra, cluster):
    dra.start()
    devices = dra.wait_devices({GPU, OTHER})
    (s,) = cluster.slices(dra.node_name)
    assert s["spec"]["driver"] == DRIVER and s["spec"]["nodeName"] == dra.node_name
    pool = s["spec"]["pool"]
    assert (pool["name"], pool["resourceSliceCount"]) == (dra.node_name, 1) and pool["generation"] >= 1
    assert devices[GPU]["attributes"] == {
        "resource.kubernetes.io/pciBusID": {"string": "0000:01:00.0"},
        "resource.kubernetes.io/pcieRoot": {"string": "pci0000:00"},
        "vendorID": {"string": "10de"},
        "deviceID": {"string": "2484"},
        "productName": {"string": "GA104 [GeForce RTX 3070]"},
        "resourceName": {"string": "nvidia.com/GA104"},
        "iommuGroup": {"int": 13},
        "numaNode": {"int": 0},
        "functions": {"int": 2},
    }
    assert devices[OTHER]["attributes"]["numaNode"] == {"int": 1}
    dra.wait_registered()
    assert wait(lambda: dra.daemon.frontend.health()[0]), dra.daemon.frontend.health()


def test_an_unhealthy_group_is_withdrawn_with_its_reason_and_comes_back(dra, cluster):
    dra.start()
    dra.wait_devices({GPU, OTHER})
    before = cluster.generation(dra.node_name)
    dra.node.bind("0000:01:00.1", "snd_hda_intel")  # the GPU's audio function back on a host driver
    dra.wait_devices({OTHER})
    assert cluster.generation(dra.node_name) > before
    (withdrawn,) = dra.status()["withdrawn"]
    assert withdrawn["name"] == GPU and "snd_hda_intel" in withdrawn["reason"]
    middle = cluster.generation(dra.node_name)
    dra.node.bind("0000:01:00.1", "vfio-pci")
    dra.wait_devices({GPU, OTHER})
    assert cluster.generation(dra.node_name) > middle
    assert dra.status()["withdrawn"] == []


def test_a_group_that_leaves_the_node_is_withdrawn_and_a_new_one_appears(dra, cluster):
    dra.start()
    dra.wait_devices({GPU, OTHER})
    dra.node.remove("0000:02:00.1")
    dra.node.remove("0000:02:00.0")
    dra.wait_devices({GPU})
    dra.node.add_all(gpu("0000:03:00.0", "2484", "228b", "15"))
    dra.wait_devices({GPU, "pci-0000-03-00-0"})


def test_slices_wiped_by_the_kubelet_are_published_again(dra, cluster):
    dra.start()
    dra.wait_devices({GPU, OTHER})
    generation = cluster.generation(dra.node_name)
    assert dra.kubelet.wipe() == 1  # what a starting kubelet does to every slice of its node
    dra.wait_devices({GPU, OTHER}, timeout=5)
    assert cluster.generation(dra.node_name) > generation  # a new generation: the scheduler drops what it cached


def test_a_restarted_kubelet_registers_the_driver_again_and_the_wiped_slices_come_back(dra, cluster):
    dra.start()
    dra.wait_registered()
    dra.wait_devices({GPU, OTHER})
    registrations = len(dra.kubelet.registrations)
    dra.kubelet.restart(wipe=True)
    assert dra.kubelet.wait_for(lambda k: len(k.registrations) > registrations and k.registered(DRIVER), 10)
    dra.wait_devices({GPU, OTHER}, timeout=5)
    assert dra.kubelet.wipes[-1][1] is None  # the start-up wipe removed all of the node's slices


def test_the_slices_of_a_driver_that_went_away_are_wiped_and_published_again_when_it_returns(dra, cluster):
    dra.kubelet.disconnect_wipe_delay = 0.2  # 30 s in the kubelet
    dra.start()
    dra.wait_registered()
    dra.wait_devices({GPU, OTHER})
    dra.stop_daemon()  # SIGTERM: the sockets go, the slices stay...
    assert set(cluster.devices(dra.node_name)) == {GPU, OTHER}
    assert wait(lambda: not dra.kubelet.registered(DRIVER))
    assert wait(lambda: not cluster.slices(dra.node_name))  # ...until the kubelet's disconnect wipe
    dra.start_daemon()
    dra.wait_registered()
    dra.wait_devices({GPU, OTHER})


def test_the_registration_socket_is_served_again_when_deleted(dra):
    import os

    dra.start()
    dra.wait_registered()
    registrations = len(dra.kubelet.registrations)
    os.unlink(dra.options.registration_socket)
    assert dra.kubelet.wait_for(lambda k: len(k.registrations) > registrations, 10), dra.kubelet.rejections


def test_status_and_metrics_show_the_dra_view(dra):
    from deviceplugin.status import health, status_document

    dra.start()
    dra.wait_registered()
    dra.wait_devices({GPU, OTHER})
    assert wait(lambda: health(dra.daemon)[0]), health(dra.daemon)
    doc = status_document(dra.daemon)
    assert doc["mode"] == "dra"
    assert [d["name"] for d in doc["dra"]["published"]] == [GPU, OTHER]
    assert doc["dra"]["registration"]["registered"] and doc["dra"]["slices"]["in_sync"]
    text = dra.daemon.recorder.exposition().decode()
    assert 'vfio_device_plugin_dra_devices{state="published"} 2.0' in text
    assert 'vfio_device_plugin_dra_slice_writes_total{op="create"} 1.0' in text


def test_a_plugin_restart_leaves_the_slices_untouched(dra, cluster):
    dra.start()
    dra.wait_registered()
    dra.wait_devices({GPU, OTHER})
    (before,) = cluster.slices(dra.node_name)
    dra.stop_daemon()
    dra.start_daemon()
    dra.wait_registered()
    assert wait(lambda: dra.daemon.frontend.publisher.in_sync)
    (after,) = cluster.slices(dra.node_name)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]  # not even rewritten
    assert 'op="update"' not in dra.daemon.recorder.exposition().decode()
