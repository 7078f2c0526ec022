"""`bind` and `release`: move whole IOMMU groups to vfio-pci and back, safely.

Users typed three echo commands per function and got them wrong (EBUSY, ENODEV, a framebuffer in
the card's memory, a host driver that does not let go), and the `new_id` method binds every unbound
card with the same ids. Here the unit is the IOMMU group: every endpoint function of it (bridges stay
on pcieport) is moved through its own `driver_override` (set it, unbind the current driver,
drivers_probe), and its `driver` link is read back. A write that fails or does not finish within the
timeout stops the group, and what this run changed in it is rolled back from the state the kernel
shows then, so no group is left half bound. Before any write, refusals protect the host: a group
shared with other devices, a boot GPU whose memory a firmware framebuffer uses, vfio-pci not loaded,
the IOMMU off. Groups, functions and those rules come from the same snapshot and discovery code as
`inspect`, so the two cannot disagree.

The kernel is written only through `KernelIO.write(path, text)`: `SysfsWriter` on a node, the fake
kernel (sim/kernel.py) in tests. Each write runs in a worker thread so that one the kernel keeps
waiting (an unbind whose driver still has users) can be timed out, and every path is under the roots given.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from deviceplugin.config import Config, Rule
from deviceplugin.discovery import (
    IOMMU_OFF,
    GroupReport,
    blocker_reason,
    class_name,
    describe,
    discover,
    foreign_functions,
    match_rule,
    pick_primary,
    stays_on_host,
    vfs_of,
)
from deviceplugin.hostuse import find_holders, firmware_framebuffer
from deviceplugin.naming import PciIds
from deviceplugin.sysfs import NodeSnapshot, PciFunction, SysfsScanner, current_driver, device_dir, is_vfio_driver, parse_address, read_attr

BIND, RELEASE = "bind", "release"
DEFAULT_VFIO_DRIVER = "vfio-pci"
NO_OVERRIDE = "(null)"  # what driver_override reads when it is not set
# Step results
OK, FAILED, TIMEOUT, PENDING = "ok", "failed", "timeout", "pending"
# Group outcomes
BOUND, RELEASED, UNCHANGED, REFUSED, PLANNED = "bound", "released", "unchanged", "refused", "planned"
ROLLED_BACK, INCOMPLETE, NOT_RUN = "rolled back", "rollback incomplete", "not run"
FAILURES = (REFUSED, ROLLED_BACK, INCOMPLETE)

_ERRNO_HINTS = {
    errno.EBUSY: "the device already has a driver",
    errno.ENODEV: "no such device, or the driver does not match it (or no longer has it)",
    errno.EINVAL: "the kernel rejected the text written",
    errno.ENOENT: "no such attribute (is the driver loaded? is --sysfs-root a real sysfs?)",
    errno.EACCES: "not allowed: run as root with a writable /sys (the binder init container is privileged)",
    errno.EPERM: "not allowed: run as root with a writable /sys (the binder init container is privileged)",
    errno.EROFS: "sysfs is mounted read-only here (the plugin container's is; the binder init container mounts the host's)",
}


class BindError(ValueError):
    """The request cannot be understood (an address that is not one, a function that does not exist)."""


class KernelIO(Protocol):
    def write(self, path: str, text: str) -> None:
        """One write(2) of `text` to a sysfs attribute; raises OSError with the kernel's errno."""


class SysfsWriter:
    """The real kernel: os.open(O_WRONLY) and one os.write, and only under the sysfs root it was given."""

    def __init__(self, sysfs_root: str) -> None:
        self.root = os.path.abspath(sysfs_root)

    def write(self, path: str, text: str) -> None:
        full = os.path.abspath(path)
        if os.path.commonpath([self.root, full]) != self.root:
            raise OSError(errno.EPERM, f"refusing to write {path}: it is not under --sysfs-root {self.root}")
        fd = os.open(full, os.O_WRONLY)  # no O_CREAT: a missing attribute is ENOENT, never a new file
        try:
            os.write(fd, text.encode())  # one write: sysfs hands the whole buffer to one store call
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Roots:
    sysfs: str = "/sys"
    dev: str = "/dev"
    proc: str = "/proc"


