"""bind / release on fake nodes with the fake kernel: the state the kernel ends in (driver links,
/dev/vfio nodes, driver_override), each refusal, the rollback, and that a dry run changes nothing."""

from __future__ import annotations

import errno
import os
import re

import pytest
from conftest import Harness, inventory_of, tree_of, wait

from deviceplugin.bind import (
    BIND,
    BOUND,
    PLANNED,
    REFUSED,
    RELEASE,
    RELEASED,
    ROLLED_BACK,
    UNCHANGED,
    BindError,
    Options,
    Report,
    Roots,
    SysfsWriter,
    render_text,
    run,
    run_command,
    timed_write,
)
from deviceplugin.cli import build_parser
from deviceplugin.config import Config, parse_config
from deviceplugin.discovery import IOMMU_OFF
from deviceplugin.naming import PciIds
from deviceplugin.sim.kernel import FakeKernel
from deviceplugin.sim.node import FakeNode, Fn, gpu

GPU, AUDIO = "0000:01:00.0", "0000:01:00.1"
TWIN, TWIN_AUDIO = "0000:02:00.0", "0000:02:00.1"
SPARE = "0000:03:00.0"


def host_card(node: FakeNode, address: str, group: str) -> None:
    node.add_all(gpu(address, "2484", "228b", group, driver="nvidia", audio_driver="snd_hda_intel"))


@pytest.fixture
def kernel(node) -> FakeKernel:
    """Two identical RTX 3070s on the host drivers and a third, identical one with no driver at all."""
    host_card(node, GPU, "13")
    host_card(node, TWIN, "14")
    node.add_all(gpu(SPARE, "2484", "228b", "15", driver=None, audio_driver=None))
    return FakeKernel(node).load("vfio-pci")


def roots(node: FakeNode) -> Roots:
    return Roots(str(node.sys), str(node.dev), str(node.proc))


def do(kernel: FakeKernel, *addresses: str, action: str = BIND, config: Config | None = None, **options) -> Report:
    opts = Options(action, addresses, **options)
    return run(opts, roots(kernel.node), config or Config(), PciIds(), kernel)


def drivers(node: FakeNode, *addresses: str) -> list[str | None]:
    return [node.driver_of(a) for a in addresses]


# --- bind and release -----------------------------------------------------------------------------
def test_bind_moves_the_whole_group_and_nothing_else(kernel):
    node = kernel.node
    report = do(kernel, AUDIO)  # any function names its group
    assert report.outcome == "done" and [g.outcome for g in report.groups] == [BOUND]
    assert drivers(node, GPU, AUDIO) == ["vfio-pci", "vfio-pci"]
    assert (node.dev / "vfio" / "13").exists()
    assert drivers(node, TWIN, TWIN_AUDIO) == ["nvidia", "snd_hda_intel"]  # the identical card elsewhere
    assert drivers(node, SPARE) == [None] and not (node.dev / "vfio" / "15").exists()  # what new_id would grab
    assert not any(path.endswith("new_id") for path, _ in kernel.writes)
    assert (kernel.override(GPU), kernel.override(TWIN)) == ("vfio-pci", None)
    assert inventory_of(node, PciIds()).offered() == {"nvidia.com/2484": (GPU,), "nvidia.com/2484_AUDIO": (AUDIO,)}
    assert "/dev/vfio/13 is present" in report.groups[0].message


def test_release_gives_the_group_back_to_its_host_drivers(kernel):
    node = kernel.node
    do(kernel, GPU)
    report = do(kernel, GPU, action=RELEASE)
    assert [g.outcome for g in report.groups] == [RELEASED]
    assert drivers(node, GPU, AUDIO) == ["nvidia", "snd_hda_intel"]
    assert (kernel.override(GPU), kernel.override(AUDIO)) == (None, None)
    assert not (node.dev / "vfio" / "13").exists()
    assert "0000:01:00.0 -> nvidia, 0000:01:00.1 -> snd_hda_intel" in report.groups[0].message


