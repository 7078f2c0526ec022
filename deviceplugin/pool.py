"""The devices currently published per resource, with their health: the ONE place state changes.

`update(inventory)` is the single reconcile step (start-up, rescans, inotify events and kubelet
restarts all end here). It publishes healthy candidates, keeps devices it already published as
Unhealthy (with the reason) while they still exist on the node, and drops devices that left the node.
On top of that sit *holds*: a multi-GPU IOMMU group can be opened by one VM only, so once a pod holds
some of its GPUs the others are published Unhealthy ("IOMMU group N is held by ns/pod") until it is
gone. Holds come from our own Allocate answers (at once) and from the kubelet's PodResources API
(`set_holdings`, which also says who the holder is and when it is gone).
The published state is an immutable mapping swapped under a lock, so the gRPC handlers read a
consistent snapshot without locking; ListAndWatch streams wait on a per-resource version.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from deviceplugin.discovery import Device, Inventory
from deviceplugin.naming import companion_resource, env_var_name
from deviceplugin.sysfs import current_driver

log = logging.getLogger(__name__)

HOST_DEV = "/dev"  # paths handed to the runtime are host paths, whatever --dev-root we read from
# An Allocate answer holds a multi-GPU group at once; the kubelet's PodResources API confirms the
# holder moments later. A hold it never confirms (the pod's admission failed elsewhere) ends after this.
PENDING_HOLD_SECONDS = 60.0


class UnknownDevice(LookupError):
    """The kubelet asked for an ID this plugin never offered for that resource."""


class InvalidRequest(ValueError):
    """The request itself is wrong (no device, the same device twice)."""


class DeviceUnavailable(RuntimeError):
    """The device is known but cannot be handed out now (unhealthy, no longer viable, its group held)."""


@dataclass(frozen=True)
class Allocation:
    devices: tuple[tuple[str, str, str], ...]  # (container_path, host_path, permissions)
    envs: dict[str, str]


@dataclass(frozen=True)
class Change:
    resource: str
    device: Device
    what: str  # "added", "removed", "healthy", "unhealthy"


@dataclass(frozen=True)
class Holder:
    namespace: str
    pod: str
    container: str

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.pod}"


@dataclass(frozen=True)
class Holdings:
    """What the kubelet's PodResources API said: who holds which of our device IDs."""

    ok: bool  # False: the API could not be asked (missing socket, refused, deadline, rate limit)
    error: str | None = None
    devices: Mapping[tuple[str, str], Holder] = field(default_factory=dict)  # (resource, device id) -> holder
    at: float = 0.0  # unix time of the answer
    allocatable: Mapping[str, frozenset[str]] | None = None  # resource -> IDs the kubelet counts; None: not served

    def holder(self, resource: str, device_id: str) -> Holder | None:
        return self.devices.get((resource, device_id))


@dataclass(frozen=True)
class Hold:
    """Some devices of a multi-GPU group are given to a pod: the rest of the group must not go elsewhere."""

    devices: frozenset[str]
    holder: Holder | None  # None: our own Allocate answer, not (yet) confirmed by PodResources
    since: float  # monotonic

    def who(self) -> str:
        return self.holder.name if self.holder else "another allocation"


@dataclass(frozen=True)
class _Published:
    devices: dict[str, dict[str, Device]]  # resource -> id -> device (insertion = id order)
    versions: dict[str, int]
    specs: dict[str, tuple[tuple[str, str, str], ...]]  # device id -> its DeviceSpecs, built once per scan


