"""The kubelet PodResources API (generated)."""
