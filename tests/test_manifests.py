"""What users apply: the kustomize base and overlay render and validate, the DaemonSet is least-
privileged, the examples name what the plugin registers, and the Dockerfile builds what pyproject says."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path
from unittest import mock

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
    assert sc["seLinuxOptions"] == {"type": "container_device_plugin_t"}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "status"}
    assert {"name": "status", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert "args" not in container and "command" not in container  # options come from the environment


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_mounts_directories_never_sockets_and_the_hosts_dev_read_only():
    pod = daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["device-plugins"]["hostPath"] == {"path": "/var/lib/kubelet/device-plugins", "type": "Directory"}
    assert mounts["device-plugins"]["mountPath"] == "/var/lib/kubelet/device-plugins"
    assert not mounts["device-plugins"].get("readOnly")
    assert volumes["pod-resources"]["hostPath"] == {"path": "/var/lib/kubelet/pod-resources", "type": "DirectoryOrCreate"}
    assert mounts["pod-resources"] == {"name": "pod-resources", "mountPath": "/var/lib/kubelet/pod-resources", "readOnly": True}
    # the host's /dev survives a vfio module reload (a /dev/vfio mount would go stale) and shows /dev/iommu
    assert volumes["host-dev"]["hostPath"] == {"path": "/dev", "type": "Directory"}
    assert mounts["host-dev"] == {"name": "host-dev", "mountPath": "/host/dev", "readOnly": True}
    assert env_of(pod["containers"][0])["VFIO_DP_DEV_ROOT"] == "/host/dev"
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
    env = env_of(daemonset("examples/full-naming")["spec"]["template"]["spec"]["containers"][0])
    for command in ("serve", "inspect", "kubevirt-config"):  # every command in the pod reads the same settings
        with mock.patch.dict(os.environ, env):
            args = build_parser().parse_args([command])
        assert (args.naming, args.log_format, args.config, args.dev_root) == (
            "full",
            "json",
            "/etc/vfio-device-plugin/config.yaml",
            "/host/dev",
        )
        assert command != "serve" or args.status_port == 8080


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
            # every resource the pool publishes is served and registered: /healthz's own condition
            deadline = time.monotonic() + 10
            while not h.daemon.health()[0]:
                assert time.monotonic() < deadline, h.daemon.health()[1]
                time.sleep(0.01)
            assert h.kubelet.wait_for(lambda k: set(k.endpoints) == set(h.daemon.pool.resources()), 10)
            return set(h.kubelet.endpoints)
        finally:
            h.close()


def test_examples_name_what_the_plugin_registers_for_the_sample_node():
    names = registered_names("short")
    assert names == {"nvidia.com/GA104", "nvidia.com/GA104_AUDIO"}
    patch = yaml.safe_load((MANIFESTS / "examples" / "kubevirt-permitted-host-devices.yaml").read_text())
    entries = patch["spec"]["configuration"]["permittedHostDevices"]["pciHostDevices"]
    with tempfile.TemporaryDirectory() as root:
        node = demo_node(root)
        inventory = discover(SysfsScanner(str(node.sys), str(node.dev)).scan(), Config(), load_pci_ids(str(node.root / "pci.ids")))
    assert entries == pci_host_devices(inventory)  # what `kubevirt-config` prints for that node
    vm = yaml.safe_load((MANIFESTS / "examples" / "virtualmachine.yaml").read_text())
    assert {g["deviceName"] for g in vm["spec"]["template"]["spec"]["domain"]["devices"]["gpus"]} == {"nvidia.com/GA104"}
    with_audio = yaml.safe_load((MANIFESTS / "examples" / "virtualmachine-with-audio.yaml").read_text())["spec"]["template"]["spec"]
    devices = with_audio["domain"]["devices"]
    assert [g["deviceName"] for g in devices["gpus"]] == ["nvidia.com/GA104"]
    assert [h["deviceName"] for h in devices["hostDevices"]] == ["nvidia.com/GA104_AUDIO"]
    pod = yaml.safe_load((MANIFESTS / "examples" / "pod.yaml").read_text())
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert set(pod["spec"]["containers"][0]["resources"]["limits"]) <= names


def test_full_naming_overlay_names_what_nvidias_plugin_did():
    assert registered_names("full") == {"nvidia.com/GA104_GEFORCE_RTX_3070", "nvidia.com/GA104_GEFORCE_RTX_3070_AUDIO"}


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
    assert "apt-get" not in final  # pci.ids ships in the package: nothing to fetch at build time
    assert "gcc" not in final and "build-essential" not in final
    assert "--no-cache-dir" in text


def test_the_image_keeps_compiled_bytecode():
    """Each `kubectl exec ... inspect` would otherwise compile every module it imports (73 -> 56 ms in the image)."""
    build, final = dockerfile().split("\nFROM ")[1:]
    assert "compileall" in build and "compileall" in final
    assert build.index("__pycache__") < build.index("compileall")  # pip's own bytecode goes, ours stays


def test_the_bundled_pci_ids_is_package_data():
    from importlib.resources import files

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["deviceplugin"]
    assert "data/pci.ids" in data
    text = files("deviceplugin").joinpath("data/pci.ids").read_text(encoding="utf-8", errors="replace")
    assert "\t2335  GH100 [H200 SXM 141GB]" in text


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


# --- DRA mode (manifests/examples/dra) --------------------------------------------------------------
DRA = MANIFESTS / "examples" / "dra"


def dra_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in render("examples/dra")}


def dra_examples() -> dict[str, list[dict]]:
    return {f: [d for d in yaml.safe_load_all((DRA / f).read_text()) if d] for f in ("deviceclasses.yaml", "resourceclaimtemplate.yaml")}


def test_dra_kustomization_renders_and_validates_strictly():
    docs = render("examples/dra")
    assert sorted(d["kind"] for d in docs) == sorted(
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ]
    )
    for doc in docs + [d for ds in dra_examples().values() for d in ds]:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_dra_daemonset_runs_serve_in_dra_mode_with_the_kubelets_dra_directories():
    from deviceplugin.cli import build_parser

    docs = dra_docs()
    ds = docs["DaemonSet"]
    assert ds["metadata"]["name"] == "vfio-device-plugin-dra" and ds["metadata"]["namespace"] == "kube-system"
    assert ds["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "dra"  # apart from the base DaemonSet's pods
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "args" not in container
    with mock.patch.dict(os.environ, env_of(container)):
        args = build_parser().parse_args(["serve"])
    assert (args.mode, args.driver_name, args.cdi_dir) == ("dra", "vfio-device-plugin.github.io", "/var/run/cdi")
    assert (args.kubelet_plugins_dir, args.kubelet_registry_dir) == ("/var/lib/kubelet/plugins", "/var/lib/kubelet/plugins_registry")
    assert (args.config, args.status_port) == ("/etc/vfio-device-plugin/config.yaml", 8080)
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in container["env"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"] and pod["automountServiceAccountToken"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for path in ("/var/lib/kubelet/plugins", "/var/lib/kubelet/plugins_registry", "/var/run/cdi"):
        (name,) = [n for n, v in volumes.items() if v.get("hostPath", {}).get("path") == path]
        assert mounts[name] == path  # the same path inside: the kubelet and the runtime read the paths we report
    assert "/var/lib/kubelet/device-plugins" not in mounts.values() and mounts["host-dev"] == "/host/dev"
    sc = container["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] is True


def test_dra_rbac_is_least_privilege():
    docs = dra_docs()
    assert docs["ClusterRole"]["rules"] == [
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"], "verbs": ["list", "watch", "create", "update", "delete"]},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"], "verbs": ["get"]},
    ]
    binding = docs["ClusterRoleBinding"]
    sa = docs["ServiceAccount"]["metadata"]
    assert binding["roleRef"]["name"] == docs["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    policy = docs["ValidatingAdmissionPolicy"]
    assert f"system:serviceaccount:{sa['namespace']}:{sa['name']}" in policy["spec"]["matchConditions"][0]["expression"]
    assert docs["ValidatingAdmissionPolicyBinding"]["spec"]["policyName"] == policy["metadata"]["name"]


def test_dra_examples_select_what_the_plugin_publishes_and_the_vm_uses_the_template():
    classes = {d["metadata"]["name"]: d for d in dra_examples()["deviceclasses.yaml"]}
    assert set(classes) == {"vfio-gpu", "vfio-gpu-ga104"}
    with tempfile.TemporaryDirectory() as root:
        node = demo_node(root)
        inventory = discover(SysfsScanner(str(node.sys), str(node.dev)).scan(), Config(), load_pci_ids(str(node.root / "pci.ids")))
    expression = classes["vfio-gpu-ga104"]["spec"]["selectors"][0]["cel"]["expression"]
    gpus = {r for r, devices in inventory.devices.items() if any(d.healthy and not d.role for d in devices)}
    assert gpus == {"nvidia.com/GA104"} and '== "nvidia.com/GA104"' in expression
    (template,) = dra_examples()["resourceclaimtemplate.yaml"]
    (request,) = template["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"]["deviceClassName"] == "vfio-gpu-ga104"
    vm = yaml.safe_load((DRA / "virtualmachine.yaml").read_text())["spec"]["template"]["spec"]
    assert vm["resourceClaims"] == [{"name": "gpu", "resourceClaimTemplateName": template["metadata"]["name"]}]
    (gpu_entry,) = vm["domain"]["devices"]["gpus"]
    assert (gpu_entry["claimName"], gpu_entry["requestName"]) == ("gpu", request["name"]) and "deviceName" not in gpu_entry


def test_dra_manifests_are_accepted_by_a_real_api_server(cluster):
    """Server-side dry-run creates: the API server's own validation (CEL compiled, schema, RBAC objects)."""
    from lightkube.codecs import from_dict

    docs = render("examples/dra") + [d for ds in dra_examples().values() for d in ds]
    for doc in docs:
        namespace = "default" if doc["kind"] == "ResourceClaimTemplate" else doc["metadata"].get("namespace")
        cluster.client.create(from_dict(doc), namespace=namespace, dry_run=True)
