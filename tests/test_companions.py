"""A VM gets its GPU's own audio/USB/UCSI functions: companion resources through the test kubelet on real sockets.

The kubelet admits pods as its device manager does (healthy free devices, GetPreferredAllocation, Allocate)
and merges the env of every resource of a container; the pairing must hold whatever token it picked.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import PCI_IDS_PATH, Harness

from deviceplugin.config import parse_config
from deviceplugin.sim.node import Fn, gpu

R = "nvidia.com/GA104"
AUDIO = R + "_AUDIO"
ENV, ENV_AUDIO = "PCI_RESOURCE_NVIDIA_COM_GA104", "PCI_RESOURCE_NVIDIA_COM_GA104_AUDIO"


def merged_env(responses) -> dict[str, str]:
    """What the container sees: the kubelet merges the envs of every resource's response."""
    env: dict[str, str] = {}
    for response in responses.values():
        env.update(response.envs)
    return env


@pytest.fixture
def two_cards(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13") + gpu("0000:02:00.0", "2484", "228b", "14"))
    with Harness(node, pci_ids).ready() as h:
        yield h


def test_the_kubelet_counts_gpus_and_audio_tokens(two_cards):
    assert two_cards.kubelet.allocatable() == {R: 2, AUDIO: 2}
    assert two_cards.kubelet.capacity() == {R: 2, AUDIO: 2}


@pytest.mark.parametrize("token", ["0000:02:00.1", "0000:01:00.1"])
def test_a_container_gets_its_own_gpus_audio_whatever_token_it_was_given(two_cards, token):
    responses = two_cards.kubelet.admit("vm1", {R: ["0000:01:00.0"], AUDIO: [token]})
    assert merged_env(responses) == {ENV: "0000:01:00.0", ENV_AUDIO: "0000:01:00.1"}
    assert list(responses[AUDIO].devices) == [] and dict(responses[AUDIO].envs) == {}


def test_two_containers_never_receive_the_same_group(two_cards):
    k = two_cards.kubelet
    first = merged_env(k.admit("vm1", {R: 1, AUDIO: 1}))
    second = merged_env(k.admit("vm2", {R: 1, AUDIO: 1}))
    assert {first[ENV], second[ENV]} == {"0000:01:00.0", "0000:02:00.0"}
    for env in (first, second):
        assert env[ENV_AUDIO] == env[ENV][:-1] + "1"  # the audio of the card it got


def test_a_two_gpu_container_gets_both_audio_addresses_in_gpu_order(two_cards):
    env = merged_env(two_cards.kubelet.admit("vm1", {R: ["0000:02:00.0", "0000:01:00.0"], AUDIO: 2}))
    assert env == {ENV: "0000:02:00.0,0000:01:00.0", ENV_AUDIO: "0000:02:00.1,0000:01:00.1"}


def test_a_group_turning_unhealthy_takes_its_token_with_it(two_cards):
    os.unlink(two_cards.node.dev / "vfio" / "13")
    two_cards.wait_devices(R, {"0000:01:00.0": "Unhealthy", "0000:02:00.0": "Healthy"})
    two_cards.wait_devices(AUDIO, {"0000:01:00.1": "Unhealthy", "0000:02:00.1": "Healthy"})
    assert two_cards.kubelet.allocatable() == {R: 1, AUDIO: 1}
    (two_cards.node.dev / "vfio" / "13").touch()
    two_cards.wait_devices(AUDIO, {"0000:01:00.1": "Healthy", "0000:02:00.1": "Healthy"})


def turing(node, bus: str, group: str) -> None:
    node.add_all(
        [
            Fn(f"0000:{bus}:00.0", "10de", "1e84", "030000", "vfio-pci", group),
            Fn(f"0000:{bus}:00.1", "10de", "10f8", "040300", "vfio-pci", group),
            Fn(f"0000:{bus}:00.2", "10de", "1ad8", "0c0330", "vfio-pci", group),
            Fn(f"0000:{bus}:00.3", "10de", "1ad9", "0c8000", "vfio-pci", group),
        ]
    )


def test_turing_cards_with_every_role_pair_each_function_with_its_group(node, pci_ids):
    turing(node, "2b", "14")
    turing(node, "2c", "15")
    h = Harness(node, pci_ids, config=parse_config({"companions": ["audio", "usb", "serial"]})).start()
    try:
        h.wait_ready()
        t = "nvidia.com/TU104"
        assert h.kubelet.allocatable() == {t: 2, t + "_AUDIO": 2, t + "_USB": 2, t + "_SERIAL": 2}
        env = merged_env(h.kubelet.admit("vm1", {t: ["0000:2c:00.0", "0000:2b:00.0"], t + "_USB": 2, t + "_SERIAL": 2}))
        assert env == {
            "PCI_RESOURCE_NVIDIA_COM_TU104": "0000:2c:00.0,0000:2b:00.0",
            "PCI_RESOURCE_NVIDIA_COM_TU104_AUDIO": "0000:2c:00.1,0000:2b:00.1",
            "PCI_RESOURCE_NVIDIA_COM_TU104_USB": "0000:2c:00.2,0000:2b:00.2",
            "PCI_RESOURCE_NVIDIA_COM_TU104_SERIAL": "0000:2c:00.3,0000:2b:00.3",
        }
    finally:
        h.close()


def test_no_companions_registers_only_the_gpu(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    h = Harness(node, pci_ids, config=parse_config({"companions": []})).start()
    try:
        h.wait_ready()
        assert set(h.kubelet.endpoints) == {R}
        assert merged_env(h.kubelet.admit("vm1", {R: 1})) == {ENV: "0000:01:00.0"}
    finally:
        h.close()


def test_kubevirt_config_permits_the_companion_and_pairs_it_in_the_vm(node):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    out = subprocess.run(
        [sys.executable, "-m", "deviceplugin", "kubevirt-config", *node.cli_args(PCI_IDS_PATH)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    patch, vm = yaml.safe_load_all(out)
    assert {"pciVendorSelector": "10DE:228B", "resourceName": AUDIO, "externalResourceProvider": True} in patch["spec"]["configuration"][
        "permittedHostDevices"
    ]["pciHostDevices"]
    devices = vm["spec"]["template"]["spec"]["domain"]["devices"]
    assert devices == {"gpus": [{"name": "gpu1", "deviceName": R}], "hostDevices": [{"name": "gpu1-audio", "deviceName": AUDIO}]}


def test_inspect_shows_each_devices_companions(node):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    out = subprocess.run(
        [sys.executable, "-m", "deviceplugin", "inspect", *node.cli_args(PCI_IDS_PATH)], capture_output=True, text=True, timeout=60
    ).stdout
    assert f"companion: 0000:01:00.1 is the audio function of 0000:01:00.0 (offered as {AUDIO})" in out
    assert f"{AUDIO}: 1 -> 0000:01:00.1" in out
