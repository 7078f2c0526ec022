"""Generated kubelet DRA plugin API v1beta1 (from proto/deviceplugin/api/dra/v1beta1/api.proto).

Regenerate with `python -m deviceplugin.codegen`; tests/test_codegen.py fails when these files are stale.
"""