def test_a_second_bind_changes_nothing_and_says_so(kernel):
    do(kernel, GPU)
    writes, before = len(kernel.writes), tree_of(kernel.node.root)
    report = do(kernel, GPU, AUDIO)
    assert [g.outcome for g in report.groups] == [UNCHANGED] and report.outcome == UNCHANGED
    assert len(kernel.writes) == writes and tree_of(kernel.node.root) == before
    assert "nothing changed" in render_text(report)
    assert [g.outcome for g in do(kernel, TWIN, action=RELEASE).groups] == [UNCHANGED]  # never bound: nothing to release


def test_dry_run_prints_the_exact_writes_in_order_and_changes_nothing(kernel):
    before = tree_of(kernel.node.root)
    report = do(kernel, GPU, dry_run=True)
    assert report.outcome == PLANNED and tree_of(kernel.node.root) == before and kernel.writes == []
    sys_ = kernel.node.sys
    lines = [line.strip() for line in render_text(report).splitlines() if line.strip().startswith("would")]
    assert lines == [
        f"would   echo vfio-pci > {sys_}/bus/pci/devices/{GPU}/driver_override",
        f"would   echo {GPU} > {sys_}/bus/pci/drivers/nvidia/unbind",
        f"would   echo {GPU} > {sys_}/bus/pci/drivers_probe",
        f"would   check {sys_}/bus/pci/devices/{GPU}/driver -> vfio-pci",
        f"would   echo vfio-pci > {sys_}/bus/pci/devices/{AUDIO}/driver_override",
        f"would   echo {AUDIO} > {sys_}/bus/pci/drivers/snd_hda_intel/unbind",
        f"would   echo {AUDIO} > {sys_}/bus/pci/drivers_probe",
        f"would   check {sys_}/bus/pci/devices/{AUDIO}/driver -> vfio-pci",
    ]
    assert "check   ok: vfio-pci is loaded" in render_text(report)


# --- refusals -------------------------------------------------------------------------------------
def refused(kernel: FakeKernel, *addresses: str, **options) -> str:
    """Runs a bind that must be refused without a single write, and returns its text."""
    before = tree_of(kernel.node.root)
    report = do(kernel, *addresses, **options)
    assert report.outcome == REFUSED, render_text(report)
    assert kernel.writes == [] and tree_of(kernel.node.root) == before
    return render_text(report)


def test_a_group_shared_with_another_slot_is_refused_unless_allowed(kernel):
    kernel.node.add(Fn("0000:00:17.0", "8086", "7ae2", "010601", "ahci", "13"))  # the chipset's SATA in the GPU's group
    kernel.own["0000:00:17.0"] = "ahci"
    text = refused(kernel, TWIN, GPU)  # one refused group stops the others too: nothing changes at all
    assert "group 14: not run, as another group was refused" in text
    assert "group 13 also holds 0000:00:17.0 (SATA, ahci), not part of the card at 0000:01:00" in text
    assert "(override with --allow-shared-group)" in text and "bind: refused: nothing was changed" in text
    assert do(kernel, GPU, allow_shared_group=True).groups[0].outcome == BOUND
    assert drivers(kernel.node, "0000:00:17.0", GPU) == ["vfio-pci", "vfio-pci"]


def test_a_bridge_in_the_group_is_not_shared_and_stays_on_pcieport(kernel):
    kernel.node.add(Fn("0000:00:01.0", "8086", "1901", "060400", "pcieport", "13"))
    kernel.node.add(Fn("0000:00:1c.0", "8086", "7ab8", "060400", "pcieport", "3"))
    assert do(kernel, GPU).groups[0].outcome == BOUND
    assert drivers(kernel.node, "0000:00:01.0") == ["pcieport"]
    (alone,) = do(kernel, "0000:00:1c.0").groups
    assert alone.outcome == UNCHANGED and "holds only bridges, which stay on pcieport" in alone.message


