"""The data flows one way (DESIGN.md): readers know nothing of the layers built on them.

Each module may import only the package modules listed for it; a new import across a layer fails
here with the module and the import named.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "deviceplugin"

ALLOWED: dict[str, set[str]] = {
    "sysfs": set(),
    "naming": set(),
    "config": {"naming", "sysfs"},
    "discovery": {"config", "naming", "sysfs"},
    "pool": {"discovery", "naming", "sysfs"},
    "metrics": set(),
    "jsontext": set(),
    "files": set(),
    "server": {"files", "discovery", "metrics", "naming", "pool", "api"},
    "registration": {"api", "naming"},
    "watch": set(),
    "frontend": {"metrics", "naming", "pool", "registration", "server"},
    "podresources": {"api", "pool"},
    "daemon": {"config", "discovery", "frontend", "metrics", "naming", "podresources", "pool", "registration", "sysfs", "watch"},
    "report": {"discovery", "naming", "pool"},
    "doctor": {"discovery", "dra.options", "naming", "pool", "sysfs"},
    "kubevirt": {"discovery"},
    "status": {"daemon", "jsontext", "report"},
    "hostuse": {"sysfs"},
    "bind": {"config", "discovery", "hostuse", "naming", "sysfs"},
    "sim.node": {"sysfs"},
    "sim.kubelet": {"naming", "api", "sim.podresources"},
    "sim.podresources": {"api"},
    "sim.drakubelet": {"api", "dra.kube", "sim.kubelet", "watch"},
    # the DRA mode (deviceplugin/dra/): pure parts below, the API client and the servers above them
    "dra.options": set(),
    "dra.devices": {"discovery", "sysfs"},
    "dra.checkpoint": {"files"},
    "dra.cdi": {"files"},
    "dra.metadata": {"files"},
    "dra.view": {"discovery", "dra.checkpoint", "dra.devices", "dra.options"},
    "dra.kube": set(),
    "dra.slices": {"dra.devices", "dra.kube", "metrics"},
    "dra.sockets": {"files"},
    "dra.registration": {"api"},
    "dra.driver": {"api", "dra.cdi", "dra.checkpoint", "dra.devices", "dra.metadata", "dra.options", "metrics", "pool"},
    "dra.frontend": {
        "api",
        "discovery",
        "dra.checkpoint",
        "dra.devices",
        "dra.driver",
        "dra.kube",
        "dra.options",
        "dra.registration",
        "dra.slices",
        "dra.sockets",
        "dra.view",
        "metrics",
        "pool",
    },
    "dra.run": {"dra.frontend", "dra.kube", "dra.options"},
    "sim.kernel": {"bind", "sim.node", "sysfs"},
}


# Subpackages whose modules are named one level deeper ("sim.node"); the rest are single units (generated code).
SUBPACKAGES = ("sim", "dra")
ENTRY_POINTS = {"__init__", "__main__", "cli", "demo", "codegen"}


def _unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[1:3]) if len(parts) > 2 and parts[1] in SUBPACKAGES else parts[1]


def package_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deviceplugin."):
            found.add(_unit(node.module))
        elif isinstance(node, ast.Import):
            found.update(_unit(a.name) for a in node.names if a.name.startswith("deviceplugin."))
        elif isinstance(node, ast.ImportFrom) and node.module == "deviceplugin":
            found.update(alias.name for alias in node.names if alias.name != "__version__")
        if isinstance(node, ast.ImportFrom) and node.module in {f"deviceplugin.{sub}" for sub in SUBPACKAGES}:
            found.discard(node.module.split(".")[1])  # `from deviceplugin.dra import cdi` names the module cdi
            found.update(f"{node.module.split('.')[1]}.{alias.name}" for alias in node.names)
    return found


def module_path(module: str) -> Path:
    return PACKAGE.joinpath(*module.split(".")).with_suffix(".py")


def test_every_module_imports_only_the_layers_below_it():
    for module, allowed in ALLOWED.items():
        extra = package_imports(module_path(module)) - allowed
        assert not extra, f"deviceplugin/{module}.py imports {sorted(extra)}, which it must not"


def test_product_code_never_imports_the_simulators():
    for module in ALLOWED:
        if not module.startswith("sim."):
            sims = {m for m in package_imports(module_path(module)) if m.startswith("sim")}
            assert not sims, f"deviceplugin/{module}.py imports the simulators {sorted(sims)}"


def test_the_contract_covers_every_module():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - ENTRY_POINTS
    modules |= {f"{sub}.{p.stem}" for sub in SUBPACKAGES for p in (PACKAGE / sub).glob("*.py") if p.stem != "__init__"}
    assert modules == set(ALLOWED), "add new modules to ALLOWED with the layers they may use"


def test_only_dra_kube_imports_the_api_client():
    """inspect and the device-plugin mode must not pay for lightkube's import (startup time)."""
    for module in ALLOWED:
        tree = ast.parse(module_path(module).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if any(name.split(".")[0] in ("lightkube", "kubernetes", "httpx2") for name in names):
            assert module == "dra.kube", f"deviceplugin/{module}.py imports the API client; only dra/kube.py may"
