"""The DRA mode's pure parts, without an API server: naming, grouping, attributes, slices, paths, the checkpoint."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from conftest import inventory_of

from deviceplugin.discovery import Device
from deviceplugin.dra import cdi, checkpoint, metadata
from deviceplugin.dra.checkpoint import PreparedClaim, PreparedDevice
from deviceplugin.dra.devices import device_name, group_devices, inventory_devices, pcie_root
from deviceplugin.dra.options import driver_name_error
from deviceplugin.dra.slices import MAX_DEVICES, desired_specs, slice_name
from deviceplugin.dra.view import inspect_view, view_text
from deviceplugin.sim.node import Fn, gpu

DRIVER = "vfio-device-plugin.github.io"


@pytest.mark.parametrize(
    ("address", "name"),
    [("0000:01:00.0", "pci-0000-01-00-0"), ("0000:c1:00.0", "pci-0000-c1-00-0"), ("10000:e2:1f.7", "pci-10000-e2-1f-7")],
)
def test_device_names_are_dns_labels_derived_from_the_primary_address(address, name):
    assert device_name(address) == name


def device(id_: str, group: str, healthy: bool = True, reason: str = "", resource: str = "nvidia.com/GH100") -> Device:
    return Device(id_, resource, group, 0, "10de:2330", (id_,), ((id_, "vfio-pci"),), (), healthy, reason)


def test_several_devices_of_one_group_are_one_dra_device_healthy_only_when_all_are():
    devices = [device("0000:19:00.0", "40"), device("0000:18:00.0", "40"), device("0000:20:00.0", "41")]
    one, two = group_devices(devices, {}, lambda a: None)
    assert (one.name, one.pci_bus_id, one.group, one.healthy) == ("pci-0000-18-00-0", "0000:18:00.0", "40", True)
    assert one.members == (("nvidia.com/GH100", "0000:18:00.0"), ("nvidia.com/GH100", "0000:19:00.0"))
    assert one.attributes["functions"] == {"int": 2} and two.name == "pci-0000-20-00-0"
    sick = [devices[0], replace(devices[1], healthy=False, reason="/dev/vfio/40 is missing")]
    (merged,) = group_devices(sick, {}, lambda a: None)
    assert not merged.healthy and merged.reason == "/dev/vfio/40 is missing"


def test_attributes_from_the_inventory(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", numa_node=1))
    (d,) = inventory_devices(inventory_of(node, pci_ids), str(node.sys))
    assert d.attributes["productName"] == {"string": "GA104 [GeForce RTX 3070]"}
    assert d.attributes["resource.kubernetes.io/pcieRoot"] == {"string": "pci0000:00"}
    assert d.attributes["numaNode"] == {"int": 1} and d.attributes["iommuGroup"] == {"int": 13}


def test_pcie_root_is_the_first_component_below_sys_devices(node):
    node.add_all(gpu("0001:41:00.0", "2484", None, "7"))
    assert pcie_root(str(node.sys), "0001:41:00.0") == "pci0001:00"  # FakeNode hangs it below pci0001:00
    assert pcie_root(str(node.sys), "0000:99:00.0") is None


def test_slices_hold_only_healthy_devices_and_split_at_the_api_limit():
    many = [device(f"0000:{i // 32:02x}:{i % 32:02x}.0", str(i)) for i in range(MAX_DEVICES + 2)]
    devices = group_devices([*many, device("0000:ff:00.0", "999", healthy=False)], {}, lambda a: None)
    specs = desired_specs("node-1", DRIVER, devices)
    assert list(specs) == [f"node-1-{DRIVER}", f"node-1-{DRIVER}-1"]
    assert [len(s["devices"]) for s in specs.values()] == [MAX_DEVICES, 2]
    assert all(s["pool"] == {"name": "node-1", "resourceSliceCount": 2} for s in specs.values())
    assert desired_specs("node-1", DRIVER, [])[f"node-1-{DRIVER}"]["devices"] == []  # an empty pool still says so
    long = slice_name("n" * 250, DRIVER, 0)
    assert len(long) <= 253 and long != slice_name("n" * 249 + "m", DRIVER, 0)


@pytest.mark.parametrize(
    ("name", "ok"),
    [(DRIVER, True), ("gpu.example.com", True), ("Gpu.example.com", False), ("gpu_example", False), ("a" * 64, False)],
)
def test_driver_names_are_dns_subdomains(name, ok):
    assert (driver_name_error(name) is None) == ok


def test_metadata_paths_follow_kubevirt():
    assert metadata.container_path(DRIVER, "my-claim", None, "gpu") == (
        f"/var/run/kubernetes.io/dra-device-attributes/resourceclaims/my-claim/gpu/{DRIVER}-metadata.json"
    )
    assert metadata.container_path(DRIVER, "vm-abc-gpu-x7k2", "gpu", "req") == (
        f"/var/run/kubernetes.io/dra-device-attributes/resourceclaimtemplates/gpu/req/{DRIVER}-metadata.json"
    )


def test_cdi_device_ids_are_qualified_names_unique_per_claim():
    assert cdi.cdi_id(DRIVER, "uid-1", "pci-0000-01-00-0") == f"{DRIVER}/vfio=uid-1-pci-0000-01-00-0"
    entry = cdi.device_entry("uid-1", "pci-0000-01-00-0", ("/dev/vfio/vfio", "/dev/vfio/13"), ("/h", "/c"))
    assert entry["containerEdits"]["mounts"] == [{"hostPath": "/h", "containerPath": "/c", "options": ["ro", "bind"]}]


def test_checkpoint_round_trip_and_inspect_shows_prepared_claims(node, pci_ids, tmp_path):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    plugins = tmp_path / "plugins"
    prepared = PreparedDevice("gpu", "n1", "pci-0000-01-00-0", "13", "0000:01:00.0", (f"{DRIVER}/vfio=u1-pci-0000-01-00-0",))
    gone = PreparedDevice("gpu", "n1", "pci-0000-07-00-0", "20", "0000:07:00.0", ())
    claims = {
        "u1": PreparedClaim("u1", "vms", "gpu-claim", (prepared,), {"cdiVersion": "0.5.0"}, {"gpu": {"kind": "DeviceMetadata"}}),
        "u2": PreparedClaim("u2", "vms", "old", (gone,), {}),
    }
    path = checkpoint.checkpoint_path(str(plugins / DRIVER))
    checkpoint.write(path, claims)
    assert checkpoint.read(path) == claims
    view = inspect_view(inventory_of(node, pci_ids), str(node.sys), DRIVER, str(plugins), None)
    assert view["published"][0]["prepared_claims"] == ["vms/gpu-claim (u1)"]
    assert view["prepared_elsewhere"] == {"pci-0000-07-00-0": ["vms/old (u2)"]}
    assert "prepared for vms/gpu-claim (u1)" in view_text(view)


def test_a_garbled_checkpoint_is_ignored_not_fatal(tmp_path):
    path = tmp_path / "checkpoint.json"
    path.write_text("{not json")
    assert checkpoint.read(str(path)) == {}


@pytest.fixture
def hung_api_server(tmp_path):
    """An "API server" that accepts TCP connections and never answers: every client call waits for its timeout."""
    import socket

    from conftest import silent_server

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: hung\n"
        f"clusters: [{{name: hung, cluster: {{server: 'https://127.0.0.1:{sock.getsockname()[1]}', insecure-skip-tls-verify: true}}}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: hung, context: {cluster: hung, user: u}}]\n"
    )
    with silent_server(sock):
        yield str(kubeconfig)


def test_a_hung_api_server_never_holds_up_the_health_loop(node, pci_ids, hung_api_server):
    """The publisher waits for the API server on its own thread; the pool keeps following the node."""
    import os
    import threading

    from conftest import wait

    from deviceplugin.config import Config
    from deviceplugin.daemon import Daemon, Options
    from deviceplugin.dra.options import DraOptions
    from deviceplugin.dra.run import dra_frontend_factory

    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    dra = DraOptions(
        node="n1",
        kubeconfig=hung_api_server,
        plugins_dir=str(node.root / "plugins"),
        registry_dir=str(node.root / "registry"),
        cdi_dir=str(node.root / "cdi"),
        sysfs_root=str(node.sys),
    )
    options = Options(str(node.sys), str(node.dev), str(node.proc), str(node.plugins), 3600)
    daemon = Daemon(options, Config(), pci_ids, make_frontend=dra_frontend_factory(dra))
    stop = threading.Event()
    thread = threading.Thread(target=daemon.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait(lambda: daemon.pool.devices("nvidia.com/GA104")[1], 3, "the first scan")
        os.unlink(node.dev / "vfio" / "13")  # an inotify event: the loop must not be stuck in an API call
        wait(lambda: not daemon.pool.devices("nvidia.com/GA104")[1][0].healthy, 3, "the event to reach the pool")
        assert daemon.frontend.publisher.last_sync is None  # the publisher is still waiting on the API server
    finally:
        stop.set()
        daemon.notify("stop")
        thread.join(timeout=15)


def test_pcie_root_reads_one_link_on_a_nested_tree_and_resolves_any_other_shape(node):
    # As on real machines: the GPU below a switch below a root port, every directory nested.
    node.add_all(
        [
            Fn("0000:00:01.0", "8086", "347a", "060400", "pcieport", "1"),
            Fn("0000:01:00.0", "1000", "c010", "060400", "pcieport", "2", parent="0000:00:01.0"),
            Fn("0000:02:00.0", "1000", "c010", "060400", "pcieport", "3", parent="0000:01:00.0"),
            *[replace(fn, parent="0000:02:00.0") for fn in gpu("0000:03:00.0", "2484", "228b", "13")],
            Fn("0000:fe:00.0", "8086", "344c", "088000", None, "20", parent="pci0000:fe"),
        ]
    )
    sys = str(node.sys)
    nested = "../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0"
    assert os.readlink(node.sys / "bus/pci/devices/0000:03:00.0") == nested
    assert pcie_root(sys, "0000:03:00.0") == "pci0000:00" and pcie_root(sys, "0000:fe:00.0") == "pci0000:fe"
    links = node.sys / "bus" / "pci" / "devices"
    (node.sys / "devices" / "notpci" / "x").mkdir(parents=True)
    odd = {
        "abs": (str(node.device_dir("0000:03:00.0")), "pci0000:00"),  # an absolute link: resolved
        "up": ("../../../devices/pci0000:00/../notpci/x", None),  # leaves pci0000:00 again
        "dangling": ("../../../devices/pci0000:00/0000:99:00.0", None),
        "root": ("../../../devices/pci0000:00", "pci0000:00"),  # the root complex itself
        "notpci": ("../../../devices/notpci/x", None),
    }
    for name, (target, _) in odd.items():
        (links / name).symlink_to(target)
    assert {name: pcie_root(sys, name) for name in odd} == {name: want for name, (_, want) in odd.items()}
