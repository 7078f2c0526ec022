"""Discovery against IOMMU layouts of real machines (shared/real-iommu-layouts), laid out as fake sysfs.

Each case binds the groups an operator would pass through to vfio-pci (everything else keeps a host
driver, or the driver the listing gives) and checks what is offered and what is said about the rest.
"""

from __future__ import annotations

import pytest
from conftest import inventory_of
from layouts import Listed, build, layout_path, parse_listing

from deviceplugin.config import parse_config


def load(name: str) -> list[Listed]:
    return parse_listing(layout_path(name).read_text(encoding="utf-8"))


def offered(inv):
    """GPUs (and other primary devices) offered as Healthy; companion tokens are counted by `tokens`."""
    out = {r: [d.id for d in devs if d.healthy and not d.role] for r, devs in inv.devices.items()}
    return {r: ids for r, ids in out.items() if ids}


def tokens(inv):
    """companion resource -> [(token, its GPU)] offered as Healthy."""
    out = {r: [(d.id, d.owner) for d in devs if d.healthy and d.role] for r, devs in inv.devices.items()}
    return {r: t for r, t in out.items() if t}


def group_of(listing: list[Listed], address: str) -> str:
    return next(i.group for i in listing if i.address == address)


def reasons(inv, gid: str) -> str:
    return " ".join(next(g for g in inv.groups if g.id == gid).reasons)


CASES = [
    # (file, groups to bind to vfio-pci, expected offer)
    ("01-asus-z690-i7-12700k-rtx3090.txt", {"18"}, {"nvidia.com/GA102": ["0000:01:00.0"]}),
    ("02-msi-b550m-mortar-rtx2070super-gt710.txt", {"14"}, {"nvidia.com/TU104": ["0000:2b:00.0"]}),
    ("03-msi-b450m-mortar-max-gtx960-hd7450.txt", {"12"}, {"nvidia.com/GM206": ["0000:26:00.0"]}),
    (
        "04-gigabyte-x570-aorus-pro-wifi-3900x-gtx1080ti-gt710.txt",
        {"30", "31"},
        {"nvidia.com/GK208B": ["0000:0c:00.0"], "nvidia.com/GP102": ["0000:0b:00.0"]},
    ),
    ("05-gigabyte-b550-aorus-pro-3900x-rx6950xt-rx550.txt", {"18", "19"}, {"amd.com/NAVI_21": ["0000:08:00.0"]}),
    (
        "09-hgx-h100-8gpu-nvswitch.txt",
        {"17", "18", "29", "49", "50", "58", "86", "87", "88", "89"},
        {
            "nvidia.com/GH100": [
                "0000:11:00.0",
                "0000:12:00.0",
                "0000:41:00.0",
                "0000:44:00.0",
                "0000:86:00.0",
                "0000:87:00.0",
                "0000:bb:00.0",
                "0000:be:00.0",
            ]
        },
    ),
    ("extras/x1-msi-b450m-mortar-raven-ridge-rx580.txt", {"8"}, {"amd.com/ELLESMERE": ["0000:10:00.0"]}),
    ("extras/x2-asrock-z170-itx-gtx960.txt", {"1"}, {"nvidia.com/GM206": ["0000:01:00.0"]}),
    ("extras/x4-amd-400series-gt720-rtx2080ti-chipset-shared-partial.txt", {"16"}, {"nvidia.com/TU102": ["0000:07:00.0"]}),
]


@pytest.mark.parametrize(("name", "vfio", "expected"), CASES, ids=[c[0].split("-")[0].split("/")[-1] for c in CASES])
def test_real_layout_offers_exactly_the_passed_through_gpus(node, pci_ids, name, vfio, expected):
    listing = load(name)
    assert len(listing) >= 4, "the parser lost the listing"
    build(node, listing, vfio)
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == expected
    assert inv.problems == ()
    offered_groups = {g.id for g in inv.groups if g.offered}
    for gid in offered_groups:  # every function of an offered group travels with it
        assert {fn.address for fn in next(g for g in inv.groups if g.id == gid).functions} == {i.address for i in listing if i.group == gid}


