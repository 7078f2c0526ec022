"""The claims this node has prepared, kept in a JSON file so that they survive a restart of the plugin.

The kubelet calls NodePrepareResources again for claims it had prepared (after its own restart, or ours),
and expects the same CDI device IDs back; NodeUnprepareResources must undo what was done even when the
claim is gone from the API server. The checkpoint holds, per claim UID, everything needed for both: the
devices and the exact CDI spec and metadata documents, so a file lost on a tmpfs can be written again.
`inspect` reads the same file to show what is prepared per device.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from deviceplugin.files import write_json

log = logging.getLogger(__name__)

FILENAME = "checkpoint.json"
VERSION = 1


@dataclass(frozen=True)
class PreparedDevice:
    request: str
    pool: str
    device: str
    group: str
    pci_bus_id: str
    cdi_ids: tuple[str, ...]


@dataclass(frozen=True)
class PreparedClaim:
    uid: str
    namespace: str
    name: str
    devices: tuple[PreparedDevice, ...]
    cdi_spec: dict[str, Any]  # written to <cdi-dir>/<driver>-<uid>.json
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # request -> its KEP-5304 metadata document

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def _claim_from(doc: dict[str, Any]) -> PreparedClaim:
    devices = tuple(PreparedDevice(**{**d, "cdi_ids": tuple(d["cdi_ids"])}) for d in doc["devices"])
    return PreparedClaim(doc["uid"], doc["namespace"], doc["name"], devices, doc["cdi_spec"], doc.get("metadata", {}))


def read(path: str) -> dict[str, PreparedClaim]:
    """The prepared claims by UID; empty when the file is missing. A garbled file is logged and ignored:
    the plugin must start, and the kubelet re-prepares what it still needs."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return {uid: _claim_from(c) for uid, c in doc.get("claims", {}).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("ignoring unreadable checkpoint %s: %s", path, exc)
        return {}


def write(path: str, claims: dict[str, PreparedClaim]) -> None:
    doc = {"version": VERSION, "claims": {uid: asdict(c) for uid, c in sorted(claims.items())}}
    write_json(path, doc, mode=0o600)


def checkpoint_path(data_dir: str) -> str:
    return os.path.join(data_dir, FILENAME)


def claims_per_device(claims: dict[str, PreparedClaim]) -> dict[str, list[str]]:
    """DRA device name -> the claims ("namespace/name (uid)") prepared with it."""
    per: dict[str, list[str]] = {}
    for claim in claims.values():
        for d in claim.devices:
            per.setdefault(d.device, []).append(f"{claim.ref} ({claim.uid})")
    return per