class DevicePool:
    def __init__(self, sysfs_root: str = "/sys", dev_root: str = "/dev") -> None:
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root
        self._cond = threading.Condition()
        self._state = _Published({}, {}, {})
        self._base: dict[str, dict[str, Device]] = {}  # what discovery says, before holds
        self._iommufd = False
        self._holds: dict[str, Hold] = {}  # IOMMU group -> hold (multi-GPU groups only)
        self._holdings = Holdings(ok=False, error="not asked yet")
        self._stopped = False
        self.on_stale: Callable[[], None] = lambda: None  # asks the daemon for a rescan
        self.on_allocated: Callable[[], None] = lambda: None  # asks for a PodResources refresh

    # --- the reconcile step ---------------------------------------------------------------------
    def update(self, inventory: Inventory) -> list[Change]:
        with self._cond:
            present = {fn.address for g in inventory.groups for fn in g.functions}
            self._base = _merge(self._base, inventory, present)
            self._iommufd = inventory.host.iommufd
            return self._publish()

    def set_holdings(self, holdings: Holdings) -> list[Change]:
        """A fresh PodResources answer: rebuild the holds from it (keeping our own unconfirmed ones a while)."""
        with self._cond:
            self._holdings = holdings
            if not holdings.ok:
                return []  # the holds stay as they were (and as published): nothing to publish anew
            self._holds = _holds_from(holdings, self._base, self._holds, time.monotonic())
            return self._publish()

    def _publish(self) -> list[Change]:
        """Applies the holds to the discovered devices and swaps in the new state. Call with the lock held."""
        old = self._state
        self._holds = {g: h for g, h in self._holds.items() if _group_exists(self._base, g)}
        new_devices = _apply_holds(self._base, self._holds)
        changes = _diff(old.devices, new_devices)
        versions = dict(old.versions)
        for resource in {c.resource for c in changes} | (new_devices.keys() - old.versions.keys()):
            versions[resource] = versions.get(resource, 0) + 1
        specs = {d.id: _device_specs(d, self._iommufd) for devs in new_devices.values() for d in devs.values() if not d.role}
        self._state = _Published(new_devices, versions, specs)
        if changes or versions != old.versions:
            self._cond.notify_all()
        return changes

    # --- readers --------------------------------------------------------------------------------
    def resources(self) -> list[str]:
        return sorted(self._state.devices)

    def devices(self, resource: str) -> tuple[int, tuple[Device, ...]]:
        state = self._state
        return state.versions.get(resource, 0), tuple(state.devices.get(resource, {}).values())

    def holdings(self) -> Holdings:
        return self._holdings

    def wait_for_change(self, resource: str, version: int, timeout: float, cancelled: Callable[[], bool]) -> bool:
        """Blocks until the resource's version moves past `version`; False on timeout, stop or cancel."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._stopped or cancelled() or self._state.versions.get(resource, 0) != version,
                timeout=timeout,
            )
            return not self._stopped and not cancelled() and self._state.versions.get(resource, 0) != version

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopped

    # --- allocation -----------------------------------------------------------------------------
    def allocate(self, resource: str, ids: Iterable[str]) -> Allocation:
        """The device-plugin Allocate: device nodes and env, and a hold on every multi-GPU group it touches."""
        devices = self._resolve(resource, ids)
        if all(d.role for d in devices):
            # A companion token: the function itself reaches the VM through its GPU's Allocate (same group,
            # same order); a second writer of the PCI_RESOURCE variable would break that pairing.
            return Allocation((), {})
        self._check_groups_free(devices)
        allocation = Allocation(self._specs(devices), _envs(resource, devices))
        self._hold(devices)
        self.on_allocated()
        return allocation

    def device_nodes(self, resource: str, ids: Iterable[str]) -> tuple[tuple[str, str, str], ...]:
        """The host device nodes of these devices after the same checks as Allocate (for DRA's prepare,
        which keeps whole groups itself and needs neither env nor holds)."""
        return self._specs([d for d in self._resolve(resource, ids) if not d.role])

    def _resolve(self, resource: str, ids: Iterable[str]) -> list[Device]:
        published = self._state.devices.get(resource, {})
        return [self._usable(resource, published, device_id) for device_id in _checked(resource, list(ids))]

    def _specs(self, devices: list[Device]) -> tuple[tuple[str, str, str], ...]:
        specs: dict[tuple[str, str, str], None] = {(f"{HOST_DEV}/vfio/vfio", f"{HOST_DEV}/vfio/vfio", "mrw"): None}
        state = self._state
        for device in devices:
            specs.update(dict.fromkeys(state.specs[device.id]))
        return tuple(specs)

    def _usable(self, resource: str, published: dict[str, Device], device_id: str) -> Device:
        device = published.get(device_id)
        if device is None:
            raise UnknownDevice(f"{device_id} is not a {resource} device on this node (offered: {', '.join(published) or 'none'})")
        if not device.healthy:
            raise DeviceUnavailable(f"{resource} device {device_id} (IOMMU group {device.group}) is unhealthy: {device.reason}")
        problem = self._recheck(device)
        if problem:
            self.on_stale()
            raise DeviceUnavailable(f"{resource} device {device_id} (IOMMU group {device.group}) is no longer usable: {problem}")
        return device

    def _check_groups_free(self, devices: list[Device]) -> None:
        """Refuses to split a group across pods, e.g. when a stale kubelet checkpoint asks for a held group's mate."""
        holds = self._holds
        for device in devices:
            hold = holds.get(device.group)
            if hold is not None and device.id not in hold.devices and not hold.devices & {d.id for d in devices}:
                raise DeviceUnavailable(
                    f"IOMMU group {device.group} is held by {hold.who()} ({', '.join(sorted(hold.devices))}): {device.id} "
                    "cannot go to another pod, because a group can be opened by one VM only"
                )

    def _hold(self, devices: list[Device]) -> None:
        """Our own answer holds each multi-GPU group it touched until PodResources says who has it."""
        touched: dict[str, set[str]] = {}
        for device in devices:
            if device.mates:
                touched.setdefault(device.group, set()).add(device.id)
        if not touched:
            return
        now = time.monotonic()
        with self._cond:
            for group, ids in touched.items():
                self._holds[group] = Hold(frozenset(ids), None, now)
            self._publish()

    def _recheck(self, device: Device) -> str | None:
        """A few syscalls, not a rescan: each function's driver link and the group's device node."""
        for address, driver in device.drivers:
            now = current_driver(self.sysfs_root, address)
            if now != driver:
                return f"{address} is now bound to {now or 'no driver (or removed)'}, was {driver or 'no driver'}"
        if not os.path.exists(os.path.join(self.dev_root, "vfio", device.group)):
            return f"/dev/vfio/{device.group} is gone"
        return None

    def preferred(self, resource: str, available: list[str], must_include: list[str], size: int) -> list[str]:
        published = self._state.devices.get(resource, {})
        return preferred_allocation(available, must_include, size, {d.id: (d.group, d.numa_node) for d in published.values()})


