"""Publishes this node's DRA devices as one ResourceSlice pool, and puts it back when it disappears.

The pool is named after the node and holds one device per healthy IOMMU group (unhealthy or departed
groups are withdrawn, so the scheduler never allocates them). Its generation goes up whenever the content
changes. Slices have fixed names (`<node>-<driver>`, then `-1`, `-2`... when more than 128 devices need
several), so a write after a crash or a lost response is an update, never a duplicate.

The kubelet deletes every ResourceSlice of its node when it starts, and a driver's slices once the
driver has been disconnected for 30 s; an administrator may delete them too. The watcher follows our
own slices and asks for a resync on any change, and every sync lists what the API server has and
repairs the difference. On SIGTERM nothing is deleted: a restarting plugin must not make the scheduler
forget the node's devices. `delete_all` is the explicit clean-up (`serve --mode dra --cleanup`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from deviceplugin.dra.devices import DraDevice
from deviceplugin.dra.kube import KubeApi, KubeError
from deviceplugin.metrics import Recorder

log = logging.getLogger(__name__)

MAX_DEVICES = 128  # resource.k8s.io/v1: devices per ResourceSlice
MAX_NAME = 253
API_VERSION = "resource.k8s.io/v1"
WATCH_BACKOFF = (1.0, 2.0, 5.0, 10.0)

Spec = dict[str, Any]


def slice_name(node: str, driver: str, index: int) -> str:
    name = f"{node}-{driver}" + (f"-{index}" if index else "")
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: MAX_NAME - 11].rstrip('-.')}-{digest}"


def desired_specs(node: str, driver: str, devices: list[DraDevice]) -> dict[str, Spec]:
    """Slice name -> spec without the pool generation, for the healthy devices only."""
    healthy = [{"name": d.name, "attributes": d.attributes} for d in devices if d.healthy]
    chunks = [healthy[i : i + MAX_DEVICES] for i in range(0, len(healthy), MAX_DEVICES)] or [[]]
    return {
        slice_name(node, driver, i): {
            "driver": driver,
            "nodeName": node,
            "pool": {"name": node, "resourceSliceCount": len(chunks)},
            "devices": chunk,
        }
        for i, chunk in enumerate(chunks)
    }


def _comparable(spec: Spec) -> Spec:
    pool = {k: v for k, v in spec.get("pool", {}).items() if k != "generation"}
    return {"driver": spec.get("driver"), "nodeName": spec.get("nodeName"), "pool": pool, "devices": spec.get("devices") or []}


def _generation(doc: dict[str, Any]) -> int:
    return int(doc.get("spec", {}).get("pool", {}).get("generation") or 0)


class SlicePublisher:
    """Called on the daemon's thread only: makes the API server hold exactly the desired slices."""

    def __init__(self, api: KubeApi, driver: str, node: str, recorder: Recorder) -> None:
        self.api = api
        self.driver = driver
        self.node = node
        self.recorder = recorder
        self.generation = 0
        self.dirty = True  # compare with the API server on the next sync (start, watch event, registration)
        self.last_error: str | None = None
        self.last_sync: float | None = None  # unix time the API server last matched what we want
        self._written: dict[str, Spec] | None = None

    @property
    def in_sync(self) -> bool:
        return self._written is not None and not self.dirty and self.last_error is None

    def sync(self, devices: list[DraDevice]) -> bool:
        desired = desired_specs(self.node, self.driver, devices)
        if not self.dirty and desired == self._written:
            return True
        try:
            self._reconcile(desired)
        except KubeError as exc:
            first = self.last_error is None
            self.dirty, self.last_error = True, str(exc)
            self.recorder.dra_slice_error()
            (log.warning if first else log.debug)("cannot publish ResourceSlices (will retry): %s", exc)
            return False
        self._written, self.dirty, self.last_error, self.last_sync = desired, False, None, time.time()
        return True

    def _reconcile(self, desired: dict[str, Spec]) -> None:
        existing, _ = self.api.list_slices(self.node, self.driver)
        by_name = {s["metadata"]["name"]: s for s in existing}
        generations = {_generation(s) for s in existing}
        current = max([self.generation, *generations])
        unchanged = (
            by_name.keys() == desired.keys()
            and all(_comparable(by_name[n]["spec"]) == spec for n, spec in desired.items())
            and generations == {current}
        )
        if unchanged:
            self.generation = current
            return
        generation = current + 1
        for name, spec in desired.items():
            doc: dict[str, Any] = {
                "apiVersion": API_VERSION,
                "kind": "ResourceSlice",
                "metadata": {"name": name},
                "spec": {**spec, "pool": {**spec["pool"], "generation": generation}},
            }
            if name in by_name:
                doc["metadata"]["resourceVersion"] = by_name[name]["metadata"]["resourceVersion"]
                self.api.replace_slice(doc)
                self.recorder.dra_slice_write("update")
            else:
                self.api.create_slice(doc)
                self.recorder.dra_slice_write("create")
        for name in sorted(by_name.keys() - desired.keys()):
            self.api.delete_slice(name)
            self.recorder.dra_slice_write("delete")
        self.generation = generation
        count = sum(len(s["devices"]) for s in desired.values())
        why = "re-published (they had been removed)" if self._written is not None and not existing else "published"
        log.info("%s ResourceSlice pool %s of %s, generation %d: %d device(s)", why, self.node, self.driver, generation, count)

    def delete_all(self) -> int:
        existing, _ = self.api.list_slices(self.node, self.driver)
        for s in existing:
            self.api.delete_slice(s["metadata"]["name"])
            self.recorder.dra_slice_write("delete")
        self._written, self.dirty = None, True
        return len(existing)


class SliceWatcher:
    """Watches our slices in a thread of its own and calls notify("slices") on any change.

    The daemon then lets the publisher compare and repair; our own writes come back as events too and
    end in a comparison that finds nothing to do. A broken watch is listed and watched again with backoff.
    The thread is a daemon thread: lightkube's watch cannot be interrupted, so stop() only makes it end at
    its next event or error instead of waiting for one.
    """

    def __init__(self, api: KubeApi, node: str, driver: str, notify: Callable[[str], None]) -> None:
        self.api = api
        self.node = node
        self.driver = driver
        self.notify = notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dra-slice-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                _, version = self.api.list_slices(self.node, self.driver)
                self.notify("slices")  # whatever happened while we were not watching
                for _kind in self.api.watch_slices(self.node, self.driver, version):
                    if self._stop.is_set():
                        return
                    failures = 0
                    self.notify("slices")
            except KubeError as exc:
                if self._stop.is_set():
                    return
                delay = WATCH_BACKOFF[min(failures, len(WATCH_BACKOFF) - 1)]
                (log.warning if failures == 0 else log.debug)("watching ResourceSlices failed, again in %.0f s: %s", delay, exc)
                failures += 1
                self._stop.wait(delay)
