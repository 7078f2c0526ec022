"""Config parsing: what is accepted, and that every error names the key and the problem."""

from __future__ import annotations

import pytest

from deviceplugin.config import ConfigError, load_config, parse_config


def test_defaults():
    config = load_config(None)
    assert (config.naming, config.classes, config.rules) == ("short", ("03",), ())


def test_full_config_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        'naming: full\nclasses: ["03", "0108"]\nrules:\n'
        '  - {vendor: "10DE", device: "2484", resource: nvidia.com/rtx3070}\n'
        '  - {address: "01:00.0", exclude: true}\n'
        '  - {driver: vfio-pci, class: "0c03"}\n'
    )
    config = load_config(str(path))
    assert config.naming == "full" and config.classes == ("03", "0108")
    assert config.rules[0].selector == {"vendor": "10de", "device": "2484"}
    assert config.rules[0].resource == "nvidia.com/rtx3070"
    assert config.rules[1].selector == {"address": "0000:01:00.0"} and config.rules[1].exclude
    assert load_config(str(path), naming_override="short").naming == "short"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nameing": "short"}, "unknown key(s) nameing"),
        ({"naming": "long"}, "naming: must be one of short, full"),
        ({"classes": "03"}, "classes: must be a list"),
        ({"classes": [300]}, "classes[0]: quote hex ids"),
        ({"rules": [{"vendor": "10de", "resource": "GA104"}]}, "rules[0].resource: invalid extended resource name 'GA104'"),
        ({"rules": [{"vendor": "10de", "resource": "nvidia.com/" + "x" * 70}]}, "rules[0].resource"),
        ({"rules": [{"resource": "nvidia.com/x"}]}, "rules[0]: needs at least one selector"),
        ({"rules": [{"vendor": "10de", "colour": "green"}]}, "rules[0]: unknown key(s) colour"),
        ({"rules": [{"device": "24840"}]}, "rules[0].device: '24840' must be 4 hex digits"),
        ({"rules": [{"address": "1:0.0"}]}, "rules[0].address: '1:0.0' is not a PCI address"),
        ({"rules": [{"vendor": "10de", "exclude": "yes"}]}, "rules[0].exclude: must be true or false"),
        ({"rules": [{"vendor": "10de", "exclude": True, "resource": "a.com/b"}]}, "contradict"),
        ({"rules": [{"vendor": "10de", "bind": "yes"}]}, "rules[0].bind: must be true or false, got 'yes'"),
        ({"rules": [{"vendor": "10de", "vfio_driver": "nvidia"}]}, "rules[0].vfio_driver: 'nvidia' is not a vfio driver"),
        ({"rules": [{"vendor": "10de", "vfio_driver": "vfio pci"}]}, "rules[0].vfio_driver: 'vfio pci' is not a vfio driver"),
        ({"rules": [{"vendor": "10de", "vfio_driver": 3}]}, "rules[0].vfio_driver: 3 is not a vfio driver"),
        ({"rules": [{"vendor": "10de", "exclude": True, "bind": True}]}, "rules[0]: exclude: true contradicts bind: true"),
        ({"rules": [{"vendor": "10de", "exclude": True, "vfio_driver": "vfio-pci"}]}, "rules[0]: exclude: true contradicts vfio_driver"),
        (["not", "a", "mapping"], "top level must be a mapping"),
        ({"companions": "audio"}, "companions: must be a list of roles (audio, usb, serial)"),
        ({"companions": ["audio", "hdmi"]}, "companions[1]: unknown role 'hdmi'; known: audio, usb, serial"),
        ({"companions": [{"audio": True}]}, "companions[0]: must be a role name"),
        ({"companions": ["usb", "usb"]}, "companions: lists a role twice"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data, source="cfg.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("cfg.yaml")


def test_companions_default_to_audio_and_keep_a_stable_order():
    assert load_config(None).companions == ("audio",)
    assert parse_config({"companions": ["serial", "audio", "usb"]}).companions == ("audio", "usb", "serial")
    assert parse_config({"companions": []}).companions == ()


def test_errors_in_a_file_name_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("naming: short\ncompanions:\n  - audio\n  - hdmi\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(f"{path} line 4: companions[1]: unknown role 'hdmi'")
    path.write_text('rules:\n  - {vendor: "10de"}\n  - {device: 2484}\n')
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(f"{path} line 3: rules[1].device: quote hex ids")


def test_bind_keys_mark_groups_for_bind_and_name_a_variant_driver():
    config = parse_config(
        {"rules": [{"vendor": "10de", "device": "2342", "bind": True, "vfio_driver": "nvgrace_gpu_vfio_pci"}, {"class": "0108"}]}
    )
    grace, nvme = config.rules
    assert (grace.bind, grace.vfio_driver, grace.exclude, grace.resource) == (True, "nvgrace_gpu_vfio_pci", False, None)
    assert (nvme.bind, nvme.vfio_driver) == (False, None)  # the defaults: bind only where a rule asks
    assert grace.describe() == "config rule 0 (vendor=10de, device=2342)"  # unchanged: the bind keys are not selectors


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.yaml"))
