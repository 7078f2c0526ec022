"""CDI specs: how the container runtime learns what a prepared claim adds to a container.

NodePrepareResources returns CDI device IDs only; containerd/CRI-O look them up in the spec files of
`--cdi-dir` and apply their edits. One spec file per claim (`<cdi-dir>/<driver>-<claim uid>.json`), one
CDI device per allocated DRA device, named `<claim uid>-<device name>` so that an ID is never reused for
another claim (runtimes cache specs). Its edits add the VFIO container and group nodes (and the iommufd
nodes where the host has them), and bind-mount the request's KEP-5304 metadata file read-only.

cdiVersion 0.5.0: device names may start with a digit (the claim UID) and device nodes carry hostPath.
Runtimes replace device nodes and mounts by container path, so the shared /dev/vfio/vfio of several
devices, or one metadata file mounted by each device of a request, is applied once.
"""

from __future__ import annotations

import os
from typing import Any

from deviceplugin.files import remove, write_json

CDI_VERSION = "0.5.0"
CDI_CLASS = "vfio"


def kind(driver: str) -> str:
    return f"{driver}/{CDI_CLASS}"


def spec_path(cdi_dir: str, driver: str, claim_uid: str) -> str:
    return os.path.join(cdi_dir, f"{driver}-{claim_uid}.json")


def cdi_name(claim_uid: str, device: str) -> str:
    return f"{claim_uid}-{device}"


def cdi_id(driver: str, claim_uid: str, device: str) -> str:
    """The fully qualified CDI device name: `<vendor>/<class>=<name>`."""
    return f"{kind(driver)}={cdi_name(claim_uid, device)}"


def device_entry(claim_uid: str, device: str, nodes: tuple[str, ...], mount: tuple[str, str] | None) -> dict[str, Any]:
    """One CDI device: the host device nodes to add, and (host, container) of the metadata file to mount."""
    edits: dict[str, Any] = {"deviceNodes": [{"path": p, "hostPath": p, "permissions": "rwm"} for p in nodes]}
    if mount is not None:
        edits["mounts"] = [{"hostPath": mount[0], "containerPath": mount[1], "options": ["ro", "bind"]}]
    return {"name": cdi_name(claim_uid, device), "containerEdits": edits}


def spec(driver: str, devices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"cdiVersion": CDI_VERSION, "kind": kind(driver), "devices": devices}


def write_spec(cdi_dir: str, driver: str, claim_uid: str, doc: dict[str, Any]) -> str:
    path = spec_path(cdi_dir, driver, claim_uid)
    write_json(path, doc)
    return path


def remove_spec(cdi_dir: str, driver: str, claim_uid: str) -> None:
    remove(spec_path(cdi_dir, driver, claim_uid))
