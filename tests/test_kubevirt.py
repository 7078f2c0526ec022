"""kubevirt-config names exactly what serve registers, for short and full naming."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import PCI_IDS_PATH, Harness

from deviceplugin.config import parse_config
from deviceplugin.sim.node import gpu


@pytest.mark.parametrize("naming", ["short", "full"])
def test_kubevirt_config_matches_the_registrations(node, pci_ids, naming):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    node.add_all(gpu("0000:02:00.0", "2486", "228b", "14"))
    node.add_all(gpu("0000:03:00.0", "73df", "ab28", "15", vendor="1002"))
    node.add_all(gpu("0000:04:00.0", "1b06", "10ef", "16", audio_driver="snd_hda_intel"))  # not offered
    out = subprocess.run(
        [sys.executable, "-m", "deviceplugin", "kubevirt-config", "--naming", naming, *node.cli_args(PCI_IDS_PATH)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    patch, vm = yaml.safe_load_all(out)
    entries = patch["spec"]["configuration"]["permittedHostDevices"]["pciHostDevices"]
    assert all(e["externalResourceProvider"] is True for e in entries)
    selectors = {e["pciVendorSelector"]: e["resourceName"] for e in entries}
    resources = {e["resourceName"] for e in entries}
    assert set(selectors) == {"10DE:2484", "10DE:2486", "10DE:228B", "1002:73DF", "1002:AB28"}
    h = Harness(node, pci_ids, config=parse_config({"naming": naming})).start()
    try:
        assert h.kubelet.wait_for(lambda k: len(k.endpoints) == len(resources), 10)
        registered = {r.resource for r in h.kubelet.registrations}
    finally:
        h.close()
    assert resources == registered
    devices = vm["spec"]["template"]["spec"]["domain"]["devices"]
    assert {g["deviceName"] for g in devices["gpus"]} | {h["deviceName"] for h in devices["hostDevices"]} == registered
    if naming == "short":
        assert selectors == {
            "10DE:2484": "nvidia.com/GA104",
            "10DE:2486": "nvidia.com/GA104",
            "10DE:228B": "nvidia.com/GA104_AUDIO",
            "1002:73DF": "amd.com/NAVI_22",
            "1002:AB28": "amd.com/NAVI_22_AUDIO",
        }
        assert devices == {
            "gpus": [{"name": "gpu1", "deviceName": "amd.com/NAVI_22"}, {"name": "gpu2", "deviceName": "nvidia.com/GA104"}],
            "hostDevices": [
                {"name": "gpu1-audio", "deviceName": "amd.com/NAVI_22_AUDIO"},
                {"name": "gpu2-audio", "deviceName": "nvidia.com/GA104_AUDIO"},
            ],
        }
    else:
        pairs = {(e["pciVendorSelector"], e["resourceName"]) for e in entries}
        # one audio id under two names (one per card model): an entry for each, none dropped
        assert {
            ("10DE:228B", "nvidia.com/GA104_GEFORCE_RTX_3070_AUDIO"),
            ("10DE:228B", "nvidia.com/GA104_GEFORCE_RTX_3060_TI_AUDIO"),
        } <= pairs
        assert ("10DE:2484", "nvidia.com/GA104_GEFORCE_RTX_3070") in pairs


def test_nothing_offered_says_so(node):
    out = subprocess.run(
        [sys.executable, "-m", "deviceplugin", "kubevirt-config", *node.cli_args(PCI_IDS_PATH)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "offers no device" in out and "doctor" in out
