"""The DRA front end: the same IOMMU groups offered through Dynamic Resource Allocation (`resource.k8s.io/v1`).

Instead of serving the device-plugin API, this mode publishes one ResourceSlice pool per node, registers a
DRA kubelet plugin through the kubelet's plugin watcher, and prepares claims by writing CDI specs and
KEP-5304 device-metadata files (the PCI address KubeVirt's virt-launcher reads). Discovery, the pool and
health are the daemon's, shared with the device-plugin mode. Only `frontend`, `slices` and `kube` talk to
the API server; `kube` alone imports the client library, so `inspect` and the device-plugin mode never load it.
"""
