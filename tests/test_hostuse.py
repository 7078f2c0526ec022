"""Who holds a card: device nodes per driver, processes with them open, framebuffers in its memory."""

from __future__ import annotations

from deviceplugin.hostuse import device_nodes, find_holders, firmware_framebuffer, iomem_framebuffers, read_bars
from deviceplugin.sim.node import gpu
from deviceplugin.sysfs import SysfsScanner

GPU = "0000:01:00.0"


def function(node, address):
    return next(fn for fn in SysfsScanner(str(node.sys), str(node.dev)).scan().functions if fn.address == address)


def test_the_nodes_of_a_gpu_on_nvidia_with_drm(node):
    node.add_all(gpu(GPU, "2484", "228b", "13", driver="nvidia", audio_driver="snd_hda_intel"))
    node.add_drm(GPU, "card1", "renderD129", "card1-DP-1")
    info = node.proc / "driver" / "nvidia" / "gpus" / GPU
    info.mkdir(parents=True)
    (info / "information").write_text("Model: \t\t NVIDIA GeForce RTX 3070\nIRQ:   \t\t 180\nDevice Minor: \t 1\n")
    fn = function(node, GPU)
    assert device_nodes(str(node.sys), str(node.proc), fn, "nvidia") == ["/dev/dri/card1", "/dev/dri/renderD129", "/dev/nvidia1"]
    node.add_process(10, "nvidia-persiste", "/dev/nvidiactl", "/dev/nvidia1")
    node.add_process(11, "Xorg", "/dev/dri/card1", "/dev/dri/card0")
    node.add_process(12, "other", "/dev/nvidia0", "/dev/dri/renderD128")  # the other GPU
    holders = find_holders(str(node.sys), str(node.proc), fn, "nvidia")
    assert holders.processes == ("pid 10 (nvidia-persiste) has /dev/nvidia1 open", "pid 11 (Xorg) has /dev/dri/card1 open")
    assert holders.describe() == "pid 10 (nvidia-persiste) has /dev/nvidia1 open; pid 11 (Xorg) has /dev/dri/card1 open"


def test_nothing_identified_says_what_was_looked_for(node):
    node.add_all(gpu(GPU, "2484", "228b", "13", driver="nvidia"))
    node.add_process(12, "other", "/dev/nvidiactl", "/dev/nvidia-uvm")  # the driver, not this GPU
    holders = find_holders(str(node.sys), str(node.proc), function(node, GPU), "nvidia")
    assert holders.describe() == "nothing identified: no process has /dev/nvidia[0-9]* open (a kernel user or a console may hold it)"
    node.add_framebuffer("fb0", GPU)
    assert find_holders(str(node.sys), str(node.proc), function(node, GPU), "nvidia").describe() == ("fb0 (a framebuffer console) is on it")


def test_the_nodes_of_a_group_on_vfio(node):
    node.add_all(gpu(GPU, "2484", "228b", "13"))
    node.add_vfio_cdev(GPU, "vfio3")
    fn = function(node, GPU)  # gpu() puts it on vfio-pci
    assert device_nodes(str(node.sys), str(node.proc), fn, "vfio-pci") == ["/dev/vfio/13", "/dev/vfio/devices/vfio3"]


def test_bars_and_iomem_framebuffers(node):
    node.add_all(gpu(GPU, "2484", "228b", "13", driver="nvidia"))
    node.set_bars(GPU, (0xF6000000, 0xF6FFFFFF), (0xE0000000, 0xEFFFFFFF))
    assert read_bars(str(node.sys), GPU) == [(0xF6000000, 0xF6FFFFFF), (0xE0000000, 0xEFFFFFFF)]
    node.write_iomem("00000000-00000fff : Reserved\ne0000000-efffffff : PCI Bus 0000:01\n  e0000000-e07e8fff : efifb\n")
    assert iomem_framebuffers(str(node.proc)) == [("efifb", 0xE0000000, 0xE07E8FFF)]
    assert firmware_framebuffer(str(node.sys), str(node.proc), GPU) == "efifb holds 0xe0000000-0xe07e8fff of its memory (/proc/iomem)"
    node.set_bars(GPU, (0xF6000000, 0xF6FFFFFF))
    assert firmware_framebuffer(str(node.sys), str(node.proc), GPU) is None  # another card's memory