@dataclass(frozen=True)
class Options:
    action: str
    addresses: tuple[str, ...] = ()
    dry_run: bool = False
    timeout: float = 10.0
    allow_shared_group: bool = False
    allow_boot_vga: bool = False


# --- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    kind: str  # "write", or "check": read the driver link back
    address: str
    path: str
    text: str  # write: the text (echo adds the newline); check: the driver wanted ("" = not a vfio driver)

    def line(self) -> str:
        if self.kind == "check":
            return f"check {self.path} -> {self.text or 'a host driver or none'}"
        return f"echo {self.text} > {self.path}" if self.text else f"echo > {self.path}"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    override: str = ""  # the flag that overrides this refusal, where one does


@dataclass(frozen=True)
class Change:
    function: PciFunction
    override: str | None  # driver_override before this run
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class GroupPlan:
    action: str
    group: str
    functions: tuple[PciFunction, ...]
    driver: str  # bind: the vfio driver; release: ""
    checks: tuple[Check, ...]
    changes: tuple[Change, ...]

    @property
    def refused(self) -> bool:
        return any(not c.ok for c in self.checks)


@dataclass(frozen=True)
class Result:
    step: Step
    outcome: str  # ok, failed, timeout, pending (a rollback write queued behind an unfinished unbind)
    detail: str = ""
    seconds: float = 0.0


@dataclass
class GroupRun:
    plan: GroupPlan
    outcome: str = NOT_RUN
    message: str = ""
    steps: list[Result] = field(default_factory=list)
    rollback: list[Result] = field(default_factory=list)


@dataclass
class Report:
    action: str
    dry_run: bool
    checks: list[Check] = field(default_factory=list)  # host-wide
    groups: list[GroupRun] = field(default_factory=list)
    note: str = ""

    @property
    def outcome(self) -> str:
        if any(not c.ok for c in self.checks) or any(g.outcome == REFUSED for g in self.groups):
            return REFUSED
        if any(g.outcome in FAILURES for g in self.groups):
            return "failed"
        if self.dry_run and any(g.outcome == PLANNED for g in self.groups):
            return PLANNED
        return "done" if self.changed else UNCHANGED

    @property
    def changed(self) -> bool:
        return any(g.outcome in (BOUND, RELEASED) for g in self.groups)


def _device_path(sysfs: str, address: str, attr: str) -> str:
    return os.path.join(device_dir(sysfs, address), attr)


def _driver_path(sysfs: str, driver: str, attr: str = "") -> str:
    return os.path.join(sysfs, "bus", "pci", "drivers", driver, attr)


def _probe_path(sysfs: str) -> str:
    return os.path.join(sysfs, "bus", "pci", "drivers_probe")


def read_override(sysfs: str, address: str) -> str | None:
    value = read_attr(_device_path(sysfs, address, "driver_override"))
    return None if value in (None, "", NO_OVERRIDE) else value


def _as_bound(functions: tuple[PciFunction, ...]) -> tuple[PciFunction, ...]:
    return tuple(fn if stays_on_host(fn) else replace(fn, driver=DEFAULT_VFIO_DRIVER) for fn in functions)


def bind_rule(functions: tuple[PciFunction, ...], config: Config) -> Rule | None:
    """The config rule for a group as `serve` will judge it once bound: its primary is picked as if every
    endpoint were on vfio-pci (a GPU still on nvidia has one already; an NVMe drive gets one only then),
    and the rules are matched against the functions as they are now."""
    bound = pick_primary(_as_bound(functions))
    primary = next((fn for fn in functions if bound is not None and fn.address == bound.address), None)
    return match_rule(config.rules, functions, primary)


def _bind_steps(sysfs: str, fn: PciFunction, driver: str) -> tuple[Step, ...]:
    a = fn.address
    steps = [Step("write", a, _device_path(sysfs, a, "driver_override"), driver)]
    if fn.driver:
        # The driver named in the plan, not devices/<a>/driver/unbind: if someone rebinds the function
        # meanwhile, this write fails (ENODEV) instead of unbinding a driver nobody looked at.
        steps.append(Step("write", a, _driver_path(sysfs, fn.driver, "unbind"), a))
    steps += [Step("write", a, _probe_path(sysfs), a), Step("check", a, _device_path(sysfs, a, "driver"), driver)]
    return tuple(steps)


