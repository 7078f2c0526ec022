"""The plugin config (YAML): naming style, which device classes are offered, and per-device rules.

```yaml
naming: short              # or full
classes: ["03"]            # class-code prefixes offered without a rule (default: display controllers)
companions: [audio]        # card functions offered next to a GPU: audio, usb, serial (default [audio]; [] for none)
rules:                     # tried in order against a group's primary function; first match wins
  - {vendor: "10de", device: "2484", resource: nvidia.com/RTX3070}   # rename
  - {class: "0108"}                                                   # also offer NVMe, auto-named
  - {address: "0000:05:00.0", exclude: true}                          # never offer this group
  - {vendor: "10de", device: "2342", bind: true, vfio_driver: nvgrace_gpu_vfio_pci}  # `bind --config`
```

`bind` and `vfio_driver` are read only by `vfio-device-plugin bind`: `bind: true` marks the groups that
`bind --config FILE` binds (at node start, from the binder init container), and `vfio_driver` names a
vfio variant driver to bind them to instead of vfio-pci.

A broken config is refused as a whole with a message that names the key, its line and the problem,
before anything is registered: half-applying a config would advertise names the operator did not ask for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from deviceplugin.naming import NAMINGS, resource_name_error
from deviceplugin.sysfs import PciFunction, is_vfio_driver, parse_address

SELECTOR_KEYS = ("vendor", "device", "class", "address", "driver")
RULE_KEYS = (*SELECTOR_KEYS, "resource", "exclude", "bind", "vfio_driver")
TOP_KEYS = ("naming", "classes", "companions", "rules")
# Companion roles and the class-code prefixes of the card functions that play them.
COMPANION_ROLES: dict[str, tuple[str, ...]] = {"audio": ("04",), "usb": ("0c03",), "serial": ("0c80",)}
DEFAULT_COMPANIONS = ("audio",)
_HEX = re.compile(r"^[0-9a-f]+$")
_DRIVER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigError(ValueError):
    """The config cannot be used; the message names the key and the problem."""


@dataclass(frozen=True)
class Rule:
    index: int
    selector: dict[str, str]
    resource: str | None = None
    exclude: bool = False
    bind: bool = False  # `bind --config` binds the groups this rule selects
    vfio_driver: str | None = None  # the vfio driver `bind` uses for them (None: vfio-pci)

    def matches(self, fn: PciFunction) -> bool:
        for key, want in self.selector.items():
            if key == "vendor" and fn.vendor != want:
                return False
            if key == "device" and fn.device != want:
                return False
            if key == "class" and not fn.class_code.startswith(want):
                return False
            if key == "address" and fn.address != want:
                return False
            if key == "driver" and (fn.driver or "") != want:
                return False
        return True

    def describe(self) -> str:
        sel = ", ".join(f"{k}={v}" for k, v in self.selector.items())
        return f"config rule {self.index} ({sel})"


@dataclass(frozen=True)
class Config:
    naming: str = "short"
    classes: tuple[str, ...] = ("03",)
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    companions: tuple[str, ...] = DEFAULT_COMPANIONS


Path = tuple[str | int, ...]  # where a value sits in the document: ("rules", 2, "vendor")


def _path_text(path: Path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


@dataclass(frozen=True)
class _Where:
    """Names a place in the config for an error: the file, the line where known, the key path."""

    source: str
    line_of: Callable[[Path], int | None]

    def error(self, path: Path, problem: str) -> ConfigError:
        line = self.line_of(path)
        head = f"{self.source} line {line}" if line else self.source
        return ConfigError(f"{head}: {_path_text(path)}: {problem}" if path else f"{head}: {problem}")


def _no_lines(_path: Path) -> int | None:
    return None


def _yaml_lines(text: str) -> Callable[[Path], int | None]:
    """Maps a key path to its 1-based line in the YAML text (the closest enclosing node's line)."""
    import yaml

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return _no_lines

    def line_of(path: Path) -> int | None:
        node = root
        line = node.start_mark.line + 1 if node is not None else None
        for part in path:
            child = None
            if isinstance(node, yaml.MappingNode):
                child = next((v for k, v in node.value if k.value == part), None)
                key = next((k for k, _ in node.value if k.value == part), None)
                line = key.start_mark.line + 1 if key is not None else line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                child = node.value[part]
                line = child.start_mark.line + 1
            if child is None:
                return line
            node = child
        return line

    return line_of


def load_config(path: str | None, naming_override: str | None = None) -> Config:
    """Reads and validates the config file (None = defaults); --naming overrides the file's naming."""
    data: Any = {}
    lines: Callable[[Path], int | None] = _no_lines
    if path:
        import yaml  # only with a config file: most commands run on the defaults

        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            data = yaml.safe_load(text)
        except OSError as exc:
            raise ConfigError(f"config {path}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path}: not valid YAML: {exc}") from exc
        lines = _yaml_lines(text)
    config = parse_config(data if data is not None else {}, source=path or "<defaults>", lines=lines)
    if naming_override is not None:
        if naming_override not in NAMINGS:
            raise ConfigError(f"--naming: must be one of {', '.join(NAMINGS)}, got {naming_override!r}")
        config = replace(config, naming=naming_override)
    return config


def parse_config(data: Any, source: str = "config", lines: Callable[[Path], int | None] = _no_lines) -> Config:
    at = _Where(source, lines)
    if not isinstance(data, dict):
        raise at.error((), f"top level must be a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise at.error((), f"unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(TOP_KEYS)}")
    naming = data.get("naming", "short")
    if naming not in NAMINGS:
        raise at.error(("naming",), f"must be one of {', '.join(NAMINGS)}, got {naming!r}")
    classes = data.get("classes", ["03"])
    if not isinstance(classes, list):
        raise at.error(("classes",), 'must be a list of class-code prefixes such as "03"')
    rules_data = data.get("rules", [])
    if not isinstance(rules_data, list):
        raise at.error(("rules",), "must be a list of rules")
    return Config(
        naming=naming,
        classes=tuple(_hex_value(at, ("classes", i), c, (2, 4, 6)) for i, c in enumerate(classes)),
        rules=tuple(_parse_rule(at, i, r) for i, r in enumerate(rules_data)),
        companions=_parse_companions(at, data.get("companions", list(DEFAULT_COMPANIONS))),
    )


def _parse_companions(at: _Where, value: Any) -> tuple[str, ...]:
    roles = ", ".join(COMPANION_ROLES)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise at.error(("companions",), f"must be a list of roles ({roles}), e.g. [audio] or []; got {value!r}")
    for i, role in enumerate(value):
        if not isinstance(role, str):
            raise at.error(("companions", i), f"must be a role name ({roles}), got {role!r}")
        if role not in COMPANION_ROLES:
            raise at.error(("companions", i), f"unknown role {role!r}; known: {roles}")
    if len(set(value)) != len(value):
        raise at.error(("companions",), f"lists a role twice: {value}")
    return tuple(r for r in COMPANION_ROLES if r in value)


def _parse_rule(at: _Where, index: int, data: Any) -> Rule:
    where: Path = ("rules", index)
    if not isinstance(data, dict):
        raise at.error(where, f"must be a mapping with keys from {', '.join(RULE_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(RULE_KEYS))
    if unknown:
        raise at.error(where, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(RULE_KEYS)}")
    selector: dict[str, str] = {}
    for key in SELECTOR_KEYS:
        if key in data:
            selector[key] = _selector_value(at, (*where, key), key, data[key])
    if not selector:
        raise at.error(where, f"needs at least one selector ({', '.join(SELECTOR_KEYS)})")
    exclude = data.get("exclude", False)
    if not isinstance(exclude, bool):
        raise at.error((*where, "exclude"), f"must be true or false, got {exclude!r}")
    resource = data.get("resource")
    if resource is not None:
        if exclude:
            raise at.error(where, "resource and exclude: true contradict each other")
        err = resource_name_error(str(resource)) if isinstance(resource, str) else "must be a string"
        if err:
            raise at.error((*where, "resource"), f"invalid extended resource name {resource!r}: {err}")
    bind, vfio_driver = _bind_options(at, where, data, exclude)
    return Rule(index=index, selector=selector, resource=resource, exclude=exclude, bind=bind, vfio_driver=vfio_driver)


def _bind_options(at: _Where, where: Path, data: dict[Any, Any], exclude: bool) -> tuple[bool, str | None]:
    bind = data.get("bind", False)
    if not isinstance(bind, bool):
        raise at.error((*where, "bind"), f"must be true or false, got {bind!r}")
    driver = data.get("vfio_driver")
    if driver is not None and not (isinstance(driver, str) and _DRIVER_NAME.match(driver) and is_vfio_driver(driver)):
        raise at.error(
            (*where, "vfio_driver"),
            f"{driver!r} is not a vfio driver: name vfio-pci or a variant driver whose name "
            "contains vfio (as in /sys/bus/pci/drivers), such as nvgrace_gpu_vfio_pci",
        )
    if exclude and (bind or driver is not None):
        raise at.error(where, f"exclude: true contradicts {'bind: true' if bind else 'vfio_driver'} (an excluded group is never used)")
    return bind, driver


def _selector_value(at: _Where, where: Path, key: str, value: Any) -> str:
    if key == "vendor" or key == "device":
        return _hex_value(at, where, value, (4,))
    if key == "class":
        return _hex_value(at, where, value, (2, 4, 6))
    if key == "address":
        address = parse_address(str(value))
        if address is None:
            raise at.error(where, f"{value!r} is not a PCI address like 0000:01:00.0")
        return address
    return str(value).strip()


def _hex_value(at: _Where, where: Path, value: Any, widths: tuple[int, ...]) -> str:
    # YAML reads an unquoted 0300 as the integer 300 and 10de as a string; insist on strings.
    if not isinstance(value, str):
        raise at.error(where, f'quote hex ids as strings (e.g. "0300"), got {value!r}')
    text = value.strip().lower().removeprefix("0x")
    if len(text) not in widths or not _HEX.match(text):
        raise at.error(where, f"{value!r} must be {' or '.join(map(str, widths))} hex digits")
    return text
