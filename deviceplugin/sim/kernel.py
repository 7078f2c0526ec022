"""A fake kernel: writes to a FakeNode's sysfs answer as Linux's PCI driver core does.

`bind.py` changes drivers only through a `write(path, text)` interface. On a node that is `os.write`
on sysfs; in tests it is this class, which changes the same links the readers see (a function's
`driver` link, the driver's entry, `/dev/vfio/<group>`), so a test asserts the kernel's state, not the
strings that were written. What it models (drivers/base/bus.c and dd.c, drivers/pci/pci-driver.c):

- `devices/<addr>/driver_override`: the next probe of that one device may use only the named driver;
  a write of an empty line clears it (the file then reads `(null)`).
- `drivers/<drv>/unbind`: detaches the device, ENODEV when it is not bound to <drv>. It waits while a
  holder keeps the device open (`hold()`): the NVIDIA driver with a running process, a console. As on
  Linux, the `driver` link is gone while it waits (the core removes it before the driver's remove).
- `drivers/<drv>/bind`: ENODEV when <drv> does not match the device (driver_override names another
  driver, or neither the override nor an id matches), then EBUSY when the device already has a driver.
  Text that is not a PCI address is EINVAL (the contract in issue 10; Linux itself answers ENODEV for
  any name it cannot find, and EINVAL for a new_id it cannot parse).
- `drivers_probe`: a device without a driver goes to its driver_override if that driver is loaded,
  else to the first loaded driver that matches it (one whose new_id table holds its ids, then its own
  host driver); nothing matches: it stays unbound and the write still succeeds, as on Linux.
- `drivers/<drv>/new_id`: adds the ids to <drv>'s table and at once binds every unbound device with
  those ids. The plugin never uses it: a test shows what it would grab.
- Each write to one device holds that device's lock, like the kernel's device_lock, so a write to a
  device whose unbind is still waiting waits with it.

A driver is loaded when `sys/bus/pci/drivers/<drv>` exists (`load()` creates it).
"""

from __future__ import annotations

import errno
import os
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from deviceplugin.bind import NO_OVERRIDE
from deviceplugin.sim.node import FakeNode
from deviceplugin.sysfs import ADDRESS_RE, is_vfio_driver

_DRIVER_ATTRS = ("bind", "unbind", "new_id")


def _error(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)} ({what})")


