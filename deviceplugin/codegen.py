"""Regenerates the gRPC/protobuf Python code from proto/ with grpcio-tools.

Kept as a module so the staleness test and developers run the exact same command. Each proto lives
at proto/deviceplugin/api/<api>/<version>/api.proto and its code at deviceplugin/api/<api>/<version>/.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILES = (
    "deviceplugin/api/deviceplugin/v1beta1/api.proto",
    "deviceplugin/api/podresources/v1/api.proto",
    "deviceplugin/api/dra/v1/api.proto",
    "deviceplugin/api/dra/v1beta1/api.proto",
    "deviceplugin/api/pluginregistration/v1/api.proto",
)
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")


def generated_dir(proto: str) -> str:
    """The package directory (relative to the output root) that holds a proto's generated code."""
    return str(Path(proto).parent)


def generate(out_dir: Path) -> None:
    """Writes <generated_dir>/{GENERATED} below out_dir for every proto."""
    from grpc_tools import protoc  # test/dev dependency only

    for proto in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {proto}")


if __name__ == "__main__":
    generate(Path(__file__).resolve().parent.parent)
    sys.exit(0)
