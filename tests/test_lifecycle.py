"""The plugin stays right while the node changes under it: real inotify events, real sysfs rescans,
kubelet restarts, signals on the real process, and concurrent admission while devices flap.
Every wait is a condition with a deadline."""

from __future__ import annotations

import ctypes
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import grpc
import pytest
from conftest import PCI_IDS_PATH, Harness, wait

from deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as api
from deviceplugin.config import parse_config
from deviceplugin.sim.kubelet import FakeKubelet
from deviceplugin.sim.node import Fn, gpu

R = "nvidia.com/GA104"
GPU1 = "0000:01:00.0"
GPU2 = "0000:02:00.0"


def two_gpus(node) -> None:
    node.add_all(gpu(GPU1, "2484", "228b", "13", numa_node=0))
    node.add_all(gpu(GPU2, "2484", "228b", "14", numa_node=0))


@pytest.fixture
def slow_rescan(node, pci_ids):
    """A daemon whose timer never fires during the test: only inotify can deliver the change."""
    h = Harness(node, pci_ids, rescan_interval=3600)
    try:
        yield h
    finally:
        h.close()


def test_dev_vfio_node_removed_then_recreated_via_inotify(slow_rescan):
    h = slow_rescan
    two_gpus(h.node)
    h.start()
    h.wait_devices(R, {GPU1: "Healthy", GPU2: "Healthy"})
    os.unlink(h.node.dev / "vfio" / "13")
    h.wait_devices(R, {GPU1: "Unhealthy", GPU2: "Healthy"}, timeout=5)
    assert "/dev/vfio/13 is missing" in h.daemon.pool.devices(R)[1][0].reason
    (h.node.dev / "vfio" / "13").touch()
    h.wait_devices(R, {GPU1: "Healthy", GPU2: "Healthy"}, timeout=5)
    assert h.daemon.recorder.rescan_count <= 4  # start + the two events (+1 coalescing slack): no timer


