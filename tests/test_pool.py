"""The pool: publish/keep/drop rules, allocation answers and errors, preferred allocation."""

from __future__ import annotations

import re

import pytest
from conftest import inventory_of
from hypothesis import given, settings
from hypothesis import strategies as st

from deviceplugin import pool as pool_module
from deviceplugin.config import parse_config
from deviceplugin.pool import (
    Allocation,
    DevicePool,
    DeviceUnavailable,
    Holder,
    Holdings,
    InvalidRequest,
    UnknownDevice,
    preferred_allocation,
)
from deviceplugin.sim.node import Fn, gpu

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
    # each GPU's own audio function, in the same order (the pairing KubeVirt's positional rule needs)
    assert alloc.envs == {
        "PCI_RESOURCE_NVIDIA_COM_GA104": "0000:02:00.0,0000:01:00.0",
        "PCI_RESOURCE_NVIDIA_COM_GA104_AUDIO": "0000:02:00.1,0000:01:00.1",
    }


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
    # the GPU and its audio token turn unhealthy in the same update
    assert [(c.what, c.resource, c.device.id) for c in changes] == [
        ("unhealthy", R, "0000:01:00.0"),
        ("unhealthy", R + "_AUDIO", "0000:01:00.1"),
    ]
    _, devices = pool.devices(R)
    assert not devices[0].healthy and "snd_hda_intel" in devices[0].reason
    with pytest.raises(DeviceUnavailable, match=re.escape("is unhealthy: 0000:01:00.1")):
        pool.allocate(R, ["0000:01:00.0"])
    assert pool.update(inventory_of(node, pci_ids)) == []  # unchanged rescan: nothing to push
    assert pool.devices(R)[0] == version + 1
    node.bind("0000:01:00.1", "vfio-pci")
    assert [c.what for c in pool.update(inventory_of(node, pci_ids))] == ["healthy", "healthy"]
    node.remove("0000:01:00.0")
    node.remove("0000:01:00.1")
    assert [c.what for c in pool.update(inventory_of(node, pci_ids))] == ["removed", "removed"]
    assert pool.devices(R)[1] == () and pool.resources() == [R, R + "_AUDIO"]


def test_unhealthy_candidates_are_never_advertised_at_start(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", audio_driver="snd_hda_intel"))
    assert make_pool(node, pci_ids).resources() == []


def singles(numa: dict[str, int], ids: str = "abcd") -> dict[str, tuple[str, int]]:
    """Devices that are each alone in their IOMMU group."""
    return {d: (d, numa.get(d, -1)) for d in ids}


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
        (["x", "y", "a", "b"], [], 2, {}, ["a", "b"]),
        (["a", "b", "c"], [], 2, {"a": -1, "b": 0, "c": 0}, ["b", "c"]),
    ],
    ids=[
        "stable-order",
        "must-first",
        "same-numa-as-must",
        "numa-node-that-fits",
        "fits-beats-lowest",
        "ignores-unknown-must",
        "must-fills",
        "ignores-foreign-ids",
        "known-numa-beats-unknown",
    ],
)
def test_preferred_allocation_of_single_device_groups(available, must, size, numa, expected):
    assert preferred_allocation(available, must, size, singles(numa)) == expected


def test_preferred_allocation_offers_only_its_own_devices_among_20000_ids():
    """The kubelet's `available` may carry IDs this resource never published; they are never preferred."""
    ours = {f"0000:{b:02x}:00.0": (str(b), b % 2) for b in range(8)}
    foreign = [f"GPU-{i:05d}" for i in range(20_000)]
    result = preferred_allocation([*foreign, *ours], [], 4, ours)
    assert result == ["0000:00:00.0", "0000:02:00.0", "0000:04:00.0", "0000:06:00.0"]  # one NUMA node, own IDs only


