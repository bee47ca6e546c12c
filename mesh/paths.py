"""Where a daemon keeps its socket, logs and pid, per host namespace (pure).

    /run/mesh/<scope>/api.sock, daemon.log, daemon.pid, logs/<task>.log
    /run/mesh/<scope>/nodes/<node>/applied.json, logs/<task>.log   (the lab's nodes: mesh.cluster)
`scope` is the host namespace's name, or `root`. MESH_RUN_DIR overrides /run/mesh.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from mesh.names import scope_of

MADE_HOST_MARKER = "made-host-netns"    # in a run dir: the daemon made the host namespace (mesh.cluster, a single host's agent)


@dataclass(frozen=True)
class Paths:
    root: str

    @classmethod
    def for_host(cls, host_netns: str | None) -> "Paths":
        base = os.environ.get("MESH_RUN_DIR", "/run/mesh")
        return cls(os.path.join(base, scope_of(host_netns)))

    @property
    def made_host_marker(self) -> str:
        """Its presence says the daemon made the host namespace (MADE_HOST_MARKER)."""
        return os.path.join(self.root, MADE_HOST_MARKER)

    @property
    def socket(self) -> str:
        return os.path.join(self.root, "api.sock")

    @property
    def daemon_log(self) -> str:
        return os.path.join(self.root, "daemon.log")

    @property
    def pid_file(self) -> str:
        return os.path.join(self.root, "daemon.pid")

    @property
    def logs(self) -> str:
        return os.path.join(self.root, "logs")

    @property
    def nodes(self) -> str:
        """The lab's nodes (mesh.cluster), each with the files of a run dir of its own."""
        return os.path.join(self.root, "nodes")

    def node(self, name: str) -> "Paths":
        return Paths(os.path.join(self.nodes, name))