def test_rebinding_to_a_host_driver_is_seen_by_the_rescan(harness):
    two_gpus(harness.node)
    harness.start()
    harness.wait_devices(R, {GPU1: "Healthy", GPU2: "Healthy"})
    harness.node.bind("0000:01:00.1", "snd_hda_intel")  # /dev/vfio/13 stays: sysfs only
    harness.wait_devices(R, {GPU1: "Unhealthy", GPU2: "Healthy"})
    device = harness.daemon.pool.devices(R)[1][0]
    assert "0000:01:00.1" in device.reason and "snd_hda_intel" in device.reason
    with pytest.raises(grpc.RpcError) as err:
        harness.kubelet.allocate(R, GPU1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "snd_hda_intel" in err.value.details()
    harness.node.bind("0000:01:00.1", "vfio-pci")
    harness.wait_devices(R, {GPU1: "Healthy", GPU2: "Healthy"})


def test_new_group_new_resource_hot_unplug_and_empty_resource(harness):
    harness.node.add_all(gpu(GPU1, "2484", "228b", "13"))
    harness.start()
    harness.wait_devices(R, {GPU1: "Healthy"})
    harness.node.add_all(gpu(GPU2, "2484", "228b", "14"))
    harness.wait_devices(R, {GPU1: "Healthy", GPU2: "Healthy"})
    harness.node.add_all(gpu("0000:03:00.0", "73df", "ab28", "15", vendor="1002"))
    harness.wait_devices("amd.com/NAVI_22", {"0000:03:00.0": "Healthy"})
    assert [r.resource for r in harness.kubelet.registrations].count("amd.com/NAVI_22") == 1
    harness.node.remove("0000:02:00.1")
    harness.node.remove(GPU2)
    harness.wait_devices(R, {GPU1: "Healthy"})
    harness.node.remove("0000:03:00.1")
    harness.node.remove("0000:03:00.0")
    harness.wait_devices("amd.com/NAVI_22", {})
    assert harness.kubelet.allocatable()["amd.com/NAVI_22"] == 0


def test_unchanged_rescans_push_nothing(harness):
    two_gpus(harness.node)
    harness.start()
    harness.wait_devices(R, {GPU1: "Healthy", GPU2: "Healthy"})
    updates = harness.kubelet.endpoints[R].updates
    start = harness.daemon.recorder.rescan_count
    wait(lambda: harness.daemon.recorder.rescan_count >= start + 5, what="five more rescans")
    assert harness.kubelet.endpoints[R].updates == updates


def test_a_new_listandwatch_stream_gets_the_current_full_list(harness):
    two_gpus(harness.node)
    harness.start()
    harness.wait_devices(R, {GPU1: "Healthy", GPU2: "Healthy"})
    os.unlink(harness.node.dev / "vfio" / "14")
    harness.wait_devices(R, {GPU1: "Healthy", GPU2: "Unhealthy"})
    stream = harness.kubelet.stub(R).ListAndWatch(api.Empty())
    first = next(stream)
    stream.cancel()
    assert {d.ID: d.health for d in first.devices} == {GPU1: "Healthy", GPU2: "Unhealthy"}


def test_kubelet_restarted_50_times(harness):
    two_gpus(harness.node)
    harness.node.add_all(gpu("0000:03:00.0", "73df", "ab28", "15", vendor="1002"))
    harness.start()
    expected = {
        R: {GPU1: "Healthy", GPU2: "Healthy"},
        R + "_AUDIO": {"0000:01:00.1": "Healthy", "0000:02:00.1": "Healthy"},
        "amd.com/NAVI_22": {"0000:03:00.0": "Healthy"},
        "amd.com/NAVI_22_AUDIO": {"0000:03:00.1": "Healthy"},
    }
    k = harness.kubelet
    assert k.wait_for(lambda k: all(k.devices(r) == d for r, d in expected.items()), 10)
    for i in range(50):
        before = len(k.registrations)
        k.restart()

        def registered_again(k: FakeKubelet, before: int = before) -> bool:
            fresh = {r.resource for r in k.registrations[before:] if r.generation == k.generation}
            return fresh == set(expected) and all(k.devices(r) == d and k.endpoints[r].connected for r, d in expected.items())

        ok = k.wait_for(registered_again, timeout=10)
        assert ok, f"restart {i}: kubelet sees {k.capacity()} after {k.registrations[before:]}"


def test_one_register_per_resource_per_kubelet_restart(node, pci_ids):
    """A restart is several inotify events and timer ticks; the kubelet must still get one Register per resource.

    A second Register for the same kubelet gives it a second client and ListAndWatch stream for the
    resource; when either ends, it marks the resource's devices unhealthy.
    """
    two_gpus(node)  # nvidia.com/GA104 and its companion nvidia.com/GA104_AUDIO
    h = Harness(node, pci_ids, rescan_interval=0.05).start()  # a fast timer: many checks per restart
    try:
        h.wait_ready()
        k = h.kubelet
        resources = {R, R + "_AUDIO"}
        for _ in range(15):
            k.restart()
            wait(lambda: {r.resource for r in k.registrations if r.generation == k.generation} == resources, what="re-registration")
            # Let the daemon handle every event and tick the restart caused before the next one.
            settled = h.daemon.recorder.rescan_count + 3
            wait(lambda n=settled: h.daemon.recorder.rescan_count >= n and not h.daemon.frontend.registrar.pending(), what="three ticks")
        counts = Counter((r.generation, r.resource) for r in k.registrations)
        assert {key: n for key, n in counts.items() if n != 1} == {}, "registered more than once with one kubelet"
        assert len(counts) == 16 * len(resources)
        h.wait_ready()
    finally:
        h.close()


def test_kubelet_absent_at_start_appearing_3s_later(node, pci_ids):
    node.add_all(gpu(GPU1, "2484", "228b", "13"))
    h = Harness(node, pci_ids).start(kubelet=False)
    try:
        wait(lambda: h.daemon.frontend.registration_state()[1].get(R) is not None, what="a failed registration attempt")
        assert "kubelet.sock does not exist" in h.daemon.frontend.registration_state()[1][R]
        time.sleep(3)  # the scenario: the kubelet comes up three seconds late
        assert h.thread.is_alive()
        h.kubelet.start()
        h.wait_devices(R, {GPU1: "Healthy"}, timeout=5)
    finally:
        h.close()


def test_refused_registration_is_retried_and_the_daemon_lives_on(node, pci_ids):
    node.add_all(gpu(GPU1, "2484", "228b", "13"))
    h = Harness(node, pci_ids)
    h.daemon.frontend.registrar.backoff = (0.05, 0.1)
    h.kubelet.reject[R] = "resource already registered by another plugin"
    h.start()
    try:
        wait(lambda: "already registered" in (h.daemon.frontend.registration_state()[1].get(R) or ""), what="the refusal")
        h.kubelet.reject.clear()
        h.wait_devices(R, {GPU1: "Healthy"})
        # the kubelet streams the devices before its Register call returns to the plugin
        wait(lambda: h.daemon.frontend.registration_state()[1] == {}, what="the error to clear after success")
        assert R in h.daemon.frontend.registration_state()[0]
    finally:
        h.close()


def start_serve(node) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "deviceplugin", "serve", "--rescan-interval", "0.5", *node.cli_args(PCI_IDS_PATH)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_sends_an_empty_list_removes_sockets_and_exits_0_within_2s(node):
    two_gpus(node)
    kubelet = FakeKubelet(str(node.plugins)).start()
    proc = start_serve(node)
    try:
        assert kubelet.wait_for(lambda k: k.allocatable().get(R) == 2, 15), proc.stdout and proc.stdout.read()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
        assert code == 0 and elapsed <= 2.0, f"exit {code} after {elapsed:.2f}s"
        assert kubelet.wait_for(lambda k: k.devices(R) == {}, 2)
        assert any(res == R and devices == {} for _, res, devices in kubelet.update_log)
        assert sorted(os.listdir(node.plugins)) == ["kubelet.sock"]
    finally:
        if proc.poll() is None:
            proc.kill()
        kubelet.stop()


def test_sigkill_then_restart_cleans_up_and_registers(node):
    two_gpus(node)
    kubelet = FakeKubelet(str(node.plugins)).start()
    first = start_serve(node)
    try:
        assert kubelet.wait_for(lambda k: k.allocatable().get(R) == 2, 15)
        first.kill()
        first.wait(timeout=10)
        assert "vfio-dp-nvidia.com_GA104.sock" in os.listdir(node.plugins)  # left behind
        assert kubelet.wait_for(lambda k: k.allocatable().get(R) == 0, 5)  # stream broke: unhealthy
        before = len(kubelet.registrations)
        second = start_serve(node)
        try:
            assert kubelet.wait_for(lambda k: len(k.registrations) > before and k.allocatable().get(R) == 2, 15)
            out = second.stdout
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=10) == 0
            assert "removing stale socket vfio-dp-nvidia.com_GA104.sock" in (out.read() if out else "")
        finally:
            if second.poll() is None:
                second.kill()
    finally:
        kubelet.stop()


