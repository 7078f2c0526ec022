"""What keeps a PCI function from letting go: processes with its device nodes open, and a firmware
framebuffer in its memory.

`bind` asks these questions before it changes anything (a boot GPU whose memory a firmware
framebuffer still uses must not be taken from the host) and when an unbind does not finish (the
driver waits for its users, so the message names them). Pure readers over `--sysfs-root` and
`--proc-root`, like sysfs.py: nothing here raises, an unreadable file is an unknown answer.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass

from deviceplugin.sysfs import PciFunction, device_dir, is_vfio_driver, read_attr

# The names firmware framebuffers give their memory in /proc/iomem (sysfb, efifb, simpledrm, vesafb).
FIRMWARE_FRAMEBUFFERS = ("BOOTFB", "efifb", "simpledrm", "vesafb")
_IOMEM_LINE = re.compile(r"^\s*([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.+)$")
_DRM_NODE = re.compile(r"^(card|renderD)\d+$")  # not the connectors (card1-DP-1) some trees list beside them
_NVIDIA_MINOR = re.compile(r"^Device Minor:\s*(\d+)", re.M)


@dataclass(frozen=True)
class Holders:
    driver: str | None
    nodes: tuple[str, ...]  # the device nodes that were looked for
    processes: tuple[str, ...]  # "pid 42 (nvidia-smi) has /dev/nvidia0 open"
    consoles: tuple[str, ...]  # framebuffers on the function (fbcon keeps them open)
    unreadable: int  # processes whose fd table could not be read (not root)

    def describe(self) -> str:
        found = [*self.processes, *(f"{fb} (a framebuffer console) is on it" for fb in self.consoles)]
        if found:
            return "; ".join(found)
        looked = f"no process has {', '.join(self.nodes)} open" if self.nodes else f"{self.driver} exposes no device node known here"
        skipped = f"; {self.unreadable} process(es) could not be inspected (run as root)" if self.unreadable else ""
        return f"nothing identified: {looked} (a kernel user or a console may hold it){skipped}"


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


# --- firmware framebuffer -------------------------------------------------------------------------
def read_bars(sysfs_root: str, address: str) -> list[tuple[int, int]]:
    """The memory ranges of the function (its `resource` file: start end flags, one line per region)."""
    bars = []
    for line in (read_attr(os.path.join(device_dir(sysfs_root, address), "resource")) or "").splitlines():
        fields = line.split()
        try:
            start, end = int(fields[0], 16), int(fields[1], 16)
        except (IndexError, ValueError):
            continue
        if end > start:
            bars.append((start, end))
    return bars


def iomem_framebuffers(proc_root: str) -> list[tuple[str, int, int]]:
    """(name, start, end) of each firmware framebuffer in /proc/iomem; start = end = 0 where the kernel hides
    addresses (a reader without CAP_SYS_ADMIN)."""
    try:
        with open(os.path.join(proc_root, "iomem"), encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        m = _IOMEM_LINE.match(line)
        if m and m.group(3).strip().startswith(FIRMWARE_FRAMEBUFFERS):
            found.append((m.group(3).strip(), int(m.group(1), 16), int(m.group(2), 16)))
    return found


def framebuffer_consoles(sysfs_root: str, address: str) -> list[str]:
    """/sys/class/graphics/fb* whose device is this function."""
    graphics = os.path.join(sysfs_root, "class", "graphics")
    mine = os.path.realpath(device_dir(sysfs_root, address))
    return [fb for fb in _listdir(graphics) if fb.startswith("fb") and os.path.realpath(os.path.join(graphics, fb, "device")) == mine]


def firmware_framebuffer(sysfs_root: str, proc_root: str, address: str) -> str | None:
    """Where a firmware framebuffer still uses the function's memory, in words; None when none does."""
    bars = read_bars(sysfs_root, address)
    for name, start, end in iomem_framebuffers(proc_root):
        if start == end == 0:
            return f"{name} is in /proc/iomem but its addresses are hidden (not root), so it may be in this card's memory"
        if any(s <= end and start <= e for s, e in bars):
            return f"{name} holds {start:#x}-{end:#x} of its memory (/proc/iomem)"
    consoles = framebuffer_consoles(sysfs_root, address)
    if consoles:
        return f"/sys/class/graphics/{consoles[0]} is on it"
    return None


# --- processes ------------------------------------------------------------------------------------
def device_nodes(sysfs_root: str, proc_root: str, fn: PciFunction, driver: str | None) -> list[str]:
    """The /dev paths through which users hold this function under `driver`, as fnmatch patterns."""
    base = device_dir(sysfs_root, fn.address)
    nodes = [f"/dev/dri/{n}" for n in _listdir(os.path.join(base, "drm")) if _DRM_NODE.match(n)]
    for card in _listdir(os.path.join(base, "sound")):
        if card.startswith("card") and card[4:].isdigit():
            n = card[4:]
            nodes += [f"/dev/snd/controlC{n}", f"/dev/snd/pcmC{n}D*", f"/dev/snd/hwC{n}D*"]
    if driver == "nvidia":
        info = read_attr(os.path.join(proc_root, "driver", "nvidia", "gpus", fn.address, "information")) or ""
        minor = _NVIDIA_MINOR.search(info)
        nodes.append(f"/dev/nvidia{minor.group(1)}" if minor else "/dev/nvidia[0-9]*")
    if is_vfio_driver(driver) and fn.iommu_group is not None:
        nodes.append(f"/dev/vfio/{fn.iommu_group}")
        nodes += [f"/dev/vfio/devices/{c}" for c in _listdir(os.path.join(base, "vfio-dev"))]
    return nodes


def find_holders(sysfs_root: str, proc_root: str, fn: PciFunction, driver: str | None) -> Holders:
    """Processes under `proc_root` with one of the function's device nodes open, and consoles on it."""
    nodes = device_nodes(sysfs_root, proc_root, fn, driver)
    processes, unreadable = [], 0
    for pid in (p for p in _listdir(proc_root) if p.isdigit()):
        fd_dir = os.path.join(proc_root, pid, "fd")
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            unreadable += 1
            continue
        except OSError:
            continue  # the process has exited
        opened = sorted({t for t in (_readlink(os.path.join(fd_dir, fd)) for fd in fds) if t and _is_one_of(t, nodes)})
        if opened:
            comm = read_attr(os.path.join(proc_root, pid, "comm")) or "?"
            processes.append(f"pid {pid} ({comm}) has {', '.join(opened)} open")
    consoles = tuple(framebuffer_consoles(sysfs_root, fn.address))
    return Holders(driver, tuple(nodes), tuple(processes), consoles, unreadable)


def _is_one_of(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
