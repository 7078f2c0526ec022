"""inotify watches on /dev/vfio and the device-plugin dir, kept armed while the node changes.

Events only tell the daemon *that* something changed ("dev" or "plugins"); the daemon then takes a
snapshot and reconciles. inotify cannot see sysfs, which is why the daemon also rescans on a timer.

The watched directories do not live forever: a vfio module reload deletes and recreates /dev/vfio,
and the device-plugin dir can be recreated under a running plugin. Each directory's parent is
watched too, so its return is seen at once, and `ensure()` (called by the daemon after every event
and on every rescan tick) re-arms any watch whose directory is gone, back or replaced. A watch the
kernel refuses (inotify instance or watch limits, which root shares with the kubelet and the
container runtime) is a warning, never fatal: the rescan timer carries on without it.

All watches share one inotify instance and one thread that sleeps in poll() until the kernel has
events. (watchdog, used before, took an instance and two threads per watched directory, four of
each here, and woke every one of them each second; its import was 1.9 MB of the daemon.)
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# <sys/inotify.h>
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000  # the watch is gone: its directory was deleted, or it was removed
IN_ONLYDIR = 0x01000000
CHILD_EVENTS = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
SELF_EVENTS = IN_DELETE_SELF | IN_MOVE_SELF
WATCH_MASK = CHILD_EVENTS | SELF_EVENTS | IN_ONLYDIR
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class Inotify:
    """One inotify instance and the thread that reads it: `on_event(wd, mask, name)` for every event.

    Raises OSError (errno EMFILE at the instance limit) when the kernel refuses an instance.
    """

    def __init__(self, on_event: Callable[[int, int, str], None]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._add_watch = libc.inotify_add_watch
        self._add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._rm_watch = libc.inotify_rm_watch
        self._rm_watch.argtypes = (ctypes.c_int, ctypes.c_int)
        fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd
        self.on_event = on_event
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="inotify", daemon=True)
        self._thread.start()

    def add(self, path: str) -> int:
        """Watches a directory (not recursively); the watch descriptor. The same directory twice: the same one."""
        wd = int(self._add_watch(self.fd, os.fsencode(path), WATCH_MASK))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return wd

    def remove(self, wd: int) -> None:
        self._rm_watch(self.fd, wd)  # EINVAL when the kernel dropped it already: nothing left to do

    def close(self) -> None:
        """Stops the thread, which closes the instance (and so every watch) on its way out."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready:
                    return
                try:
                    data = os.read(self.fd, 64 * 1024)
                except BlockingIOError:
                    continue
                self._dispatch(data)
        finally:
            for fd in (self.fd, self._wake_r, self._wake_w):
                os.close(fd)

    def _dispatch(self, data: bytes) -> None:
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            try:
                self.on_event(wd, mask, os.fsdecode(name))
            except Exception:  # the reader outlives one bad callback
                log.exception("handling an inotify event failed")


@dataclass
class _Armed:
    wd: int
    inode: int


@dataclass(frozen=True)
class _Handler:
    """What a watch is for: events of `kind`; with `only`, just those about that one name (a parent's child)."""

    kind: str
    only: str | None = None


