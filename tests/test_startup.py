"""The commands people run by hand import what they need, when they need it (issue: snappy at any size).

`inspect`, `doctor` and `kubevirt-config` on a node without a PodResources socket never load grpc,
protobuf, watchdog, prometheus_client or the daemon: together they were two thirds of their start.
YAML is loaded only to read a config file (and by kubevirt-config, whose output is YAML).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from deviceplugin.sim.node import gpu

HEAVY = (
    "grpc",
    "google.protobuf",
    "watchdog",
    "prometheus_client",
    "deviceplugin.daemon",
    "deviceplugin.server",
    "deviceplugin.watch",
    "lightkube",
)

# Runs the command's main() in this interpreter (the console script would end the process with it), then
# names the heavy modules it loaded.
PROBE = (
    "import sys\nfrom deviceplugin.cli import main\nmain(sys.argv[1:])\n"
    f"heavy = {HEAVY!r}\n"
    "print('LOADED', sorted({m for m in sys.modules for h in heavy if m == h or m.startswith(h + '.')} | "
    "({'yaml'} & set(sys.modules))), file=sys.stderr)\n"
)


def loaded(args: list[str]) -> tuple[list[str], str]:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("LOADED"), result.stderr
    return eval(last.removeprefix("LOADED ")), result.stdout


@pytest.mark.parametrize(
    ("command", "yaml"),
    [(["inspect"], False), (["inspect", "--json"], False), (["doctor"], False), (["doctor", "--json"], False), (["kubevirt-config"], True)],
)
def test_commands_by_hand_load_no_daemon_modules(node, command, yaml):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    args = [*command, *node.cli_args(), f"--pod-resources-socket={node.root}/no-such.sock"]
    if command[0] != "kubevirt-config":
        args.append(f"--kubelet-plugins-dir={node.root}/plugins")
    modules, stdout = loaded(args)
    assert stdout, "the command printed nothing"
    assert modules == (["yaml"] if yaml else []), f"{' '.join(command)} loaded {modules}"


def test_a_config_file_loads_yaml_and_still_no_grpc(node):
    config = node.root / "config.yaml"
    config.write_text("naming: full\n")
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    modules, stdout = loaded(["inspect", *node.cli_args(), f"--config={config}", f"--pod-resources-socket={node.root}/none"])
    assert modules == ["yaml"] and "GA104" in stdout