@pytest.mark.parametrize(
    ("iomem", "fb_on_card", "found"),
    [
        ("c0000000-c02fffff : BOOTFB\n", False, "BOOTFB holds 0xc0000000-0xc02fffff of its memory"),
        ("c0100000-c08fffff : efifb\n", False, "efifb holds 0xc0100000-0xc08fffff"),
        ("00000000-00000000 : simpledrm\n", False, "its addresses are hidden"),
        ("", True, "/sys/class/graphics/fb0 is on it"),
    ],
)
def test_the_boot_gpu_with_a_firmware_framebuffer_is_refused_unless_allowed(kernel, iomem, fb_on_card, found):
    node = kernel.node
    node.write_attr(GPU, "boot_vga", "1\n")
    node.set_bars(GPU, (0xF6000000, 0xF6FFFFFF), (0xC0000000, 0xCFFFFFFF))
    node.write_iomem(f"c0000000-cfffffff : PCI Bus 0000:01\n  c0000000-cfffffff : {GPU}\n    {iomem}")
    if fb_on_card:
        node.add_framebuffer("fb0", GPU)
    text = refused(kernel, GPU)
    assert f"{GPU} (10de:2484 VGA) is the boot VGA device and a firmware framebuffer still uses its memory" in text
    assert found in text and "(override with --allow-boot-vga)" in text
    assert do(kernel, GPU, allow_boot_vga=True).groups[0].outcome == BOUND


def test_the_boot_gpu_is_bound_when_no_framebuffer_uses_it(kernel):
    kernel.node.write_attr(GPU, "boot_vga", "1\n")
    kernel.node.set_bars(GPU, (0xC0000000, 0xCFFFFFFF))
    kernel.node.write_iomem("d0000000-d02fffff : BOOTFB\n")  # on another card
    kernel.node.add_framebuffer("fb0", TWIN)
    report = do(kernel, GPU)
    assert report.groups[0].outcome == BOUND
    assert "is the boot VGA device, but no firmware framebuffer is on it" in render_text(report)


def test_vfio_pci_not_loaded_is_refused_with_the_modprobe(node):
    host_card(node, GPU, "13")
    kernel = FakeKernel(node)  # vfio-pci is not loaded
    text = refused(kernel, GPU)
    assert "vfio-pci is not loaded" in text and "run `modprobe vfio-pci`" in text


def test_iommu_off_is_refused(tmp_path):
    node = FakeNode(tmp_path).host(iommu=None)
    node.add_all(gpu(GPU, "2484", "228b", None, driver="nvidia", audio_driver="snd_hda_intel"))  # no groups at all
    kernel = FakeKernel(node).load("vfio-pci")
    assert IOMMU_OFF in refused(kernel, GPU)


def test_a_group_with_an_unreadable_function_is_refused(kernel):
    kernel.node.add(Fn("0000:01:00.2", "10de", "1ad8", "0c0330", "xhci_hcd", "13"))
    kernel.node.write_attr("0000:01:00.2", "vendor", "garbage")
    assert "0000:01:00.2 in group 13 could not be read" in refused(kernel, GPU)


# --- failures and rollback ------------------------------------------------------------------------
def test_a_blocking_unbind_of_the_second_function_rolls_the_first_back(kernel):
    node = kernel.node
    (node.device_dir(AUDIO) / "sound" / "card1").mkdir(parents=True)
    node.add_process(4242, "pipewire", "/dev/snd/controlC1", "/dev/null")
    node.add_process(4243, "bash", "/dev/snd/controlC0")
    held = kernel.hold(AUDIO)
    try:
        report = do(kernel, GPU, timeout=0.25)
        run_ = report.groups[0]
        assert run_.outcome == ROLLED_BACK and report.outcome == "failed"
        assert drivers(node, GPU) == ["nvidia"] and kernel.override(GPU) is None  # restored
        assert not (node.dev / "vfio" / "13").exists()  # nothing is half bound
        timed_out = run_.steps[-1]
        assert timed_out.outcome == "timeout" and timed_out.step.path.endswith("drivers/snd_hda_intel/unbind")
        assert "did not finish within 0.25 s" in timed_out.detail and "cannot be cancelled" in timed_out.detail
        assert "pid 4242 (pipewire) has /dev/snd/controlC1 open" in timed_out.detail and "bash" not in timed_out.detail
        assert [r.outcome for r in run_.rollback][-1] == "pending"  # its override write waits for the unbind
        assert f"Rolled back, except {AUDIO}" in run_.message
    finally:
        held.set()
    wait(lambda: kernel.override(AUDIO) is None)
    assert drivers(node, GPU, AUDIO) == ["nvidia", None]  # the unbind finished: no driver, no override
    assert drivers(node, TWIN, TWIN_AUDIO) == ["nvidia", "snd_hda_intel"]


