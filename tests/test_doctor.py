"""doctor: every check's verdict and fix on fake nodes, the exit code and the JSON document."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
from conftest import PCI_IDS_PATH, inventory_of

from deviceplugin.config import parse_config
from deviceplugin.doctor import FAIL, OK, WARN, read_node, run_checks
from deviceplugin.pool import Holdings
from deviceplugin.sim.node import FakeNode, Fn, gpu


def checks_of(node: FakeNode, pci_ids, config=None, cpu: str = "GenuineIntel", holdings=None) -> dict[str, tuple[str, str, str]]:
    (node.proc / "cpuinfo").write_text(f"vendor_id\t: {cpu}\n")
    args = argparse.Namespace(
        proc_root=str(node.proc),
        device_plugin_dir=str(node.plugins),
        sysfs_root=str(node.sys),
        kubelet_registry_dir=str(node.root / "registry"),
        driver_name="vfio-device-plugin.github.io",
    )
    checks = run_checks(inventory_of(node, pci_ids, config), read_node(args), holdings, pci_ids)
    return {c.id: (c.verdict, c.found, c.fix) for c in checks}


def test_a_good_node_passes(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    checks = checks_of(node, pci_ids)
    assert {cid: v for cid, (v, _, _) in checks.items() if v != OK} == {}
    assert "offered as nvidia.com/GA104, device ID 0000:01:00.0" in checks["group.13"][1]
    assert checks["offered"][1] == "offering nvidia.com/GA104: 1, nvidia.com/GA104_AUDIO: 1"


@pytest.mark.parametrize(("cpu", "fix"), [("GenuineIntel", "intel_iommu=on"), ("AuthenticAMD", "AMD-Vi")])
def test_iommu_off_fails_with_a_vendor_specific_fix(tmp_path, pci_ids, cpu, fix):
    node = FakeNode(tmp_path).host(iommu=None, cmdline="BOOT_IMAGE=/vmlinuz")
    verdict, found, text = checks_of(node, pci_ids, cpu=cpu)["iommu"]
    assert verdict == FAIL and "IOMMU is off" in found and fix in text


@pytest.mark.parametrize(
    ("cmdline", "check", "verdict", "text"),
    [
        ("intel_iommu=off", "cmdline.iommu", FAIL, "intel_iommu=off"),
        ("amd_iommu=off", "cmdline.iommu", FAIL, "amd_iommu=off"),
        ("quiet", "cmdline.iommu", WARN, "intel_iommu=on not on the kernel command line"),
        ("intel_iommu=on", "cmdline.iommu_pt", WARN, "iommu=pt not set"),
        ("intel_iommu=on iommu=pt", "cmdline.iommu_pt", OK, "iommu=pt"),
        ("vfio-pci.ids=10de:2484,10de:228b", "cmdline.vfio_pci_ids", OK, "vfio-pci.ids=10de:2484,10de:228b"),
        ("pcie_acs_override=downstream,multifunction", "cmdline.acs_override", WARN, "peer-to-peer DMA"),
    ],
)
def test_kernel_command_line(tmp_path, pci_ids, cmdline, check, verdict, text):
    node = FakeNode(tmp_path).host(cmdline=cmdline)
    got_verdict, found, _ = checks_of(node, pci_ids)[check]
    assert got_verdict == verdict and text in found


def test_missing_modules_and_dev_vfio(tmp_path, pci_ids):
    node = FakeNode(tmp_path).host(modules=False)
    checks = checks_of(node, pci_ids)
    assert checks["vfio-modules"][0] == FAIL and "modprobe vfio vfio-pci vfio-iommu-type1" in checks["vfio-modules"][2]
    assert checks["vfio-container"][0] == FAIL and "/dev/vfio/vfio missing" in checks["vfio-container"][1]


def test_vfio_pci_built_in_is_accepted(tmp_path, pci_ids):
    node = FakeNode(tmp_path).host()
    os.rmdir(node.sys / "module" / "vfio_pci")
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))  # creates bus/pci/drivers/vfio-pci
    assert checks_of(node, pci_ids)["vfio-modules"][0] == OK


def test_group_verdicts(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    node.add_all(gpu("0000:02:00.0", "1b06", "10ef", "14", audio_driver="snd_hda_intel"))
    node.add(Fn("0000:00:02.0", "8086", "4680", "030000", "i915", "2", boot_vga=True))
    node.add(Fn("0000:05:00.0", "144d", "a808", "010802", "vfio-pci", "20"))
    checks = checks_of(node, pci_ids)
    assert checks["group.13"][0] == OK
    verdict, found, fix = checks["group.14"]
    assert verdict == FAIL and "a VM asking for it would fail" in found
    assert "vfio-device-plugin bind 0000:02:00.1" in fix
    verdict, found, _ = checks["group.2"]
    assert verdict == OK and "no function is bound to vfio-pci (the host may be using it" in found
    verdict, found, fix = checks["group.20"]
    assert verdict == WARN and 'add the config rule {class: "0108"}' in fix


def test_poor_isolation_is_reported_before_anything_is_bound(node, pci_ids):
    node.add_all(
        [
            Fn("0000:05:00.0", "10ec", "8125", "020000", "r8169", "15"),
            *gpu("0000:06:00.0", "128b", "0e0f", "15", driver="nouveau", audio_driver="snd_hda_intel"),
        ]
    )
    verdict, found, _ = checks_of(node, pci_ids)["group.15.isolation"]
    assert verdict == WARN and "0000:05:00.0 (Ethernet, r8169)" in found


def test_poor_isolation_boot_vga_and_pooling_warn(node, pci_ids):
    node.add_all(
        [
            Fn("0000:02:00.1", "1022", "43c8", "010601", "ahci", "15"),
            Fn("0000:02:00.2", "1022", "43c6", "060400", "pcieport", "15"),
            *gpu("0000:06:00.0", "128b", "0e0f", "15"),
        ]
    )
    node.add(Fn("0000:01:00.0", "10de", "2484", "030000", "vfio-pci", "13", boot_vga=True))
    node.add(Fn("0000:03:00.0", "10de", "2486", "030000", "vfio-pci", "16"))
    checks = checks_of(node, pci_ids)
    verdict, found, fix = checks["group.15.isolation"]
    assert verdict == WARN and "0000:02:00.1 (SATA, ahci)" in found and "0000:02:00.2" not in found and "slot" in fix
    assert checks["group.13.boot_vga"][0] == WARN and "host console loses its display" in checks["group.13.boot_vga"][1]
    verdict, found, _ = checks["pool.nvidia.com/GA104"]
    assert verdict == WARN and "10de:2484, 10de:2486" in found


@pytest.mark.parametrize(
    ("naming", "socket"),
    [("short", "kubevirt-nvidia.com-GA104.sock"), ("full", "kubevirt-GA104_GEFORCE_RTX_3070.sock")],
)
def test_another_plugin_publishing_our_resource_fails(node, pci_ids, naming, socket):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    (node.plugins / socket).touch()
    (node.plugins / "kubevirt-kvm.sock").touch()
    checks = checks_of(node, pci_ids, parse_config({"naming": naming}))
    conflict = next(v for k, v in checks.items() if k.startswith("conflict."))
    assert conflict[0] == FAIL and socket in conflict[1] and "flips" in conflict[1]
    assert "externalResourceProvider: true" in conflict[2]


@pytest.mark.parametrize(
    ("naming", "socket"),
    [
        ("short", "kubevirt-GA104_GEFORCE_RTX_3070.sock"),  # NVIDIA's plugin, full names, while we use short ones
        ("full", "kubevirt-GA104.sock"),
        ("short", "kubevirt-2484.sock"),  # its fallback when pci.ids does not know the id
    ],
)
def test_another_plugin_under_any_naming_of_our_device_fails(node, pci_ids, naming, socket):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    (node.plugins / socket).touch()
    checks = checks_of(node, pci_ids, parse_config({"naming": naming}))
    conflict = next(v for k, v in checks.items() if k.startswith("conflict."))
    assert conflict[0] == FAIL and socket in conflict[1] and "0000:01:00.0" in conflict[1] and "advertised twice" in conflict[1]
    assert "conflicts" not in checks


def test_the_kubelet_holding_our_gpu_under_another_name_fails(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    registered = Holdings(
        ok=True, allocatable={"nvidia.com/GA104": frozenset({"0000:01:00.0"}), "nvidia.com/GA104_GEFORCE_RTX_3070": frozenset({"7"})}
    )
    conflict = checks_of(node, pci_ids, holdings=registered)["conflict.nvidia.com/GA104"]
    assert conflict[0] == FAIL and "the kubelet has nvidia.com/GA104_GEFORCE_RTX_3070 registered" in conflict[1]
    # an unrelated resource and our own names are no conflict
    fine = Holdings(ok=True, allocatable={"nvidia.com/GA104": frozenset({"0000:01:00.0"}), "intel.com/qat": frozenset({"x"})})
    assert checks_of(node, pci_ids, holdings=fine)["conflicts"][0] == OK


def test_socket_path_over_the_limit_fails(tmp_path, pci_ids):
    node = FakeNode(tmp_path).host()
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    node.plugins = node.root / ("p" * 110)
    node.plugins.mkdir()
    verdict, found, _ = checks_of(node, pci_ids)["name.nvidia.com/GA104"]
    assert verdict == FAIL and "limit 107" in found


def run_doctor(node: FakeNode, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deviceplugin", "doctor", *extra, *node.cli_args(PCI_IDS_PATH)], capture_output=True, text=True, timeout=60
    )


def test_exit_codes_and_json(node):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    good = run_doctor(node)
    assert good.returncode == 0 and "[ ok ] group.13" in good.stdout and "0 fail" in good.stdout
    node.add_all(gpu("0000:02:00.0", "1b06", "10ef", "14", audio_driver="snd_hda_intel"))
    bad = run_doctor(node, "--json")
    assert bad.returncode == 1
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False and doc["summary"]["fail"] == 1
    assert all(set(c) == {"id", "verdict", "found", "fix"} and c["verdict"] in ("ok", "warn", "fail") for c in doc["checks"])
    assert next(c for c in doc["checks"] if c["id"] == "group.14")["verdict"] == "fail"
    text = run_doctor(node)
    assert text.returncode == 1 and "fix: 0000:02:00.1 (10de:10ef Audio) is bound to host driver snd_hda_intel" in text.stdout


def test_both_modes_active_on_one_node_fails(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    registry = node.root / "registry"
    registry.mkdir()
    assert checks_of(node, pci_ids)["mode"][:2] == (OK, "neither mode is serving on this node yet")
    (node.plugins / "vfio-dp-nvidia.com-GA104.sock").touch()
    assert checks_of(node, pci_ids)["mode"][0] == OK
    (registry / "vfio-device-plugin.github.io-reg.sock").touch()
    verdict, found, fix = checks_of(node, pci_ids)["mode"]
    assert verdict == FAIL and "both modes are active" in found and "vfio-device-plugin.github.io-reg.sock" in found
    assert "one mode per node" in fix
    (node.plugins / "vfio-dp-nvidia.com-GA104.sock").unlink()
    assert checks_of(node, pci_ids)["mode"][:2] == (OK, f"DRA mode (vfio-device-plugin.github.io-reg.sock in {registry})")
    (node.plugins / "vfio-dp-nvidia.com-GA104.sock").touch()
    cli = run_doctor(node, "--json", f"--kubelet-registry-dir={registry}")
    assert next(c for c in json.loads(cli.stdout)["checks"] if c["id"] == "mode")["verdict"] == "fail"


ARM64_CPUINFO = "processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd sve2\nCPU implementer\t: 0x41\nCPU architecture: 8\n"


def test_a_gh200_on_a_vfio_variant_driver_alone_passes_without_x86_advice(tmp_path, pci_ids):
    """Grace Hopper: the GPU on nvgrace_gpu_vfio_pci, no vfio_pci module, an arm64 kernel command line."""
    node = FakeNode(tmp_path).host(cmdline="BOOT_IMAGE=/vmlinuz-6.8.0-nvidia-64k root=/dev/nvme0n1p2 ro")
    os.rmdir(node.sys / "module" / "vfio_pci")
    node.add(Fn("0009:01:00.0", "10de", "2342", "030200", "nvgrace_gpu_vfio_pci", "40"))
    node.sync_devnode("40")
    (node.proc / "cpuinfo").write_text(ARM64_CPUINFO)
    args = argparse.Namespace(
        proc_root=str(node.proc),
        device_plugin_dir=str(node.plugins),
        sysfs_root=str(node.sys),
        kubelet_registry_dir=str(node.root / "registry"),
        driver_name="vfio-device-plugin.github.io",
    )
    checks = {c.id: c for c in run_checks(inventory_of(node, pci_ids), read_node(args))}
    assert {cid: c.verdict for cid, c in checks.items() if c.verdict == FAIL} == {}
    assert "nvgrace_gpu_vfio_pci" in checks["vfio-modules"].found
    advice = " ".join(c.found + c.fix for c in checks.values())
    for x86_only in ("intel_iommu", "iommu=pt", "amd_iommu", "VT-d"):
        assert x86_only not in advice, x86_only
    assert checks["group.40"].verdict == OK


def test_arm64_with_the_iommu_off_gets_arm_advice(tmp_path, pci_ids):
    node = FakeNode(tmp_path).host(iommu=None, cmdline="BOOT_IMAGE=/vmlinuz")
    (node.proc / "cpuinfo").write_text(ARM64_CPUINFO)
    args = argparse.Namespace(proc_root=str(node.proc), device_plugin_dir=str(node.plugins), sysfs_root=str(node.sys))
    checks = {c.id: c for c in run_checks(inventory_of(node, pci_ids), read_node(args))}
    assert checks["iommu"].verdict == FAIL and "SMMU" in checks["iommu"].fix and "intel_iommu" not in checks["iommu"].fix