def _release_steps(sysfs: str, fn: PciFunction, override: str | None) -> tuple[Step, ...]:
    a = fn.address
    steps = [Step("write", a, _device_path(sysfs, a, "driver_override"), "")] if override is not None else []
    steps += [
        Step("write", a, _driver_path(sysfs, fn.driver or "", "unbind"), a),
        Step("write", a, _probe_path(sysfs), a),  # the kernel gives it to its own driver, if one is loaded
        Step("check", a, _device_path(sysfs, a, "driver"), ""),
    ]
    return tuple(steps)


def _shared_group_check(g: GroupReport, options: Options) -> Check | None:
    primary = pick_primary(_as_bound(g.functions))
    if primary is None:
        return None
    slot = primary.address[:-2]
    others = foreign_functions(g.functions, primary)
    if not others:
        return Check("shared-group", True, f"group {g.id} holds only functions of the card at {slot}")
    listed = ", ".join(f"{fn.address} ({class_name(fn.class_code)}, {fn.driver or 'no driver'})" for fn in others)
    if options.allow_shared_group:
        return Check("shared-group", True, f"--allow-shared-group: {listed} go with the card at {slot} to the VM")
    return Check(
        "shared-group",
        False,
        f"group {g.id} also holds {listed}, not part of the card at {slot}: binding the group takes them from the host "
        "(poor ACS isolation; a slot with its own IOMMU group, usually CPU-attached, avoids it)",
        "--allow-shared-group",
    )


def _sriov_checks(g: GroupReport, snapshot: NodeSnapshot) -> list[Check]:
    """Never unbind an SR-IOV physical function that has VFs: the kernel destroys them with it (no override)."""
    checks = []
    for fn in g.functions:
        vfs = vfs_of(fn, snapshot.functions)  # wherever they are: unbinding the PF destroys them all
        if vfs and not is_vfio_driver(fn.driver):
            checks.append(Check("sriov-pf", False, blocker_reason(fn, vfs)))
    return checks


def _boot_vga_checks(g: GroupReport, options: Options, roots: Roots) -> list[Check]:
    checks = []
    for fn in (f for f in g.functions if f.boot_vga):
        framebuffer = firmware_framebuffer(roots.sysfs, roots.proc, fn.address)
        if framebuffer is None:
            checks.append(Check("boot-vga", True, f"{fn.address} is the boot VGA device, but no firmware framebuffer is on it"))
        elif options.allow_boot_vga:
            checks.append(Check("boot-vga", True, f"--allow-boot-vga: {fn.address} is the boot VGA device and {framebuffer}"))
        else:
            checks.append(
                Check(
                    "boot-vga",
                    False,
                    f"{describe(fn)} is the boot VGA device and a firmware framebuffer still uses its memory: {framebuffer}. "
                    "vfio-pci cannot claim that memory for a VM while it does, and the host console loses its display: make "
                    "another GPU the primary display in the firmware, or boot with video=efifb:off (efifb) or "
                    "initcall_blacklist=sysfb_init (BOOTFB, simpledrm)",
                    "--allow-boot-vga",
                )
            )
    return checks


def _bind_checks(g: GroupReport, driver: str, snapshot: NodeSnapshot, options: Options, roots: Roots) -> tuple[Check, ...]:
    checks = [
        Check("readable", False, f"{p.address} in group {g.id} could not be read ({p.reason}), so the group cannot be checked")
        for p in snapshot.problems
        if p.iommu_group == g.id
    ]
    loaded = os.path.isdir(_driver_path(roots.sysfs, driver))
    checks.append(
        Check("driver", True, f"{driver} is loaded")
        if loaded
        else Check("driver", False, f"{driver} is not loaded ({_driver_path(roots.sysfs, driver)} is missing): run `modprobe {driver}`")
    )
    checks += _sriov_checks(g, snapshot)
    shared = _shared_group_check(g, options)
    if shared is not None:
        checks.append(shared)
    checks += _boot_vga_checks(g, options, roots)
    return tuple(checks)


