"""What a kernel load balancer holds in one network namespace: pure data, standard library only.

A namespace's balancer is a dict of VirtualService by `key`. mesh.lb.plan builds them from the
cluster's desired state; a backend (mesh.lb.nftables, mesh.lb.ipvs) makes the kernel match them.

    VirtualService("10.0.1.2", "tcp", None, (Backend("10.0.1.5"), Backend("10.0.1.6")))
        a service VIP: every tcp port of 10.0.1.2, balanced to the same port of either task
    VirtualService("169.254.97.2", "tcp", 8080, (Backend("10.255.0.5", 80),), masquerade=True)
        a published port in an ingress namespace: 8080 -> port 80 of the task, source NAT'd
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

PROTOCOLS = ("tcp", "udp")


@dataclass(frozen=True)
class Backend:
    address: str
    port: int | None = None          # None: the port the client asked for (a VIP forwards every port)
    weight: int = 1                  # 0: draining: no new connections, established ones go on


@dataclass(frozen=True)
class VirtualService:
    address: str                     # the VIP, or the ingress namespace's address for a published port
    protocol: str                    # "tcp" | "udp"
    port: int | None                 # None: every port of `address` (a service VIP)
    backends: tuple[Backend, ...] = ()
    affinity: bool = False           # the same client address always reaches the same backend
    masquerade: bool = False         # source NAT to the namespace's own address (ingress without
    #                                  client-IP preservation)
    scheduler: str = "rr"            # IPVS scheduler; nftables picks uniformly at random (or jhash)

    @property
    def key(self) -> str:
        return f"{self.address}/{self.protocol}/{self.port if self.port is not None else 'any'}"

    @property
    def active(self) -> tuple[Backend, ...]:
        """The backends that take new connections."""
        return tuple(b for b in self.backends if b.weight > 0)


Table = dict[str, VirtualService]    # one namespace's balancer, by VirtualService.key


def table_of(services) -> Table:
    return {s.key: s for s in services}


def seed_of(key: str) -> int:
    """A fixed hash seed for `key` (a service, a published port): the same on every node and every
    rewrite of the rules, so client-address affinity survives changes."""
    return int.from_bytes(hashlib.blake2s(key.encode(), digest_size=4).digest(), "big")
