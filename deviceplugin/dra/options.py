"""The command-line options of the DRA mode and their defaults, without importing anything heavy.

`cli` declares them on `serve` (and the paths on `inspect` and `doctor`, which show the DRA view and check
that only one mode runs on a node); the rest of the mode reads a `DraOptions`.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

# The driver name is a DNS subdomain the project controls (its GitHub organisation's pages domain, the
# same organisation as the image on ghcr.io), as DRA driver names should be: vendor drivers use their
# own domains (gpu.nvidia.com, gpu.amd.com), so ours can never clash with them. It is also the domain of
# our attributes in CEL: device.attributes["vfio-device-plugin.github.io"].resourceName.
DEFAULT_DRIVER = "vfio-device-plugin.github.io"
DEFAULT_PLUGINS_DIR = "/var/lib/kubelet/plugins"
DEFAULT_REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
DEFAULT_CDI_DIR = "/var/run/cdi"
MODES = ("device-plugin", "dra")

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
MAX_DRIVER_NAME = 63  # ResourceSlice.spec.driver


@dataclass(frozen=True)
class DraOptions:
    driver: str = DEFAULT_DRIVER
    node: str = ""
    kubeconfig: str | None = None  # None: the in-cluster service account
    plugins_dir: str = DEFAULT_PLUGINS_DIR
    registry_dir: str = DEFAULT_REGISTRY_DIR
    cdi_dir: str = DEFAULT_CDI_DIR
    sysfs_root: str = "/sys"

    @property
    def data_dir(self) -> str:
        """Where the kubelet finds dra.sock, and where the checkpoint and metadata files live."""
        return os.path.join(self.plugins_dir, self.driver)

    @property
    def plugin_socket(self) -> str:
        return os.path.join(self.data_dir, "dra.sock")

    @property
    def registration_socket(self) -> str:
        return os.path.join(self.registry_dir, registration_socket_name(self.driver))


def registration_socket_name(driver: str) -> str:
    """`<driver>-reg.sock`, the name the upstream kubeletplugin helper uses."""
    return f"{driver}-reg.sock"


def driver_name_error(name: str) -> str | None:
    if len(name) > MAX_DRIVER_NAME:
        return f"longer than {MAX_DRIVER_NAME} characters"
    if not _DNS_SUBDOMAIN.match(name):
        return "not a DNS subdomain (lower-case letters, digits, '-' and '.')"
    return None


def options_from_args(args: argparse.Namespace) -> DraOptions:
    """Raises ValueError with a message for the user when an option is unusable."""
    error = driver_name_error(args.driver_name)
    if error:
        raise ValueError(f"--driver-name {args.driver_name!r}: {error}")
    node = getattr(args, "node_name", None) or os.environ.get("NODE_NAME", "")
    return DraOptions(
        driver=args.driver_name,
        node=node,
        kubeconfig=getattr(args, "kubeconfig", None),
        plugins_dir=args.kubelet_plugins_dir,
        registry_dir=args.kubelet_registry_dir,
        cdi_dir=getattr(args, "cdi_dir", DEFAULT_CDI_DIR),
        sysfs_root=args.sysfs_root,
    )
