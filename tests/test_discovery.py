"""Discovery on fake sysfs trees: grouping, viability, primary function, naming and reasons."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import inventory_of

from deviceplugin.config import parse_config
from deviceplugin.discovery import Inventory
from deviceplugin.sim.node import FakeNode, Fn, gpu
from deviceplugin.sysfs import SysfsScanner, parse_uevent


def offered(inv: Inventory) -> dict[str, list[str]]:
    """GPUs (and other primary devices) offered as Healthy; companion tokens are checked on their own."""
    out = {r: [d.id for d in devs if d.healthy and not d.role] for r, devs in inv.devices.items()}
    return {r: ids for r, ids in out.items() if ids}


def group(inv: Inventory, gid: str):
    return next(g for g in inv.groups if g.id == gid)


def turing(node: FakeNode, usb_driver: str = "vfio-pci") -> None:
    node.add_all(
        [
            Fn("0000:2b:00.0", "10de", "1e84", "030000", "vfio-pci", "14"),
            Fn("0000:2b:00.1", "10de", "10f8", "040300", "vfio-pci", "14"),
            Fn("0000:2b:00.2", "10de", "1ad8", "0c0330", usb_driver, "14"),
            Fn("0000:2b:00.3", "10de", "1ad9", "0c8000", "vfio-pci", "14"),
        ]
    )


def test_rtx3070_group_13_is_one_device_named_ga104(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", numa_node=0))
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {"nvidia.com/GA104": ["0000:01:00.0"]}
    g = group(inv, "13")
    assert (g.viable, g.offered, g.reasons, g.primary, g.numa_node) == (True, True, (), "0000:01:00.0", 0)
    assert [f.address for f in g.functions] == ["0000:01:00.0", "0000:01:00.1"]
    assert g.names == ("GA104 [GeForce RTX 3070]", "GA104 High Definition Audio Controller")


def test_turing_four_functions_on_vfio_are_one_device(node, pci_ids):
    turing(node)
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {"nvidia.com/TU104": ["0000:2b:00.0"]}
    assert inv.devices["nvidia.com/TU104"][0].addresses == ("0000:2b:00.0", "0000:2b:00.1", "0000:2b:00.2", "0000:2b:00.3")


def test_turing_usb_function_on_xhci_makes_the_group_not_viable(node, pci_ids):
    turing(node, usb_driver="xhci_hcd")
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {}
    g = group(inv, "14")
    assert not g.viable and not g.offered
    assert len(g.reasons) == 1
    assert "0000:2b:00.2" in g.reasons[0] and "xhci_hcd" in g.reasons[0]
    assert "run `vfio-device-plugin bind 0000:2b:00.2`: it binds the whole IOMMU group" in g.reasons[0]


def test_root_port_on_pcieport_inside_the_gpu_group_is_viable(node, pci_ids):
    node.add(Fn("0000:00:01.0", "8086", "1901", "060400", "pcieport", "1"))
    node.add_all(gpu("0000:01:00.0", "1401", "0fba", "1"))
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {"nvidia.com/GM206": ["0000:01:00.0"]}


def test_a_bridge_on_a_driver_that_manages_dma_blocks(node, pci_ids):
    # Linux >= 5.19 only lets pcieport (driver_managed_dma) stay on a bridge in a user-owned group
    node.add(Fn("0000:00:1c.0", "8086", "a338", "060400", "shpchp", "1"))
    node.add_all(gpu("0000:01:00.0", "1401", "0fba", "1"))
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {}
    assert "0000:00:1c.0 (8086:a338 PCI bridge) is bound to host driver shpchp" in group(inv, "1").reasons[0]


def test_a_non_bridge_on_pcieport_still_blocks(node, pci_ids):
    node.add(Fn("0000:00:01.0", "8086", "1901", "088000", "pcieport", "1"))
    node.add_all(gpu("0000:01:00.0", "1401", "0fba", "1"))
    assert offered(inventory_of(node, pci_ids)) == {}


def test_two_gpus_in_one_group_are_two_devices_that_know_their_mate(node, pci_ids):
    node.add(Fn("0000:12:00.0", "10de", "2330", "030200", "vfio-pci", "29"))
    node.add(Fn("0000:11:00.0", "10de", "2330", "030200", "vfio-pci", "29"))
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {"nvidia.com/GH100": ["0000:11:00.0", "0000:12:00.0"]}
    a, b = inv.devices["nvidia.com/GH100"]
    assert a.addresses == b.addresses == ("0000:11:00.0", "0000:12:00.0") and a.group == b.group == "29"
    assert (a.mates, b.mates) == (("0000:12:00.0",), ("0000:11:00.0",))
    g = group(inv, "29")
    assert g.primary == "0000:11:00.0" and g.devices == ("0000:11:00.0", "0000:12:00.0")
    assert any("holds 2 GPUs" in n and "ACS" in n for n in g.notes)


def test_a_gpu_of_a_shared_group_that_is_not_on_vfio_is_unhealthy_alone(node, pci_ids):
    node.add(Fn("0000:11:00.0", "10de", "2330", "030200", "vfio-pci", "29"))
    node.add(Fn("0000:12:00.0", "10de", "2330", "030200", None, "29"))
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {"nvidia.com/GH100": ["0000:11:00.0"]}
    bad = inv.devices["nvidia.com/GH100"][1]
    assert not bad.healthy and "0000:12:00.0 (10de:2330 3D controller) is bound to no driver" in bad.reason


def test_amd_gpu_is_named_under_amd_com(node, pci_ids):
    node.add_all(gpu("0000:03:00.0", "73df", "ab28", "15", vendor="1002"))
    assert offered(inventory_of(node, pci_ids)) == {"amd.com/NAVI_22": ["0000:03:00.0"]}


def test_gpu_sharing_a_chipset_group_with_host_devices_is_not_viable(node, pci_ids):
    node.add_all(
        [
            Fn("0000:02:00.1", "1022", "43c8", "010601", "ahci", "15"),
            Fn("0000:02:00.2", "1022", "43c6", "060400", "pcieport", "15"),
            Fn("0000:05:00.0", "10ec", "8125", "020000", "r8169", "15"),
            *gpu("0000:06:00.0", "128b", "0e0f", "15"),
        ]
    )
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {}
    reasons = " ".join(group(inv, "15").reasons)
    assert "0000:02:00.1" in reasons and "ahci" in reasons
    assert "0000:05:00.0" in reasons and "r8169" in reasons
    assert "0000:02:00.2" not in reasons  # the bridge on pcieport is fine


def test_no_iommu_offers_nothing_and_says_so(tmp_path, pci_ids):
    node = FakeNode(tmp_path).host(iommu=None)
    node.add_all([Fn(f.address, f.vendor, f.device, f.class_code, f.driver, None) for f in gpu("0000:01:00.0", "2484", "228b", "13")])
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {} and inv.groups == ()
    assert not inv.host.iommu_enabled
    assert any("IOMMU is off" in n and "intel_iommu=on" in n for n in inv.notes)
    assert [f.address for f in inv.ungrouped] == ["0000:01:00.0", "0000:01:00.1"]


def test_primary_with_no_driver_is_not_offered(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", driver=None))
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {}
    g = group(inv, "13")
    assert g.viable and "bound to no driver" in g.reasons[0]


def test_missing_dev_vfio_node_is_not_offered(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    os.unlink(node.dev / "vfio" / "13")
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {}
    assert "/dev/vfio/13 is missing" in group(inv, "13").reasons[0]


def test_no_iommu_mode_is_named(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    os.rename(node.dev / "vfio" / "13", node.dev / "vfio" / "noiommu-13")
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {}
    assert "VFIO no-IOMMU mode (/dev/vfio/noiommu-13)" in group(inv, "13").reasons[0]


@pytest.mark.parametrize("driver", ["nvgrace_gpu_vfio_pci", "xe-vfio-pci", "pds_vfio_pci"])
def test_vfio_pci_variant_drivers_count_as_vfio(node, pci_ids, driver):
    node.add(Fn("0000:09:01.0", "10de", "2330", "030200", driver, "40"))
    node.sync_devnode("40")
    assert offered(inventory_of(node, pci_ids)) == {"nvidia.com/GH100": ["0000:09:01.0"]}


def test_a_root_complex_event_collector_on_pcieport_is_allowed(node, pci_ids):
    node.add(Fn("0000:00:1f.7", "8086", "09a9", "080700", "pcieport", "1"))
    node.add_all(gpu("0000:01:00.0", "1401", "0fba", "1"))
    assert offered(inventory_of(node, pci_ids)) == {"nvidia.com/GM206": ["0000:01:00.0"]}


def test_pci_stub_and_unbound_siblings_keep_the_group_viable(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", audio_driver="pci-stub"))
    node.add(Fn("0000:01:00.2", "10de", "1ad8", "0c0330", None, "13"))
    assert offered(inventory_of(node, pci_ids)) == {"nvidia.com/GA104": ["0000:01:00.0"]}


def test_vfio_bound_nvme_is_reported_until_a_rule_selects_it(node, pci_ids):
    node.add(Fn("0000:02:00.0", "144d", "a808", "010802", "vfio-pci", "19"))
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {}
    assert 'add the config rule {class: "0108"}' in group(inv, "19").reasons[0]
    config = parse_config({"rules": [{"class": "0108"}]})
    inv = inventory_of(node, pci_ids, config)
    assert offered(inv) == {"samsung.com/NVME_SSD_CONTROLLER_SM981_PM981_PM983": ["0000:02:00.0"]}
    assert group(inv, "19").selected_by == "config rule 0 (class=0108)"


def test_extra_classes_and_exclude_rules(node, pci_ids):
    node.add(Fn("0000:41:00.0", "15b3", "101d", "020000", "vfio-pci", "30"))
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    node.add_all(gpu("0000:02:00.0", "2484", "228b", "14"))
    config = parse_config({"classes": ["03", "02"], "rules": [{"address": "0000:02:00.1", "exclude": True}]})
    inv = inventory_of(node, pci_ids, config)
    assert offered(inv) == {"mellanox.com/MT2892_FAMILY": ["0000:41:00.0"], "nvidia.com/GA104": ["0000:01:00.0"]}
    assert group(inv, "14").reasons == ("excluded by config rule 0 (address=0000:02:00.1)",)


def test_config_rule_renames_and_pools_two_device_ids(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    node.add_all(gpu("0000:02:00.0", "2486", "228b", "14"))
    config = parse_config({"rules": [{"vendor": "10de", "class": "03", "resource": "nvidia.com/ampere"}]})
    inv = inventory_of(node, pci_ids, config)
    assert offered(inv) == {"nvidia.com/ampere": ["0000:01:00.0", "0000:02:00.0"]}
    assert inv.pools == {"nvidia.com/ampere": ("10de:2484", "10de:2486"), "nvidia.com/ampere_AUDIO": ("10de:228b",)}
    # without the rule both GA104 variants share the short name, and the pool says so
    assert inventory_of(node, pci_ids).pools["nvidia.com/GA104"] == ("10de:2484", "10de:2486")


def test_full_naming_matches_nvidia_plugin_names(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    inv = inventory_of(node, pci_ids, parse_config({"naming": "full"}))
    assert offered(inv) == {"nvidia.com/GA104_GEFORCE_RTX_3070": ["0000:01:00.0"]}


def test_unknown_device_id_falls_back_and_says_so(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "9999", None, "13"))
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {"nvidia.com/9999": ["0000:01:00.0"]}
    assert "fallback to the device id" in (group(inv, "13").naming or "")


def test_boot_vga_and_numa_are_read(node, pci_ids):
    node.add(Fn("0000:00:02.0", "8086", "4680", "030000", "vfio-pci", "2", numa_node=1, boot_vga=True))
    fn = SysfsScanner(str(node.sys), str(node.dev)).scan().functions[0]
    assert (fn.boot_vga, fn.numa_node, fn.driver, fn.iommu_group) == (True, 1, "vfio-pci", "2")


@pytest.mark.parametrize(
    ("attr", "value", "reason"),
    [
        ("vendor", "0xZZZZ\n", "garbled sysfs attribute(s): vendor"),
        ("class", "", "garbled sysfs attribute(s): class"),
        ("device", "0x12345\n", "garbled sysfs attribute(s): device"),
        ("numa_node", "zero\n", "garbled numa_node"),
    ],
)
def test_garbled_files_skip_only_that_function(node, pci_ids, attr, value, reason):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    node.add_all(gpu("0000:02:00.0", "2484", "228b", "14"))
    node.write_attr("0000:02:00.0", attr, value)
    inv = inventory_of(node, pci_ids)
    assert [(p.address, reason in p.reason) for p in inv.problems] == [("0000:02:00.0", True)]
    assert offered(inv)["nvidia.com/GA104"] == ["0000:01:00.0"]


def test_missing_files_dangling_links_and_odd_group_names_are_reported(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    node.add(Fn("0000:03:00.0", "10de", "2484", "030000", "vfio-pci", "15"))
    os.unlink(node.device_dir("0000:03:00.0") / "vendor")
    os.unlink(node.device_dir("0000:03:00.0") / "uevent")
    node.add(Fn("0000:04:00.0", "10de", "2484", "030000", "vfio-pci", None))
    (node.device_dir("0000:04:00.0") / "iommu_group").symlink_to("../../../kernel/iommu_groups/99")
    node.add(Fn("0000:05:00.0", "10de", "2484", "030000", "vfio-pci", None))
    (node.device_dir("0000:05:00.0") / "iommu_group").symlink_to("../../../kernel/iommu_groups/abc")
    os.symlink("nowhere", node.sys / "bus" / "pci" / "devices" / "garbage")
    inv = inventory_of(node, pci_ids)
    problems = {p.address: p.reason for p in inv.problems}
    assert "vendor" in problems["0000:03:00.0"]
    assert "dangling" in problems["0000:04:00.0"]
    assert "odd group name 'abc'" in problems["0000:05:00.0"]
    assert "not a PCI address" in problems["garbage"]
    assert offered(inv) == {"nvidia.com/GA104": ["0000:01:00.0"]}


def test_uevent_and_attribute_files_give_the_same_records(tmp_path):
    fns = [*gpu("0000:01:00.0", "2484", "228b", "13", numa_node=1), Fn("0000:00:01.0", "8086", "1901", "060400", "pcieport", "13")]
    with_uevent = FakeNode(tmp_path / "a").host().add_all(fns)
    files_only = FakeNode(tmp_path / "b", uevent=False).host().add_all(fns)
    assert not (files_only.device_dir("0000:01:00.0") / "uevent").exists()
    a = SysfsScanner(str(with_uevent.sys), str(with_uevent.dev)).scan().functions
    b = SysfsScanner(str(files_only.sys), str(files_only.dev)).scan().functions
    assert a == b and a[1].class_code == "030000" and a[0].class_code == "060400"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DRIVER=vfio-pci\nPCI_CLASS=30000\nPCI_ID=10DE:2484\nPCI_SUBSYS_ID=1458:4037\n", ("10de", "2484", "030000", "1458", "4037")),
        ("PCI_CLASS=10802\nPCI_ID=144D:A808\n", ("144d", "a808", "010802", "0000", "0000")),
        ("PCI_CLASS=30000\nPCI_ID=10DE\n", None),
        ("PCI_CLASS=3000000\nPCI_ID=10DE:2484\n", None),
        ("", None),
    ],
)
def test_uevent_parsing(text, expected):
    assert parse_uevent(text) == expected


def test_rescan_uses_cache_but_sees_a_replaced_device(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    scanner = SysfsScanner(str(node.sys), str(node.dev))
    assert scanner.scan().functions[0].device == "2484"
    node.remove("0000:01:00.0")
    node.add(Fn("0000:01:00.0", "10de", "2486", "030000", "vfio-pci", "13"))
    assert scanner.scan().functions[0].device == "2486"


def test_iommufd_char_devices_are_discovered(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    node.add_vfio_cdev("0000:01:00.0", "vfio0")
    node.add_vfio_cdev("0000:01:00.1", "vfio1")
    inv = inventory_of(node, pci_ids)
    assert inv.host.iommufd
    assert inv.devices["nvidia.com/GA104"][0].vfio_cdevs == ("vfio0", "vfio1")


def test_a_minimal_tree_without_driver_and_group_directories_is_still_read(tmp_path, pci_ids):
    """Links whose targets a tree builder never created are read by name, not thrown away."""
    node = FakeNode(tmp_path).host()
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    shutil.rmtree(node.sys / "bus" / "pci" / "drivers")
    shutil.rmtree(node.sys / "kernel" / "iommu_groups")
    inv = inventory_of(node, pci_ids)
    assert inv.problems == () and inv.host.iommu_groups == 1 and inv.host.iommu_enabled
    assert offered(inv) == {"nvidia.com/GA104": ["0000:01:00.0"]}


def test_dangling_driver_link_is_reported(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    link = node.device_dir("0000:01:00.1") / "driver"
    link.unlink()
    link.symlink_to("../../../bus/pci/drivers/ghost")
    inv = inventory_of(node, pci_ids)
    assert [(p.address, "dangling" in p.reason and "ghost" in p.reason, p.iommu_group) for p in inv.problems] == [
        ("0000:01:00.1", True, "13")
    ]
    # the GPU is readable, but its group holds a function nobody can vouch for: not offered
    g = group(inv, "13")
    assert not g.viable and not g.offered
    assert "0000:01:00.1 in this group could not be read" in g.reasons[0]


# --- companions: the card's own audio/USB/UCSI functions ------------------------------------------
def tokens(inv: Inventory) -> dict[str, list[tuple[str, str]]]:
    """companion resource -> [(token id, owner)] of healthy tokens."""
    out = {r: [(d.id, d.owner) for d in devs if d.role and d.healthy] for r, devs in inv.devices.items()}
    return {r: t for r, t in out.items() if t}


def test_two_ga104_cards_offer_two_audio_tokens_owned_by_their_gpus(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13") + gpu("0000:02:00.0", "2484", "228b", "14"))
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {"nvidia.com/GA104": ["0000:01:00.0", "0000:02:00.0"]}
    assert tokens(inv) == {"nvidia.com/GA104_AUDIO": [("0000:01:00.1", "0000:01:00.0"), ("0000:02:00.1", "0000:02:00.0")]}
    gpu1 = inv.devices["nvidia.com/GA104"][0]
    assert gpu1.companions == (("audio", "0000:01:00.1"),)
    assert group(inv, "13").companions == (("0000:01:00.0", "audio", "0000:01:00.1", "nvidia.com/GA104_AUDIO"),)


def test_turing_with_every_role_offers_three_companion_resources(node, pci_ids):
    turing(node)
    inv = inventory_of(node, pci_ids, parse_config({"companions": ["audio", "usb", "serial"]}))
    assert tokens(inv) == {
        "nvidia.com/TU104_AUDIO": [("0000:2b:00.1", "0000:2b:00.0")],
        "nvidia.com/TU104_SERIAL": [("0000:2b:00.3", "0000:2b:00.0")],
        "nvidia.com/TU104_USB": [("0000:2b:00.2", "0000:2b:00.0")],
    }
    assert tokens(inventory_of(node, pci_ids)) == {"nvidia.com/TU104_AUDIO": [("0000:2b:00.1", "0000:2b:00.0")]}


def test_no_companions_configured_offers_none(node, pci_ids):
    turing(node)
    inv = inventory_of(node, pci_ids, parse_config({"companions": []}))
    assert tokens(inv) == {} and list(inv.devices) == ["nvidia.com/TU104"]
    assert inv.devices["nvidia.com/TU104"][0].companions == ()


def test_a_chipset_usb_controller_sharing_the_group_is_never_a_companion(node, pci_ids):
    node.add_all(
        [
            Fn("0000:02:00.0", "1022", "43ee", "0c0330", "vfio-pci", "13"),
            Fn("0000:02:00.2", "1022", "43e9", "060400", "pcieport", "13"),
            *gpu("0000:04:00.0", "128b", "0e0f", "13"),
        ]
    )
    inv = inventory_of(node, pci_ids, parse_config({"companions": ["audio", "usb"]}))
    assert offered(inv) == {"nvidia.com/GK208B": ["0000:04:00.0"]}
    assert tokens(inv) == {"nvidia.com/GK208B_AUDIO": [("0000:04:00.1", "0000:04:00.0")]}


def test_an_acs_split_audio_function_is_its_own_group_not_a_companion(node, pci_ids):
    node.add(Fn("0000:08:00.0", "1002", "73df", "030000", "vfio-pci", "18"))
    node.add(Fn("0000:08:00.1", "1002", "ab28", "040300", "vfio-pci", "19"))
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {"amd.com/NAVI_22": ["0000:08:00.0"]} and tokens(inv) == {}
    note = " ".join(group(inv, "18").notes)
    assert "0000:08:00.1 sits in its own IOMMU group 19" in note and "not a companion" in note
    # offered on its own by a rule, it is a device of its own, not a token
    inv = inventory_of(node, pci_ids, parse_config({"rules": [{"class": "0403"}]}))
    assert offered(inv)["amd.com/NAVI_21_23_HDMI_DP_AUDIO_CONTROLLER"] == ["0000:08:00.1"]


def test_an_audio_function_on_no_driver_is_not_a_companion_and_says_why(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", audio_driver=None))
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {"nvidia.com/GA104": ["0000:01:00.0"]} and tokens(inv) == {}
    assert any("0000:01:00.1 is on no driver" in n for n in group(inv, "13").notes)


def test_companion_tokens_follow_their_gpus_health(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    os.unlink(node.dev / "vfio" / "13")
    inv = inventory_of(node, pci_ids)
    (token,) = inv.devices["nvidia.com/GA104_AUDIO"]
    assert not token.healthy and token.reason == inv.devices["nvidia.com/GA104"][0].reason


def test_companion_names_stay_valid_when_the_base_is_long(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    inv = inventory_of(node, pci_ids, parse_config({"rules": [{"device": "2484", "resource": "nvidia.com/" + "A" * 63}]}))
    (name,) = [r for r in inv.devices if r.endswith("_AUDIO")]
    assert name == "nvidia.com/" + "A" * 57 + "_AUDIO"


# --- SR-IOV: a VF that shares its group with its PF --------------------------------------------------
def x710_with_vfs(node: FakeNode) -> None:
    node.add(Fn("0000:3b:00.0", "8086", "1572", "020000", "i40e", "40"))
    node.add(Fn("0000:3b:02.0", "8086", "154c", "020000", "vfio-pci", "40", physfn="0000:3b:00.0"))
    node.add(Fn("0000:3b:02.1", "8086", "154c", "020000", "iavf", "40", physfn="0000:3b:00.0"))


def test_a_vf_sharing_its_group_with_a_pf_in_use_is_explained_never_unbind_the_pf(node, pci_ids):
    x710_with_vfs(node)
    inv = inventory_of(node, pci_ids, parse_config({"rules": [{"vendor": "8086", "device": "154c"}]}))
    assert offered(inv) == {}
    text = " ".join(group(inv, "40").reasons)
    assert "0000:3b:00.0 (8086:1572 Ethernet) is the SR-IOV physical function of 0000:3b:02.0, 0000:3b:02.1" in text
    assert "Do not unbind the PF" in text
    assert "bind 0000:3b:00.0" not in text  # the destructive advice of before
    # the VF still on iavf is an ordinary blocker with the ordinary fix
    assert "0000:3b:02.1 (8086:154c Ethernet) is bound to host driver iavf" in text and "bind 0000:3b:02.1" in text


def test_vfs_read_their_pf_from_sysfs(node, pci_ids):
    x710_with_vfs(node)
    fns = {fn.address: fn for fn in SysfsScanner(str(node.sys), str(node.dev)).scan().functions}
    assert fns["0000:3b:02.0"].physfn == "0000:3b:00.0" and fns["0000:3b:00.0"].physfn is None
    assert os.readlink(node.device_dir("0000:3b:00.0") / "virtfn1").endswith("0000:3b:02.1")


@pytest.mark.parametrize(
    "text",
    [
        "PCI_ID=10DE:2484\nPCI_CLASS=30000\nPCI_SUBSYS_ID=1458:4037\n",  # not the kernel's order: each line on its own
        "PCI_CLASS=30000\nPCI_ID=10DE:2484\nPCI_SUBSYS_ID=1458:4037\nPCI_SLOT_NAME=0000:01:00.0\n",
        "DRIVER=vfio-pci\nPCI_CLASS=30000\nPCI_ID=10DE:2484\nPCI_SUBSYS_ID=1458:4037\nPCI_SLOT_NAME=0000:01:00.0\nMODALIAS=pci:v000010DEd00002484\n",
    ],
)
def test_uevent_lines_in_any_order(text):
    assert parse_uevent(text) == ("10de", "2484", "030000", "1458", "4037")


def test_a_one_shot_scan_reads_the_same_records_on_a_nested_tree_with_every_attribute(tmp_path):
    """FakeNode(full=True) nests functions below their bridges and writes every file a real node has."""
    node = FakeNode(tmp_path / "n", full=True).host()
    node.add_all(
        [
            Fn("0000:00:01.0", "8086", "347a", "060400", "pcieport", "1"),
            Fn("0000:01:00.0", "10de", "2484", "030000", "vfio-pci", "13", 1, boot_vga=False, parent="0000:00:01.0"),
            Fn("0000:01:00.1", "10de", "228b", "040300", "vfio-pci", "13", 1, parent="0000:00:01.0"),
            Fn("0000:02:00.0", "8086", "10fb", "020000", "ixgbe", "14", parent="0000:00:01.0"),
            Fn("0000:02:10.0", "8086", "10ed", "020000", "vfio-pci", "15", physfn="0000:02:00.0", parent="0000:00:01.0"),
        ]
    )
    gpu_dir = node.sys / "devices/pci0000:00/0000:00:01.0/0000:01:00.0"
    assert {"config", "resource", "irq", "local_cpus", "enable", "modalias", "power", "msi_irqs"} <= set(os.listdir(gpu_dir))
    assert os.readlink(gpu_dir / "iommu_group") == "../../../../kernel/iommu_groups/13"
    cached = SysfsScanner(str(node.sys), str(node.dev))
    first = cached.scan()
    once = SysfsScanner(str(node.sys), str(node.dev), once=True).scan()
    assert once == first and cached.scan() == first
    vf = next(f for f in once.functions if f.address == "0000:02:10.0")
    assert (vf.physfn, vf.iommu_group, vf.driver) == ("0000:02:00.0", "15", "vfio-pci")
    gpu_fn = once.functions[1]
    assert (gpu_fn.address, gpu_fn.class_code, gpu_fn.numa_node, gpu_fn.driver) == ("0000:01:00.0", "030000", 1, "vfio-pci")
