"""Regenerates the gRPC/protobuf Python code from proto/ with grpcio-tools.

Kept as a module so the staleness test and developers run the exact same command.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILE = "deviceplugin/v1beta1/api.proto"
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Writes deviceplugin/v1beta1/{GENERATED} below out_dir."""
    from grpc_tools import protoc  # test/dev dependency only

    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {PROTO_FILE}")


if __name__ == "__main__":
    generate(Path(__file__).resolve().parent.parent)
    sys.exit(0)
