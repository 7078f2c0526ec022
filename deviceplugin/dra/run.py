"""The DRA mode's entry points for `serve`: the front-end factory the daemon calls, and `--cleanup`.

Kept apart from `cli` so that the command line imports nothing of the API client until `--mode dra`.
A configuration or API error becomes a UsageError-like message and exit code 2, not a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from deviceplugin.dra.frontend import DraFrontend, cleanup
from deviceplugin.dra.kube import KubeApi, KubeError
from deviceplugin.dra.options import DraOptions

log = logging.getLogger(__name__)


def dra_frontend_factory(options: DraOptions) -> Callable[[Any], DraFrontend]:
    """For Daemon(make_frontend=...): the front end reads the daemon's pool, inventory and events."""
    try:
        api = KubeApi(options.kubeconfig)
    except KubeError as exc:
        print(f"vfio-device-plugin: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc

    def make(daemon: Any) -> DraFrontend:
        return DraFrontend(options, daemon.pool, lambda: daemon.inventory, daemon.notify, daemon.recorder, api)

    return make


def run_cleanup(options: DraOptions) -> int:
    try:
        cleanup(options)
    except KubeError as exc:
        log.error("cleanup failed: %s", exc)
        return 1
    return 0
