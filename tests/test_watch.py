"""The inotify watches and the idle rescan's driver check, on real directories."""

from __future__ import annotations

import os
import queue
import shutil
import threading

from deviceplugin.sim.node import FakeNode, Fn
from deviceplugin.sysfs import SysfsScanner
from deviceplugin.watch import DirWatcher


def kinds_within(events: queue.SimpleQueue[str], seconds: float = 2.0) -> set[str]:
    got = {events.get(timeout=seconds)}
    while True:
        try:
            got.add(events.get(timeout=0.2))
        except queue.Empty:
            return got


def inotify_instances() -> int:
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return found


def test_every_directory_shares_one_instance_and_one_thread(tmp_path):
    dev, plugins = tmp_path / "dev" / "vfio", tmp_path / "plugins"
    dev.mkdir(parents=True)
    plugins.mkdir()
    events: queue.SimpleQueue[str] = queue.SimpleQueue()
    before_fds, before_threads = inotify_instances(), threading.active_count()
    watcher = DirWatcher({"dev": str(dev), "plugins": str(plugins)}, events.put)
    watcher.start()
    try:
        assert sorted(watcher.watching) == sorted([str(dev), str(plugins)])
        assert inotify_instances() == before_fds + 1 and threading.active_count() == before_threads + 1
        (dev / "13").touch()
        assert kinds_within(events) == {"dev"}
        (plugins / "kubelet.sock").touch()
        (tmp_path / "unrelated").touch()  # in the parent of plugins: not its name
        assert kinds_within(events) == {"plugins"}
        shutil.rmtree(dev)  # the directory itself goes: its own event, and its parent's
        assert kinds_within(events) == {"dev"}
        dev.mkdir()  # seen through the parent's watch; ensure() arms the new directory
        assert kinds_within(events) == {"dev"}
        watcher.ensure()
        (dev / "14").touch()
        assert kinds_within(events) == {"dev"}
    finally:
        watcher.stop()
    assert inotify_instances() == before_fds


def test_an_idle_rescan_of_many_functions_sees_a_rebind_and_keeps_unchanged_records(tmp_path):
    node = FakeNode(tmp_path / "n").host()
    node.add_all([Fn(f"0000:{b:02x}:00.{f}", "10de", "1e84", "030000", "vfio-pci", str(b)) for b in range(1, 6) for f in range(4)])
    scanner = SysfsScanner(str(node.sys), str(node.dev))
    first = scanner.scan()
    assert len(first.functions) == 20  # over 4 x the one driver: the drivers' directories are listed, not each link
    assert scanner.scan().functions == first.functions
    node.bind("0000:03:00.1", "snd_hda_intel")
    after = scanner.scan()
    assert next(f for f in after.functions if f.address == "0000:03:00.1").driver == "snd_hda_intel"
    # A drivers/ entry missing (a bind half done): the function's own link decides, and its record stays the same object.
    os.unlink(node.sys / "bus" / "pci" / "drivers" / "vfio-pci" / "0000:04:00.0")
    again = scanner.scan()
    old = next(f for f in after.functions if f.address == "0000:04:00.0")
    assert next(f for f in again.functions if f.address == "0000:04:00.0") is old