class FakeKernel:
    """Implements bind's KernelIO on a FakeNode. `host_drivers` names each function's own host driver
    where it is not the one it is bound to now (a card already on vfio-pci); `writes` logs every write."""

    def __init__(self, node: FakeNode, host_drivers: dict[str, str] | None = None) -> None:
        self.node = node
        self.sys = os.path.realpath(node.sys)
        self.writes: list[tuple[str, str]] = []
        self.own: dict[str, str] = {}
        self.dynids: dict[str, set[tuple[str, str]]] = defaultdict(set)
        self._holders: dict[str, threading.Event] = {}
        self._rejects: set[tuple[str, str]] = set()
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._meta = threading.Lock()  # guards _locks and the tree (FakeNode is not thread-safe)
        for address in self.addresses():
            driver = node.driver_of(address)
            own = (host_drivers or {}).get(address) or (driver if driver and not is_vfio_driver(driver) else None)
            if own:
                self.own[address] = own
            override = node.device_dir(address) / "driver_override"
            if not override.exists():
                override.write_text(f"{NO_OVERRIDE}\n")

    # --- what tests use -------------------------------------------------------------------------
    def addresses(self) -> list[str]:
        return sorted(os.listdir(self.node.sys / "bus" / "pci" / "devices"))

    def load(self, *drivers: str) -> FakeKernel:
        """modprobe: the driver appears under bus/pci/drivers with its attribute files."""
        for driver in drivers:
            d = self.node.sys / "bus" / "pci" / "drivers" / driver
            d.mkdir(parents=True, exist_ok=True)
            for attr in _DRIVER_ATTRS:
                (d / attr).touch()
        return self

    def hold(self, address: str) -> threading.Event:
        """An open handle on the device: its unbind waits until the returned event is set."""
        held = threading.Event()
        self._holders[address] = held
        return held

    def reject(self, driver: str, address: str) -> None:
        """The driver's probe fails for this device (as vfio-pci's does for a device it cannot isolate):
        drivers_probe leaves it unbound and still succeeds; a write to bind answers the probe's error."""
        self._rejects.add((driver, address))

    def override(self, address: str) -> str | None:
        text = (self.node.device_dir(address) / "driver_override").read_text().strip()
        return None if text == NO_OVERRIDE else text

    # --- the write interface (bind.KernelIO) ----------------------------------------------------
    def write(self, path: str, text: str) -> None:
        self.writes.append((path, text))
        real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        rel = os.path.relpath(real, self.sys)
        parts = rel.split(os.sep)
        if rel.startswith(".."):
            raise _error(errno.EACCES, f"{path} is outside the fake sysfs {self.sys}")
        if parts == ["bus", "pci", "drivers_probe"]:
            return self._probe(self._device(text))
        if len(parts) == 5 and parts[:3] == ["bus", "pci", "drivers"] and parts[4] in _DRIVER_ATTRS:
            return self._driver_write(parts[3], parts[4], text, real)
        if parts[0] == "devices" and parts[-1] == "driver_override":
            return self._set_override(parts[-2], text)
        raise _error(errno.EACCES if os.path.exists(real) else errno.ENOENT, path)

    def _driver_write(self, driver: str, attr: str, text: str, path: str) -> None:
        if not os.path.isdir(os.path.dirname(path)):
            raise _error(errno.ENOENT, f"driver {driver} is not loaded")
        if attr == "new_id":
            return self._new_id(driver, text)
        address = self._device(text)
        return self._unbind(driver, address) if attr == "unbind" else self._bind(driver, address)

    def _device(self, text: str) -> str:
        name = text.removesuffix("\n")  # sysfs_streq: one trailing newline is allowed, nothing else
        if not ADDRESS_RE.match(name):
            raise _error(errno.EINVAL, f"{name!r} is not a PCI address")
        if not os.path.lexists(self.node.sys / "bus" / "pci" / "devices" / name):
            raise _error(errno.ENODEV, f"no device {name}")
        return name

    @contextmanager
    def _device_lock(self, address: str) -> Iterator[None]:
        with self._meta:
            lock = self._locks[address]
        with lock:
            yield

    def _set_driver(self, address: str, driver: str | None, devnode: bool = True) -> None:
        with self._meta:
            self.node.bind(address, driver, devnode=devnode)

    def _sync_devnode(self, address: str) -> None:
        with self._meta:
            group = self.node.group_of(address)
            if group is not None:
                self.node.sync_devnode(group)

    # --- the operations -------------------------------------------------------------------------
    def _set_override(self, address: str, text: str) -> None:
        value = text.split("\n", 1)[0]
        if len(value) >= 4096:
            raise _error(errno.EINVAL, "driver_override too long")
        with self._device_lock(address):
            (self.node.device_dir(address) / "driver_override").write_text(f"{value or NO_OVERRIDE}\n")

    def _unbind(self, driver: str, address: str) -> None:
        with self._device_lock(address):
            if self.node.driver_of(address) != driver:
                raise _error(errno.ENODEV, f"{address} is not bound to {driver}")
            # The kernel removes the driver link before it calls the driver's remove, which is where a
            # driver waits for its users: the link is gone while the write still waits.
            self._set_driver(address, None, devnode=False)
            held = self._holders.get(address)
            if held is not None:
                held.wait()  # nothing cancels it
                self._holders.pop(address, None)
            self._sync_devnode(address)

    def _bind(self, driver: str, address: str) -> None:
        with self._device_lock(address):
            if not self._matches(driver, address):
                raise _error(errno.ENODEV, f"{driver} does not match {address}")
            if self.node.driver_of(address) is not None:
                raise _error(errno.EBUSY, f"{address} already has a driver")
            if (driver, address) in self._rejects:
                raise _error(errno.EINVAL, f"the probe of {driver} failed for {address}")
            self._set_driver(address, driver)

    def _probe(self, address: str) -> None:
        with self._device_lock(address):
            if self.node.driver_of(address) is not None:
                return
            # A driver whose probe fails is passed over; none left: no driver, and the write still succeeds.
            candidates = (d for d in self._candidates(address) if self._loaded(d) and self._matches(d, address))
            driver = next((d for d in candidates if (d, address) not in self._rejects), None)
            if driver is not None:
                self._set_driver(address, driver)

    def _new_id(self, driver: str, text: str) -> None:
        fields = text.split()
        try:
            vendor, device = (f"{int(f, 16):04x}" for f in fields[:2])
        except ValueError:
            raise _error(errno.EINVAL, f"new_id wants 'vendor device' in hex, got {text!r}") from None
        self.dynids[driver].add((vendor, device))
        for address in self.addresses():  # driver_attach: every unbound device that now matches
            with self._device_lock(address):
                if self.node.driver_of(address) is None and self._matches(driver, address):
                    self._set_driver(address, driver)

    # --- matching (pci_match_device) ------------------------------------------------------------
    def _candidates(self, address: str) -> list[str]:
        override = self.override(address)
        if override is not None:
            return [override]
        ids = self._ids(address)
        return [d for d, table in sorted(self.dynids.items()) if ids in table] + [self.own.get(address, "")]

    def _matches(self, driver: str, address: str) -> bool:
        override = self.override(address)
        if override is not None:
            return override == driver
        return driver == self.own.get(address) or self._ids(address) in self.dynids.get(driver, set())

    def _ids(self, address: str) -> tuple[str, str]:
        d = self.node.device_dir(address)
        return ((d / "vendor").read_text().strip()[2:], (d / "device").read_text().strip()[2:])

    def _loaded(self, driver: str) -> bool:
        return bool(driver) and (self.node.sys / "bus" / "pci" / "drivers" / driver).is_dir()
