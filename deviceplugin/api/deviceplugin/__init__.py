"""The kubelet device-plugin API (generated)."""
