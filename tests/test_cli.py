"""The command line as an operator runs it: real processes, exit codes, the JSON document."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import PCI_IDS_PATH, tree_of

from deviceplugin.sim.node import Fn, gpu

CLI = [sys.executable, "-m", "deviceplugin"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_inspect_json_document(node):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", numa_node=0))
    node.add_all(gpu("0000:02:00.0", "1b06", "10ef", "14", audio_driver="snd_hda_intel"))
    result = run("inspect", "--json", *node.cli_args(PCI_IDS_PATH))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) >= {"host", "groups", "resources", "pools", "problems"}
    assert doc["host"]["iommu_enabled"] is True and doc["host"]["vfio_modules"]["vfio_pci"] is True
    assert doc["resources"] == {"nvidia.com/GA104": ["0000:01:00.0"], "nvidia.com/GA104_AUDIO": ["0000:01:00.1"]}
    g13 = next(g for g in doc["groups"] if g["id"] == "13")
    assert g13["devices"] == ["0000:01:00.0"]
    assert g13["companions"] == {"0000:01:00.0": {"audio": "0000:01:00.1"}}
    assert {k: g13[k] for k in ("viable", "offered", "resource", "device_id", "numa_node", "reasons")} == {
        "viable": True,
        "offered": True,
        "resource": "nvidia.com/GA104",
        "device_id": "0000:01:00.0",
        "numa_node": 0,
        "reasons": [],
    }
    assert g13["functions"][0] == {
        "address": "0000:01:00.0",
        "vendor": "10de",
        "device": "2484",
        "class": "030000",
        "class_name": "VGA",
        "driver": "vfio-pci",
        "name": "GA104 [GeForce RTX 3070]",
        "numa_node": 0,
        "boot_vga": False,
    }
    g14 = next(g for g in doc["groups"] if g["id"] == "14")
    assert g14["offered"] is False and "snd_hda_intel" in g14["reasons"][0]


def test_inspect_text_says_why(node):
    node.add_all(gpu("0000:02:00.0", "1b06", "10ef", "14", audio_driver="snd_hda_intel"))
    result = run("inspect", *node.cli_args(PCI_IDS_PATH))
    assert result.returncode == 0
    assert "IOMMU group 14: NOT OFFERED (would be nvidia.com/GP102)" in result.stdout
    assert "why: 0000:02:00.1 (10de:10ef Audio) is bound to host driver snd_hda_intel" in result.stdout


def test_naming_option_and_missing_database(node):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    full = json.loads(run("inspect", "--json", "--naming", "full", *node.cli_args(PCI_IDS_PATH)).stdout)
    assert full["resources"]["nvidia.com/GA104_GEFORCE_RTX_3070"] == ["0000:01:00.0"]
    assert full["resources"]["nvidia.com/GA104_GEFORCE_RTX_3070_AUDIO"] == ["0000:01:00.1"]
    empty = node.root / "empty.ids"
    empty.write_text("")
    doc = json.loads(run("inspect", "--json", *node.cli_args(empty)).stdout)
    assert doc["resources"]["nvidia.com/2484"] == ["0000:01:00.0"]
    assert "fallback to the device id" in doc["groups"][0]["naming"]


def test_broken_config_exits_non_zero_naming_the_key_before_serving(node):
    config = node.root / "bad.yaml"
    config.write_text("rules:\n  - {vendor: '10de', resource: 'GA 104'}\n")
    result = run("serve", "--config", str(config), *node.cli_args(PCI_IDS_PATH))
    assert result.returncode == 2
    assert "rules[0].resource: invalid extended resource name 'GA 104'" in result.stderr
    assert list(node.plugins.iterdir()) == []  # nothing served, nothing registered


def test_unreadable_pci_ids_is_a_clear_error(node):
    result = run("inspect", *node.cli_args(node.root / "nope.ids"))
    assert result.returncode == 2 and "--pci-ids" in result.stderr


def test_help_and_module_entry_point():
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "inspect", "doctor", "kubevirt-config", "bind", "release", "demo"):
        assert command in result.stdout


def test_demo_runs_the_real_plugin_against_a_test_kubelet():
    result = run("demo", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "allocatable: {'nvidia.com/GA104': 1, 'nvidia.com/GA104_AUDIO': 1}" in out
    assert "PCI_RESOURCE_NVIDIA_COM_GA104=0000:01:00.0" in out
    assert "PCI_RESOURCE_NVIDIA_COM_GA104_AUDIO=0000:01:00.1" in out
    assert "device /dev/vfio/13 -> /dev/vfio/13 (mrw)" in out
    assert "group 14: 0000:02:00.1 (10de:10ef Audio) is bound to host driver snd_hda_intel" in out
    assert "allocatable is {'nvidia.com/GA104': 0, 'nvidia.com/GA104_AUDIO': 0}" in out


# --- every option also reads VFIO_DP_*: commands run with `kubectl exec` agree with serve ---------------
def run_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **env})


def test_kubevirt_config_and_inspect_follow_the_daemonsets_variables(node):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    config = node.root / "config.yaml"
    config.write_text("rules:\n  - {vendor: '10de', device: '2484', resource: nvidia.com/rtx3070-reserved}\n")
    env = {
        "VFIO_DP_CONFIG": str(config),
        "VFIO_DP_SYSFS_ROOT": str(node.sys),
        "VFIO_DP_DEV_ROOT": str(node.dev),
        "VFIO_DP_PROC_ROOT": str(node.proc),
        "VFIO_DP_DEVICE_PLUGIN_DIR": str(node.plugins),
        "VFIO_DP_PCI_IDS": str(PCI_IDS_PATH),
        "VFIO_DP_POD_RESOURCES_SOCKET": str(node.root / "none.sock"),
    }
    assert "resourceName: nvidia.com/rtx3070-reserved" in run_env(env, "kubevirt-config").stdout
    assert json.loads(run_env(env, "inspect", "--json").stdout)["resources"]["nvidia.com/rtx3070-reserved"] == ["0000:01:00.0"]
    full = json.loads(run_env({**env, "VFIO_DP_CONFIG": "", "VFIO_DP_NAMING": "full"}, "inspect", "--json").stdout)
    assert "nvidia.com/GA104_GEFORCE_RTX_3070" in full["resources"]
    # a flag wins over its variable
    short = json.loads(run_env({**env, "VFIO_DP_CONFIG": "", "VFIO_DP_NAMING": "full"}, "inspect", "--json", "--naming", "short").stdout)
    assert "nvidia.com/GA104" in short["resources"]


def test_a_bad_value_in_a_variable_is_a_clear_error():
    result = run_env({"VFIO_DP_NAMING": "long"}, "inspect")
    assert result.returncode == 2 and "VFIO_DP_NAMING='long': must be one of short, full" in result.stderr
    result = run_env({"VFIO_DP_RESCAN_INTERVAL": "soon"}, "serve")
    assert result.returncode == 2 and "rescan-interval" in result.stderr


def test_help_names_the_variable_of_every_option():
    text = " ".join(run("serve", "--help").stdout.split())
    flags = ("--sysfs-root", "--dev-root", "--config", "--naming", "--pci-ids", "--rescan-interval", "--status-port", "--status-address")
    for flag in flags:
        assert f"env {'VFIO_DP_' + flag[2:].replace('-', '_').upper()}" in text, flag


# --- bind / release -------------------------------------------------------------------------------
def host_gpu(node) -> None:
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", driver="nvidia", audio_driver="snd_hda_intel"))
    (node.sys / "bus" / "pci" / "drivers" / "vfio-pci").mkdir()


def test_bind_dry_run_json_plans_writes_under_the_given_roots_only(node):
    host_gpu(node)
    before = tree_of(node.root)
    result = run("bind", "--dry-run", "--json", "01:00.1", *node.cli_args())
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["action"], doc["dry_run"], doc["outcome"], doc["changed"]) == ("bind", True, "planned", False)
    (group,) = doc["groups"]
    assert group["group"] == "13" and group["driver"] == "vfio-pci" and group["steps"] == []
    assert [s["line"].split(" > ")[0] for s in group["plan"] if s["kind"] == "write"][:3] == [
        "echo vfio-pci",
        "echo 0000:01:00.0",
        "echo 0000:01:00.0",
    ]
    assert all(s["path"].startswith(str(node.sys) + "/") for s in group["plan"])
    assert {c["name"]: c["ok"] for c in group["checks"]} == {"driver": True, "shared-group": True}
    assert tree_of(node.root) == before


def test_bind_refusal_exits_1_and_a_failed_write_is_rolled_back(node):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", driver="nvidia", audio_driver="snd_hda_intel"))
    before = tree_of(node.root)
    result = run("bind", "0000:01:00.0", *node.cli_args())
    assert result.returncode == 1 and "run `modprobe vfio-pci`" in result.stdout
    assert tree_of(node.root) == before
    (node.sys / "bus" / "pci" / "drivers" / "vfio-pci").mkdir()
    before = tree_of(node.root)
    # The real writer on a tree that is not sysfs: driver_override does not exist, and no file is made
    result = run("bind", "0000:01:00.0", *node.cli_args())
    assert result.returncode == 1
    assert "ENOENT" in result.stdout and "Rolled back: every function of group 13 is as it was" in result.stdout
    assert tree_of(node.root) == before


def test_bind_usage_errors_exit_2(node):
    host_gpu(node)
    result = run("release", "0000:01:00.0", "bogus", *node.cli_args())
    assert result.returncode == 2 and "vfio-device-plugin: error: 'bogus' is not a PCI address" in result.stderr


def test_bind_config_at_node_start_is_idempotent(node):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))  # already on vfio-pci
    config = node.root / "config.yaml"
    config.write_text('rules:\n  - {vendor: "10de", device: "2484", bind: true}\n')
    result = run("bind", "--config", str(config), *node.cli_args())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "=> unchanged: group 13: every function is already on a vfio driver" in result.stdout
    assert result.stdout.endswith("bind: nothing changed: everything was already as asked\n")


def test_bind_and_release_through_the_parser_with_the_fake_kernel(node, capsys):
    from deviceplugin.bind import run_command
    from deviceplugin.cli import build_parser
    from deviceplugin.config import Config
    from deviceplugin.naming import PciIds
    from deviceplugin.sim.kernel import FakeKernel

    host_gpu(node)
    kernel = FakeKernel(node)
    args = build_parser().parse_args(["bind", "--json", "--timeout", "2", "0000:01:00.0", *node.cli_args()])
    assert run_command(args, Config(), PciIds(), kernel) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["outcome"], doc["changed"]) == ("done", True)
    assert [s["result"] for s in doc["groups"][0]["steps"]] == ["ok"] * 8 and doc["groups"][0]["rollback"] == []
    assert node.driver_of("0000:01:00.1") == "vfio-pci" and (node.dev / "vfio" / "13").exists()
    args = build_parser().parse_args(["release", "0000:01:00.1", *node.cli_args()])
    assert run_command(args, Config(), PciIds(), kernel) == 0
    assert "=> released: group 13: given back to the host" in capsys.readouterr().out
    assert node.driver_of("0000:01:00.0") == "nvidia"


def test_bind_defaults_are_the_real_paths():
    from deviceplugin.cli import build_parser

    args = build_parser().parse_args(["bind", "0000:01:00.0"])
    assert (args.sysfs_root, args.dev_root, args.proc_root, args.timeout, args.dry_run) == ("/sys", "/dev", "/proc", 10.0, False)
    assert build_parser().parse_args(["release", "--timeout", "0.5", "0000:01:00.0"]).timeout == 0.5


# --- pci.ids: a current copy ships with the package ------------------------------------------------------
def test_an_h200_is_named_from_the_bundled_pci_ids(node):
    node.add(Fn("0000:19:00.0", "10de", "2335", "030200", "vfio-pci", "30"))
    node.sync_devnode("30")
    doc = json.loads(run("inspect", "--json", *node.cli_args()).stdout)  # no --pci-ids: the newest copy found
    assert doc["resources"]["nvidia.com/GH100"] == ["0000:19:00.0"]
    assert doc["host"]["pci_ids"].endswith("deviceplugin/data/pci.ids") and doc["host"]["pci_ids_version"] == "2026.10.24"
    full = json.loads(run("inspect", "--json", "--naming", "full", *node.cli_args()).stdout)
    assert full["resources"]["nvidia.com/GH100_H200_SXM_141GB"] == ["0000:19:00.0"]
    assert "(version 2026.10.24)" in run("inspect", *node.cli_args()).stdout


def test_the_newest_pci_ids_wins_unless_one_is_named(tmp_path, monkeypatch):
    from deviceplugin import naming

    old, new = tmp_path / "old.ids", tmp_path / "new.ids"
    old.write_text("#\tVersion: 2023.04.11\n10de  NVIDIA Corporation\n\t2335  old name\n")
    new.write_text("#\tVersion: 2099.01.01\n10de  NVIDIA Corporation\n\t2335  GH100 [H200 SXM 141GB]\n")
    monkeypatch.setattr(naming, "PCI_IDS_PATHS", (str(old), str(new)))
    assert naming.load_pci_ids().path == str(new)  # newer than the bundled copy too
    monkeypatch.setattr(naming, "PCI_IDS_PATHS", (str(old),))
    assert naming.load_pci_ids().path == naming.BUNDLED_PCI_IDS  # the bundled 2026 copy beats a stale system one
    assert naming.load_pci_ids(str(old)).device_name("10de", "2335") == "old name"  # --pci-ids always wins