# Two 2-GPU groups (g1 on NUMA 0, g2 on NUMA 1) and four single-GPU groups (s1, s2 on NUMA 0; s3, s4 on NUMA 1).
GROUPS = {
    "a1": ("g1", 0),
    "a2": ("g1", 0),
    "b1": ("g2", 1),
    "b2": ("g2", 1),
    "s1": ("s1", 0),
    "s2": ("s2", 0),
    "s3": ("s3", 1),
    "s4": ("s4", 1),
}


@pytest.mark.parametrize(
    ("available", "must", "size", "expected"),
    [
        (list(GROUPS), [], 2, ["a1", "a2"]),
        (list(GROUPS), [], 1, ["s1"]),
        (list(GROUPS), [], 3, ["a1", "a2", "s1"]),
        (list(GROUPS), [], 8, sorted(GROUPS)),
        (["s3", "s1", "s2"], [], 2, ["s1", "s2"]),
        (["s1", "s3", "s4"], [], 2, ["s3", "s4"]),
        (["a1", "a2", "s3"], [], 1, ["s3"]),
        (["a1", "a2", "b1", "b2"], [], 1, ["a1"]),
        (list(GROUPS), ["b2"], 2, ["b2", "b1"]),
        (list(GROUPS), ["s3"], 3, ["s3", "b1", "b2"]),
        (list(GROUPS), ["s3"], 2, ["s3", "s4"]),
    ],
    ids=[
        "a-whole-two-gpu-group",
        "a-single-group-for-one",
        "fewest-groups",
        "everything",
        "two-singles-on-one-numa-node-when-no-pair-is-free",
        "the-numa-node-that-fits",
        "a-single-rather-than-half-a-pair",
        "split-only-when-nothing-else-fits",
        "must-include-brings-its-mate",
        "must-include-then-whole-groups",
        "same-numa-node-as-must-include",
    ],
)
def test_preferred_allocation_keeps_groups_whole(available, must, size, expected):
    assert preferred_allocation(available, must, size, GROUPS) == expected