def test_allocate_storm_while_devices_flap(harness):
    for i in range(4):
        harness.node.add_all(gpu(f"0000:0{i + 1}:00.0", "2484", "228b", str(13 + i), numa_node=i % 2))
    harness.start()
    ids = [f"0000:0{i + 1}:00.0" for i in range(4)]
    assert harness.kubelet.wait_for(lambda k: k.allocatable().get(R) == 4, 10)
    stop = threading.Event()
    errors: list[str] = []
    counts = {"ok": 0, "precondition": 0}
    lock = threading.Lock()

    def flapper() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            i = rng.randrange(4)
            if rng.random() < 0.5:
                node_path = harness.node.dev / "vfio" / str(13 + i)
                node_path.unlink(missing_ok=True)
                time.sleep(0.005)
                node_path.touch()
            else:
                harness.node.bind(f"0000:0{i + 1}:00.1", "snd_hda_intel")
                time.sleep(0.005)
                harness.node.bind(f"0000:0{i + 1}:00.1", "vfio-pci")

    def client(seed: int) -> None:
        rng = random.Random(seed)
        channel = grpc.insecure_channel(f"unix://{harness.daemon.frontend.servers[R].socket_path}")
        from deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc

        stub = api_pb2_grpc.DevicePluginStub(channel)
        for n in range(625):
            want = rng.sample(ids, rng.choice((1, 2)))
            try:
                if n % 5 == 0:
                    stub.GetPreferredAllocation(
                        api.PreferredAllocationRequest(
                            container_requests=[api.ContainerPreferredAllocationRequest(available_deviceIDs=ids, allocation_size=2)]
                        ),
                        timeout=10,
                    )
                request = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=want)])
                response = stub.Allocate(request, timeout=10)
                env = response.container_responses[0].envs["PCI_RESOURCE_NVIDIA_COM_GA104"]
                assert env == ",".join(want)
                with lock:
                    counts["ok"] += 1
            except grpc.RpcError as exc:
                with lock:
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        counts["precondition"] += 1
                    else:
                        errors.append(f"{exc.code()}: {exc.details()}")
            except Exception as exc:
                with lock:
                    errors.append(repr(exc))
        channel.close()

    flap = threading.Thread(target=flapper)
    flap.start()
    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(16)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=120)
    stop.set()
    flap.join()
    assert errors == []
    assert counts["ok"] + counts["precondition"] == 16 * 625
    assert counts["ok"] > 0 and counts["precondition"] > 0  # the flapping really raced the admissions
    # and afterwards everything is healthy again
    harness.wait_devices(R, dict.fromkeys(ids, "Healthy"))


def test_config_selects_a_second_class_live(node, pci_ids):
    node.add(Fn("0000:05:00.0", "144d", "a808", "010802", "vfio-pci", "20"))
    node.sync_devnode("20")
    h = Harness(node, pci_ids, config=parse_config({"rules": [{"class": "0108", "resource": "samsung.com/nvme"}]})).start()
    try:
        h.wait_devices("samsung.com/nvme", {"0000:05:00.0": "Healthy"})
    finally:
        h.close()