def _checked(resource: str, request: list[str]) -> list[str]:
    if not request:
        raise InvalidRequest(f"Allocate for {resource} asked for no device")
    twice = sorted(d for d, n in Counter(request).items() if n > 1)
    if twice:
        raise InvalidRequest(f"Allocate for {resource} names {', '.join(twice)} more than once (a VM would get it twice)")
    return request


def _envs(resource: str, devices: list[Device]) -> dict[str, str]:
    """PCI_RESOURCE_<NAME>: the requested GPUs in request order; per companion role the same GPUs' own functions."""
    envs = {env_var_name(resource): ",".join(d.id for d in devices)}
    by_role: dict[str, list[str]] = {}
    for device in devices:
        for role, address in device.companions:
            by_role.setdefault(role, []).append(address)
    for role, addresses in by_role.items():
        envs[env_var_name(companion_resource(resource, role))] = ",".join(addresses)
    return envs


def _merge(old: dict[str, dict[str, Device]], inventory: Inventory, present: set[str]) -> dict[str, dict[str, Device]]:
    merged: dict[str, dict[str, Device]] = {}
    for resource, candidates in inventory.devices.items():
        known = old.get(resource, {})
        # Never advertise a device a VM could not use: an unhealthy candidate is only kept (as
        # Unhealthy) when we already published it, so the kubelet learns it went bad.
        kept = {d.id: d for d in candidates if d.healthy or d.id in known}
        if kept:
            merged[resource] = kept
    for resource, devices in old.items():
        for device in devices.values():
            if device.id in merged.get(resource, {}) or device.id not in present:
                continue
            why = _why_not_candidate(inventory, device)
            merged.setdefault(resource, {})[device.id] = replace(device, healthy=False, reason=why)
    for resource in old:
        merged.setdefault(resource, {})  # a resource that lost every device still streams an empty list
    return {r: dict(sorted(d.items())) for r, d in sorted(merged.items())}


