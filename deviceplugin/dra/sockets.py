"""A gRPC server on a unix socket that notices when its socket file is deleted or replaced.

Both DRA sockets (the registration socket the kubelet's plugin watcher finds, and dra.sock it dials for
NodePrepareResources) are served this way. A stale socket left by an earlier instance is replaced on
start; on stop the socket is removed only if it is still ours.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent import futures

import grpc

from deviceplugin.files import inode, remove


class UnixServer:
    def __init__(self, path: str, register: Callable[[grpc.Server], None], name: str, workers: int = 4) -> None:
        self.path = path
        self.register = register
        self.name = name
        self.workers = workers
        self._server: grpc.Server | None = None
        self._inode: int | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        remove(self.path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=self.name))
        self.register(server)
        server.add_insecure_port(f"unix://{self.path}")
        server.start()
        self._server = server
        self._inode = inode(self.path)

    @property
    def serving(self) -> bool:
        return self._server is not None

    def alive(self) -> bool:
        """False once someone deleted or replaced our socket file."""
        return self._inode is not None and inode(self.path) == self._inode

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=0.5).wait(2.0)
        if self._inode is not None and inode(self.path) == self._inode:
            remove(self.path)
        self._inode = None
