"""Resource names: pci.ids parsing, short/full styles, vendor domains, validity and socket paths."""

from __future__ import annotations

import os

import pytest

from deviceplugin.naming import (
    MAX_SOCKET_PATH,
    auto_name,
    clamp_name,
    env_var_name,
    full_name,
    load_pci_ids,
    parse_pci_ids,
    resource_name_error,
    short_name,
    socket_name,
    vendor_domain,
)


@pytest.mark.parametrize(
    ("device_name", "short", "full"),
    [
        ("GA104 [GeForce RTX 3070]", "GA104", "GA104_GEFORCE_RTX_3070"),
        ("Navi 22 [Radeon RX 6700/6700 XT/6750 XT / 6800M/6850M XT]", "NAVI_22", "NAVI_22_RADEON_RX_6700_6700_XT_6750_XT___6800M_6850M_XT"),
        ("GA100[A100 PCIe 80GB]", "GA100", "GA100A100_PCIE_80GB"),
        ("AlderLake-S GT1", "ALDERLAKE_S_GT1", "ALDERLAKES_GT1"),
        ("TU104GL [Tesla T4]", "TU104GL", "TU104GL_TESLA_T4"),
        ("GP102 [GeForce GTX 1080 Ti]", "GP102", "GP102_GEFORCE_GTX_1080_TI"),
        ("Device 1234 (rev. 2)", "DEVICE_1234_REV_2", "DEVICE_1234_REV__2"),  # full keeps runs, as NVIDIA does
    ],
)
def test_short_and_full_styles(device_name, short, full):
    assert short_name(device_name) == short
    assert full_name(device_name) == full


def test_pci_ids_parser_reads_vendors_and_devices_and_stops_at_classes(pci_ids):
    assert pci_ids.vendor_name("10de") == "NVIDIA Corporation"
    assert pci_ids.device_name("10de", "2484") == "GA104 [GeForce RTX 3070]"
    assert pci_ids.device_name("10de", "1458") is None  # a subsystem line is not a device
    db = parse_pci_ids("# c\n10DE  NVIDIA\n\t2484  GA104 [x]\n\t\t1458 4037  sub\n1af4  Red Hat\nC 03  Display\n\t00  VGA\n")
    assert db.device_name("10de", "2484") == "GA104 [x]" and db.vendor_name("10DE") == "NVIDIA"
    assert db.device_name("10de", "1458") is None  # a subsystem line, two tabs deep
    assert db.device_name("1af4", "0000") is None and db.vendor_name("1af4") == "Red Hat"  # the block ends at the next vendor
    assert db.vendor_name("03") is None and db.device_name("03", "00") is None  # the class section is not vendors
    assert db.device_name("10de", "24841") is None and db.device_name("10de", ".*") is None  # no regex injection


def test_vendor_domains(pci_ids):
    assert vendor_domain("10de", pci_ids) == "nvidia.com"
    assert vendor_domain("1002", pci_ids) == "amd.com"
    assert vendor_domain("8086", pci_ids) == "intel.com"
    assert vendor_domain("15b3", pci_ids) == "mellanox.com"
    assert vendor_domain("144d", pci_ids) == "samsung.com"
    assert vendor_domain("abcd", pci_ids) == "pci-abcd.com"


def test_odd_entries_still_give_valid_names(pci_ids):
    bracket_only = auto_name("10de", "1db4", pci_ids, "short")
    assert bracket_only.resource == "nvidia.com/TESLA_V100_PCIE_16GB"
    assert "no chip part" in bracket_only.source
    long = auto_name("10de", "1fff", pci_ids, "full").resource
    assert len(long.split("/")[1]) <= 63 and resource_name_error(long) is None
    assert (
        auto_name("10de", "1fff", pci_ids, "short").resource == "nvidia.com/EXTREMELY_LONG_EXPERIMENTAL_ACCELERATOR_CHIP_NAME_THAT_GOES_ON"
    )


def test_unknown_and_missing_database_fall_back_to_the_device_id(pci_ids):
    assert auto_name("10de", "9999", pci_ids, "short").resource == "nvidia.com/9999"
    empty = parse_pci_ids("")
    naming = auto_name("10de", "2484", empty, "short")
    assert naming.resource == "nvidia.com/2484" and "no pci.ids database" in naming.source


