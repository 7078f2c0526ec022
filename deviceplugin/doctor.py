"""Preflight checks: one verdict per check (ok / warn / fail), what was found, and the fix.

The per-group verdicts come from discovery's reasons, so `doctor`, `inspect` and `serve` can never
disagree about a device; this module only adds what discovery does not look at (kernel command line,
modules, other plugins' sockets) and turns everything into advice.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from deviceplugin.discovery import Device, GroupReport, Inventory, class_name, describe, foreign_functions
from deviceplugin.dra.options import DEFAULT_DRIVER, DEFAULT_REGISTRY_DIR, registration_socket_name
from deviceplugin.naming import (
    KUBELET_SOCKET,
    MAX_SOCKET_PATH,
    NAMINGS,
    SOCKET_PREFIX,
    PciIds,
    auto_name,
    resource_name_error,
    socket_name,
)
from deviceplugin.pool import Holdings
from deviceplugin.sysfs import ADDRESS_RE, is_vfio_driver

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    id: str
    verdict: str
    found: str
    fix: str = ""


@dataclass(frozen=True)
class Node:
    """What the checks read besides the inventory."""

    cmdline: str | None
    cpu_vendor: str  # "intel", "amd", "arm" or ""
    plugin_dir: str
    plugin_sockets: list[str] | None  # None: the directory cannot be read
    vfio_drivers: tuple[str, ...]  # vfio drivers in bus/pci/drivers: vfio-pci (maybe built in) and variants
    registry_dir: str = DEFAULT_REGISTRY_DIR
    registry_sockets: list[str] | None = None  # the kubelet's plugins_registry; None: cannot be read
    driver: str = DEFAULT_DRIVER


def read_node(args: argparse.Namespace) -> Node:
    cmdline = _read(os.path.join(args.proc_root, "cmdline"))
    cpuinfo = _read(os.path.join(args.proc_root, "cpuinfo")) or ""
    vendor = cpu_vendor(cpuinfo)
    try:
        sockets: list[str] | None = sorted(os.listdir(args.device_plugin_dir))
    except OSError:
        sockets = None
    try:
        drivers = tuple(sorted(d for d in os.listdir(os.path.join(args.sysfs_root, "bus", "pci", "drivers")) if is_vfio_driver(d)))
    except OSError:
        drivers = ()
    registry_dir = getattr(args, "kubelet_registry_dir", DEFAULT_REGISTRY_DIR)
    try:
        registry: list[str] | None = sorted(os.listdir(registry_dir))
    except OSError:
        registry = None
    driver = getattr(args, "driver_name", DEFAULT_DRIVER)
    return Node(cmdline, vendor, args.device_plugin_dir, sockets, drivers, registry_dir, registry, driver)


def cpu_vendor(cpuinfo: str) -> str:
    """intel / amd from x86's vendor_id; arm from arm64's "CPU implementer" lines (no x86 kernel options there)."""
    if "GenuineIntel" in cpuinfo:
        return "intel"
    if "AuthenticAMD" in cpuinfo:
        return "amd"
    return "arm" if "CPU implementer" in cpuinfo else ""


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


# --- host ---------------------------------------------------------------------------------------
def iommu_fix(cpu_vendor: str) -> str:
    if cpu_vendor == "arm":
        return "enable the SMMU in the firmware (it is described by ACPI IORT or the device tree) and reboot"
    if cpu_vendor == "amd":
        return "enable IOMMU / AMD-Vi (and SVM) in the firmware setup; make sure amd_iommu=off is not on the kernel command line"
    if cpu_vendor == "intel":
        return "enable VT-d in the firmware setup and add intel_iommu=on to the kernel command line, then reboot"
    return "enable VT-d (Intel) or AMD-Vi/IOMMU (AMD) in the firmware and add intel_iommu=on (Intel) to the kernel command line"


def host_checks(inv: Inventory, node: Node) -> Iterator[Check]:
    h = inv.host
    if h.iommu_enabled:
        units = ", ".join(h.iommu_units) or "no entry under /sys/class/iommu"
        yield Check("iommu", OK, f"IOMMU on: {h.iommu_groups} groups ({units})")
    else:
        present = f"IOMMU hardware present ({', '.join(h.iommu_units)}) but " if h.iommu_units else ""
        yield Check("iommu", FAIL, f"{present}no IOMMU groups under /sys/kernel/iommu_groups: IOMMU is off", iommu_fix(node.cpu_vendor))
    yield from cmdline_checks(node)
    yield module_check(inv, node)
    if h.vfio_container:
        yield Check("vfio-container", OK, "/dev/vfio/vfio present")
    else:
        yield Check("vfio-container", FAIL, "/dev/vfio/vfio missing", "load the vfio module; in a container, mount the host's /dev/vfio")


def module_check(inv: Inventory, node: Node) -> Check:
    """vfio, a vfio driver (vfio-pci, or a variant such as nvgrace_gpu_vfio_pci on its own), an IOMMU backend."""
    h = inv.host
    missing = []
    if not h.modules.get("vfio"):
        missing.append("vfio")
    if not (h.modules.get("vfio_pci") or node.vfio_drivers):
        missing.append("vfio_pci")
    if not (h.modules.get("vfio_iommu_type1") or h.iommufd):  # iommufd serves the container interface too
        missing.append("vfio_iommu_type1")
    if missing:
        fix = f"modprobe {' '.join(m.replace('_', '-') for m in missing)}; persist with a file in /etc/modules-load.d/"
        return Check("vfio-modules", FAIL, f"not loaded: {', '.join(missing)}", fix)
    drivers = ", ".join(node.vfio_drivers) or "vfio-pci"
    backend = "vfio_iommu_type1" if h.modules.get("vfio_iommu_type1") else "iommufd"
    return Check("vfio-modules", OK, f"vfio loaded; vfio drivers: {drivers}; IOMMU backend: {backend}")


def _flag(cmdline: str, name: str) -> str | None:
    m = re.search(rf"(?:^|\s){re.escape(name)}=(\S*)", cmdline)
    return m.group(1) if m else None


def cmdline_checks(node: Node) -> Iterator[Check]:
    if node.cmdline is None:
        yield Check("cmdline", WARN, "cannot read /proc/cmdline", "run doctor with the host's /proc (--proc-root)")
        return
    cmd = node.cmdline.strip()
    if node.cpu_vendor == "arm":
        yield from _arm_cmdline_checks(cmd)
        yield from _common_cmdline_checks(cmd)
        return
    yield from _x86_cmdline_checks(node, cmd)
    yield from _common_cmdline_checks(cmd)


def _arm_cmdline_checks(cmd: str) -> Iterator[Check]:
    """arm64 has no intel_iommu/amd_iommu/iommu=pt: the SMMU is on when the firmware describes it."""
    passthrough = _flag(cmd, "iommu.passthrough")
    found = (
        f"iommu.passthrough={passthrough}" if passthrough else "no IOMMU option needed on arm64 (the SMMU is on when the firmware has it)"
    )
    yield Check("cmdline.iommu", OK, found)


def _x86_cmdline_checks(node: Node, cmd: str) -> Iterator[Check]:
    intel, amd = _flag(cmd, "intel_iommu"), _flag(cmd, "amd_iommu")
    if intel is not None and "off" in intel.split(","):
        yield Check("cmdline.iommu", FAIL, "intel_iommu=off on the kernel command line", "replace it with intel_iommu=on and reboot")
    elif amd == "off":
        yield Check("cmdline.iommu", FAIL, "amd_iommu=off on the kernel command line", "remove amd_iommu=off and reboot")
    elif intel is not None and "on" in intel.split(","):
        yield Check("cmdline.iommu", OK, f"intel_iommu={intel}")
    elif node.cpu_vendor == "intel":
        yield Check(
            "cmdline.iommu",
            WARN,
            "intel_iommu=on not on the kernel command line (some kernels enable it by default)",
            "add intel_iommu=on to the kernel command line",
        )
    else:
        yield Check("cmdline.iommu", OK, f"amd_iommu={amd}" if amd else "no IOMMU override (AMD-Vi is on by default on AMD)")
    if _flag(cmd, "iommu") == "pt":
        yield Check("cmdline.iommu_pt", OK, "iommu=pt")
    else:
        yield Check(
            "cmdline.iommu_pt",
            WARN,
            "iommu=pt not set (recommended: host devices keep full DMA speed)",
            "add iommu=pt to the kernel command line",
        )


def _common_cmdline_checks(cmd: str) -> Iterator[Check]:
    ids = _flag(cmd, "vfio-pci.ids") or _flag(cmd, "vfio_pci.ids")
    yield Check("cmdline.vfio_pci_ids", OK, f"vfio-pci.ids={ids}" if ids else "vfio-pci.ids not set (devices are bound at runtime)")
    acs = _flag(cmd, "pcie_acs_override")
    if acs is not None:
        yield Check(
            "cmdline.acs_override",
            WARN,
            f"pcie_acs_override={acs}: IOMMU groups are split by a kernel patch, not by the "
            "hardware, so a VM may still reach devices of other groups by peer-to-peer DMA",
            "use a slot with real ACS isolation (CPU-attached) and drop pcie_acs_override where isolation matters",
        )
    else:
        yield Check("cmdline.acs_override", OK, "no ACS override")


# --- groups -------------------------------------------------------------------------------------
def _is_candidate(g: GroupReport) -> bool:
    return any(fn.is_display or is_vfio_driver(fn.driver) for fn in g.functions)


def group_checks(g: GroupReport) -> Iterator[Check]:
    cid = f"group.{g.id}"
    primary = next((fn for fn in g.functions if fn.address == g.primary), None)
    what = f"group {g.id}: {describe(primary)}" if primary else f"group {g.id}"
    on_vfio = [fn for fn in g.functions if is_vfio_driver(fn.driver)]
    if g.offered:
        ids = f"device IDs {', '.join(g.devices)}" if len(g.devices) > 1 else f"device ID {g.primary}"
        yield Check(cid, OK, f"{what} offered as {g.resource}, {ids}")
    elif g.reasons and g.reasons[0].startswith("excluded by"):
        yield Check(cid, OK, f"{what} not offered: {g.reasons[0]}")
    elif not on_vfio:
        yield Check(
            cid,
            OK,
            f"{what} not offered: no function is bound to vfio-pci (the host may be using it, e.g. as its console GPU)",
            f"to pass it through: {'; '.join(g.reasons)}" if g.reasons else "",
        )
    elif g.resource is None:
        yield Check(cid, WARN, f"{what} is bound to vfio-pci but not offered", "; ".join(g.reasons))
    else:
        yield Check(cid, FAIL, f"{what} is not offered (a VM asking for it would fail)", "; ".join(g.reasons))
    yield from _multi_gpu_check(g)
    gpus = [fn for fn in g.functions if fn.address in g.devices]
    others = (
        [fn for fn in foreign_functions(g.functions, primary) if not any(fn.address[:-1] == d.address[:-1] for d in gpus)]
        if primary
        else []
    )
    if others:
        listed = ", ".join(f"{fn.address} ({class_name(fn.class_code)}, {fn.driver or 'no driver'})" for fn in others)
        yield Check(
            f"{cid}.isolation",
            WARN,
            f"group {g.id} also holds devices that are not part of the card: {listed}; they can "
            "only go to the same VM (poor ACS isolation)",
            "move the card to a slot with its own IOMMU group (usually a CPU-attached slot)",
        )
    for fn in g.functions:
        if fn.boot_vga and is_vfio_driver(fn.driver):
            yield Check(
                f"{cid}.boot_vga",
                WARN,
                f"{fn.address} is the boot VGA device and is bound to vfio-pci: the host console loses its display",
                "use another GPU (or the iGPU) as the primary display in the firmware, or accept a headless host",
            )


def _multi_gpu_check(g: GroupReport) -> Iterator[Check]:
    if len(g.devices) > 1:
        yield Check(
            f"group.{g.id}.gpus",
            WARN,
            f"IOMMU group {g.id} holds {len(g.devices)} GPUs ({', '.join(g.devices)}): each is offered, but the group can be "
            "opened by one VM only, so a pod that gets some of them holds the others back (they turn Unhealthy until it is gone)",
            "ask for all of them in one VM to use them together; a switch or slot with ACS isolation would split the group",
        )


def resource_checks(inv: Inventory, node: Node) -> Iterator[Check]:
    for resource, ids in inv.pools.items():
        if len(ids) > 1:
            yield Check(
                f"pool.{resource}",
                WARN,
                f"{resource} pools different devices: {', '.join(ids)}; a VM asking for it may get any of them",
                "give each device id its own name with a config rule (vendor/device -> resource) if they are not interchangeable",
            )
    for resource in inv.devices:
        error = resource_name_error(resource)
        path = os.path.join(node.plugin_dir, socket_name(resource, node.plugin_dir))
        if error:
            yield Check(
                f"name.{resource}", FAIL, f"{resource} is not a valid extended resource name: {error}", "rename it with a config rule"
            )
        elif len(path.encode()) > MAX_SOCKET_PATH:
            yield Check(
                f"name.{resource}",
                FAIL,
                f"socket path {path} is {len(path.encode())} bytes (limit {MAX_SOCKET_PATH})",
                "use a shorter --device-plugin-dir",
            )


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _aliases(inv: Inventory, db: PciIds) -> dict[str, set[tuple[str, str]]]:
    """Every name another plugin could publish one of our devices under -> (our resource, device id).

    Our own name, the short and full pci.ids names (NVIDIA's plugin and Harvester use the full one) and
    the bare device id (the fallback when pci.ids does not know it), normalized for comparing.
    """
    out: dict[str, set[tuple[str, str]]] = {}
    for resource, devices in inv.devices.items():
        for d in devices:
            if d.role:
                continue
            vendor, _, device = d.ids.partition(":")
            parts = {resource.split("/", 1)[1], device}
            parts |= {auto_name(vendor, device, db, style).resource.split("/", 1)[1] for style in NAMINGS}
            for part in parts:
                out.setdefault(_norm(part), set()).add((resource, d.id))
    return out


def conflict_checks(inv: Inventory, node: Node, db: PciIds | None = None, holdings: Holdings | None = None) -> Iterator[Check]:
    """Another plugin serving any naming of our devices: the same GPU advertised twice, two VMs for one group."""
    aliases = _aliases(inv, db or PciIds())
    found = False
    if node.plugin_sockets is None:
        yield Check("conflicts", WARN, f"cannot read {node.plugin_dir}", "run doctor where the kubelet's device-plugin dir is mounted")
    else:
        for sock in node.plugin_sockets:
            if sock == KUBELET_SOCKET or sock.startswith(SOCKET_PREFIX):
                continue
            stem = _norm(sock.removesuffix(".sock"))
            for alias, ours in aliases.items():
                if stem.endswith(alias):
                    found = True
                    yield _twice(f"{sock} in {node.plugin_dir} looks like another plugin serving", ours)
    if holdings is not None and holdings.ok:
        for resource, ids in sorted(_kubelet_resources(holdings).items()):
            if resource in inv.devices:
                continue
            ours = aliases.get(_norm(resource.split("/", 1)[-1]), set()) | {(r, d) for r, d in _our_ids(inv) if d in ids}
            if ours:
                found = True
                yield _twice(f"the kubelet has {resource} registered (by another plugin, or by this one under an old name) for", ours)
    if not found:
        yield Check("conflicts", OK, "no other plugin publishes our devices under any of their names")


def _kubelet_resources(holdings: Holdings) -> dict[str, set[str]]:
    """resource -> device IDs the kubelet knows: its allocatable ones and the ones pods hold."""
    out: dict[str, set[str]] = {r: set(ids) for r, ids in (holdings.allocatable or {}).items()}
    for resource, device_id in holdings.devices:
        out.setdefault(resource, set()).add(device_id)
    return out


def _our_ids(inv: Inventory) -> set[tuple[str, str]]:
    return {(r, d.id) for r, devices in inv.devices.items() for d in devices if not d.role}


def _twice(what: str, ours: set[tuple[str, str]]) -> Check:
    resources = sorted({r for r, _ in ours})
    devices = ", ".join(sorted({d for _, d in ours}))
    return Check(
        f"conflict.{resources[0]}",
        FAIL,
        f"{what} {', '.join(resources)} ({devices}): the device is advertised twice, so the kubelet can give one "
        "GPU to two pods (the second VM fails to open its IOMMU group) and flips between the registrations",
        "remove the device from the other plugin (for KubeVirt: externalResourceProvider: true in permittedHostDevices; "
        "uninstall NVIDIA's kubevirt-gpu-device-plugin / Harvester's PCI plugin for it), or pin this plugin's name to the "
        "old one with a config rule if it is this plugin under an old name",
    )


# --- holders (PodResources) ----------------------------------------------------------------------
def holder_checks(inv: Inventory, holdings: Holdings) -> Iterator[Check]:
    """What the kubelet has handed out, against what this node can still give."""
    if not holdings.ok:
        yield Check(
            "holders",
            WARN,
            f"holder unknown: {holdings.error}",
            "mount the host's /var/lib/kubelet/pod-resources into the pod (the DaemonSet does) or pass --pod-resources-socket",
        )
        return
    ours = {(r, d.id): d for r, devices in inv.devices.items() for d in devices}
    by_id = {d.id: r for (r, _), d in ours.items()}
    present = {fn.address for g in inv.groups for fn in g.functions} | {fn.address for fn in inv.ungrouped}
    found = False
    for (resource, device_id), holder in sorted(holdings.devices.items()):
        device = ours.get((resource, device_id))
        check = _held_check(resource, device_id, holder.name + f" ({holder.container})", device, by_id.get(device_id), present, inv)
        if check is not None:
            found = True
            yield check
    if not found:
        held = sum(1 for key in holdings.devices if key in ours)
        yield Check("holders", OK, f"{held} device(s) of this plugin held by pods, all usable")


def _held_check(
    resource: str, device_id: str, pod: str, device: Device | None, offered_as: str | None, present: set[str], inv: Inventory
) -> Check | None:
    cid = f"held.{resource}.{device_id}"
    if device is not None:
        if device.healthy:
            return None
        return Check(
            cid,
            FAIL,
            f"{device_id} ({resource}) is held by {pod} but is Unhealthy: {device.reason}. "
            "The VM will fail to start, or has lost the device",
            "fix the reason above, then restart the VM (virtctl restart) so it gets a usable device",
        )
    if offered_as is not None:
        return Check(
            cid,
            WARN,
            f"{device_id} is held by {pod} as {resource}, but this plugin offers it as {offered_as} (renamed by a "
            "pci.ids update or a config rule, or another plugin serves it)",
            f'pin the old name with a config rule {{address: "{device_id}", resource: {resource}}} (or a vendor/device rule) '
            "until the VMs move to the new name",
        )
    if resource in inv.devices and ADDRESS_RE.match(device_id) and device_id not in present:
        return Check(
            cid,
            FAIL,
            f"{device_id} ({resource}) is held by {pod} but is no longer on this node (removed or hot-unplugged)",
            "restart the VM so it is scheduled onto a device that exists",
        )
    if resource in inv.devices:
        return Check(
            cid,
            WARN,
            f"the kubelet holds {device_id} as {resource} for {pod}, an ID this plugin never offered "
            "(another plugin serving the same name?)",
            "make sure only this plugin serves the resource (doctor's conflict checks), then restart the pod",
        )
    return None


def mode_checks(node: Node) -> Iterator[Check]:
    """One mode per node: the device-plugin API and DRA would both offer the same groups to different pods."""
    ours = [s for s in node.plugin_sockets or [] if s.startswith(SOCKET_PREFIX) and s.endswith(".sock")]
    dra_socket = registration_socket_name(node.driver)
    dra = node.registry_sockets is not None and dra_socket in node.registry_sockets
    if ours and dra:
        yield Check(
            "mode",
            FAIL,
            f"both modes are active on this node: device-plugin sockets {', '.join(ours)} in {node.plugin_dir} and the DRA "
            f"registration socket {dra_socket} in {node.registry_dir}; the same IOMMU groups are offered twice and a VM can "
            "get a group another pod already holds",
            "run one mode per node: keep the device-plugin DaemonSet and the DRA DaemonSet (serve --mode dra) on disjoint "
            "nodes (nodeSelector/affinity), then restart the one that stays",
        )
    elif dra:
        yield Check("mode", OK, f"DRA mode ({dra_socket} in {node.registry_dir})")
    elif ours:
        yield Check("mode", OK, f"device-plugin mode ({len(ours)} socket(s) in {node.plugin_dir})")
    else:
        yield Check("mode", OK, "neither mode is serving on this node yet")


def summary_checks(inv: Inventory) -> Iterator[Check]:
    if inv.problems:
        listed = "; ".join(f"{p.address}: {p.reason}" for p in inv.problems)
        yield Check("sysfs", WARN, f"{len(inv.problems)} function(s) skipped: {listed}", "check --sysfs-root points at a real sysfs")
    offered = inv.offered()
    if offered:
        yield Check("offered", OK, "offering " + ", ".join(f"{r}: {len(ids)}" for r, ids in offered.items()))
    else:
        yield Check("offered", WARN, "this node offers no device", "see the group checks above for why")


def run_checks(inv: Inventory, node: Node, holdings: Holdings | None = None, db: PciIds | None = None) -> list[Check]:
    checks = list(host_checks(inv, node))
    for g in inv.groups:
        if _is_candidate(g):
            checks.extend(group_checks(g))
    checks.extend(resource_checks(inv, node))
    checks.extend(conflict_checks(inv, node, db, holdings))
    if holdings is not None:
        checks.extend(holder_checks(inv, holdings))
    checks.extend(mode_checks(node))
    checks.extend(summary_checks(inv))
    return checks


def render(checks: list[Check]) -> str:
    width = max((len(c.id) for c in checks), default=10)
    lines = []
    for c in checks:
        lines.append(f"[{c.verdict:^4}] {c.id:<{width}}  {c.found}")
        if c.fix and c.verdict != OK:
            lines.append(f"       {'':<{width}}  fix: {c.fix}")
    counts = {v: sum(1 for c in checks if c.verdict == v) for v in (OK, WARN, FAIL)}
    lines.append(f"{counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail")
    return "\n".join(lines) + "\n"


def run_doctor(args: argparse.Namespace, inv: Inventory, holdings: Holdings | None = None, db: PciIds | None = None) -> int:
    checks = run_checks(inv, read_node(args), holdings, db)
    failed = any(c.verdict == FAIL for c in checks)
    if args.json:
        counts = {v: sum(1 for c in checks if c.verdict == v) for v in (OK, WARN, FAIL)}
        print(json.dumps({"ok": not failed, "summary": counts, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        sys.stdout.write(render(checks))
    return 1 if failed else 0