def test_z690_igpu_on_i915_is_not_offered_and_says_why(node, pci_ids):
    build(node, load("01-asus-z690-i7-12700k-rtx3090.txt"), {"18"})
    assert "0000:00:02.0 (8086:4680 VGA) is bound to host driver i915" in reasons(inventory_of(node, pci_ids), "2")


def test_turing_four_functions_travel_together(node, pci_ids):
    build(node, load("02-msi-b550m-mortar-rtx2070super-gt710.txt"), {"14"})
    device = inventory_of(node, pci_ids).devices["nvidia.com/TU104"][0]
    assert device.addresses == ("0000:2b:00.0", "0000:2b:00.1", "0000:2b:00.2", "0000:2b:00.3")


@pytest.mark.parametrize(
    ("name", "gpu", "host_blockers"),
    [
        ("02-msi-b550m-mortar-rtx2070super-gt710.txt", "0000:04:00.0", ["r8169"]),
        ("03-msi-b450m-mortar-max-gtx960-hd7450.txt", "0000:25:00.0", ["ahci", "xhci_hcd", "r8169"]),
        ("05-gigabyte-b550-aorus-pro-3900x-rx6950xt-rx550.txt", "0000:04:00.0", ["r8169"]),
        ("extras/x4-amd-400series-gt720-rtx2080ti-chipset-shared-partial.txt", "0000:06:00.0", ["ahci", "xhci_hcd", "r8169"]),
    ],
)
def test_gpu_in_a_chipset_group_is_not_viable_even_with_its_own_functions_on_vfio(node, pci_ids, name, gpu, host_blockers):
    listing = load(name)
    gid = group_of(listing, gpu)
    gpu_fns = {i.address for i in listing if i.address[:-1] == gpu[:-1]}
    build(node, listing, {gid}, keep_host={i.address for i in listing if i.group == gid and i.address not in gpu_fns})
    inv = inventory_of(node, pci_ids)
    g = next(g for g in inv.groups if g.id == gid)
    assert not g.viable and not g.offered
    text = " ".join(g.reasons)
    for driver in host_blockers:
        assert f"host driver {driver}" in text
    assert "pcieport" not in text  # the chipset's bridges are not to blame


def test_navi_audio_in_its_own_group_is_explained_as_part_of_the_card(node, pci_ids):
    build(node, load("05-gigabyte-b550-aorus-pro-3900x-rx6950xt-rx550.txt"), {"18", "19"})
    inv = inventory_of(node, pci_ids)
    text = reasons(inv, "19")
    assert "0000:08:00.1 (1002:ab28 Audio) is a function of the card at 0000:08:00.0 but sits in its own IOMMU group" in text
    assert "a VM gets 0000:08:00.0 alone" in text and '{class: "0403"}' in text
    # and the GPU's side says its audio is not a companion, rather than pretending it is
    gpu_notes = " ".join(next(g for g in inv.groups if g.id == "18").notes)
    assert "0000:08:00.1 sits in its own IOMMU group 19 (ACS split), so it is not a companion of 0000:08:00.0" in gpu_notes
    assert tokens(inv) == {}


def test_before_acs_override_the_gpu_shares_a_group_with_the_fpga(node, pci_ids):
    build(node, load("07-gigabyte-z390-i9-9900k-alveo-u200-rtx3060ti-before-acs-override.txt"), set())
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {}
    text = reasons(inv, "1")
    assert "0000:02:00.0 (10de:2489 VGA) is bound to host driver nvidia" in text
    assert "0000:02:00.1 (10de:228b Audio) is bound to host driver snd_hda_intel" in text


