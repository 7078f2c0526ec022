"""Generated kubelet device-plugin API v1beta1 (from proto/deviceplugin/api/deviceplugin/v1beta1/api.proto).

Regenerate with `python -m deviceplugin.codegen`; tests/test_codegen.py fails when these files are stale.
"""
