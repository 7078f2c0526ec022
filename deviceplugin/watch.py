"""inotify watches (watchdog) on /dev/vfio and the device-plugin dir, kept armed while the node changes.

Events only tell the daemon *that* something changed ("dev" or "plugins"); the daemon then takes a
snapshot and reconciles. inotify cannot see sysfs, which is why the daemon also rescans on a timer.

The watched directories do not live forever: a vfio module reload deletes and recreates /dev/vfio,
and the device-plugin dir can be recreated under a running plugin. Each directory's parent is
watched too, so its return is seen at once, and `ensure()` (called by the daemon after every event
and on every rescan tick) re-arms any watch whose directory is gone, back or replaced. A watch the
kernel refuses (inotify instance or watch limits, which root shares with the kubelet and the
container runtime) is a warning, never fatal: the rescan timer carries on without it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

log = logging.getLogger(__name__)

INTERESTING = {"created", "deleted", "moved"}


class _Handler(FileSystemEventHandler):
    """Passes create/delete/move events on; with `only`, just those about that one name (a parent's child)."""

    def __init__(self, kind: str, notify: Callable[[str], None], only: str | None = None) -> None:
        self.kind = kind
        self.notify = notify
        self.only = only

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in INTERESTING:
            return
        if self.only is not None:
            names = {os.path.basename(os.fsdecode(event.src_path)), os.path.basename(os.fsdecode(getattr(event, "dest_path", "") or ""))}
            if self.only not in names:
                return
        self.notify(self.kind)


@dataclass
class _Armed:
    watch: ObservedWatch
    inode: int


class DirWatcher:
    """Watches each named directory (not recursively) and calls notify(kind) on create/delete/move."""

    def __init__(self, dirs: dict[str, str], notify: Callable[[str], None]) -> None:
        self.dirs = dirs
        self.notify = notify
        self._observer: BaseObserver | None = None
        self._armed: dict[str, _Armed] = {}  # path -> its current watch
        self._refused: dict[str, str] = {}  # path ("" for the observer) -> why the kernel refused it (logged once)
        self._started = False
        self._lock = threading.Lock()

    @property
    def watching(self) -> list[str]:
        with self._lock:
            return [p for p in self._armed if p in self.dirs.values()]

    def start(self) -> None:
        self._started = True
        self.ensure()

    def _observe(self) -> BaseObserver | None:
        """The observer (one inotify instance for every watch), created when the kernel lets us."""
        if self._observer is None and self._started:
            try:
                observer = Observer()
            except OSError as exc:
                if self._refused.get("") != str(exc):
                    log.warning("cannot watch anything: %s; relying on the periodic rescan", _why(exc))
                    self._refused[""] = str(exc)
                return None
            if "" in self._refused:
                log.info("inotify available again: watching")
                del self._refused[""]
            observer.daemon = True
            observer.start()
            self._observer = observer
        return self._observer

    def ensure(self) -> None:
        """Arms what exists and is not watched, re-arms what was replaced, drops what is gone. Cheap: a few stats."""
        if self._observe() is None:
            return
        with self._lock:
            for kind, path in self.dirs.items():
                self._keep(path, _Handler(kind, self.notify), kind)
                parent, name = os.path.split(path.rstrip("/"))
                self._keep(parent, _Handler(kind, self.notify, only=name), kind)

    def _keep(self, path: str, handler: _Handler, kind: str) -> None:
        observer = self._observer
        assert observer is not None
        inode = _dir_inode(path)
        armed = self._armed.get(path)
        if armed is not None and armed.inode == inode and _alive(observer, armed.watch):
            return
        if armed is not None:
            observer.unschedule(armed.watch)
            del self._armed[path]
            if inode is None:
                log.info("%s (%s) is gone: watching for its return; the periodic rescan covers the gap", path, kind)
        if inode is None:
            return
        try:
            watch = observer.schedule(handler, path, recursive=False)
        except OSError as exc:
            if self._refused.get(path) != str(exc):
                log.warning("cannot watch %s (%s): %s; relying on the periodic rescan", path, kind, _why(exc))
                self._refused[path] = str(exc)
            return
        if path in self._refused:
            log.info("watching %s (%s) again", path, kind)
            del self._refused[path]
        self._armed[path] = _Armed(watch, inode)

    def stop(self) -> None:
        self._started = False
        if self._observer is not None:
            self._observer.stop()
            self._observer = None


def _alive(observer: BaseObserver, watch: ObservedWatch) -> bool:
    """watchdog stops a watch's emitter when its directory is deleted, even if one of that name returns."""
    return any(e.watch == watch and e.is_alive() for e in observer.emitters)


def _dir_inode(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino if os.path.isdir(path) else None


def _why(exc: OSError) -> str:
    if exc.errno == 24:
        return "inotify instance limit reached (fs.inotify.max_user_instances, shared by every process of this user)"
    if exc.errno == 28:
        return "inotify watch limit reached (fs.inotify.max_user_watches)"
    return str(exc)
