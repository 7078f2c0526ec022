"""Small file operations shared by the front ends: atomic writes, and the socket files they own.

CDI specs, metadata files and the checkpoint are written to a temporary file in the same directory and
renamed into place, so a reader (containerd's CDI cache, a restarted plugin) never sees half a file. A
socket's inode tells whether the file at its path is still the one we created (a restarting kubelet
deletes and recreates the files in its directories).
"""

from __future__ import annotations

import json
import os
from typing import Any


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    import tempfile  # only the writers need it, not `inspect` reading the checkpoint

    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: str, doc: Any, mode: int = 0o644) -> None:
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode)


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
