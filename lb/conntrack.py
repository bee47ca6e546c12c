"""Conntrack cleanup when a UDP backend leaves a balancer: its entries are deleted, so the next
datagram of a "connection" is balanced again instead of going to a task that is gone (the stale UDP
flow Docker and kube-proxy users hit). Through conntrack netlink (pyroute2), inside the namespace.

    flush_udp_to("mesh-h1-n1-ingress", ["10.0.9.4"])   # -> number of entries deleted
"""
from __future__ import annotations

import contextlib
import socket

from pyroute2 import Conntrack

from mesh import netns as ns
from mesh.lb.model import Table


def removed_udp_backends(old: Table, new: Table) -> set[str]:
    """Addresses that were UDP backends of `old` and take no new flows in `new` (pure)."""
    def udp(table: Table, active: bool) -> set[str]:
        return {b.address for s in table.values() if s.protocol == "udp"
                for b in (s.active if active else s.backends)}
    return udp(old, False) - udp(new, True)


def flush_udp_to(netns: str | None, addresses) -> int:
    """Delete the UDP entries whose reply comes from one of `addresses` (worker thread: it stays
    in the namespace meanwhile; pyroute2 binds its socket at first use)."""
    if not addresses:
        return 0
    wanted = set(addresses)
    deleted = 0
    with ns.entered(netns) if netns else contextlib.nullcontext():
        ct = Conntrack()
        try:
            for entry in list(ct.dump_entries()):
                reply = entry.tuple_reply
                if reply.proto != socket.IPPROTO_UDP or reply.saddr not in wanted:
                    continue
                try:
                    ct.delete(entry)
                    deleted += 1
                except Exception:
                    pass          # it expired meanwhile
        finally:
            ct.close()
    return deleted