# --- input validation ---------------------------------------------------------------------------
def test_an_empty_or_repeated_request_is_invalid(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    pool = make_pool(node, pci_ids)
    with pytest.raises(InvalidRequest, match="asked for no device"):
        pool.allocate(R, [])
    with pytest.raises(InvalidRequest, match=re.escape("names 0000:01:00.0 more than once")):
        pool.allocate(R, ["0000:01:00.0", "0000:01:00.0"])


# --- companions -----------------------------------------------------------------------------------
def test_companion_tokens_allocate_nothing_of_their_own(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13") + gpu("0000:02:00.0", "2484", "228b", "14"))
    pool = make_pool(node, pci_ids)
    assert pool.allocate(R + "_AUDIO", ["0000:02:00.1"]) == Allocation((), {})
    # whichever token the kubelet gave, the GPU's Allocate names the GPU's own audio function
    assert pool.allocate(R, ["0000:01:00.0"]).envs == {
        "PCI_RESOURCE_NVIDIA_COM_GA104": "0000:01:00.0",
        "PCI_RESOURCE_NVIDIA_COM_GA104_AUDIO": "0000:01:00.1",
    }
    with pytest.raises(UnknownDevice):
        pool.allocate(R + "_AUDIO", ["0000:01:00.0"])  # a GPU is not an audio token


def test_turing_roles_each_get_the_function_of_each_allocated_group(node, pci_ids):
    for bus, group in (("2b", "14"), ("2c", "15")):
        node.add_all(
            [
                Fn(f"0000:{bus}:00.0", "10de", "1e84", "030000", "vfio-pci", group),
                Fn(f"0000:{bus}:00.1", "10de", "10f8", "040300", "vfio-pci", group),
                Fn(f"0000:{bus}:00.2", "10de", "1ad8", "0c0330", "vfio-pci", group),
                Fn(f"0000:{bus}:00.3", "10de", "1ad9", "0c8000", "vfio-pci", group),
            ]
        )
    pool = DevicePool(str(node.sys), str(node.dev))
    pool.update(inventory_of(node, pci_ids, parse_config({"companions": ["audio", "usb", "serial"]})))
    assert pool.allocate("nvidia.com/TU104", ["0000:2c:00.0", "0000:2b:00.0"]).envs == {
        "PCI_RESOURCE_NVIDIA_COM_TU104": "0000:2c:00.0,0000:2b:00.0",
        "PCI_RESOURCE_NVIDIA_COM_TU104_AUDIO": "0000:2c:00.1,0000:2b:00.1",
        "PCI_RESOURCE_NVIDIA_COM_TU104_USB": "0000:2c:00.2,0000:2b:00.2",
        "PCI_RESOURCE_NVIDIA_COM_TU104_SERIAL": "0000:2c:00.3,0000:2b:00.3",
    }


def test_no_companions_configured_sets_only_the_primary_variable(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    pool = DevicePool(str(node.sys), str(node.dev))
    pool.update(inventory_of(node, pci_ids, parse_config({"companions": []})))
    assert pool.resources() == [R]
    assert pool.allocate(R, ["0000:01:00.0"]).envs == {"PCI_RESOURCE_NVIDIA_COM_GA104": "0000:01:00.0"}


# --- multi-GPU groups -----------------------------------------------------------------------------
H = "nvidia.com/GH100"
A, B, C = "0000:11:00.0", "0000:12:00.0", "0000:41:00.0"


def hgx(node, pci_ids) -> DevicePool:
    node.add(Fn(A, "10de", "2330", "030200", "vfio-pci", "29"))
    node.add(Fn(B, "10de", "2330", "030200", "vfio-pci", "29"))
    node.add(Fn(C, "10de", "2330", "030200", "vfio-pci", "17"))
    return make_pool(node, pci_ids)


def health(pool: DevicePool, resource: str = H) -> dict[str, bool]:
    return {d.id: d.healthy for d in pool.devices(resource)[1]}


def test_both_gpus_of_a_group_get_the_group_node_once_and_exactly_the_requested_addresses(node, pci_ids):
    pool = hgx(node, pci_ids)
    alloc = pool.allocate(H, [B, C, A])
    assert [spec[0] for spec in alloc.devices] == ["/dev/vfio/vfio", "/dev/vfio/29", "/dev/vfio/17"]
    assert alloc.envs == {"PCI_RESOURCE_NVIDIA_COM_GH100": f"{B},{C},{A}"}
    assert health(pool) == {A: True, B: True, C: True}  # nothing left behind to hold back


def test_one_gpu_of_a_group_holds_back_its_mate_until_the_holder_is_gone(node, pci_ids):
    pool = hgx(node, pci_ids)
    allocated = []
    pool.on_allocated = lambda: allocated.append(True)
    version = pool.devices(H)[0]
    assert pool.allocate(H, [A]).envs == {"PCI_RESOURCE_NVIDIA_COM_GH100": A}  # never the mate's address
    assert allocated == [True] and pool.devices(H)[0] == version + 1  # pushed at once, not at the next rescan
    assert health(pool) == {A: True, B: False, C: True}
    mate = pool.devices(H)[1][1]
    assert mate.reason.startswith(f"IOMMU group 29 is held by another allocation ({A})")
    # PodResources names the holder
    pod = Holder("ns1", "vm1", "compute")
    pool.set_holdings(Holdings(ok=True, devices={(H, A): pod}))
    assert pool.devices(H)[1][1].reason.startswith(f"IOMMU group 29 is held by ns1/vm1 ({A})")
    # a stale checkpoint asking for the mate for another pod is refused, naming the holder
    with pytest.raises(DeviceUnavailable, match="held by ns1/vm1"):
        pool.allocate(H, [B])
    # the pod is gone: the group is free again
    pool.set_holdings(Holdings(ok=True, devices={}))
    assert health(pool) == {A: True, B: True, C: True}
    assert pool.allocate(H, [B]).envs == {"PCI_RESOURCE_NVIDIA_COM_GH100": B}


def test_a_hold_survives_an_unavailable_podresources_and_a_rescan(node, pci_ids):
    pool = hgx(node, pci_ids)
    pool.allocate(H, [A])
    pool.set_holdings(Holdings(ok=False, error="socket missing"))
    pool.update(inventory_of(node, pci_ids))
    assert health(pool) == {A: True, B: False, C: True}
    assert "held by another allocation" in pool.devices(H)[1][1].reason


def test_an_unconfirmed_hold_expires_once_podresources_works(node, pci_ids, monkeypatch):
    pool = hgx(node, pci_ids)
    pool.allocate(H, [A])
    pool.set_holdings(Holdings(ok=True, devices={}))  # not listed yet: the kubelet may still be admitting
    assert health(pool)[B] is False
    monkeypatch.setattr(pool_module, "PENDING_HOLD_SECONDS", 0.0)
    pool.set_holdings(Holdings(ok=True, devices={}))  # never confirmed: the admission failed elsewhere
    assert health(pool)[B] is True


def test_held_devices_keep_their_own_health_and_tokens_follow_their_gpu(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    node.add(Fn("0000:01:01.0", "10de", "2484", "030000", "vfio-pci", "13"))
    node.add(Fn("0000:01:01.1", "10de", "228b", "040300", "vfio-pci", "13"))
    pool = make_pool(node, pci_ids)
    pool.allocate(R, ["0000:01:00.0"])
    assert health(pool, R) == {"0000:01:00.0": True, "0000:01:01.0": False}
    assert health(pool, R + "_AUDIO") == {"0000:01:00.1": True, "0000:01:01.1": False}  # counts stay equal


# --- property: groups stay whole whenever they can ---------------------------------------------------
@st.composite
def requests(draw):
    """A random node (groups of 1-4 GPUs on NUMA -1..2, some devices not available) and a request."""
    devices: dict[str, tuple[str, int]] = {}
    for g in range(draw(st.integers(1, 8))):
        numa = draw(st.integers(-1, 2))
        for i in range(draw(st.integers(1, 4))):
            devices[f"0000:{g:02x}:{i:02x}.0"] = (f"g{g}", numa)
    ids = sorted(devices)
    available = draw(st.lists(st.sampled_from(ids), unique=True, min_size=1))
    must = draw(st.lists(st.sampled_from(available), unique=True, max_size=3))
    size = draw(st.integers(len(must), len(available)))
    foreign = draw(st.lists(st.sampled_from(["x", "0000:ff:00.0"]), unique=True))
    return devices, draw(st.permutations(available + foreign)), must, size


def unsplit_choice_exists(devices, available, must, size) -> bool:
    parts: dict[str, int] = {}
    for d in available:
        if d in devices:
            parts[devices[d][0]] = parts.get(devices[d][0], 0) + 1
    forced = {devices[d][0] for d in must}
    need = size - sum(parts[g] for g in forced)
    sums = {0}
    for g, n in parts.items():
        if g not in forced:
            sums |= {s + n for s in sums}
    return need in sums


@settings(max_examples=400, deadline=None)
@given(requests())
def test_preferred_allocation_never_splits_a_group_while_an_unsplit_choice_exists(case):
    devices, available, must, size = case
    result = preferred_allocation(available, must, size, devices)
    ours = [d for d in available if d in devices]
    assert len(result) == len(set(result)) == size
    assert set(result) <= set(ours) and result[: len(must)] == must
    if unsplit_choice_exists(devices, ours, must, size):
        for group in {g for g, _ in devices.values()}:
            members = {d for d in ours if devices[d][0] == group}
            taken = members & set(result)
            assert taken in (set(), members), f"group {group} split: {sorted(taken)} of {sorted(members)}"