def test_after_acs_override_vga_and_audio_split_and_the_fpga_is_offered_by_rule(node, pci_ids):
    listing = load("08-gigabyte-z390-i9-9900k-alveo-u200-rtx3060ti-after-acs-override.txt")
    build(node, listing, set())
    inv = inventory_of(node, pci_ids)
    assert offered(inv) == {}
    assert 'add the config rule {class: "1200"}' in reasons(inv, "12")
    inv = inventory_of(node, pci_ids, parse_config({"rules": [{"vendor": "10ee", "resource": "xilinx.com/alveo-u200"}]}))
    assert offered(inv) == {"xilinx.com/alveo-u200": ["0000:01:00.0", "0000:01:00.1"]}
    assert inv.pools["xilinx.com/alveo-u200"] == ("10ee:5000", "10ee:5001")


def test_hgx_nvswitch_needs_a_rule_and_short_names_would_pool_it_with_the_gpus(node, pci_ids):
    listing = load("09-hgx-h100-8gpu-nvswitch.txt")
    build(node, listing, {i.group for i in listing})
    inv = inventory_of(node, pci_ids)
    assert 'add the config rule {class: "0680"}' in reasons(inv, "86")
    first, second = inv.devices["nvidia.com/GH100"][:2]
    assert first.addresses == second.addresses == ("0000:11:00.0", "0000:12:00.0") and first.group == second.group == "29"
    pooled = inventory_of(node, pci_ids, parse_config({"rules": [{"class": "0680"}]}))
    assert pooled.pools == {"nvidia.com/GH100": ("10de:22a3", "10de:2330")}
    named = inventory_of(node, pci_ids, parse_config({"rules": [{"class": "0680", "resource": "nvidia.com/nvswitch"}]}))
    assert len(offered(named)["nvidia.com/nvswitch"]) == 4 and len(offered(named)["nvidia.com/GH100"]) == 8


AUDIO_TOKENS = [
    ("01-asus-z690-i7-12700k-rtx3090.txt", {"18"}, {"nvidia.com/GA102_AUDIO": [("0000:01:00.1", "0000:01:00.0")]}),
    ("04-gigabyte-x570-aorus-pro-wifi-3900x-gtx1080ti-gt710.txt", {"30", "31"}, None),
    ("05-gigabyte-b550-aorus-pro-3900x-rx6950xt-rx550.txt", {"18", "19"}, {}),
    ("09-hgx-h100-8gpu-nvswitch.txt", {"17", "18", "29", "58"}, {}),
]


@pytest.mark.parametrize(("name", "vfio", "expected"), AUDIO_TOKENS, ids=[c[0].split("-")[0] for c in AUDIO_TOKENS])
def test_real_layouts_offer_each_card_its_own_audio(node, pci_ids, name, vfio, expected):
    listing = load(name)
    build(node, listing, vfio)
    inv = inventory_of(node, pci_ids)
    found = tokens(inv)
    if expected is not None:
        assert found == expected
    for resource, pairs in found.items():  # every token is a function of its own GPU's card, in its group
        for token, gpu in pairs:
            assert token[:-1] == gpu[:-1] and group_of(listing, token) == group_of(listing, gpu), resource


def test_turing_four_function_card_offers_three_companion_resources(node, pci_ids):
    build(node, load("02-msi-b550m-mortar-rtx2070super-gt710.txt"), {"14"})
    inv = inventory_of(node, pci_ids, parse_config({"companions": ["audio", "usb", "serial"]}))
    assert tokens(inv) == {
        "nvidia.com/TU104_AUDIO": [("0000:2b:00.1", "0000:2b:00.0")],
        "nvidia.com/TU104_SERIAL": [("0000:2b:00.3", "0000:2b:00.0")],
        "nvidia.com/TU104_USB": [("0000:2b:00.2", "0000:2b:00.0")],
    }


def test_a40_sriov_virtual_functions_are_32_devices_and_mdev_lines_are_ignored(node, pci_ids):
    listing = load("11-nvidia-a40-sriov-vgpu-vfs-mdev.txt")
    assert len(listing) == 32
    build(node, listing, {i.group for i in listing})
    inv = inventory_of(node, pci_ids)
    assert len(offered(inv)["nvidia.com/GA102GL"]) == 32
