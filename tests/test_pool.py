"""The pool: publish/keep/drop rules, allocation answers and errors, preferred allocation."""

from __future__ import annotations

import re

import pytest
from conftest import inventory_of

from deviceplugin.pool import DevicePool, DeviceUnavailable, UnknownDevice, preferred_allocation
from deviceplugin.sim.node import gpu

R = "nvidia.com/GA104"


def make_pool(node, pci_ids) -> DevicePool:
    pool = DevicePool(str(node.sys), str(node.dev))
    pool.update(inventory_of(node, pci_ids))
    return pool


def test_allocate_returns_vfio_nodes_and_env_in_request_order(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13") + gpu("0000:02:00.0", "2484", "228b", "14"))
    pool = make_pool(node, pci_ids)
    alloc = pool.allocate(R, ["0000:02:00.0", "0000:01:00.0"])
    assert alloc.devices == (
        ("/dev/vfio/vfio", "/dev/vfio/vfio", "mrw"),
        ("/dev/vfio/14", "/dev/vfio/14", "mrw"),
        ("/dev/vfio/13", "/dev/vfio/13", "mrw"),
    )
    assert alloc.envs == {"PCI_RESOURCE_NVIDIA_COM_GA104": "0000:02:00.0,0000:01:00.0"}


def test_host_paths_do_not_depend_on_dev_root(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    paths = [p for spec in make_pool(node, pci_ids).allocate(R, ["0000:01:00.0"]).devices for p in spec[:2]]
    assert all(p.startswith("/dev/") for p in paths) and str(node.root) not in "".join(paths)


def test_iommufd_adds_dev_iommu_and_the_cdevs(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    node.add_vfio_cdev("0000:01:00.0", "vfio0")
    node.add_vfio_cdev("0000:01:00.1", "vfio1")
    paths = [s[1] for s in make_pool(node, pci_ids).allocate(R, ["0000:01:00.0"]).devices]
    assert paths == ["/dev/vfio/vfio", "/dev/vfio/13", "/dev/iommu", "/dev/vfio/devices/vfio0", "/dev/vfio/devices/vfio1"]


def test_unknown_id_and_rebound_function_are_refused_with_reasons(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    pool = make_pool(node, pci_ids)
    stale = []
    pool.on_stale = lambda: stale.append(True)
    with pytest.raises(UnknownDevice, match=re.escape("0000:09:00.0 is not a nvidia.com/GA104 device")):
        pool.allocate(R, ["0000:09:00.0"])
    with pytest.raises(UnknownDevice):
        pool.allocate("nvidia.com/OTHER", ["0000:01:00.0"])
    node.bind("0000:01:00.1", "snd_hda_intel")  # the pool has not rescanned: Allocate's own recheck catches it
    with pytest.raises(DeviceUnavailable, match=re.escape("0000:01:00.1 is now bound to snd_hda_intel")):
        pool.allocate(R, ["0000:01:00.0"])
    assert stale == [True]


def test_published_device_turns_unhealthy_then_healthy_and_is_dropped_when_removed(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    pool = make_pool(node, pci_ids)
    version = pool.devices(R)[0]
    node.bind("0000:01:00.1", "snd_hda_intel")
    changes = pool.update(inventory_of(node, pci_ids))
    assert [(c.what, c.device.id) for c in changes] == [("unhealthy", "0000:01:00.0")]
    _, devices = pool.devices(R)
    assert not devices[0].healthy and "snd_hda_intel" in devices[0].reason
    with pytest.raises(DeviceUnavailable, match=re.escape("is unhealthy: 0000:01:00.1")):
        pool.allocate(R, ["0000:01:00.0"])
    assert pool.update(inventory_of(node, pci_ids)) == []  # unchanged rescan: nothing to push
    assert pool.devices(R)[0] == version + 1
    node.bind("0000:01:00.1", "vfio-pci")
    assert [c.what for c in pool.update(inventory_of(node, pci_ids))] == ["healthy"]
    node.remove("0000:01:00.0")
    node.remove("0000:01:00.1")
    assert [c.what for c in pool.update(inventory_of(node, pci_ids))] == ["removed"]
    assert pool.devices(R)[1] == () and pool.resources() == [R]


def test_unhealthy_candidates_are_never_advertised_at_start(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", audio_driver="snd_hda_intel"))
    assert make_pool(node, pci_ids).resources() == []


@pytest.mark.parametrize(
    ("available", "must", "size", "numa", "expected"),
    [
        (["b", "a", "c"], [], 2, {}, ["a", "b"]),
        (["a", "b", "c"], ["c"], 2, {}, ["c", "a"]),
        (["a", "b", "c", "d"], ["c"], 2, {"a": 0, "b": 1, "c": 1, "d": 0}, ["c", "b"]),
        (["a", "b", "c", "d"], [], 2, {"a": 0, "b": 1, "c": 1, "d": 0}, ["a", "d"]),
        (["a", "b", "c"], [], 2, {"a": 0, "b": 1, "c": 1}, ["b", "c"]),
        (["a", "b"], ["x"], 1, {}, ["a"]),
        (["a", "b", "c"], ["a", "b"], 2, {}, ["a", "b"]),
    ],
    ids=[
        "stable-order",
        "must-first",
        "same-numa-as-must",
        "numa-node-that-fits",
        "fits-beats-lowest",
        "ignores-unavailable-must",
        "must-fills",
    ],
)
def test_preferred_allocation(available, must, size, numa, expected):
    assert preferred_allocation(available, must, size, numa) == expected