def test_a_release_blocked_by_a_vm_names_it_and_rebinds_the_rest(kernel):
    node = kernel.node
    do(kernel, GPU)
    node.add_process(777, "qemu-kvm", "/dev/vfio/13", "/dev/vfio/vfio")
    held = kernel.hold(AUDIO)
    try:
        run_ = do(kernel, GPU, action=RELEASE, timeout=0.25).groups[0]
        assert run_.outcome == ROLLED_BACK
        assert "pid 777 (qemu-kvm) has /dev/vfio/13 open" in run_.steps[-1].detail
        assert drivers(node, GPU) == ["vfio-pci"] and kernel.override(GPU) == "vfio-pci"
        assert (node.dev / "vfio" / "13").exists()
    finally:
        held.set()
    wait(lambda: kernel.override(AUDIO) == "vfio-pci")  # restored: a probe puts it back on vfio-pci


def test_a_probe_that_does_not_take_the_function_fails_the_check_and_rolls_back(kernel):
    kernel.reject("vfio-pci", AUDIO)
    run_ = do(kernel, GPU).groups[0]
    assert run_.outcome == ROLLED_BACK and run_.steps[-1].outcome == "failed"
    assert "is on no driver after drivers_probe, not vfio-pci: vfio-pci did not take it" in run_.steps[-1].detail
    assert drivers(kernel.node, GPU, AUDIO) == ["nvidia", "snd_hda_intel"]
    assert (kernel.override(GPU), kernel.override(AUDIO)) == (None, None)
    assert "every function of group 13 is as it was" in run_.message


def test_a_release_that_vfio_pci_takes_back_by_id_is_rolled_back(kernel):
    do(kernel, GPU)
    kernel.write(str(kernel.node.sys / "bus/pci/drivers/vfio-pci/new_id"), "10de 2484")  # as vfio-pci.ids= does at boot
    run_ = do(kernel, GPU, action=RELEASE).groups[0]
    assert run_.outcome == ROLLED_BACK
    assert "is on vfio-pci after drivers_probe, not a host driver: vfio-pci claims its ids (vfio-pci.ids=" in run_.steps[-1].detail
    assert drivers(kernel.node, GPU, AUDIO) == ["vfio-pci", "vfio-pci"] and kernel.override(GPU) == "vfio-pci"


def test_a_failed_group_stops_the_run_and_earlier_groups_stay_whole(kernel):
    kernel.reject("vfio-pci", TWIN)
    report = do(kernel, GPU, TWIN)
    assert [g.outcome for g in report.groups] == [BOUND, ROLLED_BACK]
    assert drivers(kernel.node, GPU, AUDIO, TWIN, TWIN_AUDIO) == ["vfio-pci", "vfio-pci", "nvidia", "snd_hda_intel"]


# --- config: bind: true and variant drivers -------------------------------------------------------
def test_bind_config_binds_what_bind_rules_select(kernel):
    kernel.node.add(Fn("0000:05:00.0", "144d", "a808", "010802", "nvme", "20"))
    config = parse_config({"rules": [{"address": TWIN, "bind": True}, {"class": "0108", "bind": True}, {"address": GPU}]})
    report = do(kernel, config=config)
    assert [(g.plan.group, g.outcome) for g in report.groups] == [("14", BOUND), ("20", BOUND)]
    assert drivers(kernel.node, GPU, TWIN, "0000:05:00.0") == ["nvidia", "vfio-pci", "vfio-pci"]
    assert [g.outcome for g in do(kernel, config=config).groups] == [UNCHANGED, UNCHANGED]


def test_bind_config_without_a_matching_rule_has_nothing_to_do(kernel):
    report = do(kernel, config=parse_config({"rules": [{"vendor": "1002", "bind": True}]}))
    assert report.groups == [] and report.outcome == UNCHANGED and "nothing to bind" in render_text(report)


