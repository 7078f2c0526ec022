"""Builds fake nodes: real directories, files and relative symlinks laid out like Linux sysfs and /dev.

Used by `demo`, the tests and the benchmarks, so all three exercise the same reader the daemon runs
on a real node. Layout (as on Linux):

    sys/devices/pci0000:00/0000:01:00.0/{vendor,device,class,...}
    sys/bus/pci/devices/0000:01:00.0 -> ../../../devices/pci0000:00/0000:01:00.0
    .../0000:01:00.0/iommu_group -> ../../../kernel/iommu_groups/13
    .../0000:01:00.0/driver -> ../../../bus/pci/drivers/vfio-pci
    sys/kernel/iommu_groups/13/devices/0000:01:00.0 -> ../../../../devices/pci0000:00/0000:01:00.0
    dev/vfio/vfio, dev/vfio/13   (plain files stand in for the character devices)

A function with a `parent` (its bridge or root port) nests below it, as on real machines:
`devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/...`. The tests write only the files the
plugin reads; `FakeNode(root, full=True)` (the benchmarks) writes every attribute file and directory
a real PCI function has, so the benchmarks walk trees as large as the kernel's.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from deviceplugin.sysfs import is_vfio_driver

DEMO_PCI_IDS = """\
# A few entries of the pci.ids database, enough for the demo node.
1002  Advanced Micro Devices, Inc. [AMD/ATI]
\t73df  Navi 22 [Radeon RX 6700/6700 XT/6750 XT / 6800M/6850M XT]
\tab28  Navi 21/23 HDMI/DP Audio Controller
10de  NVIDIA Corporation
\t1b06  GP102 [GeForce GTX 1080 Ti]
\t10ef  GP102 HDMI Audio Controller
\t2484  GA104 [GeForce RTX 3070]
\t\t1458 4037  GeForce RTX 3070 Gaming OC
\t228b  GA104 High Definition Audio Controller
8086  Intel Corporation
\t4680  AlderLake-S GT1
\t7ad0  Alder Lake-S HD Audio Controller
\t7ae2  Alder Lake-S PCH SATA Controller [AHCI Mode]
C 03  Display controller
"""


@dataclass(frozen=True)
class Fn:
    address: str
    vendor: str
    device: str
    class_code: str
    driver: str | None = None
    group: str | None = None
    numa_node: int = -1
    boot_vga: bool | None = None
    physfn: str | None = None  # an SR-IOV VF: its PF's address (sysfs links physfn and the PF's virtfnN)
    parent: str | None = None  # the bridge above it (an address already added), or a root complex ("pci0000:fe")


class FakeNode:
    """A node under `root`: root/sys, root/dev, root/proc and root/device-plugins."""

    def __init__(self, root: str | Path, uevent: bool = True, full: bool = False) -> None:
        self.root = Path(root)
        self.uevent = uevent  # Linux has one; FakeNode(root, uevent=False) exercises the per-file fallback
        self.full = full  # every attribute file of a real function (benchmarks), not just what the plugin reads
        self._dirs: dict[str, Path] = {}  # address -> its directory, for functions nested below a bridge
        self.sys = self.root / "sys"
        self.dev = self.root / "dev"
        self.proc = self.root / "proc"
        self.plugins = self.root / "device-plugins"
        for d in ("bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups", "devices/pci0000:00"):
            (self.sys / d).mkdir(parents=True, exist_ok=True)
        (self.dev / "vfio").mkdir(parents=True, exist_ok=True)
        self.proc.mkdir(parents=True, exist_ok=True)
        self.plugins.mkdir(parents=True, exist_ok=True)

    # --- host ------------------------------------------------------------------------------------
    def host(
        self, iommu: str | None = "dmar0", modules: bool = True, cmdline: str = "BOOT_IMAGE=/vmlinuz intel_iommu=on iommu=pt"
    ) -> FakeNode:
        if iommu:
            (self.sys / "class" / "iommu" / iommu).mkdir(parents=True, exist_ok=True)
        if modules:
            for m in ("vfio", "vfio_pci", "vfio_iommu_type1"):
                (self.sys / "module" / m).mkdir(parents=True, exist_ok=True)
            (self.dev / "vfio" / "vfio").touch()
        (self.proc / "cmdline").write_text(cmdline + "\n")
        return self

    # --- functions -------------------------------------------------------------------------------
    def device_dir(self, address: str) -> Path:
        return self._dirs.get(address) or self.sys / "devices" / f"pci{address[:-8]}:00" / address

    def add(self, fn: Fn, devnode: bool = True) -> FakeNode:
        if fn.parent is not None:
            above = self.sys / "devices" / fn.parent if fn.parent.startswith("pci") else self.device_dir(fn.parent)
            self._dirs[fn.address] = above / fn.address
        d = self.device_dir(fn.address)
        d.mkdir(parents=True, exist_ok=True)
        for name, value in (("vendor", fn.vendor), ("device", fn.device), ("subsystem_vendor", fn.vendor), ("subsystem_device", "0000")):
            (d / name).write_text(f"0x{value}\n")
        (d / "class").write_text(f"0x{fn.class_code}\n")
        if self.uevent:  # as the kernel writes it, less DRIVER= (the plugin reads the driver link)
            (d / "uevent").write_text(
                f"PCI_CLASS={int(fn.class_code, 16):04X}\nPCI_ID={fn.vendor.upper()}:{fn.device.upper()}\n"
                f"PCI_SUBSYS_ID={fn.vendor.upper()}:0000\nPCI_SLOT_NAME={fn.address}\n"
            )
        (d / "numa_node").write_text(f"{fn.numa_node}\n")
        if fn.class_code.startswith("03"):
            (d / "boot_vga").write_text("1\n" if fn.boot_vga else "0\n")
        if self.full:
            write_full_attributes(d, fn, self.sys)
        _link(self.sys / "bus" / "pci" / "devices" / fn.address, d)
        if fn.group is not None:
            self.set_group(fn.address, fn.group)
        if fn.physfn is not None:
            self.link_vf(fn.physfn, fn.address)
        self.bind(fn.address, fn.driver, devnode=devnode)
        return self

    def link_vf(self, pf: str, vf: str) -> None:
        """The links the kernel makes for an SR-IOV VF: VF/physfn -> PF, PF/virtfnN -> VF."""
        pf_dir, vf_dir = self.device_dir(pf), self.device_dir(vf)
        _link(vf_dir / "physfn", pf_dir)
        n = sum(1 for p in pf_dir.iterdir() if p.name.startswith("virtfn"))
        _link(pf_dir / f"virtfn{n}", vf_dir)

    def add_all(self, fns: list[Fn]) -> FakeNode:
        for fn in fns:
            self.add(fn)
        return self

    def set_group(self, address: str, group: str) -> None:
        d = self.device_dir(address)
        gdir = self.sys / "kernel" / "iommu_groups" / group / "devices"
        if not gdir.is_dir():
            gdir.mkdir(parents=True)
            if self.full:
                (gdir.parent / "type").write_text("DMA\n")
                (gdir.parent / "reserved_regions").write_text("0x00000000fee00000 0x00000000feefffff msi\n")
        _link(d / "iommu_group", gdir.parent)
        _link(gdir / address, d)

    def group_of(self, address: str) -> str | None:
        link = self.device_dir(address) / "iommu_group"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def bind(self, address: str, driver: str | None, devnode: bool = True) -> None:
        """Rebinds a function (None = unbind), keeping /dev/vfio/<group> in step like the kernel does."""
        d = self.device_dir(address)
        old = os.path.basename(os.readlink(d / "driver")) if (d / "driver").is_symlink() else None
        if old:
            (d / "driver").unlink()
            (self.sys / "bus" / "pci" / "drivers" / old / address).unlink(missing_ok=True)
        if driver:
            ddir = self.sys / "bus" / "pci" / "drivers" / driver
            ddir.mkdir(parents=True, exist_ok=True)
            _link(d / "driver", ddir)
            _link(ddir / address, d)
        group = self.group_of(address)
        if group is not None and devnode:
            self.sync_devnode(group)

    def sync_devnode(self, group: str) -> None:
        members = os.listdir(self.sys / "kernel" / "iommu_groups" / group / "devices")
        node = self.dev / "vfio" / group
        if any(is_vfio_driver(self.driver_of(a)) for a in members):
            node.touch()
        else:
            node.unlink(missing_ok=True)

    def driver_of(self, address: str) -> str | None:
        link = self.device_dir(address) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def remove(self, address: str) -> None:
        """Hot-unplug: the function disappears from every sysfs view."""
        group = self.group_of(address)
        self.bind(address, None, devnode=False)
        (self.sys / "bus" / "pci" / "devices" / address).unlink()
        if group is not None:
            (self.sys / "kernel" / "iommu_groups" / group / "devices" / address).unlink()
            self.sync_devnode(group)
        shutil.rmtree(self.device_dir(address))

    def write_attr(self, address: str, name: str, value: str) -> None:
        """Overwrites one attribute; the uevent (which would disagree) is removed so the file is read."""
        (self.device_dir(address) / name).write_text(value)
        (self.device_dir(address) / "uevent").unlink(missing_ok=True)

    def add_vfio_cdev(self, address: str, name: str) -> None:
        (self.device_dir(address) / "vfio-dev" / name).mkdir(parents=True, exist_ok=True)
        (self.dev / "vfio" / "devices").mkdir(exist_ok=True)
        (self.dev / "vfio" / "devices" / name).touch()
        (self.dev / "iommu").touch()

    # --- what holds a card (bind's refusals and timeouts) -----------------------------------------
    def set_bars(self, address: str, *bars: tuple[int, int]) -> None:
        """The function's memory regions, as the kernel writes `resource` (start end flags per line)."""
        lines = [f"0x{start:016x} 0x{end:016x} 0x{0x40200:016x}" for start, end in bars]
        lines += [f"0x{0:016x} 0x{0:016x} 0x{0:016x}"] * (7 - len(lines))
        (self.device_dir(address) / "resource").write_text("\n".join(lines) + "\n")

    def write_iomem(self, text: str) -> None:
        (self.proc / "iomem").write_text(text)

    def add_framebuffer(self, name: str, address: str) -> None:
        """/sys/class/graphics/<name> on the function (efifb's is on no PCI device: leave it out)."""
        fb = self.sys / "class" / "graphics" / name
        fb.mkdir(parents=True, exist_ok=True)
        _link(fb / "device", self.device_dir(address))

    def add_drm(self, address: str, *names: str) -> None:
        for name in names:
            (self.device_dir(address) / "drm" / name).mkdir(parents=True, exist_ok=True)

    def add_process(self, pid: int, comm: str, *opened: str) -> None:
        """A process with the given paths open: /proc/<pid>/fd/<n> links, as Linux shows them."""
        fd = self.proc / str(pid) / "fd"
        fd.mkdir(parents=True, exist_ok=True)
        (self.proc / str(pid) / "comm").write_text(f"{comm}\n")
        for n, path in enumerate(opened, start=3):
            (fd / str(n)).symlink_to(path)

    def cli_args(self, pci_ids: str | Path | None = None) -> list[str]:
        args = [
            "--sysfs-root",
            str(self.sys),
            "--dev-root",
            str(self.dev),
            "--proc-root",
            str(self.proc),
            "--device-plugin-dir",
            str(self.plugins),
        ]
        return args + (["--pci-ids", str(pci_ids)] if pci_ids else [])


