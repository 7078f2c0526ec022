"""Every GPU usable when one IOMMU group holds several, and never split across VMs.

The HGX H100 of shared/real-iommu-layouts/09 (eight GPUs in six groups; 29 and 58 hold two each) and
synthetic switch layouts, through the test kubelet on real sockets: it admits pods as the device
manager does and serves PodResources, so holders have names.
"""

from __future__ import annotations

import pytest
from conftest import Harness, wait
from layouts import build, layout_path, parse_listing

from deviceplugin.sim.node import Fn

H = "nvidia.com/GH100"
ENV = "PCI_RESOURCE_NVIDIA_COM_GH100"
GROUPS = {  # layout 09: group -> its GPUs
    "17": ["0000:41:00.0"],
    "18": ["0000:44:00.0"],
    "29": ["0000:11:00.0", "0000:12:00.0"],
    "49": ["0000:bb:00.0"],
    "50": ["0000:be:00.0"],
    "58": ["0000:86:00.0", "0000:87:00.0"],
}
ALL = sorted(a for gpus in GROUPS.values() for a in gpus)


def numa_by_bus(item) -> int:
    """Two sockets: buses below 0x80 on NUMA node 0, the rest on node 1 (typical of these boards)."""
    return 0 if int(item.address[5:7], 16) < 0x80 else 1


@pytest.fixture
def hgx(node, pci_ids):
    listing = parse_listing(layout_path("09-hgx-h100-8gpu-nvswitch.txt").read_text(encoding="utf-8"))
    build(node, listing, set(GROUPS), numa=numa_by_bus)
    with Harness(node, pci_ids).ready() as h:
        yield h


def group_nodes(response) -> list[str]:
    return [d.host_path for d in response.devices if d.host_path.removeprefix("/dev/vfio/").isdigit()]


def test_layout_09_offers_all_eight_gpus(hgx):
    assert hgx.kubelet.allocatable() == {H: 8}


def test_a_pod_asking_for_eight_gets_every_address_and_the_six_group_nodes(hgx):
    response = hgx.kubelet.admit("big", {H: 8})[H]
    assert sorted(response.envs[ENV].split(",")) == ALL
    assert sorted(group_nodes(response)) == sorted(f"/dev/vfio/{g}" for g in GROUPS)


def test_a_pod_asking_for_two_gets_a_whole_pair_then_two_singles_on_one_numa_node(hgx):
    k = hgx.kubelet
    first = k.admit("a", {H: 2})[H].envs[ENV].split(",")
    second = k.admit("b", {H: 2})[H].envs[ENV].split(",")
    assert sorted([sorted(first), sorted(second)]) == [GROUPS["29"], GROUPS["58"]]
    third = sorted(k.admit("c", {H: 2})[H].envs[ENV].split(","))
    assert third in (GROUPS["17"] + GROUPS["18"], GROUPS["49"] + GROUPS["50"])  # no pair left: one NUMA node


def test_one_gpu_of_a_pair_holds_back_its_mate_by_name_until_the_pod_is_gone(hgx):
    k = hgx.kubelet
    a, b = GROUPS["29"]
    response = k.admit("vm1", {H: [a]}, namespace="ns1")[H]
    assert response.envs[ENV] == a  # never the mate the kubelet did not allocate
    hgx.wait_devices(H, {**dict.fromkeys(ALL, "Healthy"), b: "Unhealthy"}, timeout=5)
    wait(lambda: "held by ns1/vm1" in hgx.daemon.pool.devices(H)[1][ALL.index(b)].reason, 5, "the holder's name")
    assert k.allocatable() == {H: 7}  # node allocatable counts healthy devices, in use or not
    k.remove_pod("vm1", namespace="ns1")
    hgx.wait_devices(H, dict.fromkeys(ALL, "Healthy"), timeout=5)


def test_a_stale_checkpoint_cannot_split_a_held_group(hgx):
    import grpc

    a, b = GROUPS["58"]
    hgx.kubelet.admit("vm1", {H: [a]}, namespace="ns1")
    wait(lambda: "held by ns1/vm1" in hgx.daemon.pool.devices(H)[1][ALL.index(b)].reason, 5, "the holder's name")
    with pytest.raises(grpc.RpcError) as err:
        hgx.kubelet.allocate(H, b)  # as if the kubelet's checkpoint still had b free for another pod
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "IOMMU group 58 is held by ns1/vm1" in err.value.details()


def test_a_synthetic_switch_with_four_gpus_counts_four_and_prefers_it_whole(node, pci_ids):
    node.add(Fn("0000:20:00.0", "10de", "1234", "060400", "pcieport", "40"))  # the switch port without ACS
    for i in range(4):
        node.add(Fn(f"0000:21:0{i}.0", "10de", "2330", "030200", "vfio-pci", "40", 0))
    node.add(Fn("0000:31:00.0", "10de", "2330", "030200", "vfio-pci", "41", 0))
    h = Harness(node, pci_ids).start()
    try:
        h.wait_ready()
        assert h.kubelet.allocatable() == {H: 5}
        assert h.kubelet.admit("one", {H: 1})[H].envs[ENV] == "0000:31:00.0"  # the single, not a quarter of the switch
        response = h.kubelet.admit("four", {H: 4})[H]
        assert response.envs[ENV] == "0000:21:00.0,0000:21:01.0,0000:21:02.0,0000:21:03.0"
        assert group_nodes(response) == ["/dev/vfio/40"]
    finally:
        h.close()


def test_doctor_and_inspect_explain_a_multi_gpu_group(node, pci_ids):
    import argparse

    from conftest import inventory_of

    from deviceplugin.doctor import WARN, read_node, run_checks
    from deviceplugin.report import inventory_text

    listing = parse_listing(layout_path("09-hgx-h100-8gpu-nvswitch.txt").read_text(encoding="utf-8"))
    build(node, listing, set(GROUPS))
    inv = inventory_of(node, pci_ids)
    args = argparse.Namespace(proc_root=str(node.proc), device_plugin_dir=str(node.plugins), sysfs_root=str(node.sys))
    checks = {c.id: c for c in run_checks(inv, read_node(args))}
    assert checks["group.29.gpus"].verdict == WARN and "holds 2 GPUs (0000:11:00.0, 0000:12:00.0)" in checks["group.29.gpus"].found
    assert "ACS" in checks["group.29.gpus"].fix and "group.29.isolation" not in checks  # a mate is no foreign device
    assert "group.17.gpus" not in checks
    assert "device IDs 0000:11:00.0, 0000:12:00.0" in checks["group.29"].found
    text = inventory_text(inv, pci_ids, "short")
    assert "IOMMU group 29: OFFERED as nvidia.com/GH100, device IDs 0000:11:00.0, 0000:12:00.0" in text
    assert "note: IOMMU group 29 holds 2 GPUs" in text
