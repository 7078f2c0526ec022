"""Command line: `vfio-device-plugin {serve,inspect,doctor,kubevirt-config,bind,release,demo}`.

Every subcommand takes the same node options after its name, so `inspect --sysfs-root /host/sys`
shows exactly what `serve --sysfs-root /host/sys` would offer. Every option also reads an environment
variable (`--config` <- VFIO_DP_CONFIG): the DaemonSet sets the variables, so a command run with
`kubectl exec` in the pod sees the same config, naming and paths as `serve`. A flag wins over its variable.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from deviceplugin import __version__, jsontext
from deviceplugin.config import Config, ConfigError, load_config
from deviceplugin.discovery import Inventory, discover
from deviceplugin.dra import options as dra_options
from deviceplugin.naming import NAMINGS, PciIds, load_pci_ids
from deviceplugin.podresources import DEFAULT_SOCKET as POD_RESOURCES_SOCKET
from deviceplugin.podresources import fetch
from deviceplugin.pool import Holdings
from deviceplugin.report import inventory_json, inventory_text
from deviceplugin.sysfs import SysfsScanner

log = logging.getLogger("deviceplugin")


class UsageError(Exception):
    pass


ENV_PREFIX = "VFIO_DP_"


def env_name(flag: str) -> str:
    """--sysfs-root -> VFIO_DP_SYSFS_ROOT."""
    return ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()


def _option(group: argparse._ArgumentGroup, flag: str, default: Any, help: str, **kwargs: Any) -> None:
    """An option whose default comes from its environment variable when that is set."""
    env = env_name(flag)
    kwargs["default"] = os.environ.get(env, default)
    group.add_argument(flag, help=f"{help} [env {env}]", **kwargs)


def _check_choices(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse does not check defaults against `choices`; a value from the environment must be checked here."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(getattr(args, "command", ""))
            if sub is not None:
                _check_choices(sub, args)
        elif action.choices is not None and action.dest in vars(args):
            value = getattr(args, action.dest)
            if value is not None and value not in action.choices:
                choices = ", ".join(map(str, action.choices))
                raise UsageError(f"{env_name(action.option_strings[0])}={value!r}: must be one of {choices}")


def _node_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("node options (each also read from its environment variable; a flag wins)")
    _option(g, "--sysfs-root", "/sys", "where sysfs is mounted (default /sys)")
    _option(g, "--dev-root", "/dev", "where the host's /dev (vfio, iommu) is (default /dev)")
    _option(g, "--proc-root", "/proc", "where procfs is mounted (default /proc)")
    _option(g, "--device-plugin-dir", "/var/lib/kubelet/device-plugins", "the kubelet's device-plugin dir")
    _option(g, "--pod-resources-socket", POD_RESOURCES_SOCKET, f"the kubelet's PodResources socket (default {POD_RESOURCES_SOCKET})")
    _option(g, "--pci-ids", None, "pci.ids database (default /usr/share/misc/pci.ids, /usr/share/hwdata/pci.ids)")
    _option(g, "--config", None, "YAML config file (naming, classes, companions, rules)")
    _option(g, "--naming", None, "resource names: short (GA104) or full (GA104_GEFORCE_RTX_3070)", choices=NAMINGS)
    _option(g, "--log-level", "info", "log level", choices=["debug", "info", "warning", "error"])
    _option(g, "--log-format", "text", "log format", choices=["text", "json"])
    return p


def _dra_path_options() -> argparse.ArgumentParser:
    """Shared by serve, inspect and doctor: where the DRA mode's sockets and files are."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("DRA options")
    _option(g, "--driver-name", dra_options.DEFAULT_DRIVER, f"DRA driver name, a DNS subdomain (default {dra_options.DEFAULT_DRIVER})")
    _option(
        g,
        "--kubelet-plugins-dir",
        dra_options.DEFAULT_PLUGINS_DIR,
        f"the DRA socket lives in <dir>/<driver>/ (default {dra_options.DEFAULT_PLUGINS_DIR})",
    )
    _option(
        g,
        "--kubelet-registry-dir",
        dra_options.DEFAULT_REGISTRY_DIR,
        f"the kubelet's plugin registry (default {dra_options.DEFAULT_REGISTRY_DIR})",
    )
    return p


