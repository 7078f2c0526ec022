"""The fake kernel answers like Linux's PCI driver core, so bind's tests mean something: each case
asserts the links and /dev/vfio nodes the readers see, and the errno a real write would get."""

from __future__ import annotations

import errno
import os
import threading

import pytest
from conftest import wait

from deviceplugin.sim.kernel import FakeKernel
from deviceplugin.sim.node import gpu

GPU, AUDIO = "0000:01:00.0", "0000:01:00.1"


@pytest.fixture
def kernel(node) -> FakeKernel:
    node.add_all(gpu(GPU, "2484", "228b", "13", driver="nvidia", audio_driver="snd_hda_intel"))
    return FakeKernel(node).load("vfio-pci")


def dev(kernel: FakeKernel, address: str, attr: str) -> str:
    return str(kernel.node.sys / "bus" / "pci" / "devices" / address / attr)


def drv(kernel: FakeKernel, driver: str, attr: str) -> str:
    return str(kernel.node.sys / "bus" / "pci" / "drivers" / driver / attr)


def probe(kernel: FakeKernel) -> str:
    return str(kernel.node.sys / "bus" / "pci" / "drivers_probe")


def errno_of(kernel: FakeKernel, path: str, text: str) -> int | None:
    try:
        kernel.write(path, text)
    except OSError as exc:
        return exc.errno
    return None


def test_override_unbind_probe_moves_one_function_and_makes_the_group_node(kernel):
    node = kernel.node
    kernel.write(dev(kernel, GPU, "driver_override"), "vfio-pci\n")
    assert (node.device_dir(GPU) / "driver_override").read_text() == "vfio-pci\n"
    assert node.driver_of(GPU) == "nvidia"  # the override alone changes nothing until a probe
    kernel.write(drv(kernel, "nvidia", "unbind"), f"{GPU}\n")
    assert node.driver_of(GPU) is None and not (node.sys / "bus/pci/drivers/nvidia" / GPU).exists()
    kernel.write(probe(kernel), f"{GPU}\n")
    assert node.driver_of(GPU) == "vfio-pci" and (node.sys / "bus/pci/drivers/vfio-pci" / GPU).is_symlink()
    assert (node.dev / "vfio" / "13").exists()
    kernel.write(dev(kernel, GPU, "driver_override"), "\n")  # an empty line clears it
    assert kernel.override(GPU) is None and (node.device_dir(GPU) / "driver_override").read_text() == "(null)\n"


def test_probe_without_override_goes_back_to_the_own_driver_and_a_bound_device_stays(kernel):
    kernel.write(drv(kernel, "snd_hda_intel", "unbind"), AUDIO)
    assert kernel.node.driver_of(AUDIO) is None
    kernel.write(probe(kernel), AUDIO)
    assert kernel.node.driver_of(AUDIO) == "snd_hda_intel"
    kernel.write(probe(kernel), AUDIO)  # already bound: the probe leaves it alone and succeeds
    assert kernel.node.driver_of(AUDIO) == "snd_hda_intel"


def test_bind_answers_ebusy_enodev_einval_like_the_kernel(kernel):
    node = kernel.node
    # vfio-pci has no id for the device and no override names it: no match
    assert errno_of(kernel, drv(kernel, "vfio-pci", "bind"), GPU) == errno.ENODEV
    kernel.write(dev(kernel, GPU, "driver_override"), "vfio-pci")
    assert errno_of(kernel, drv(kernel, "vfio-pci", "bind"), GPU) == errno.EBUSY  # matches now, but nvidia has it
    assert errno_of(kernel, drv(kernel, "nvidia", "bind"), GPU) == errno.ENODEV  # the override excludes nvidia
    assert errno_of(kernel, drv(kernel, "vfio-pci", "bind"), "01:00.0 please") == errno.EINVAL
    assert errno_of(kernel, drv(kernel, "vfio-pci", "bind"), "0000:09:00.0") == errno.ENODEV  # no such device
    assert errno_of(kernel, drv(kernel, "snd_hda_intel", "unbind"), GPU) == errno.ENODEV  # not its driver
    assert errno_of(kernel, drv(kernel, "nouveau", "bind"), GPU) == errno.ENOENT  # not loaded
    kernel.write(drv(kernel, "nvidia", "unbind"), GPU)
    kernel.write(drv(kernel, "vfio-pci", "bind"), GPU)
    assert node.driver_of(GPU) == "vfio-pci"


def test_unbind_waits_for_the_holder_and_locks_the_device_meanwhile(kernel):
    held = kernel.hold(GPU)
    unbind = threading.Thread(target=kernel.write, args=(drv(kernel, "nvidia", "unbind"), GPU), daemon=True)
    unbind.start()
    # Linux removes the driver link before the driver's remove waits for its users
    wait(lambda: kernel.node.driver_of(GPU) is None)
    override = threading.Thread(target=kernel.write, args=(dev(kernel, GPU, "driver_override"), "vfio-pci"), daemon=True)
    override.start()
    unbind.join(0.1)
    override.join(0.1)
    assert unbind.is_alive() and override.is_alive()  # both wait for the device lock the unbind holds
    assert kernel.override(GPU) is None
    held.set()
    unbind.join(5)
    override.join(5)
    assert not unbind.is_alive() and not override.is_alive()
    assert kernel.override(GPU) == "vfio-pci" and kernel.node.driver_of(GPU) is None


def test_new_id_grabs_every_unbound_card_with_those_ids(node):
    node.add_all(gpu(GPU, "2484", "228b", "13", driver="nvidia", audio_driver="snd_hda_intel"))
    node.add_all(gpu("0000:02:00.0", "2484", "228b", "14", driver=None, audio_driver=None))  # a spare, unbound
    kernel = FakeKernel(node).load("vfio-pci")
    assert errno_of(kernel, drv(kernel, "vfio-pci", "new_id"), "10de") == errno.EINVAL
    kernel.write(drv(kernel, "vfio-pci", "new_id"), "10de 2484")
    assert node.driver_of("0000:02:00.0") == "vfio-pci"  # the card nobody asked for
    assert node.driver_of(GPU) == "nvidia"  # a bound one is only taken after its unbind and a probe
    kernel.write(drv(kernel, "nvidia", "unbind"), GPU)
    kernel.write(probe(kernel), GPU)
    assert node.driver_of(GPU) == "vfio-pci"  # the dynamic id matches before its own driver


def test_a_rejected_probe_leaves_the_device_unbound(kernel):
    kernel.reject("vfio-pci", GPU)
    kernel.write(dev(kernel, GPU, "driver_override"), "vfio-pci")
    kernel.write(drv(kernel, "nvidia", "unbind"), GPU)
    kernel.write(probe(kernel), GPU)  # succeeds, as on Linux
    assert kernel.node.driver_of(GPU) is None
    assert errno_of(kernel, drv(kernel, "vfio-pci", "bind"), GPU) == errno.EINVAL


def test_writes_outside_the_tree_or_to_read_only_attributes_fail(kernel):
    assert errno_of(kernel, "/etc/hostname", "x") == errno.EACCES
    assert errno_of(kernel, dev(kernel, GPU, "vendor"), "0x1234") == errno.EACCES
    assert errno_of(kernel, dev(kernel, GPU, "no_such_attribute"), "1") == errno.ENOENT
    assert os.readlink(kernel.node.device_dir(GPU) / "driver").endswith("nvidia")
