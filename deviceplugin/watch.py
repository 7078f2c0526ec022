"""inotify watches (watchdog) on /dev/vfio and the device-plugin dir.

Events only tell the daemon *that* something changed ("dev" or "plugins"); the daemon then takes a
snapshot and reconciles. inotify cannot see sysfs, which is why the daemon also rescans on a timer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)

INTERESTING = {"created", "deleted", "moved"}


class _Handler(FileSystemEventHandler):
    def __init__(self, kind: str, notify: Callable[[str], None]) -> None:
        self.kind = kind
        self.notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in INTERESTING:
            self.notify(self.kind)


class DirWatcher:
    """Watches each named directory (not recursively) and calls notify(kind) on create/delete/move."""

    def __init__(self, dirs: dict[str, str], notify: Callable[[str], None]) -> None:
        self.dirs = dirs
        self.notify = notify
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self.watching: list[str] = []

    def start(self) -> None:
        observer = Observer()
        for kind, path in self.dirs.items():
            if os.path.isdir(path):
                observer.schedule(_Handler(kind, self.notify), path, recursive=False)
                self.watching.append(path)
            else:
                log.warning("not watching %s (%s): it does not exist; relying on the periodic rescan", path, kind)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer = None
