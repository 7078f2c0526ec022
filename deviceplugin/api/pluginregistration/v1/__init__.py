"""Generated kubelet plugin registration API v1 (from proto/deviceplugin/api/pluginregistration/v1/api.proto).

Regenerate with `python -m deviceplugin.codegen`; tests/test_codegen.py fails when these files are stale.
"""