class DirWatcher:
    """Watches each named directory (not recursively) and calls notify(kind) on create/delete/move."""

    def __init__(self, dirs: dict[str, str], notify: Callable[[str], None]) -> None:
        self.dirs = dirs
        self.notify = notify
        self._inotify: Inotify | None = None
        self._armed: dict[str, _Armed] = {}  # path -> its current watch
        self._handlers: dict[int, dict[str, _Handler]] = {}  # wd -> path -> handler (two paths may share a directory)
        self._refused: dict[str, str] = {}  # path ("" for the instance) -> why the kernel refused it (logged once)
        self._started = False
        self._lock = threading.Lock()

    @property
    def watching(self) -> list[str]:
        with self._lock:
            return [p for p in self._armed if p in self.dirs.values()]

    def start(self) -> None:
        self._started = True
        self.ensure()

    def _instance(self) -> Inotify | None:
        """The inotify instance (one for every watch), created when the kernel lets us."""
        if self._inotify is None and self._started:
            try:
                self._inotify = Inotify(self._on_event)
            except OSError as exc:
                if self._refused.get("") != str(exc):
                    log.warning("cannot watch anything: %s; relying on the periodic rescan", _why(exc))
                    self._refused[""] = str(exc)
                return None
            if "" in self._refused:
                log.info("inotify available again: watching")
                del self._refused[""]
        return self._inotify

    def ensure(self) -> None:
        """Arms what exists and is not watched, re-arms what was replaced, drops what is gone. Cheap: a few stats."""
        inotify = self._instance()
        if inotify is None:
            return
        with self._lock:
            for kind, path in self.dirs.items():
                self._keep(inotify, path, _Handler(kind), kind)
                parent, name = os.path.split(path.rstrip("/"))
                self._keep(inotify, parent, _Handler(kind, only=name), kind)

    def _keep(self, inotify: Inotify, path: str, handler: _Handler, kind: str) -> None:
        inode = _dir_inode(path)
        armed = self._armed.get(path)
        if armed is not None and armed.inode == inode and armed.wd in self._handlers:
            return
        if armed is not None:
            self._drop(inotify, path, armed)
            if inode is None:
                log.info("%s (%s) is gone: watching for its return; the periodic rescan covers the gap", path, kind)
        if inode is None:
            return
        try:
            wd = inotify.add(path)
        except OSError as exc:
            if self._refused.get(path) != str(exc):
                log.warning("cannot watch %s (%s): %s; relying on the periodic rescan", path, kind, _why(exc))
                self._refused[path] = str(exc)
            return
        if path in self._refused:
            log.info("watching %s (%s) again", path, kind)
            del self._refused[path]
        self._armed[path] = _Armed(wd, inode)
        self._handlers.setdefault(wd, {})[path] = handler

    def _drop(self, inotify: Inotify, path: str, armed: _Armed) -> None:
        del self._armed[path]
        handlers = self._handlers.get(armed.wd)
        if handlers is not None:
            handlers.pop(path, None)
            if not handlers:  # no other path watches that directory
                del self._handlers[armed.wd]
                inotify.remove(armed.wd)

    def _on_event(self, wd: int, mask: int, name: str) -> None:
        """On the inotify thread: which kinds the event concerns; notify outside the lock."""
        with self._lock:
            if mask & IN_Q_OVERFLOW:  # events were lost: every kind may have changed
                kinds = set(self.dirs)
            else:
                handlers = list(self._handlers.get(wd, {}).values())
                kinds = {h.kind for h in handlers if _concerns(h, mask, name)}
            if mask & IN_IGNORED:
                self._handlers.pop(wd, None)  # the kernel dropped it; ensure() arms the directory's successor
        for kind in sorted(kinds):
            self.notify(kind)

    def stop(self) -> None:
        self._started = False
        with self._lock:
            inotify, self._inotify = self._inotify, None
            self._armed.clear()
            self._handlers.clear()
        if inotify is not None:
            inotify.close()


def _concerns(handler: _Handler, mask: int, name: str) -> bool:
    if handler.only is not None:  # the parent's watch: only its child of that name
        return bool(mask & CHILD_EVENTS) and name == handler.only
    return bool(mask & (CHILD_EVENTS | SELF_EVENTS))


def _dir_inode(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino if os.path.isdir(path) else None


def _why(exc: OSError) -> str:
    if exc.errno == errno.EMFILE:
        return "inotify instance limit reached (fs.inotify.max_user_instances, shared by every process of this user)"
    if exc.errno == errno.ENOSPC:
        return "inotify watch limit reached (fs.inotify.max_user_watches)"
    return str(exc)
