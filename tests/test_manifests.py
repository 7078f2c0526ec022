"""What users apply: the kustomize base and overlay render and validate, the DaemonSet is least-
privileged, the examples name what the plugin registers, and the Dockerfile builds what pyproject says."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from deviceplugin import __version__
from deviceplugin.config import Config
from deviceplugin.discovery import discover
from deviceplugin.kubevirt import pci_host_devices
from deviceplugin.naming import load_pci_ids
from deviceplugin.sim.node import demo_node
from deviceplugin.sysfs import SysfsScanner

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
KUSTOMIZATIONS = ["base", "examples/full-naming", "examples/with-binder"]
K8S_VERSION = kubernetes_validate.latest_version()


def render(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is required for the manifest tests (.ci/run installs it)"
    out = subprocess.run([kubectl, "kustomize", str(MANIFESTS / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def daemonset(path: str = "base") -> dict:
    return next(d for d in render(path) if d["kind"] == "DaemonSet")


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_renders_and_validates_strictly(path):
    docs = render(path)
    assert {d["kind"] for d in docs} == {"DaemonSet", "ConfigMap"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_misspelled_field_would_fail_validation():
    bad = daemonset()
    bad["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_daemonset_is_least_privileged_and_node_critical():
    ds = daemonset()
    assert ds["metadata"]["namespace"] == "kube-system"
    spec = ds["spec"]
    assert spec["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    pod = spec["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"key": "CriticalAddonsOnly", "operator": "Exists"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["automountServiceAccountToken"] is False
    assert "hostNetwork" not in pod and "hostPID" not in pod
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    res = container["resources"]
    assert set(res) == {"requests", "limits"} and res["limits"]["memory"] == "128Mi"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "status"}
    assert "--status-port=8080" in container["args"] and {"name": "status", "containerPort": 8080, "protocol": "TCP"} in container["ports"]


def test_mounts_the_plugin_directory_not_the_socket_and_dev_vfio_read_only():
    pod = daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["device-plugins"]["hostPath"] == {"path": "/var/lib/kubelet/device-plugins", "type": "Directory"}
    assert mounts["device-plugins"]["mountPath"] == "/var/lib/kubelet/device-plugins"
    assert not mounts["device-plugins"].get("readOnly")
    assert volumes["dev-vfio"]["hostPath"] == {"path": "/dev/vfio", "type": "DirectoryOrCreate"}  # nodes without vfio still run it
    assert mounts["dev-vfio"] == {"name": "dev-vfio", "mountPath": "/dev/vfio", "readOnly": True}
    assert not any(v.get("hostPath", {}).get("path", "").endswith(".sock") for v in pod["volumes"])
    assert not any(v.get("hostPath", {}).get("path") == "/sys" for v in pod["volumes"])  # the container's own /sys


def test_config_map_is_a_valid_plugin_config_and_args_parse():
    from deviceplugin.cli import build_parser
    from deviceplugin.config import parse_config

    cm = next(d for d in render("base") if d["kind"] == "ConfigMap")
    ds = daemonset()
    volume = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]  # the generated, hashed name
    config = parse_config(yaml.safe_load(cm["data"]["config.yaml"]))
    assert config.naming == "short"
    args = build_parser().parse_args(["serve", *daemonset("examples/full-naming")["spec"]["template"]["spec"]["containers"][0]["args"]])
    assert (args.naming, args.status_port, args.log_format, args.config) == ("full", 8080, "json", "/etc/vfio-device-plugin/config.yaml")


def test_image_tag_is_the_package_version():
    for path in KUSTOMIZATIONS:
        pod = daemonset(path)["spec"]["template"]["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["image"] == f"ghcr.io/vfio-device-plugin/vfio-device-plugin:{__version__}"


def test_binder_component_adds_the_only_privileged_container():
    from deviceplugin.cli import build_parser

    base, pod = daemonset()["spec"]["template"]["spec"], daemonset("examples/with-binder")["spec"]["template"]["spec"]
    assert pod["containers"] == base["containers"]  # the plugin container keeps every restriction and mount
    unchanged = {k: v for k, v in pod.items() if k not in ("initContainers", "volumes")}
    assert unchanged == {k: v for k, v in base.items() if k != "volumes"}  # no hostPID, no pod-level privilege
    (init,) = pod["initContainers"]
    privileged = [c["name"] for c in pod["containers"] + pod["initContainers"] if c.get("securityContext", {}).get("privileged")]
    assert privileged == ["bind"] and init["securityContext"] == {"privileged": True}
    args = build_parser().parse_args(init["command"][1:])
    assert init["command"][0] == "vfio-device-plugin" and args.command == "bind" and args.addresses == []
    assert (args.config, args.sysfs_root, args.proc_root, args.dry_run) == (
        "/etc/vfio-device-plugin/config.yaml",
        "/host/sys",
        "/host/proc",
        False,
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert [v for v in base["volumes"] if v not in pod["volumes"]] == []
    added = set(volumes) - {v["name"] for v in base["volumes"]}
    assert added == {"host-sys", "host-proc"}
    assert volumes["host-sys"]["hostPath"] == {"path": "/sys", "type": "Directory"}
    mounts = {m["name"]: m for m in init["volumeMounts"]}
    assert mounts["host-sys"] == {"name": "host-sys", "mountPath": "/host/sys"}  # writable: it binds
    assert mounts["host-proc"]["readOnly"] and mounts["config"]["readOnly"] and mounts["dev-vfio"]["readOnly"]
    assert volumes["config"]["configMap"]["name"].startswith("vfio-device-plugin-config-")  # the same, hashed ConfigMap


def registered_names(naming: str) -> set[str]:
    """What the plugin registers with a kubelet for the sample (demo) node."""
    from conftest import Harness

    with tempfile.TemporaryDirectory(prefix="vdp", dir="/tmp") as root:
        node = demo_node(root)
        pci_ids = load_pci_ids(str(node.root / "pci.ids"))
        h = Harness(node, pci_ids, config=Config(naming=naming)).start()
        try:
            assert h.kubelet.wait_for(lambda k: bool(k.endpoints), 10)
            return set(h.kubelet.endpoints)
        finally:
            h.close()


def test_examples_name_what_the_plugin_registers_for_the_sample_node():
    names = registered_names("short")
    assert names == {"nvidia.com/GA104"}
    patch = yaml.safe_load((MANIFESTS / "examples" / "kubevirt-permitted-host-devices.yaml").read_text())
    entries = patch["spec"]["configuration"]["permittedHostDevices"]["pciHostDevices"]
    with tempfile.TemporaryDirectory() as root:
        node = demo_node(root)
        inventory = discover(SysfsScanner(str(node.sys), str(node.dev)).scan(), Config(), load_pci_ids(str(node.root / "pci.ids")))
    assert entries == pci_host_devices(inventory)  # what `kubevirt-config` prints for that node
    vm = yaml.safe_load((MANIFESTS / "examples" / "virtualmachine.yaml").read_text())
    assert {g["deviceName"] for g in vm["spec"]["template"]["spec"]["domain"]["devices"]["gpus"]} == names
    pod = yaml.safe_load((MANIFESTS / "examples" / "pod.yaml").read_text())
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert set(pod["spec"]["containers"][0]["resources"]["limits"]) == names


def test_full_naming_overlay_names_what_nvidias_plugin_did():
    assert registered_names("full") == {"nvidia.com/GA104_GEFORCE_RTX_3070"}


# --- Dockerfile -----------------------------------------------------------------------------------
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_copies_files_that_exist_and_is_multi_stage():
    text = dockerfile()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert stages == ["python:3.11-slim-bookworm", "python:3.11-slim-bookworm"]
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    final = text.split("\nFROM ")[-1]
    assert "pci.ids" in final and "rm -rf /var/lib/apt/lists/*" in final
    assert "gcc" not in final and "build-essential" not in final
    assert "--no-cache-dir" in text


def test_entrypoint_is_the_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])$", dockerfile(), re.M)
    assert entry is not None
    assert yaml.safe_load(entry.group(1)) == ["vfio-device-plugin", "serve"] and "vfio-device-plugin" in scripts


def test_dockerignore_keeps_the_build_context_small():
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignore  # everything is excluded unless re-included below
    for needed in ("!pyproject.toml", "!README.md", "!proto/", "!deviceplugin/"):
        assert needed in ignore
