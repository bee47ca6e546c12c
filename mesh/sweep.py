"""Remove what a daemon of a host namespace left behind when it could not clean up itself
(it was killed): task processes (from their pid files), sandboxes, their /etc/netns folders, mesh links and the `mesh` table of the host.

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
from mesh.paths import MADE_HOST_MARKER, Paths
from mesh.runtime import kill_leftovers

OUR_LINKS = ("mhb", "mhv", "mhm", "mhx", "mhl", "mhg")  # bridges, veths, macvlans, vxlans, lab
#                                                          links, ingress uplinks


def sweep(host_netns: str | None, nl: Netlink | None = None) -> list[str]:
    nl = nl or Netlink()
    paths = Paths.for_host(host_netns)
    nodes = sorted(os.listdir(paths.nodes)) if os.path.isdir(paths.nodes) else []
    logs = [paths.logs] + [paths.node(n).logs for n in nodes]      # the lab's nodes too
    removed = [f"process {pid}" for d in logs for pid in kill_leftovers(d)]
    prefix = names.sandbox_prefix(host_netns)
    for ns in nl.list_netns(prefix):
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
    marker = os.path.join(paths.root, MADE_HOST_MARKER)
    if host_netns and os.path.exists(marker):       # a lab made the host namespace: it goes too
        nl.delete_netns(host_netns)
        os.unlink(marker)
        removed.append(f"namespace {host_netns}")
    return removed