def _why_not_candidate(inventory: Inventory, device: Device) -> str:
    for group in inventory.groups:
        if any(fn.address == device.id for fn in group.functions):
            return "; ".join(group.reasons) or f"now offered as {group.resource}"
    return "no longer offered"


def _diff(old: dict[str, dict[str, Device]], new: dict[str, dict[str, Device]]) -> list[Change]:
    changes = []
    for resource in sorted(old.keys() | new.keys()):
        before, after = old.get(resource, {}), new.get(resource, {})
        for device_id in sorted(before.keys() | after.keys()):
            a, b = before.get(device_id), after.get(device_id)
            if a is None and b is not None:
                changes.append(Change(resource, b, "added"))
            elif b is None and a is not None:
                changes.append(Change(resource, a, "removed"))
            elif a is not None and b is not None and (a.healthy, a.numa_node) != (b.healthy, b.numa_node):
                changes.append(Change(resource, b, "healthy" if b.healthy else "unhealthy"))
    return changes


def _group_exists(base: dict[str, dict[str, Device]], group: str) -> bool:
    return any(d.group == group for devs in base.values() for d in devs.values())


def _holds_from(holdings: Holdings, base: dict[str, dict[str, Device]], old: dict[str, Hold], now: float) -> dict[str, Hold]:
    """Holds as PodResources reports them; our own unconfirmed holds stay until it confirms them or they expire."""
    held: dict[str, dict[str, Holder]] = {}
    for (resource, device_id), holder in holdings.devices.items():
        device = base.get(resource, {}).get(device_id)
        if device is not None and device.mates and not device.role:
            held.setdefault(device.group, {})[device_id] = holder
    holds = {}
    for group, members in held.items():
        previous = old.get(group)
        since = previous.since if previous is not None and previous.devices == frozenset(members) else now
        holds[group] = Hold(frozenset(members), min(members.values(), key=lambda h: h.name), since)
    for group, hold in old.items():
        if group not in holds and hold.holder is None and now - hold.since < PENDING_HOLD_SECONDS:
            holds[group] = hold
    return holds


def _apply_holds(base: dict[str, dict[str, Device]], holds: dict[str, Hold]) -> dict[str, dict[str, Device]]:
    """Group-mates of held devices (and their companion tokens) turn Unhealthy, naming the holder."""
    if not holds:
        return base
    out: dict[str, dict[str, Device]] = {}
    for resource, devices in base.items():
        out[resource] = {}
        for device_id, device in devices.items():
            hold = holds.get(device.group)
            gpu = device.owner or device.id
            if hold is not None and gpu not in hold.devices and device.healthy:
                held = ", ".join(sorted(hold.devices))
                why = f"IOMMU group {device.group} is held by {hold.who()} ({held}): a group can be opened by one VM only"
                device = replace(device, healthy=False, reason=why)
            out[resource][device_id] = device
    return out


def _device_specs(device: Device, iommufd: bool) -> tuple[tuple[str, str, str], ...]:
    paths = [f"{HOST_DEV}/vfio/{device.group}"]
    if iommufd and device.vfio_cdevs:
        paths.append(f"{HOST_DEV}/iommu")
        paths.extend(f"{HOST_DEV}/vfio/devices/{c}" for c in device.vfio_cdevs)
    return tuple((p, p, "mrw") for p in paths)


