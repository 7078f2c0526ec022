"""The plugin config (YAML): naming style, which device classes are offered, and per-device rules.

```yaml
naming: short              # or full
classes: ["03"]            # class-code prefixes offered without a rule (default: display controllers)
rules:                     # tried in order against a group's primary function; first match wins
  - {vendor: "10de", device: "2484", resource: nvidia.com/RTX3070}   # rename
  - {class: "0108"}                                                   # also offer NVMe, auto-named
  - {address: "0000:05:00.0", exclude: true}                          # never offer this group
  - {vendor: "10de", device: "2342", bind: true, vfio_driver: nvgrace_gpu_vfio_pci}  # `bind --config`
```

`bind` and `vfio_driver` are read only by `vfio-device-plugin bind`: `bind: true` marks the groups that
`bind --config FILE` binds (at node start, from the binder init container), and `vfio_driver` names a
vfio variant driver to bind them to instead of vfio-pci.

A broken config is refused as a whole with a message that names the key and the problem, before
anything is registered: half-applying a config would advertise names the operator did not ask for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from deviceplugin.naming import NAMINGS, resource_name_error
from deviceplugin.sysfs import PciFunction, is_vfio_driver, parse_address

SELECTOR_KEYS = ("vendor", "device", "class", "address", "driver")
RULE_KEYS = (*SELECTOR_KEYS, "resource", "exclude", "bind", "vfio_driver")
TOP_KEYS = ("naming", "classes", "rules")
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


def load_config(path: str | None, naming_override: str | None = None) -> Config:
    """Reads and validates the config file (None = defaults); --naming overrides the file's naming."""
    data: Any = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as exc:
            raise ConfigError(f"config {path}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path}: not valid YAML: {exc}") from exc
    config = parse_config(data if data is not None else {}, source=path or "<defaults>")
    if naming_override is not None:
        if naming_override not in NAMINGS:
            raise ConfigError(f"--naming: must be one of {', '.join(NAMINGS)}, got {naming_override!r}")
        config = Config(naming=naming_override, classes=config.classes, rules=config.rules)
    return config


def parse_config(data: Any, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(TOP_KEYS)}")
    naming = data.get("naming", "short")
    if naming not in NAMINGS:
        raise ConfigError(f"{source}: naming: must be one of {', '.join(NAMINGS)}, got {naming!r}")
    classes = data.get("classes", ["03"])
    if not isinstance(classes, list):
        raise ConfigError(f'{source}: classes: must be a list of class-code prefixes such as "03"')
    rules_data = data.get("rules", [])
    if not isinstance(rules_data, list):
        raise ConfigError(f"{source}: rules: must be a list of rules")
    return Config(
        naming=naming,
        classes=tuple(_hex_value(f"{source}: classes[{i}]", c, (2, 4, 6)) for i, c in enumerate(classes)),
        rules=tuple(_parse_rule(source, i, r) for i, r in enumerate(rules_data)),
    )


def _parse_rule(source: str, index: int, data: Any) -> Rule:
    where = f"{source}: rules[{index}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping with keys from {', '.join(RULE_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(RULE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(RULE_KEYS)}")
    selector: dict[str, str] = {}
    for key in SELECTOR_KEYS:
        if key in data:
            selector[key] = _selector_value(f"{where}.{key}", key, data[key])
    if not selector:
        raise ConfigError(f"{where}: needs at least one selector ({', '.join(SELECTOR_KEYS)})")
    exclude = data.get("exclude", False)
    if not isinstance(exclude, bool):
        raise ConfigError(f"{where}.exclude: must be true or false, got {exclude!r}")
    resource = data.get("resource")
    if resource is not None:
        if exclude:
            raise ConfigError(f"{where}: resource and exclude: true contradict each other")
        err = resource_name_error(str(resource)) if isinstance(resource, str) else "must be a string"
        if err:
            raise ConfigError(f"{where}.resource: invalid extended resource name {resource!r}: {err}")
    bind, vfio_driver = _bind_options(where, data, exclude)
    return Rule(index=index, selector=selector, resource=resource, exclude=exclude, bind=bind, vfio_driver=vfio_driver)


def _bind_options(where: str, data: dict[Any, Any], exclude: bool) -> tuple[bool, str | None]:
    bind = data.get("bind", False)
    if not isinstance(bind, bool):
        raise ConfigError(f"{where}.bind: must be true or false, got {bind!r}")
    driver = data.get("vfio_driver")
    if driver is not None and not (isinstance(driver, str) and _DRIVER_NAME.match(driver) and is_vfio_driver(driver)):
        raise ConfigError(
            f"{where}.vfio_driver: {driver!r} is not a vfio driver: name vfio-pci or a variant driver whose name "
            "contains vfio (as in /sys/bus/pci/drivers), such as nvgrace_gpu_vfio_pci"
        )
    if exclude and (bind or driver is not None):
        raise ConfigError(f"{where}: exclude: true contradicts {'bind: true' if bind else 'vfio_driver'} (an excluded group is never used)")
    return bind, driver


def _selector_value(where: str, key: str, value: Any) -> str:
    if key == "vendor" or key == "device":
        return _hex_value(where, value, (4,))
    if key == "class":
        return _hex_value(where, value, (2, 4, 6))
    if key == "address":
        address = parse_address(str(value))
        if address is None:
            raise ConfigError(f"{where}: {value!r} is not a PCI address like 0000:01:00.0")
        return address
    return str(value).strip()


def _hex_value(where: str, value: Any, widths: tuple[int, ...]) -> str:
    # YAML reads an unquoted 0300 as the integer 300 and 10de as a string; insist on strings.
    if not isinstance(value, str):
        raise ConfigError(f'{where}: quote hex ids as strings (e.g. "0300"), got {value!r}')
    text = value.strip().lower().removeprefix("0x")
    if len(text) not in widths or not _HEX.match(text):
        raise ConfigError(f"{where}: {value!r} must be {' or '.join(map(str, widths))} hex digits")
    return text