# What a real PCI function's sysfs directory holds besides the files above (Linux 6.x, a PCIe GPU):
# read-only attributes with their usual contents, write-only triggers, BAR files and subdirectories.
_TEXT_ATTRIBUTES = {
    "ari_enabled": "0",
    "broken_parity_status": "0",
    "consistent_dma_mask_bits": "64",
    "current_link_speed": "16.0 GT/s PCIe",
    "current_link_width": "16",
    "d3cold_allowed": "1",
    "dma_mask_bits": "64",
    "driver_override": "(null)",
    "enable": "1",
    "irq": "16",
    "local_cpulist": "0-31",
    "local_cpus": "ffffffff",
    "max_link_speed": "16.0 GT/s PCIe",
    "max_link_width": "16",
    "msi_bus": "1",
    "power_state": "D0",
    "reset_method": "flr bus",
    "revision": "0xa1",
    "aer_dev_correctable": "RxErr 0\nBadTLP 0\nBadDLLP 0\nRollover 0\nTimeout 0\nNonFatalErr 0\nTOTAL_ERR_COR 0",
    "aer_dev_fatal": "Undefined 0\nDLP 0\nSDES 0\nTLP 0\nFCP 0\nCmpltTO 0\nUnxCmplt 0\nTOTAL_ERR_FATAL 0",
    "aer_dev_nonfatal": "Undefined 0\nDLP 0\nSDES 0\nTLP 0\nFCP 0\nCmpltTO 0\nUnxCmplt 0\nTOTAL_ERR_NONFATAL 0",
}
_EMPTY_ATTRIBUTES = ("remove", "rescan", "reset", "rom", "resource0", "resource1", "resource1_wc", "resource3", "resource3_wc", "resource5")
_POWER = {
    "async": "enabled",
    "autosuspend_delay_ms": "",
    "control": "on",
    "runtime_active_kids": "0",
    "runtime_active_time": "123456",
    "runtime_enabled": "forbidden",
    "runtime_status": "active",
    "runtime_suspended_time": "0",
    "runtime_usage": "1",
    "wakeup": "disabled",
}


