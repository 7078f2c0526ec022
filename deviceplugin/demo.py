"""`vfio-device-plugin demo`: the real plugin on a built-in example node, against a test kubelet.

Builds the node this project was born from (an RTX 3070 in IOMMU group 13 on vfio-pci) plus a
second GPU whose audio function is still on snd_hda_intel, then shows what the kubelet sees, what
Allocate returns, and why the second GPU is not offered. No root, GPU or cluster needed.
"""

from __future__ import annotations

import tempfile
import threading

from deviceplugin.config import Config
from deviceplugin.daemon import Daemon, Options
from deviceplugin.naming import load_pci_ids
from deviceplugin.sim.kubelet import FakeKubelet
from deviceplugin.sim.node import demo_node

RESOURCE = "nvidia.com/GA104"
AUDIO = "nvidia.com/GA104_AUDIO"


def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="vfio-demo-") as tmp:
        node = demo_node(tmp)
        kubelet = FakeKubelet(str(node.plugins)).start()
        pci_ids = load_pci_ids(str(node.root / "pci.ids"))
        options = Options(str(node.sys), str(node.dev), str(node.proc), str(node.plugins), rescan_interval=5.0)
        daemon = Daemon(options, Config(), pci_ids)
        stop = threading.Event()
        thread = threading.Thread(target=daemon.run, args=(stop,), name="daemon")
        thread.start()
        try:
            return _show(node.root, kubelet, daemon)
        finally:
            stop.set()
            daemon.notify("stop")
            thread.join(timeout=5)
            kubelet.wait_for(lambda k: not any(k.allocatable().values()), timeout=3)
            print(f"\nAfter the plugin stopped, allocatable is {kubelet.allocatable()} (it sent an empty list).")
            kubelet.stop()


def _show(root: object, kubelet: FakeKubelet, daemon: Daemon) -> int:
    print(f"Example node in {root}:")
    print("  IOMMU group 13: 0000:01:00.0 10de:2484 GA104 [GeForce RTX 3070] + 0000:01:00.1 10de:228b audio, both on vfio-pci")
    print("  IOMMU group 14: 0000:02:00.0 10de:1b06 GTX 1080 Ti on vfio-pci, 0000:02:00.1 audio still on snd_hda_intel")
    if not kubelet.wait_for(lambda k: k.allocatable().get(RESOURCE) == 1 and k.allocatable().get(AUDIO) == 1, timeout=15):
        print(f"FAILED: the test kubelet never saw {RESOURCE} (capacity {kubelet.capacity()})")
        return 1
    print("\nThe kubelet registered the plugin over its unix socket and now reports:")
    print(f"  capacity:    {kubelet.capacity()}")
    print(f"  allocatable: {kubelet.allocatable()}")
    response = kubelet.allocate(RESOURCE, "0000:01:00.0").container_responses[0]
    print(f"\nAllocate({RESOURCE}: [0000:01:00.0]) -> what the container runtime gets:")
    for spec in response.devices:
        print(f"  device {spec.host_path} -> {spec.container_path} ({spec.permissions})")
    for key, value in sorted(response.envs.items()):
        what = "its own audio function" if key.endswith("_AUDIO") else "the GPU"
        print(f"  env    {key}={value}   (virt-launcher reads this to find {what})")
    print(f"\nA VM that also lists {AUDIO} under hostDevices gets the audio function of the GPU it was given.")
    print("\nWhy the second GPU is not offered:")
    assert daemon.inventory is not None
    for group in daemon.inventory.groups:
        if group.id == "14":
            for reason in group.reasons:
                print(f"  group 14: {reason}")
    print("\n(`vfio-device-plugin inspect` and `doctor` say the same on a real node.)")
    return 0