def preferred_allocation(available: list[str], must_include: list[str], size: int, devices: Mapping[str, tuple[str, int]]) -> list[str]:
    """The devices to give a container, keeping IOMMU groups whole.

    `devices`: this resource's published devices -> (IOMMU group, NUMA node); IDs it does not know are
    ignored. must_include first, then the rest of the groups those touch, then the fewest whole free
    groups that make up the request (spanning the fewest NUMA nodes, preferring the nodes already
    chosen); a group is split only when no set of whole groups adds up to the request. Linear in
    `available` plus a small knapsack over groups.
    """
    avail = sorted({d for d in available if d in devices} | {d for d in must_include if d in devices})
    chosen = [d for d in dict.fromkeys(must_include) if d in devices]
    if len(chosen) >= size:
        return chosen
    members: dict[str, list[str]] = {}
    for device_id in avail:
        members.setdefault(devices[device_id][0], []).append(device_id)
    taken = set(chosen)
    for group in dict.fromkeys(devices[d][0] for d in chosen):
        for device_id in members[group]:
            if len(taken) < size and device_id not in taken:
                chosen.append(device_id)
                taken.add(device_id)
    touched = {devices[d][0] for d in chosen}
    free = [(devices[m[0]][1], m) for g, m in members.items() if g not in touched]
    prefer = {devices[d][1] for d in chosen}
    return chosen + _fill(free, size - len(chosen), prefer)


_Pick = tuple[int, tuple[tuple[int, int], ...]]  # (groups used, (group index, devices taken) ...)
MAX_NUMA_SUBSETS_NODES = 6  # 2^6 subsets; beyond that all nodes are considered together
MAX_KNAPSACK_CELLS = 200_000  # groups x request size; beyond that a greedy fill (never seen on real nodes)


def _fill(free: list[tuple[int, list[str]]], need: int, prefer: set[int]) -> list[str]:
    """`need` devices from the free groups ((numa, members), in address order), as whole groups if possible."""
    if need <= 0 or not free:
        return []
    if sum(len(m) for _, m in free) <= need:
        return [d for _, m in free for d in m]
    free = sorted(free, key=lambda g: (g[0] not in prefer, g[1][0]))
    nodes = sorted({numa for numa, _ in free})
    subsets = [c for k in range(1, len(nodes) + 1) for c in itertools.combinations(nodes, k)]
    if len(nodes) > MAX_NUMA_SUBSETS_NODES:
        subsets = [tuple(nodes)]
    for split in (False, True):
        best: tuple[tuple[int, int, bool, bool, tuple[int, ...]], list[str]] | None = None
        for subset in subsets:
            groups = [m for numa, m in free if numa in subset]
            pick = _knapsack(groups, need, split)
            if pick is None:
                continue
            key = (pick[0], len(subset), -1 in subset, bool(prefer) and not set(subset) <= prefer, subset)
            if best is None or key < best[0]:
                best = (key, [d for index, n in pick[1] for d in groups[index][:n]])
        if best is not None:
            return best[1]
    return []


def _knapsack(groups: list[list[str]], need: int, split: bool) -> _Pick | None:
    """Fewest groups whose sizes add up to exactly `need` (with `split`, one may be taken in part); earlier groups win ties."""
    if sum(len(g) for g in groups) < need:
        return None
    if len(groups) * need > MAX_KNAPSACK_CELLS:
        return _greedy(groups, need)
    layers = 2 if split else 1
    best: list[list[_Pick | None]] = [[None] * (need + 1) for _ in range(layers)]
    best[0][0] = (0, ())
    for index, group in enumerate(groups):
        new = [row[:] for row in best]
        for layer in range(layers):
            for total, pick in enumerate(best[layer]):
                if pick is None:
                    continue
                takes = [(len(group), layer)] + ([(n, 1) for n in range(1, len(group))] if split and layer == 0 else [])
                for n, to in takes:
                    if total + n <= need:
                        candidate = (pick[0] + 1, (*pick[1], (index, n)))
                        current = new[to][total + n]
                        if current is None or candidate < current:
                            new[to][total + n] = candidate
        best = new
    found = [row[need] for row in best if row[need] is not None]
    return min(found) if found else None  # type: ignore[type-var]


def _greedy(groups: list[list[str]], need: int) -> _Pick:
    picks: list[tuple[int, int]] = []
    for group in sorted(range(len(groups)), key=lambda i: -len(groups[i])):
        if need <= 0:
            break
        n = min(len(groups[group]), need)
        picks.append((group, n))
        need -= n
    return len(picks), tuple(picks)