def _dra_serve_options(serve: argparse.ArgumentParser) -> None:
    g = serve.add_argument_group("mode")
    _option(g, "--mode", "device-plugin", "device-plugin (default) or dra (resource.k8s.io/v1)", choices=dra_options.MODES)
    _option(g, "--node-name", None, "this node's name (DRA; default $NODE_NAME)")
    _option(g, "--kubeconfig", None, "kubeconfig file (DRA; default: the in-cluster service account)")
    _option(g, "--cdi-dir", dra_options.DEFAULT_CDI_DIR, f"where CDI specs are written (DRA; default {dra_options.DEFAULT_CDI_DIR})")
    g.add_argument("--cleanup", action="store_true", help="DRA: delete this node's ResourceSlices of the driver and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfio-device-plugin", description="Offer vfio-pci bound PCI devices (whole GPUs) to Kubernetes VMs."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _node_options()
    dra_paths = _dra_path_options()
    serve = sub.add_parser("serve", parents=[common, dra_paths], help="run the device plugin (the DaemonSet's entrypoint)")
    own = serve.add_argument_group("serve options")
    _option(own, "--rescan-interval", 5.0, "seconds between sysfs rescans (default 5)", type=_positive_float)
    _option(own, "--status-port", None, "serve /metrics, /status and /healthz on this port (off by default)", type=int)
    _option(
        own,
        "--status-address",
        "",
        "address of the status endpoint (default: every IPv6 and IPv4 address, IPv4 only on hosts without IPv6)",
    )
    _dra_serve_options(serve)
    inspect = sub.add_parser("inspect", parents=[common, dra_paths], help="what this node offers, and why not")
    inspect.add_argument("--json", action="store_true", help="print one JSON document (schema in the README)")
    doctor = sub.add_parser("doctor", parents=[common, dra_paths], help="preflight checks with fixes; exit 1 if any fails")
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
    return discover(SysfsScanner(args.sysfs_root, args.dev_root, once=True).scan(), config, pci_ids)


def holdings(args: argparse.Namespace) -> Holdings:
    return fetch(args.pod_resources_socket)


def cmd_inspect(args: argparse.Namespace) -> int:
    config, pci_ids = load_inputs(args)
    inventory = scan(args, config, pci_ids)
    held = holdings(args)
    from deviceplugin.dra.view import inspect_view, view_text

    dra = inspect_view(inventory, args.sysfs_root, args.driver_name, args.kubelet_plugins_dir, os.environ.get("NODE_NAME"))
    if args.json:
        print(jsontext.dumps({**inventory_json(inventory, pci_ids, config.naming, held), "dra": dra}))
    else:
        sys.stdout.write(inventory_text(inventory, pci_ids, config.naming, held) + "\n" + view_text(dra))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # The daemon (grpc, protobuf, its inotify watches) is imported by the one command that runs it:
    # `inspect`, `doctor` and `kubevirt-config` start in a third of the time without it.
    from deviceplugin.daemon import Daemon, Options

    config, pci_ids = load_inputs(args)
    options = Options(
        args.sysfs_root,
        args.dev_root,
        args.proc_root,
        args.device_plugin_dir,
        args.rescan_interval,
        pod_resources_socket=args.pod_resources_socket,
    )
    if args.cleanup and args.mode != "dra":
        raise UsageError("--cleanup is for --mode dra")
    if args.mode == "dra":
        from deviceplugin.dra.run import dra_frontend_factory, run_cleanup

        dra = _dra_options(args)
        if args.cleanup:
            return run_cleanup(dra)
        daemon = Daemon(options, config, pci_ids, make_frontend=dra_frontend_factory(dra))
    else:
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

        status = StatusServer(daemon, args.status_port, args.status_address)
        status.start()
    log.info("vfio-device-plugin %s starting in %s mode (sysfs %s)", __version__, args.mode, args.sysfs_root)
    try:
        daemon.run(stop)
    finally:
        if status is not None:
            status.stop()
    log.info("stopped")
    return 0


def _dra_options(args: argparse.Namespace) -> dra_options.DraOptions:
    try:
        dra = dra_options.options_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not dra.node:
        raise UsageError("--mode dra needs the node's name: --node-name or $NODE_NAME")
    return dra


def cmd_doctor(args: argparse.Namespace) -> int:
    from deviceplugin.doctor import run_doctor

    config, pci_ids = load_inputs(args)
    return run_doctor(args, scan(args, config, pci_ids), holdings(args), pci_ids)


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


LONG_RUNNING = frozenset({"serve", "demo"})
_exit_state = {"one_shot": False}


def run() -> None:
    """The console script and `python -m deviceplugin`: main(), and its exit status.

    After a one-shot command the process ends with os._exit once its output is flushed: tearing the
    interpreter down frees every object of the report one by one first (12 ms after `inspect --json`
    on 4,096 functions), which the kernel does at once. Nothing else is pending then: logging flushes
    each record, and no thread of such a command has work that must finish. A flush that fails (a
    closed pipe) goes the usual way, so Python reports it as it always has.
    """
    code = main()
    if _exit_state["one_shot"]:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:
            sys.exit(code)
        os._exit(code)
    sys.exit(code)


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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_choices(parser, args)
    except UsageError as exc:
        print(f"vfio-device-plugin: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(getattr(args, "log_level", "warning") if args.command != "demo" else "warning", getattr(args, "log_format", "text"))
    if args.command not in LONG_RUNNING:
        # A one-shot command builds its records and its report, prints and exits: the cyclic collector
        # would only walk that growing heap of acyclic records again and again (10 ms of `inspect --json`
        # on 4,096 functions). Reference counting still frees everything as usual.
        gc.disable()
        _exit_state["one_shot"] = True
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError) as exc:
        print(f"vfio-device-plugin: error: {exc}", file=sys.stderr)
        return 2
