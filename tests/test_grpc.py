"""The plugin over gRPC: servicer unit tests with grpcio-testing, and the real protocol over real
unix sockets against the test kubelet (register, dial back, ListAndWatch, admission calls)."""

from __future__ import annotations

import time

import grpc
import grpc_testing
import pytest
from conftest import inventory_of

from deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as api
from deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc
from deviceplugin.pool import DevicePool
from deviceplugin.server import MAX_STREAMS, DevicePluginServicer
from deviceplugin.sim.node import gpu

R = "nvidia.com/GA104"
SERVICE = api.DESCRIPTOR.services_by_name["DevicePlugin"]


@pytest.fixture
def testing_server(node, pci_ids):
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", numa_node=0))
    pool = DevicePool(str(node.sys), str(node.dev))
    pool.update(inventory_of(node, pci_ids))
    servicer = DevicePluginServicer(R, pool)
    return grpc_testing.server_from_dictionary({SERVICE: servicer}, grpc_testing.strict_real_time())


def unary(server, method: str, request):
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name[method], (), request, None)
    return rpc.termination()


def test_options_advertise_preferred_allocation(testing_server):
    response, _, code, _ = unary(testing_server, "GetDevicePluginOptions", api.Empty())
    assert code == grpc.StatusCode.OK
    assert response.get_preferred_allocation_available and not response.pre_start_required


def test_allocate_unknown_device_is_invalid_argument(testing_server):
    request = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=["0000:07:00.0"])])
    _, _, code, details = unary(testing_server, "Allocate", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "0000:07:00.0" in details


def test_prestart_is_empty(testing_server):
    response, _, code, _ = unary(testing_server, "PreStartContainer", api.PreStartContainerRequest(devices_ids=["0000:01:00.0"]))
    assert code == grpc.StatusCode.OK and response == api.PreStartContainerResponse()


def test_registers_and_streams_over_real_sockets(harness):
    node = harness.node
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13", numa_node=0))
    node.add_all(gpu("0000:02:00.0", "2484", "228b", "14", numa_node=1))
    harness.start()
    harness.wait_devices(R, {"0000:01:00.0": "Healthy", "0000:02:00.0": "Healthy"})
    first = harness.kubelet.registrations[0]
    endpoint = first.endpoint
    assert (first.resource, endpoint, first.generation) == (R, "vfio-dp-nvidia.com_GA104.sock", 1)
    assert (node.plugins / endpoint).is_socket()
    assert harness.kubelet.endpoints[R].options.get_preferred_allocation_available
    assert harness.kubelet.endpoints[R].topology == {"0000:01:00.0": [0], "0000:02:00.0": [1]}
    assert harness.kubelet.allocatable() == {R: 2} and harness.kubelet.capacity() == {R: 2}


def test_admission_calls_over_real_sockets(harness):
    node = harness.node
    for i, numa in ((1, 0), (2, 1), (3, 1)):
        node.add_all(gpu(f"0000:0{i}:00.0", "2484", "228b", str(12 + i), numa_node=numa))
    harness.start()
    k = harness.kubelet
    assert k.wait_for(lambda k: k.allocatable().get(R) == 3, 10)
    ids = ["0000:01:00.0", "0000:02:00.0", "0000:03:00.0"]
    assert k.preferred(R, ids, [], 2) == ["0000:02:00.0", "0000:03:00.0"]
    assert k.preferred(R, ids, ["0000:01:00.0"], 2) == ["0000:01:00.0", "0000:02:00.0"]
    container = k.allocate(R, "0000:03:00.0", "0000:01:00.0").container_responses[0]
    assert [(d.container_path, d.host_path, d.permissions) for d in container.devices] == [
        ("/dev/vfio/vfio", "/dev/vfio/vfio", "mrw"),
        ("/dev/vfio/15", "/dev/vfio/15", "mrw"),
        ("/dev/vfio/13", "/dev/vfio/13", "mrw"),
    ]
    assert dict(container.envs) == {
        "PCI_RESOURCE_NVIDIA_COM_GA104": "0000:03:00.0,0000:01:00.0",
        "PCI_RESOURCE_NVIDIA_COM_GA104_AUDIO": "0000:03:00.1,0000:01:00.1",
    }
    assert k.stub(R).PreStartContainer(api.PreStartContainerRequest(devices_ids=ids[:1]), timeout=5) == api.PreStartContainerResponse()


def test_allocate_errors_reach_the_kubelet_with_reasons(harness):
    node = harness.node
    node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    harness.start()
    k = harness.kubelet
    assert k.wait_for(lambda k: k.allocatable().get(R) == 1, 10)
    with pytest.raises(grpc.RpcError) as err:
        k.allocate(R, "0000:09:00.0")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "0000:09:00.0" in err.value.details()
    node.bind("0000:01:00.1", "snd_hda_intel")
    with pytest.raises(grpc.RpcError) as err:
        k.allocate(R, "0000:01:00.0")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "0000:01:00.1" in err.value.details() and "snd_hda_intel" in err.value.details()
    # the failed recheck asked for a rescan: the kubelet learns the device is unhealthy
    harness.wait_devices(R, {"0000:01:00.0": "Unhealthy"})


def test_open_listandwatch_streams_never_starve_allocate(harness):
    """31 extra streams once took every worker: Allocate (no deadline in the kubelet) then waited forever."""
    harness.node.add_all(gpu("0000:01:00.0", "2484", "228b", "13"))
    harness.start()
    harness.wait_ready()
    channel = grpc.insecure_channel(f"unix://{harness.daemon.frontend.servers[R].socket_path}")
    stub = api_pb2_grpc.DevicePluginStub(channel)
    try:
        streams = [stub.ListAndWatch(api.Empty()) for _ in range(31)]
        outcomes = []
        for stream in streams:
            try:
                next(stream)
                outcomes.append("open")
            except grpc.RpcError as err:
                outcomes.append(err.code().name)
        request = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=["0000:01:00.0"])])
        response = stub.Allocate(request, timeout=5)
        assert response.container_responses[0].envs["PCI_RESOURCE_NVIDIA_COM_GA104"] == "0000:01:00.0"
        # the kubelet's stream holds one slot, three more opened (whichever the server took first), the rest were refused at once
        assert sorted(outcomes) == ["RESOURCE_EXHAUSTED"] * (32 - MAX_STREAMS) + ["open"] * (MAX_STREAMS - 1)
        assert harness.kubelet.endpoints[R].connected and harness.kubelet.devices(R) == {"0000:01:00.0": "Healthy"}
        for stream in streams:
            stream.cancel()
        # a closed stream frees its slot
        deadline = time.monotonic() + 5
        while True:
            fresh = stub.ListAndWatch(api.Empty())
            try:
                assert [d.ID for d in next(fresh).devices] == ["0000:01:00.0"]
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, err
                time.sleep(0.01)
            finally:
                fresh.cancel()
    finally:
        channel.close()
