"""The generated code matches proto/, and proto/ matches the upstream kubelet API field by field."""

from __future__ import annotations

from pathlib import Path

from deviceplugin import codegen
from deviceplugin.api.deviceplugin.v1beta1 import api_pb2
from deviceplugin.api.podresources.v1 import api_pb2 as podresources_pb2

PACKAGE_ROOT = Path(codegen.__file__).parent.parent

# (message, field, number, type, repeated) from k8s.io/kubelet/pkg/apis/deviceplugin/api/deviceplugin/v1beta1/api.proto
UPSTREAM = [
    ("DevicePluginOptions", "pre_start_required", 1, "bool", False),
    ("DevicePluginOptions", "get_preferred_allocation_available", 2, "bool", False),
    ("RegisterRequest", "version", 1, "string", False),
    ("RegisterRequest", "endpoint", 2, "string", False),
    ("RegisterRequest", "resource_name", 3, "string", False),
    ("RegisterRequest", "options", 4, "DevicePluginOptions", False),
    ("ListAndWatchResponse", "devices", 1, "Device", True),
    ("TopologyInfo", "nodes", 1, "NUMANode", True),
    ("NUMANode", "ID", 1, "int64", False),
    ("Device", "ID", 1, "string", False),
    ("Device", "health", 2, "string", False),
    ("Device", "topology", 3, "TopologyInfo", False),
    ("PreStartContainerRequest", "devices_ids", 1, "string", True),
    ("PreferredAllocationRequest", "container_requests", 1, "ContainerPreferredAllocationRequest", True),
    ("ContainerPreferredAllocationRequest", "available_deviceIDs", 1, "string", True),
    ("ContainerPreferredAllocationRequest", "must_include_deviceIDs", 2, "string", True),
    ("ContainerPreferredAllocationRequest", "allocation_size", 3, "int32", False),
    ("PreferredAllocationResponse", "container_responses", 1, "ContainerPreferredAllocationResponse", True),
    ("ContainerPreferredAllocationResponse", "deviceIDs", 1, "string", True),
    ("AllocateRequest", "container_requests", 1, "ContainerAllocateRequest", True),
    ("ContainerAllocateRequest", "devices_ids", 1, "string", True),
    ("CDIDevice", "name", 1, "string", False),
    ("AllocateResponse", "container_responses", 1, "ContainerAllocateResponse", True),
    ("ContainerAllocateResponse", "envs", 1, "EnvsEntry", True),
    ("ContainerAllocateResponse", "mounts", 2, "Mount", True),
    ("ContainerAllocateResponse", "devices", 3, "DeviceSpec", True),
    ("ContainerAllocateResponse", "annotations", 4, "AnnotationsEntry", True),
    ("ContainerAllocateResponse", "cdi_devices", 5, "CDIDevice", True),
    ("Mount", "container_path", 1, "string", False),
    ("Mount", "host_path", 2, "string", False),
    ("Mount", "read_only", 3, "bool", False),
    ("DeviceSpec", "container_path", 1, "string", False),
    ("DeviceSpec", "host_path", 2, "string", False),
    ("DeviceSpec", "permissions", 3, "string", False),
]
# the same from k8s.io/kubelet/pkg/apis/podresources/v1/api.proto
PODRESOURCES = [
    ("AllocatableResourcesResponse", "devices", 1, "ContainerDevices", True),
    ("AllocatableResourcesResponse", "cpu_ids", 2, "int64", True),
    ("AllocatableResourcesResponse", "memory", 3, "ContainerMemory", True),
    ("ListPodResourcesResponse", "pod_resources", 1, "PodResources", True),
    ("PodResources", "name", 1, "string", False),
    ("PodResources", "namespace", 2, "string", False),
    ("PodResources", "containers", 3, "ContainerResources", True),
    ("ContainerResources", "name", 1, "string", False),
    ("ContainerResources", "devices", 2, "ContainerDevices", True),
    ("ContainerResources", "cpu_ids", 3, "int64", True),
    ("ContainerResources", "memory", 4, "ContainerMemory", True),
    ("ContainerResources", "dynamic_resources", 5, "DynamicResource", True),
    ("ContainerMemory", "memory_type", 1, "string", False),
    ("ContainerMemory", "size", 2, "uint64", False),
    ("ContainerMemory", "topology", 3, "TopologyInfo", False),
    ("ContainerDevices", "resource_name", 1, "string", False),
    ("ContainerDevices", "device_ids", 2, "string", True),
    ("ContainerDevices", "topology", 3, "TopologyInfo", False),
    ("TopologyInfo", "nodes", 1, "NUMANode", True),
    ("NUMANode", "ID", 1, "int64", False),
    ("DynamicResource", "claim_name", 2, "string", False),
    ("DynamicResource", "claim_namespace", 3, "string", False),
    ("DynamicResource", "claim_resources", 4, "ClaimResource", True),
    ("ClaimResource", "cdi_devices", 1, "CDIDevice", True),
    ("ClaimResource", "driver_name", 2, "string", False),
    ("ClaimResource", "pool_name", 3, "string", False),
    ("ClaimResource", "device_name", 4, "string", False),
    ("CDIDevice", "name", 1, "string", False),
    ("GetPodResourcesRequest", "pod_name", 1, "string", False),
    ("GetPodResourcesRequest", "pod_namespace", 2, "string", False),
    ("GetPodResourcesResponse", "pod_resources", 1, "PodResources", False),
]
SCALARS = {1: "double", 3: "int64", 4: "uint64", 5: "int32", 8: "bool", 9: "string"}


