"""The Kubernetes API calls of the DRA mode, through lightkube: the one module that imports a client library.

It is imported only on the DRA path (`serve --mode dra`), so `inspect` and the device-plugin mode start
without it. Objects cross this boundary as plain dicts (the API's JSON), which keeps the rest of the
mode independent of the client's model classes and easy to compare. Every failure becomes a KubeError
with the API server's message; a client is not shared between threads (one KubeApi per thread).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx2
from lightkube import Client, KubeConfig
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.resources.resource_v1 import ResourceClaim, ResourceSlice

# httpx2 logs every request at INFO: one line per API call is noise in a node agent's log.
logging.getLogger("httpx2").setLevel(logging.WARNING)

FIELD_MANAGER = "vfio-device-plugin"
TIMEOUT = 10.0  # a request that takes longer is retried on the next trigger, not waited for


class KubeError(RuntimeError):
    """An API call failed; the message says which call and why."""


def _config(kubeconfig: str | None) -> KubeConfig:
    try:
        return KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_service_account()
    except Exception as exc:
        where = kubeconfig or "the in-cluster service account"
        raise KubeError(f"cannot load the Kubernetes client configuration from {where}: {exc}") from exc


def _wrap(exc: Exception, what: str) -> KubeError:
    if isinstance(exc, ApiError):
        return KubeError(f"{what}: {exc.status.code} {exc.status.reason}: {exc.status.message}")
    return KubeError(f"{what}: {type(exc).__name__}: {exc}")


_ERRORS = (ApiError, httpx2.HTTPError, OSError)


class KubeApi:
    def __init__(self, kubeconfig: str | None, timeout: float = TIMEOUT) -> None:
        self.kubeconfig = kubeconfig
        self.timeout = timeout
        self._config = _config(kubeconfig)
        self._client = Client(self._config, timeout=httpx2.Timeout(timeout), field_manager=FIELD_MANAGER)

    def clone(self) -> KubeApi:
        """A second client with the same configuration, for another thread."""
        return KubeApi(self.kubeconfig, self.timeout)

    # --- ResourceSlices -------------------------------------------------------------------------
    def list_slices(self, node: str, driver: str | None = None) -> tuple[list[dict[str, Any]], str]:
        """This node's slices (of one driver, or of all), and the list's resourceVersion."""
        fields: dict[str, Any] = {"spec.nodeName": node, **({"spec.driver": driver} if driver else {})}
        try:
            listing = self._client.list(ResourceSlice, fields=fields)
            items = [s.to_dict() for s in listing]
            return items, listing.resourceVersion
        except _ERRORS as exc:
            raise _wrap(exc, f"list ResourceSlices of node {node}") from exc

    def create_slice(self, doc: dict[str, Any]) -> None:
        try:
            self._client.create(from_dict(doc))
        except _ERRORS as exc:
            raise _wrap(exc, f"create ResourceSlice {doc['metadata']['name']}") from exc

    def replace_slice(self, doc: dict[str, Any]) -> None:
        try:
            self._client.replace(from_dict(doc))
        except _ERRORS as exc:
            raise _wrap(exc, f"update ResourceSlice {doc['metadata']['name']}") from exc

    def delete_slice(self, name: str) -> None:
        try:
            self._client.delete(ResourceSlice, name)
        except ApiError as exc:
            if exc.status.code != 404:
                raise _wrap(exc, f"delete ResourceSlice {name}") from exc
        except _ERRORS as exc:
            raise _wrap(exc, f"delete ResourceSlice {name}") from exc

    def watch_slices(self, node: str, driver: str, resource_version: str) -> Iterator[str]:
        """ADDED|MODIFIED|DELETED per change from resource_version on (the caller re-lists); raises KubeError when the watch breaks."""
        fields: dict[str, Any] = {"spec.nodeName": node, "spec.driver": driver}
        try:
            for kind, _obj in self._client.watch(ResourceSlice, fields=fields, resource_version=resource_version):
                yield kind
        except _ERRORS as exc:
            raise _wrap(exc, "watch ResourceSlices") from exc

    # --- ResourceClaims -------------------------------------------------------------------------
    def get_claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The claim, or None when it does not exist."""
        try:
            return self._client.get(ResourceClaim, name, namespace=namespace).to_dict()
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise _wrap(exc, f"get ResourceClaim {namespace}/{name}") from exc
        except _ERRORS as exc:
            raise _wrap(exc, f"get ResourceClaim {namespace}/{name}") from exc