def plan_group(options: Options, g: GroupReport, snapshot: NodeSnapshot, config: Config, roots: Roots) -> GroupPlan:
    endpoints = [fn for fn in g.functions if not stays_on_host(fn)]
    if options.action == RELEASE:
        overrides = {fn.address: read_override(roots.sysfs, fn.address) for fn in endpoints if is_vfio_driver(fn.driver)}
        changes = tuple(
            Change(fn, overrides[fn.address], _release_steps(roots.sysfs, fn, overrides[fn.address]))
            for fn in endpoints
            if fn.address in overrides
        )
        return GroupPlan(RELEASE, g.id, g.functions, "", (), changes)
    rule = bind_rule(g.functions, config)
    named = rule.vfio_driver if rule is not None else None
    driver = named or DEFAULT_VFIO_DRIVER
    # Without a config naming a variant, any vfio driver will do: never move a function off nvgrace_gpu_vfio_pci.
    todo = [fn for fn in endpoints if fn.driver != driver and not (named is None and is_vfio_driver(fn.driver))]
    changes = tuple(Change(fn, read_override(roots.sysfs, fn.address), _bind_steps(roots.sysfs, fn, driver)) for fn in todo)
    checks = _bind_checks(g, driver, snapshot, options, roots) if changes else ()
    return GroupPlan(BIND, g.id, g.functions, driver, checks, changes)


# --- which groups ---------------------------------------------------------------------------------
def _group_of(text: str, snapshot: NodeSnapshot, sysfs: str) -> str:
    address = parse_address(text)
    if address is None:
        raise BindError(f"{text!r} is not a PCI address like 0000:01:00.0")
    problem = next((p for p in snapshot.problems if p.address == address), None)
    if problem is not None:
        raise BindError(f"{address} cannot be read: {problem.reason}")
    fn = next((f for f in snapshot.functions if f.address == address), None)
    if fn is None:
        raise BindError(f"no PCI function {address} under {os.path.join(sysfs, 'bus', 'pci', 'devices')}")
    if fn.iommu_group is None:
        raise BindError(f"{address} has no IOMMU group (is the IOMMU on?)")
    return fn.iommu_group


def requested_groups(
    options: Options, groups: tuple[GroupReport, ...], snapshot: NodeSnapshot, config: Config, sysfs: str
) -> list[GroupReport]:
    """The groups of the given addresses, each once; without addresses, those a `bind: true` rule selects."""
    by_id = {g.id: g for g in groups}
    if options.addresses:
        ids = list(dict.fromkeys(_group_of(a, snapshot, sysfs) for a in options.addresses))
        return [by_id[i] for i in ids]
    return [g for g in groups if (rule := bind_rule(g.functions, config)) is not None and rule.bind and not rule.exclude]


# --- running it -----------------------------------------------------------------------------------
def timed_write(kernel: KernelIO, path: str, text: str, timeout: float) -> tuple[bool, OSError | None, float]:
    """(finished, error, seconds). A plain daemon thread, not an executor: a write the kernel keeps
    waiting cannot be cancelled, and concurrent.futures would wait for it at exit."""
    done = threading.Event()
    raised: list[BaseException] = []

    def work() -> None:
        try:
            kernel.write(path, text)
        except BaseException as exc:  # handed to the caller; a thread has nowhere else to put it
            raised.append(exc)
        finally:
            done.set()

    start = time.monotonic()
    threading.Thread(target=work, daemon=True, name=f"write {path}").start()
    finished = done.wait(timeout)
    seconds = time.monotonic() - start
    error = raised[0] if raised else None
    if error is None or isinstance(error, OSError):
        return finished, error, seconds
    raise error  # a bug, not the kernel's answer


