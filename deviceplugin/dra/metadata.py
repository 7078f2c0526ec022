"""KEP-5304 device-metadata files: how KubeVirt's virt-launcher learns the PCI address of a DRA device.

For each prepared request we write `<data-dir>/metadata/<claim uid>/<request>/<driver>-metadata.json`
and the claim's CDI spec mounts it read-only in the container at

    /var/run/kubernetes.io/dra-device-attributes/resourceclaims/<claim>/<request>/<driver>-metadata.json

or, for a claim made from a ResourceClaimTemplate, under `resourceclaimtemplates/<pod claim name>/`:
KubeVirt (pkg/dra/utils.go) looks there when the VMI's resourceClaims entry has no resourceClaimName,
and the pod claim name is what the resource-claim controller records in the generated claim's
`resource.kubernetes.io/pod-claim-name` annotation. The document follows KubeVirt's pkg/dra/metadata
types (KEP-5304 `metadata.resource.k8s.io/v1alpha1` `DeviceMetadata`); virt-launcher reads the device's
`resource.kubernetes.io/pciBusID` string attribute.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from deviceplugin.files import write_atomic

API_VERSION = "metadata.resource.k8s.io/v1alpha1"
KIND = "DeviceMetadata"
CONTAINER_DIR = "/var/run/kubernetes.io/dra-device-attributes"
POD_CLAIM_NAME_ANNOTATION = "resource.kubernetes.io/pod-claim-name"


def file_name(driver: str) -> str:
    return f"{driver}-metadata.json"


def container_path(driver: str, claim_name: str, pod_claim_name: str | None, request: str) -> str:
    if pod_claim_name:
        return os.path.join(CONTAINER_DIR, "resourceclaimtemplates", pod_claim_name, request, file_name(driver))
    return os.path.join(CONTAINER_DIR, "resourceclaims", claim_name, request, file_name(driver))


def claim_dir(data_dir: str, claim_uid: str) -> str:
    return os.path.join(data_dir, "metadata", claim_uid)


def host_path(data_dir: str, driver: str, claim_uid: str, request: str) -> str:
    return os.path.join(claim_dir(data_dir, claim_uid), request, file_name(driver))


def document(claim: dict[str, str], pod_claim_name: str | None, request: str, devices: list[dict[str, Any]]) -> dict[str, Any]:
    """claim: namespace, name, uid; devices: {driver, pool, name, attributes} as in a ResourceSlice."""
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": claim["name"], "namespace": claim["namespace"], "uid": claim["uid"], "generation": 1},
        "requests": [{"name": request, "devices": devices}],
    }
    if pod_claim_name:
        doc["podClaimName"] = pod_claim_name
    return doc


def write(path: str, doc: dict[str, Any]) -> None:
    # A JSON stream with one object per supported version (KEP-5304); we write the one version there is.
    write_atomic(path, (json.dumps(doc, sort_keys=True) + "\n").encode())


def remove_claim(data_dir: str, claim_uid: str) -> None:
    shutil.rmtree(claim_dir(data_dir, claim_uid), ignore_errors=True)
