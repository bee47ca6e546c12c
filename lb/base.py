"""The load-balancer Protocol every backend implements, and `--lb` selection.

    lb = make_lb("auto", NftCli())   # IPVS when the kernel has ip_vs, nftables otherwise
    lb.apply("mesh-h1-web.1", table) # make that namespace's balancer exactly `table`: one change,
                                     # computed from what this object applied last (kept in memory)
    lb.resync("mesh-h1-web.1")       # rewrite the namespace's balancer whole from that memory
    lb.forget("mesh-h1-web.1")       # remove it (and stop tracking the namespace)

A namespace that no longer exists is simply forgotten. Backends never read the kernel on the hot
path; `resync` is the periodic repair of anything changed behind mesh's back.
"""
from __future__ import annotations

import os
from typing import Protocol

from mesh.errors import MeshError
from mesh.lb.model import Table

LB_CHOICES = ("auto", "ipvs", "nftables")


class LoadBalancer(Protocol):
    name: str

    def apply(self, netns: str | None, table: Table) -> None: ...
    def resync(self, netns: str | None) -> None: ...
    def forget(self, netns: str | None) -> None: ...
    def namespaces(self) -> list[str | None]: ...


def kernel_has_ipvs() -> bool:
    """ip_vs loaded, built in, or loadable as a module of the running kernel."""
    if os.path.exists("/proc/net/ip_vs"):
        return True
    release = os.uname().release
    for base in (f"/lib/modules/{release}", f"/usr/lib/modules/{release}"):
        for name in ("modules.builtin", "modules.dep"):
            try:
                with open(os.path.join(base, name)) as f:
                    if any("/ip_vs.ko" in line for line in f):
                        return True
            except OSError:
                continue
    return False


def resolve_choice(choice: str) -> str:
    """`--lb` -> "ipvs" | "nftables", or a MeshError naming what is wrong."""
    if choice not in LB_CHOICES:
        raise MeshError(f"--lb: expected one of {', '.join(LB_CHOICES)}, got '{choice}'")
    if choice == "auto":
        return "ipvs" if kernel_has_ipvs() else "nftables"
    if choice == "ipvs" and not kernel_has_ipvs():
        raise MeshError("--lb ipvs: this kernel has no ip_vs (CONFIG_IP_VS); use --lb nftables "
                        "or --lb auto")
    return choice


def make_lb(choice: str, nft) -> LoadBalancer:
    if resolve_choice(choice) == "ipvs":
        from mesh.lb.ipvs import IpvsLb
        return IpvsLb(nft)
    from mesh.lb.nftables import NftLb
    from mesh.libnft import LibNft
    return NftLb(LibNft.or_cli(nft))