def test_a_variant_driver_named_by_the_config(kernel):
    config = parse_config({"rules": [{"address": GPU, "vfio_driver": "nvgrace_gpu_vfio_pci"}]})
    assert "run `modprobe nvgrace_gpu_vfio_pci`" in refused(kernel, GPU, config=config)
    kernel.load("nvgrace_gpu_vfio_pci")
    assert do(kernel, GPU, config=config).groups[0].outcome == BOUND
    assert drivers(kernel.node, GPU, AUDIO) == ["nvgrace_gpu_vfio_pci", "nvgrace_gpu_vfio_pci"]
    assert do(kernel, GPU).groups[0].outcome == UNCHANGED  # without the rule any vfio driver will do


def test_what_cannot_be_bound_is_a_usage_error(kernel):
    for addresses, message in [
        (("01:00.0", "bogus"), "'bogus' is not a PCI address like 0000:01:00.0"),
        (("0000:09:00.0",), f"no PCI function 0000:09:00.0 under {kernel.node.sys}/bus/pci/devices"),
    ]:
        with pytest.raises(BindError, match=re.escape(message)):
            do(kernel, *addresses)
    args = build_parser().parse_args(["bind", *kernel.node.cli_args()])
    with pytest.raises(BindError, match="or --config FILE with bind: true rules"):
        run_command(args, Config(), PciIds(), kernel)
    assert kernel.writes == []


# --- the real writer ------------------------------------------------------------------------------
def test_the_real_writer_writes_only_under_its_root(tmp_path):
    attr = tmp_path / "sys" / "driver_override"
    attr.parent.mkdir()
    attr.write_text("(null)\n")
    SysfsWriter(str(tmp_path / "sys")).write(str(attr), "vfio-pci\n")
    assert attr.read_text() == "vfio-pci\n"
    for outside in (str(tmp_path / "elsewhere"), str(tmp_path / "sys" / ".." / "x")):
        with pytest.raises(OSError) as err:
            SysfsWriter(str(tmp_path / "sys")).write(outside, "1\n")
        assert err.value.errno == errno.EPERM
    with pytest.raises(FileNotFoundError):  # never creates a file
        SysfsWriter(str(tmp_path / "sys")).write(str(tmp_path / "sys" / "new"), "1\n")


def test_a_write_that_blocks_times_out_with_the_real_writer(tmp_path):
    fifo = tmp_path / "unbind"
    os.mkfifo(fifo)  # opening it for writing blocks until a reader comes, like an unbind whose driver waits
    finished, error, seconds = timed_write(SysfsWriter(str(tmp_path)), str(fifo), "0000:01:00.0\n", 0.1)
    assert (finished, error) == (False, None) and seconds >= 0.1
    with open(fifo) as reader:  # let the abandoned write finish
        assert reader.read() == "0000:01:00.0\n"


# --- the running daemon ---------------------------------------------------------------------------
def test_serve_offers_a_group_within_a_rescan_of_its_bind(node, pci_ids):
    host_card(node, GPU, "13")
    kernel = FakeKernel(node).load("vfio-pci")
    h = Harness(node, pci_ids).start()
    try:
        wait(lambda: h.daemon.inventory is not None)  # it has scanned the node with the card on nvidia
        assert h.daemon.inventory.offered() == {} and h.kubelet.endpoints == {}
        assert do(kernel, GPU).groups[0].outcome == BOUND
        h.wait_devices("nvidia.com/GA104", {GPU: "Healthy"}, timeout=5)  # no restart
    finally:
        h.close()


def test_bind_never_unbinds_an_sriov_pf_that_has_vfs(tmp_path):
    node = FakeNode(tmp_path).host()
    (node.sys / "bus" / "pci" / "drivers" / "vfio-pci").mkdir(parents=True, exist_ok=True)
    node.add(Fn("0000:3b:00.0", "8086", "1572", "020000", "i40e", "40"))
    node.add(Fn("0000:3b:02.0", "8086", "154c", "020000", "iavf", "40", physfn="0000:3b:00.0"))
    kernel = FakeKernel(node)
    before = tree_of(node.root)
    report = do(kernel, "0000:3b:02.0")
    assert report.outcome == "refused"
    (check,) = [c for c in report.groups[0].plan.checks if not c.ok]
    assert check.name == "sriov-pf" and "Do not unbind the PF" in check.detail and check.override == ""
    assert tree_of(node.root) == before and kernel.writes == []