def test_generated_code_is_not_stale(tmp_path):
    codegen.generate(tmp_path)
    for proto in codegen.PROTO_FILES:
        for name in codegen.GENERATED:
            rel = Path(codegen.generated_dir(proto)) / name
            fresh = (tmp_path / rel).read_text()
            committed = (PACKAGE_ROOT / rel).read_text()
            assert fresh == committed, f"{rel} is stale: run `python -m deviceplugin.codegen` and commit the result"


def test_every_generated_package_has_an_init():
    for proto in codegen.PROTO_FILES:
        parts = Path(codegen.generated_dir(proto)).parts
        for depth in range(1, len(parts) + 1):
            assert (PACKAGE_ROOT.joinpath(*parts[:depth]) / "__init__.py").exists(), f"{'/'.join(parts[:depth])} needs an __init__.py"


def test_package_and_method_paths_are_the_kubelets():
    desc = api_pb2.DESCRIPTOR
    assert desc.package == "v1beta1"
    assert [m.full_name for m in desc.services_by_name["Registration"].methods] == ["v1beta1.Registration.Register"]
    plugin = desc.services_by_name["DevicePlugin"]
    assert [m.name for m in plugin.methods] == [
        "GetDevicePluginOptions",
        "ListAndWatch",
        "GetPreferredAllocation",
        "Allocate",
        "PreStartContainer",
    ]
    assert plugin.methods_by_name["ListAndWatch"].server_streaming


def assert_fields_match(module, upstream):
    """Every upstream field with its number, type and cardinality, and no field upstream lacks."""
    seen = set()
    for message, field, number, type_name, repeated in upstream:
        f = module.DESCRIPTOR.message_types_by_name[message].fields_by_name[field]
        actual_type = f.message_type.name if f.message_type else SCALARS[f.type]
        assert (f.number, actual_type, f.is_repeated) == (number, type_name, repeated), f"{message}.{field}"
        seen.add((message, field))
    for message in module.DESCRIPTOR.message_types_by_name.values():
        for f in message.fields:
            assert (message.name, f.name) in seen, f"unexpected field {message.name}.{f.name}"


def test_every_field_matches_upstream_numbers_and_types():
    assert_fields_match(api_pb2, UPSTREAM)


def test_podresources_fields_and_method_paths_are_the_kubelets():
    assert_fields_match(podresources_pb2, PODRESOURCES)
    service = podresources_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"]
    assert [m.full_name for m in service.methods] == [
        "v1.PodResourcesLister.List",
        "v1.PodResourcesLister.GetAllocatableResources",
        "v1.PodResourcesLister.Get",
    ]


# --- DRA (k8s.io/kubelet/pkg/apis/dra/{v1,v1beta1}/api.proto) and plugin registration -------------
DRA_UPSTREAM = [
    ("NodePrepareResourcesRequest", "claims", 1, "Claim", True),
    ("NodePrepareResourcesResponse", "claims", 1, "ClaimsEntry", True),
    ("NodePrepareResourceResponse", "devices", 1, "Device", True),
    ("NodePrepareResourceResponse", "error", 2, "string", False),
    ("Device", "request_names", 1, "string", True),
    ("Device", "pool_name", 2, "string", False),
    ("Device", "device_name", 3, "string", False),
    ("Device", "cdi_device_ids", 4, "string", True),
    ("NodeUnprepareResourcesRequest", "claims", 1, "Claim", True),
    ("NodeUnprepareResourcesResponse", "claims", 1, "ClaimsEntry", True),
    ("NodeUnprepareResourceResponse", "error", 1, "string", False),
    ("Claim", "namespace", 1, "string", False),
    ("Claim", "uid", 2, "string", False),
    ("Claim", "name", 3, "string", False),
]
# from k8s.io/kubelet/pkg/apis/pluginregistration/v1/api.proto
REGISTRATION_UPSTREAM = [
    ("PluginInfo", "type", 1, "string", False),
    ("PluginInfo", "name", 2, "string", False),
    ("PluginInfo", "endpoint", 3, "string", False),
    ("PluginInfo", "supported_versions", 4, "string", True),
    ("RegistrationStatus", "plugin_registered", 1, "bool", False),
    ("RegistrationStatus", "error", 2, "string", False),
]


def test_dra_packages_and_method_paths_are_the_kubelets():
    from deviceplugin.api.dra.v1 import api_pb2 as v1
    from deviceplugin.api.dra.v1beta1 import api_pb2 as v1beta1

    for module, version in ((v1, "v1"), (v1beta1, "v1beta1")):
        assert module.DESCRIPTOR.package == f"k8s.io.kubelet.pkg.apis.dra.{version}"
        service = module.DESCRIPTOR.services_by_name["DRAPlugin"]
        # the kubelet dials /k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources
        assert [f"/{service.full_name}/{m.name}" for m in service.methods] == [
            f"/k8s.io.kubelet.pkg.apis.dra.{version}.DRAPlugin/NodePrepareResources",
            f"/k8s.io.kubelet.pkg.apis.dra.{version}.DRAPlugin/NodeUnprepareResources",
        ]
        assert_fields_match(module, DRA_UPSTREAM)
        claims = module.DESCRIPTOR.message_types_by_name["NodePrepareResourcesResponse"].fields_by_name["claims"]
        assert claims.message_type.GetOptions().map_entry  # map<string, NodePrepareResourceResponse>


def test_pluginregistration_package_and_method_paths_are_the_kubelets():
    from deviceplugin.api.pluginregistration.v1 import api_pb2 as reg

    assert reg.DESCRIPTOR.package == "pluginregistration"  # upstream: "This should have been v1."
    service = reg.DESCRIPTOR.services_by_name["Registration"]
    assert [f"/{service.full_name}/{m.name}" for m in service.methods] == [
        "/pluginregistration.Registration/GetInfo",
        "/pluginregistration.Registration/NotifyRegistrationStatus",
    ]
    assert_fields_match(reg, REGISTRATION_UPSTREAM)