def test_clamp_cuts_to_63_and_trims_separators():
    assert clamp_name("A" * 62 + "_B") == "A" * 62
    assert len(clamp_name("X" * 100)) == 63


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("nvidia.com/GA104", None),
        ("nvidia.com/GA104_GEFORCE_RTX_3070", None),
        ("GA104", "exactly one '/'"),
        ("nvidia/GA104", "must be qualified"),
        ("Nvidia.com/GA104", "DNS subdomain"),
        ("nvidia.com/_GA104", "beginning and ending alphanumeric"),
        ("nvidia.com/" + "A" * 64, "1 to 63"),
        ("kubernetes.io/gpu", "reserved"),
    ],
)
def test_resource_name_validation(name, problem):
    error = resource_name_error(name)
    assert (error is None) if problem is None else (problem in (error or ""))


def test_env_var_is_kubevirts_contract():
    assert env_var_name("nvidia.com/GA104") == "PCI_RESOURCE_NVIDIA_COM_GA104"
    assert env_var_name("devices.kubevirt.io/a.b") == "PCI_RESOURCE_DEVICES_KUBEVIRT_IO_A_B"


def test_socket_paths_stay_under_108_bytes():
    assert socket_name("nvidia.com/GA104", "/var/lib/kubelet/device-plugins") == "vfio-dp-nvidia.com_GA104.sock"
    deep = "/var/lib/kubelet/device-plugins/" + "d" * 20
    name = socket_name("example.com/" + "N" * 63, deep)
    assert len(os.path.join(deep, name).encode()) <= MAX_SOCKET_PATH
    assert name.startswith("vfio-dp-") and not name.startswith("kubevirt")


def test_lookups_as_a_case_insensitive_line_match_would_find_them():
    text = (
        "# Version: 2026.01.02\n10DE  NVIDIA\r\n\t2484  GA104 [GeForce RTX 3070]\r\n\t2AbC  Upper\r\n"
        "1002  AMD\n\t73df  Navi 22\n\t\t1002 0e36  Sub\nC 03  Display\n"
    )
    db = parse_pci_ids(text)
    assert db.version == "2026.01.02" and db.vendor_name("10de") == "NVIDIA"
    assert db.device_name("10de", "2abc") == "Upper" and db.device_name("10DE", "2484") == "GA104 [GeForce RTX 3070]"
    assert db.device_name("1002", "73df") == "Navi 22" and db.device_name("1002", "0e36") is None  # a subsystem line is not a device
    assert db.device_name("1002", "2484") is None and db.vendor_name("ffff") is None and db.vendor_name("03") is None


def test_the_first_vendor_of_the_file_and_names_that_are_not_ascii(tmp_path):
    """The file stays bytes; a name is decoded as text mode reads it (UTF-8, an undecodable byte replaced)."""
    path = tmp_path / "pci.ids"
    path.write_bytes(b"0001  SafeNet\n\t8139  AT-2500TX\n1c5c  SK hynix\n\tc935  82\xd0\xa1935 [MachOne]\n\tc936  bad \xff byte\n")
    db = load_pci_ids(str(path))
    assert db.vendor_name("0001") == "SafeNet" and db.device_name("0001", "8139") == "AT-2500TX"
    assert db.device_name("1c5c", "c935") == "82С935 [MachOne]" and db.device_name("1c5c", "c936") == "bad \ufffd byte"


def test_a_released_database_keeps_its_answers_and_reads_the_file_again_for_a_new_id(tmp_path):
    path = tmp_path / "pci.ids"
    path.write_text("10de  NVIDIA Corporation\n\t2484  GA104 [GeForce RTX 3070]\n")
    db = load_pci_ids(str(path))
    assert db.device_name("10de", "2484") == "GA104 [GeForce RTX 3070]"
    db.release()
    path.write_text("10de  NVIDIA Corporation\n\t2484  renamed\n\t2335  GH100 [H200 SXM 141GB]\n")
    assert db.device_name("10de", "2484") == "GA104 [GeForce RTX 3070]"  # a name given never changes under a running cluster
    assert db.device_name("10de", "2335") == "GH100 [H200 SXM 141GB]"  # a hot-plugged id reads the file again
    db.release()
    path.unlink()
    assert db.device_name("10de", "9999") is None and db.vendor_name("10de") == "NVIDIA Corporation"