def write_full_attributes(d: Path, fn: Fn, sys_root: Path) -> None:
    """Every attribute file and directory of a real function, with plausible contents (benchmarks only)."""

    def put(path: Path, data: str | bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data.encode() if isinstance(data, str) else data)
        finally:
            os.close(fd)

    bridge = fn.class_code.startswith("0604")
    for name, value in _TEXT_ATTRIBUTES.items():
        put(d / name, value + "\n")
    for name in _EMPTY_ATTRIBUTES:
        put(d / name, "")
    cls = int(fn.class_code, 16)
    put(
        d / "modalias",
        f"pci:v0000{fn.vendor.upper()}d0000{fn.device.upper()}sv0000{fn.vendor.upper()}sd00000000"
        f"bc{cls >> 16:02X}sc{(cls >> 8) & 0xFF:02X}i{cls & 0xFF:02X}\n",
    )
    lines = [f"0x{0xF000_0000 + i * 0x100_0000:016x} 0x{0xF0FF_FFFF + i * 0x100_0000:016x} 0x{0x40200:016x}" for i in range(3)]
    put(d / "resource", "\n".join(lines + [f"0x{0:016x} 0x{0:016x} 0x{0:016x}"] * 10) + "\n")
    header = bytes.fromhex(fn.vendor)[::-1] + bytes.fromhex(fn.device)[::-1]
    put(d / "config", header + b"\x07\x05\x10\x00" + bytes.fromhex(fn.class_code)[::-1] + bytes(4096 - 12))
    if bridge:
        put(d / "secondary_bus_number", "1\n")
        put(d / "subordinate_bus_number", "1\n")
        for service in ("pcie001", "pcie002", "pcie010"):  # the port services (AER, hotplug, bandwidth)
            (d / f"{fn.address}:{service}" / "power").mkdir(parents=True, exist_ok=True)
    uevent = (
        (f"DRIVER={fn.driver}\n" if fn.driver else "") + f"PCI_CLASS={cls:04X}\nPCI_ID={fn.vendor.upper()}:{fn.device.upper()}\n"
        f"PCI_SUBSYS_ID={fn.vendor.upper()}:0000\nPCI_SLOT_NAME={fn.address}\n"
        f"MODALIAS=pci:v0000{fn.vendor.upper()}d0000{fn.device.upper()}sv0000{fn.vendor.upper()}sd00000000"
        f"bc{cls >> 16:02X}sc{(cls >> 8) & 0xFF:02X}i{cls & 0xFF:02X}\n"
    )
    put(d / "uevent", uevent)
    for sub in ("power", "msi_irqs", "link"):
        (d / sub).mkdir(exist_ok=True)
    for name, value in _POWER.items():
        put(d / "power" / name, value + "\n")
    for irq in range(140, 144):
        put(d / "msi_irqs" / str(irq), "msix\n")
    for name in ("clkpm", "l0s_aspm", "l1_aspm"):
        put(d / "link" / name, "0\n")
    _link(d / "subsystem", sys_root / "bus" / "pci")
    iommu = sys_root / "devices" / "virtual" / "iommu" / "dmar0"
    iommu.mkdir(parents=True, exist_ok=True)
    _link(d / "iommu", iommu)


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


