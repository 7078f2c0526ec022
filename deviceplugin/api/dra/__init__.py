"""The kubelet DRA plugin API (generated)."""
