"""Remove what a daemon of a host namespace left behind when it could not clean up itself
(it was killed): task processes (from their pid files), sandboxes (never those of another host
namespace whose names share the prefix: owned_namespaces), their /etc/netns folders, mesh links
and the `mesh` tables of the host.

    sweep(host_netns)   # returns what it removed; `mesh down` calls it when no daemon answers
"""
from __future__ import annotations

import os
import shutil

from mesh import names
from mesh.agent import ETC_NETNS
from mesh.hostrules import render_delete_table
from mesh.lb.dsr import TABLE as DSR_TABLE, render_delete as render_dsr_delete
from mesh.netlink import Netlink
from mesh.nft import NftCli
from mesh.paths import Paths
from mesh.runtime import kill_leftovers

OUR_LINKS = ("mhb", "mhv", "mhm", "mhx", "mhl", "mhg")  # bridges, veths, macvlans, vxlans, lab
#                                                          links, ingress uplinks


def owned_namespaces(existing: list[str], host_netns: str | None, lab_nodes: list[str],
                     other_hosts: frozenset[str] = frozenset(),
                     host_like: frozenset[str] | None = None) -> list[str]:
    """The namespaces of `existing` that a daemon of `host_netns` made (pure). Names alone are
    ambiguous: the root's prefix `mesh-` (or `mesh-x-` of host `mesh-x`) also starts every name of
    another host namespace (`mesh-x-y`, `mesh-lab1-…` of host `lab1`) and of its sandboxes. Those
    are left: a name belongs to the host namespace with the longest sandbox prefix it starts with
    (this host, one of its lab nodes, or another), and a namespace with sandboxes or a run
    directory of its own (`other_hosts`) is another host namespace. `existing`: every namespace of
    the machine; `host_like`: those holding links a host has (mesh bridges...), to tell a host
    from a sandbox whose name starts another's (containers `db` and `db-backup`; None: all)."""
    prefix = names.sandbox_prefix(host_netns)
    under = names.sandbox_prefix                       # the names of the sandboxes of a namespace
    hosts = set(existing if host_like is None else host_like) | set(lab_nodes) | {host_netns}
    out = []
    for n in [n for n in existing if n.startswith(prefix) and n != host_netns]:
        # whose sandbox the name says it is: the host namespace with the longest such prefix
        owner = max((h for h in existing if h != n and h in hosts and n.startswith(under(h))),
                    key=lambda h: len(under(h)), default=host_netns)
        if n in lab_nodes or owner in lab_nodes:
            out.append(n)
        elif owner != host_netns:
            continue                          # a sandbox of another host namespace
        elif n in other_hosts or n in hosts and any(m.startswith(under(n)) for m in existing):
            continue                          # another host namespace (a run dir, sandboxes)
        else:
            out.append(n)
    return out


def sweep(host_netns: str | None, nl: Netlink | None = None) -> list[str]:
    nl = nl or Netlink()
    paths = Paths.for_host(host_netns)
    nodes = sorted(os.listdir(paths.nodes)) if os.path.isdir(paths.nodes) else []
    logs = [paths.logs] + [paths.node(n).logs for n in nodes]      # the lab's nodes too
    removed = [f"process {pid}" for d in logs for pid in kill_leftovers(d)]
    lab = [names.sandbox_netns(host_netns, n) for n in nodes]
    base = os.path.dirname(paths.root)
    others = frozenset(d for d in os.listdir(base) if d != names.scope_of(host_netns)) \
        if os.path.isdir(base) else frozenset()
    existing = nl.list_netns("")
    parents = [n for n in existing if any(m.startswith(names.sandbox_prefix(n)) for m in existing)]
    host_like = frozenset(n for n in parents
                          if any(l.startswith(OUR_LINKS) for l in nl.list_links(n, "")))
    for ns in owned_namespaces(existing, host_netns, lab, others, host_like):
        if ns != host_netns:
            nl.delete_netns(ns)
            shutil.rmtree(os.path.join(ETC_NETNS, ns), ignore_errors=True)
            removed.append(f"namespace {ns}")
    if host_netns and not nl.netns_exists(host_netns):
        return removed
    for link in [l for l in nl.list_links(host_netns) if l.startswith(OUR_LINKS)]:
        nl.delete_link(host_netns, link)
        removed.append(f"link {link}")
    nft = NftCli()
    if nft.list_table(host_netns, "ip", "mesh") is not None:
        nft.apply(host_netns, render_delete_table())
        removed.append("nftables table ip mesh")
    if nft.list_table(host_netns, "netdev", DSR_TABLE) is not None:
        nft.apply(host_netns, render_dsr_delete())
        removed.append(f"nftables table netdev {DSR_TABLE}")
    marker = paths.made_host_marker
    if host_netns and os.path.exists(marker):       # a lab made the host namespace: it goes too
        nl.delete_netns(host_netns)
        os.unlink(marker)
        removed.append(f"namespace {host_netns}")
    return removed