def _error_detail(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    hint = _ERRNO_HINTS.get(exc.errno or 0)
    return f"{name}: {exc.strerror}" + (f" ({hint})" if hint else "")


def _timeout_detail(step: Step, fn: PciFunction, timeout: float, roots: Roots) -> str:
    if not step.path.endswith("/unbind"):
        return f"did not finish within {timeout:g} s: {step.address} is busy with another driver operation (an unbind or probe)"
    driver = os.path.basename(os.path.dirname(step.path))
    holders = find_holders(roots.sysfs, roots.proc, fn, driver)
    return (
        f"the unbind from {driver} did not finish within {timeout:g} s: {driver} still has {step.address} in use; "
        f"held by: {holders.describe()}. A write to unbind cannot be cancelled: the kernel finishes it when they let go, "
        f"leaving {step.address} with no driver (until then this command may not exit)"
    )


def _check(step: Step, sysfs: str, action: str) -> Result:
    now = current_driver(sysfs, step.address)
    if (now == step.text) if step.text else not is_vfio_driver(now):
        return Result(step, OK, f"{step.address} is on {now or 'no driver'}")
    if action == BIND:
        why = f"{step.text} did not take it (its probe failed: see the kernel log)" if now is None else "another driver took it"
    else:
        why = f"{now} claims its ids (vfio-pci.ids= on the kernel command line, or a new_id): remove them there"
    return Result(step, FAILED, f"{step.address} is on {now or 'no driver'} after drivers_probe, not {step.text or 'a host driver'}: {why}")


def run_step(step: Step, fn: PciFunction, kernel: KernelIO, roots: Roots, timeout: float, action: str) -> Result:
    if step.kind == "check":
        return _check(step, roots.sysfs, action)
    finished, error, seconds = timed_write(kernel, step.path, f"{step.text}\n", timeout)
    if not finished:
        return Result(step, TIMEOUT, _timeout_detail(step, fn, timeout, roots), seconds)
    if error is not None:
        return Result(step, FAILED, _error_detail(error), seconds)
    return Result(step, OK, "", seconds)


def _restore_steps(change: Change, sysfs: str, stuck: bool) -> list[Step]:
    """What puts one function back as it was, from the state the kernel shows now."""
    fn, a = change.function, change.function.address
    override_path = _device_path(sysfs, a, "driver_override")
    if stuck:
        # The kernel still holds the device (its driver link may already be gone): only put the
        # override back, so that whatever probes it next gives it to its own driver.
        return [Step("write", a, override_path, change.override or "")]
    now, override = current_driver(sysfs, a), read_override(sysfs, a)
    steps = []
    if now != fn.driver:
        steps.append(Step("write", a, override_path, fn.driver or ""))  # only its old driver may take it
        override = fn.driver
        if now:
            steps.append(Step("write", a, _driver_path(sysfs, now, "unbind"), a))
        if fn.driver:
            steps += [Step("write", a, _probe_path(sysfs), a), Step("check", a, _device_path(sysfs, a, "driver"), fn.driver)]
    if override != change.override:
        steps.append(Step("write", a, override_path, change.override or ""))
    return steps


def roll_back(touched: list[Change], stuck: str | None, kernel: KernelIO, roots: Roots, timeout: float, action: str) -> list[Result]:
    """Newest first; a function the kernel still holds last, as its writes wait for that."""
    ordered = [c for c in reversed(touched) if c.function.address != stuck] + [c for c in touched if c.function.address == stuck]
    results = []
    for change in ordered:
        is_stuck = change.function.address == stuck
        for step in _restore_steps(change, roots.sysfs, is_stuck):
            result = run_step(step, change.function, kernel, roots, timeout, action)
            if is_stuck and result.outcome == TIMEOUT:
                result = replace(
                    result, outcome=PENDING, detail="queued behind the unfinished unbind: the kernel applies it when that ends"
                )
            results.append(result)
            if result.outcome not in (OK, PENDING):
                break
    return results


def _failure_message(plan: GroupPlan, failed: Result, rollback: list[Result], stuck: str | None) -> tuple[str, str]:
    stopped = f"stopped at `{failed.step.line()}` ({failed.outcome})"
    if not all(r.outcome in (OK, PENDING) for r in rollback):
        bad = next(r for r in rollback if r.outcome not in (OK, PENDING))
        return (
            INCOMPLETE,
            f"{stopped}. ROLLBACK INCOMPLETE at `{bad.step.line()}`: {bad.detail}; the group may be half bound: fix it by hand",
        )
    if stuck is None:
        return ROLLED_BACK, f"{stopped}. Rolled back: every function of group {plan.group} is as it was"
    change = next(c for c in plan.changes if c.function.address == stuck)
    return ROLLED_BACK, (
        f"{stopped}. Rolled back, except {stuck}, which the kernel still holds: when its unbind ends it has no driver; "
        f"{_then(plan, change)}"
    )


def _then(plan: GroupPlan, change: Change) -> str:
    """How to finish by hand what the kernel could not do in time."""
    a, driver = change.function.address, change.function.driver
    if plan.action == BIND:
        return f"give it back to {driver} then with `echo {a} > /sys/bus/pci/drivers_probe`" if driver else "as it was before"
    if change.override:
        return f"its driver_override names {change.override} again, so a probe puts it back there"
    return f"bind it again then with `vfio-device-plugin bind {a}`"


def _success_message(plan: GroupPlan, roots: Roots) -> str:
    if plan.action == BIND:
        node = os.path.join(roots.dev, "vfio", plan.group)
        present = "is present" if os.path.exists(node) else "is not present (yet)"
        return f"group {plan.group}: every function is on {plan.driver}; {node} {present}"
    back = ", ".join(f"{c.function.address} -> {current_driver(roots.sysfs, c.function.address) or 'no driver'}" for c in plan.changes)
    return f"group {plan.group}: given back to the host ({back})"


def execute(plan: GroupPlan, kernel: KernelIO, roots: Roots, timeout: float) -> GroupRun:
    run = GroupRun(plan)
    touched: list[Change] = []
    for change in plan.changes:
        touched.append(change)
        for step in change.steps:
            result = run_step(step, change.function, kernel, roots, timeout, plan.action)
            run.steps.append(result)
            if result.outcome != OK:
                stuck = step.address if result.outcome == TIMEOUT else None
                run.rollback = roll_back(touched, stuck, kernel, roots, timeout, plan.action)
                run.outcome, run.message = _failure_message(plan, result, run.rollback, stuck)
                return run
    run.outcome = BOUND if plan.action == BIND else RELEASED
    run.message = _success_message(plan, roots)
    return run


def _unchanged_message(plan: GroupPlan) -> str:
    if all(stays_on_host(fn) for fn in plan.functions):
        return f"group {plan.group} holds only bridges, which stay on pcieport: nothing to do"
    if plan.action == BIND:
        return f"group {plan.group}: every function is already on a vfio driver ({plan.driver} wanted): nothing to do"
    return f"group {plan.group}: no function is on a vfio driver: nothing to release"


def _iommu_check(snapshot: NodeSnapshot) -> Check:
    if snapshot.host.iommu_enabled:
        return Check("iommu", True, f"IOMMU on: {snapshot.host.iommu_groups} groups")
    return Check("iommu", False, IOMMU_OFF)


def run(options: Options, roots: Roots, config: Config, pci_ids: PciIds, kernel: KernelIO, config_path: str | None = None) -> Report:
    """Plans every requested group, refuses all if any is refused, else runs them in order until one fails."""
    snapshot = SysfsScanner(roots.sysfs, roots.dev, once=True).scan()
    report = Report(options.action, options.dry_run)
    if options.action == BIND:
        report.checks.append(_iommu_check(snapshot))
        if not snapshot.host.iommu_enabled:
            return report
    inventory = discover(snapshot, config, pci_ids)
    groups = requested_groups(options, inventory.groups, snapshot, config, roots.sysfs)
    if not groups:
        report.note = f"no group is selected by a config rule with bind: true in {config_path or 'the config'}: nothing to {options.action}"
    plans = [plan_group(options, g, snapshot, config, roots) for g in groups]
    refused = any(p.refused for p in plans)
    failed = False
    for plan in plans:
        run_ = GroupRun(plan)
        if not plan.changes:
            run_.outcome, run_.message = UNCHANGED, _unchanged_message(plan)
        elif plan.refused:
            run_.outcome, run_.message = REFUSED, f"group {plan.group}: refused, nothing was changed"
        elif refused or failed:
            run_.message = f"group {plan.group}: not run, as {'another group was refused' if refused else 'an earlier group failed'}"
        elif options.dry_run:
            run_.outcome, run_.message = PLANNED, f"group {plan.group}: dry run, nothing was changed"
        else:
            run_ = execute(plan, kernel, roots, options.timeout)
            failed = run_.outcome in FAILURES
        report.groups.append(run_)
    return report


# --- output ---------------------------------------------------------------------------------------
def _check_line(c: Check) -> str:
    text = f"check   {'ok' if c.ok else 'REFUSED'}: {c.detail}"
    return text + (f" (override with {c.override})" if not c.ok and c.override else "")


def _result_lines(r: Result, indent: str) -> list[str]:
    took = f" ({r.seconds:.2f} s)" if r.step.kind == "write" else ""
    lines = [f"{indent}{r.outcome.upper() if r.outcome != OK else OK:<8}{r.step.line()}{took}"]
    return lines + ([f"{indent}        {r.detail}"] if r.detail and r.outcome != OK else [])


def _group_text(g: GroupRun) -> list[str]:
    plan = g.plan
    fns = ", ".join(f"{describe(fn)} on {fn.driver or 'no driver'}" for fn in plan.functions)
    lines = [f"{plan.action} group {plan.group}{' to ' + plan.driver if plan.driver else ''}: {fns}"]
    lines += [f"  {_check_line(c)}" for c in plan.checks]
    if g.outcome == PLANNED:
        lines += [f"  {'would':<8}{s.line()}" for c in plan.changes for s in c.steps]
    for r in g.steps:
        lines += _result_lines(r, "  ")
    if g.rollback:
        lines.append("  rollback:")
        for r in g.rollback:
            lines += _result_lines(r, "    ")
    return [*lines, f"  => {g.outcome}: {g.message}"]


def render_text(report: Report) -> str:
    lines = [_check_line(c) for c in report.checks]
    for g in report.groups:
        lines += _group_text(g)
    if report.note:
        lines.append(report.note)
    summary = {
        REFUSED: "refused: nothing was changed",
        "failed": "failed: see the rollback above",
        PLANNED: "dry run: nothing was changed",
        UNCHANGED: "nothing changed: everything was already as asked",
        "done": "done",
    }[report.outcome]
    return "\n".join([*lines, f"{report.action}: {summary}"]) + "\n"


def _step_json(s: Step) -> dict[str, str]:
    return {"kind": s.kind, "address": s.address, "path": s.path, "text": s.text, "line": s.line()}


def _result_json(r: Result) -> dict[str, Any]:
    return {**_step_json(r.step), "result": r.outcome, "detail": r.detail, "seconds": round(r.seconds, 3)}


def _check_json(c: Check) -> dict[str, Any]:
    return {"name": c.name, "ok": c.ok, "detail": c.detail, "override": c.override or None}


def report_json(report: Report) -> dict[str, Any]:
    return {
        "action": report.action,
        "dry_run": report.dry_run,
        "outcome": report.outcome,
        "changed": report.changed,
        "note": report.note or None,
        "checks": [_check_json(c) for c in report.checks],
        "groups": [
            {
                "group": g.plan.group,
                "driver": g.plan.driver or None,
                "outcome": g.outcome,
                "message": g.message,
                "functions": [
                    {"address": fn.address, "ids": fn.ids, "class": fn.class_code, "driver": fn.driver, "boot_vga": fn.boot_vga}
                    for fn in g.plan.functions
                ],
                "checks": [_check_json(c) for c in g.plan.checks],
                "plan": [_step_json(s) for c in g.plan.changes for s in c.steps],
                "steps": [_result_json(r) for r in g.steps],
                "rollback": [_result_json(r) for r in g.rollback],
            }
            for g in report.groups
        ],
    }


def run_command(args: argparse.Namespace, config: Config, pci_ids: PciIds, kernel: KernelIO | None = None) -> int:
    """`bind` / `release` as the command line runs them; exit 1 when refused or failed."""
    options = Options(
        action=args.command,
        addresses=tuple(args.addresses),
        dry_run=args.dry_run,
        timeout=args.timeout,
        allow_shared_group=getattr(args, "allow_shared_group", False),
        allow_boot_vga=getattr(args, "allow_boot_vga", False),
    )
    if not options.addresses and not args.config:
        raise BindError(f"give the ADDRESS of a function of each group to {options.action}, or --config FILE with bind: true rules")
    roots = Roots(args.sysfs_root, args.dev_root, args.proc_root)
    report = run(options, roots, config, pci_ids, kernel or SysfsWriter(args.sysfs_root), args.config)
    sys.stdout.write(json.dumps(report_json(report), indent=2) + "\n" if args.json else render_text(report))
    return 1 if report.outcome in (REFUSED, "failed") else 0
