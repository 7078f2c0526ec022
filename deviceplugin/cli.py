"""Command line: `vfio-device-plugin {serve,inspect,doctor,kubevirt-config,bind,release,demo}`.

Every subcommand takes the same node options after its name, so `inspect --sysfs-root /host/sys`
shows exactly what `serve --sysfs-root /host/sys` would offer.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from deviceplugin import __version__
from deviceplugin.config import Config, ConfigError, load_config
from deviceplugin.daemon import Daemon, Options
from deviceplugin.discovery import Inventory, discover
from deviceplugin.naming import NAMINGS, PciIds, load_pci_ids
from deviceplugin.report import inventory_json, inventory_text
from deviceplugin.sysfs import SysfsScanner

log = logging.getLogger("deviceplugin")


class UsageError(Exception):
    pass


def _node_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("node options")
    g.add_argument("--sysfs-root", default="/sys", help="where sysfs is mounted (default /sys)")
    g.add_argument("--dev-root", default="/dev", help="where to look for /dev/vfio (default /dev)")
    g.add_argument("--proc-root", default="/proc", help="where procfs is mounted (default /proc)")
    g.add_argument("--device-plugin-dir", default="/var/lib/kubelet/device-plugins", help="the kubelet's device-plugin dir")
    g.add_argument("--pci-ids", default=None, help="pci.ids database (default /usr/share/misc/pci.ids, /usr/share/hwdata/pci.ids)")
    g.add_argument("--config", default=None, help="YAML config file (naming, classes, rules)")
    g.add_argument("--naming", choices=NAMINGS, default=None, help="resource names: short (GA104) or full (GA104_GEFORCE_RTX_3070)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--log-format", default="text", choices=["text", "json"])
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfio-device-plugin", description="Offer vfio-pci bound PCI devices (whole GPUs) to Kubernetes VMs."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _node_options()
    serve = sub.add_parser("serve", parents=[common], help="run the device plugin (the DaemonSet's entrypoint)")
    serve.add_argument("--rescan-interval", type=_positive_float, default=5.0, help="seconds between sysfs rescans (default 5)")
    serve.add_argument("--status-port", type=int, default=None, help="serve /metrics, /status and /healthz on this port (off by default)")
    inspect = sub.add_parser("inspect", parents=[common], help="what this node offers, and why not")
    inspect.add_argument("--json", action="store_true", help="print one JSON document (schema in the README)")
    doctor = sub.add_parser("doctor", parents=[common], help="preflight checks with fixes; exit 1 if any fails")
    doctor.add_argument("--json", action="store_true")
    sub.add_parser("kubevirt-config", parents=[common], help="print the KubeVirt permittedHostDevices patch for this node")
    _binder_parsers(sub, common)
    sub.add_parser("demo", help="run the plugin on a built-in example node against a test kubelet")
    return parser


def _binder_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    bind = sub.add_parser("bind", parents=[common], help="bind whole IOMMU groups to vfio-pci, all or nothing per group")
    release = sub.add_parser("release", parents=[common], help="give whole IOMMU groups back to their host drivers")
    for p, verb in ((bind, "bind"), (release, "release")):
        p.add_argument(
            "addresses", nargs="*", metavar="ADDRESS", help=f"any function of each group to {verb} (default: --config's bind: true rules)"
        )
        p.add_argument("--dry-run", action="store_true", help="print the checks and the exact writes, change nothing")
        p.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds each write may take (default 10)")
        p.add_argument("--json", action="store_true", help="print one JSON document: plan, steps, outcome")
    bind.add_argument("--allow-shared-group", action="store_true", help="bind a group that also holds devices of another slot")
    bind.add_argument("--allow-boot-vga", action="store_true", help="bind the boot GPU although a firmware framebuffer uses it")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def load_inputs(args: argparse.Namespace) -> tuple[Config, PciIds]:
    config = load_config(args.config, args.naming)
    try:
        pci_ids = load_pci_ids(args.pci_ids)
    except OSError as exc:
        raise UsageError(f"--pci-ids {args.pci_ids}: cannot read: {exc.strerror}") from exc
    return config, pci_ids


def scan(args: argparse.Namespace, config: Config, pci_ids: PciIds) -> Inventory:
    return discover(SysfsScanner(args.sysfs_root, args.dev_root).scan(), config, pci_ids)


def cmd_inspect(args: argparse.Namespace) -> int:
    config, pci_ids = load_inputs(args)
    inventory = scan(args, config, pci_ids)
    if args.json:
        print(json.dumps(inventory_json(inventory, pci_ids, config.naming), indent=2))
    else:
        sys.stdout.write(inventory_text(inventory, pci_ids, config.naming))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config, pci_ids = load_inputs(args)
    options = Options(args.sysfs_root, args.dev_root, args.proc_root, args.device_plugin_dir, args.rescan_interval)
    daemon = Daemon(options, config, pci_ids)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()
        daemon.notify("stop")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = None
    if args.status_port is not None:
        from deviceplugin.status import StatusServer

        status = StatusServer(daemon, args.status_port)
        status.start()
    log.info("vfio-device-plugin %s starting (sysfs %s, plugin dir %s)", __version__, args.sysfs_root, args.device_plugin_dir)
    try:
        daemon.run(stop)
    finally:
        if status is not None:
            status.stop()
    log.info("stopped")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from deviceplugin.doctor import run_doctor

    config, pci_ids = load_inputs(args)
    return run_doctor(args, scan(args, config, pci_ids))


def cmd_kubevirt_config(args: argparse.Namespace) -> int:
    from deviceplugin.kubevirt import kubevirt_config

    config, pci_ids = load_inputs(args)
    sys.stdout.write(kubevirt_config(scan(args, config, pci_ids)))
    return 0


def cmd_binder(args: argparse.Namespace) -> int:
    from deviceplugin.bind import BindError, run_command

    config, pci_ids = load_inputs(args)
    try:
        return run_command(args, config, pci_ids)
    except BindError as exc:
        raise UsageError(str(exc)) from exc


def cmd_demo(args: argparse.Namespace) -> int:
    from deviceplugin.demo import run_demo

    return run_demo()


COMMANDS = {
    "serve": cmd_serve,
    "inspect": cmd_inspect,
    "doctor": cmd_doctor,
    "kubevirt-config": cmd_kubevirt_config,
    "bind": cmd_binder,
    "release": cmd_binder,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "warning") if args.command != "demo" else "warning", getattr(args, "log_format", "text"))
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError) as exc:
        print(f"vfio-device-plugin: error: {exc}", file=sys.stderr)
        return 2
