"""The kubelet plugin registration API (generated)."""