def test_a_server_that_failed_to_start_is_retried_on_a_quiet_node(harness, monkeypatch):
    from deviceplugin.server import PluginServer

    harness.node.add_all(gpu(GPU1, "2484", "228b", "13"))
    real_start = PluginServer.start
    failures = []

    def flaky_start(self) -> None:
        if not failures:
            failures.append(self.resource)
            raise OSError("address already in use (simulated)")
        real_start(self)

    monkeypatch.setattr(PluginServer, "start", flaky_start)
    harness.start()
    harness.wait_devices(R, {GPU1: "Healthy"})  # nothing on the node changed: the timer retried it
    assert failures == [R]


# --- watches that outlive their directories, and watches the kernel refuses ------------------------------
def test_a_recreated_device_plugin_dir_is_watched_again_without_the_timer(slow_rescan, caplog):
    h = slow_rescan
    two_gpus(h.node)
    h.start()
    h.wait_ready()
    for _ in range(2):  # twice: the re-armed watch must itself be re-armed
        h.kubelet.stop()
        shutil.rmtree(h.node.plugins)
        wait(lambda: h.daemon.watcher.watching == [str(h.node.dev / "vfio")], what="the watch on the deleted dir to drop")
        h.node.plugins.mkdir()
        before = len(h.kubelet.registrations)
        h.kubelet.start()
        assert h.kubelet.wait_for(lambda k, n=before: {r.resource for r in k.registrations[n:]} >= {R, R + "_AUDIO"}, 5)
        h.wait_devices(R, {GPU1: "Healthy", GPU2: "Healthy"}, timeout=5)
    assert h.daemon.recorder.rescan_count <= 12  # events only: the one-hour timer never fired
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks"


def test_a_vfio_module_reload_recreating_dev_vfio_is_seen_without_the_timer(slow_rescan):
    h = slow_rescan
    two_gpus(h.node)
    h.start()
    h.wait_devices(R, {GPU1: "Healthy", GPU2: "Healthy"})
    shutil.rmtree(h.node.dev / "vfio")  # rmmod vfio_pci vfio: the kernel removes the whole directory
    h.wait_devices(R, {GPU1: "Unhealthy", GPU2: "Unhealthy"}, timeout=5)
    (h.node.dev / "vfio").mkdir()  # modprobe: the directory first, then its nodes
    for name in ("vfio", "13", "14"):
        (h.node.dev / "vfio" / name).touch()
    h.wait_devices(R, {GPU1: "Healthy", GPU2: "Healthy"}, timeout=5)
    # the parent's event for the new directory may be handled just after the rescan that saw its files
    wait(lambda: str(h.node.dev / "vfio") in h.daemon.watcher.watching, 5, "the new /dev/vfio to be watched")
    os.unlink(h.node.dev / "vfio" / "14")  # and the new watch delivers events
    h.wait_devices(R, {GPU1: "Healthy", GPU2: "Unhealthy"}, timeout=5)


@pytest.fixture
def inotify_exhausted():
    """Takes every inotify instance root may have, as a busy node's kubelet and runtime do (shared by uid 0)."""
    libc = ctypes.CDLL(None, use_errno=True)
    limit = int(open("/proc/sys/fs/inotify/max_user_instances").read())
    if limit > 4096:
        pytest.skip(f"fs.inotify.max_user_instances is {limit}: too many to take for a test")
    fds = []
    try:
        while len(fds) <= limit:
            fd = libc.inotify_init1(os.O_CLOEXEC)
            if fd < 0:
                break
            fds.append(fd)
        if ctypes.get_errno() != errno.EMFILE:
            pytest.skip(f"could not exhaust inotify instances: {os.strerror(ctypes.get_errno())}")
        yield
    finally:
        for fd in fds:
            os.close(fd)


def test_inotify_limits_are_a_warning_and_the_timer_carries_on(node, inotify_exhausted):
    two_gpus(node)
    kubelet = FakeKubelet(str(node.plugins)).start()
    proc = start_serve(node)
    try:
        assert kubelet.wait_for(lambda k: k.allocatable().get(R) == 2, 20), "serve died or never registered"
        os.unlink(node.dev / "vfio" / "13")  # no watch: the 0.5 s rescan sees it
        assert kubelet.wait_for(lambda k: k.devices(R).get(GPU1) == "Unhealthy", 10)
        assert proc.poll() is None
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        kubelet.stop()
    assert "inotify instance limit reached" in out and "relying on the periodic rescan" in out
    assert "Traceback" not in out