def gpu(
    address: str,
    device: str,
    audio: str | None,
    group: str,
    vendor: str = "10de",
    driver: str | None = "vfio-pci",
    audio_driver: str | None = "vfio-pci",
    numa_node: int = -1,
) -> list[Fn]:
    """A GPU's VGA function and (optionally) its HDMI audio function in one IOMMU group."""
    fns = [Fn(address, vendor, device, "030000", driver, group, numa_node)]
    if audio:
        fns.append(Fn(address[:-1] + "1", vendor, audio, "040300", audio_driver, group, numa_node))
    return fns


def demo_node(root: str | Path) -> FakeNode:
    """The case this project was born from: an RTX 3070 (VGA 10de:2484 + audio 10de:228b, IOMMU group 13)
    on vfio-pci, plus a GTX 1080 Ti whose audio function is still on snd_hda_intel, an iGPU and a chipset."""
    node = FakeNode(root).host()
    (node.root / "pci.ids").write_text(DEMO_PCI_IDS)
    node.add_all(
        [
            Fn("0000:00:02.0", "8086", "4680", "030000", "i915", "2", 0, boot_vga=True),
            Fn("0000:00:17.0", "8086", "7ae2", "010601", "ahci", "10", 0),
            Fn("0000:00:1f.3", "8086", "7ad0", "040300", "snd_hda_intel", "17", 0),
            *gpu("0000:01:00.0", "2484", "228b", "13", numa_node=0),
            *gpu("0000:02:00.0", "1b06", "10ef", "14", audio_driver="snd_hda_intel", numa_node=0),
        ]
    )
    return node
