"""The overlay driver's decisions, pure: what each node programs so that tasks on different nodes
share one L2 segment over VXLAN — with static FDB and neighbour entries from the desired state,
never relying on flooding or learning (DESIGN.md §2).

Per overlay network and node: a bridge, a VXLAN device (the network's VNI, the node's underlay
address as source, learning off, ARP proxy on) as a port of it, MTU = underlay MTU - 50. For every
task of the network on another node: an FDB entry "task MAC -> that node's underlay address" and a
permanent neighbour entry "task IP -> task MAC" on the VXLAN device, so ARP is answered locally.
Task MACs are derived from their addresses (02:42 + the four address bytes, as Docker does).

    plan = build_overlay_plan("n1", {"n1": "10.99.0.1", "n2": "10.99.0.2"}, networks, endpoints)
    plan.devices["front"] -> VxlanDevice(...);  plan.fdb, plan.neigh -> sets of entries
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from ipaddress import ip_address

VXLAN_OVERHEAD = 50
VXLAN_PORT = 4789


def mac_for(address: str) -> str:
    """Docker's deterministic MAC of an IPv4 address: 02:42:a:b:c:d."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ip_address(address).packed)


def vxlan_link(network: str, vni: int) -> str:
    return "mhx" + hashlib.sha256(f"{network}/{vni}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class VxlanDevice:
    network: str
    link: str
    vni: int
    local: str                       # this node's underlay address
    mtu: int


@dataclass(frozen=True)
class OverlayPlan:
    devices: dict[str, VxlanDevice] = field(default_factory=dict)
    fdb: frozenset[tuple[str, str, str]] = frozenset()      # (vxlan link, task MAC, remote underlay)
    neigh: frozenset[tuple[str, str, str]] = frozenset()    # (vxlan link, task IP, task MAC)


def build_overlay_plan(node: str, underlay: dict[str, str], networks: dict[str, int],
                       endpoints: list[tuple[str, str, str]], underlay_mtu: int = 1500) -> OverlayPlan:
    """`networks`: overlay network -> VNI; `endpoints`: (network, node, task address) cluster-wide.

    A node programs the networks it has a task on (and only those), entries for remote tasks only.
    """
    local_nets = {net for net, where, _ in endpoints if where == node and net in networks}
    devices = {net: VxlanDevice(net, vxlan_link(net, networks[net]), networks[net], underlay[node],
                                underlay_mtu - VXLAN_OVERHEAD) for net in sorted(local_nets)}
    fdb, neigh = set(), set()
    for net, where, address in endpoints:
        if net not in devices or where == node or where not in underlay:
            continue
        link, mac = devices[net].link, mac_for(address)
        fdb.add((link, mac, underlay[where]))
        neigh.add((link, address, mac))
    return OverlayPlan(devices, frozenset(fdb), frozenset(neigh))


def diff_entries(old: frozenset, new: frozenset) -> tuple[set, set]:
    """(entries to remove, entries to write) of (link, key, value) entries: writing replaces the
    entry of its (link, key) in place, so an entry whose key stays (a task moved to another node
    keeps its MAC and address) is rewritten, never removed: write first, then remove."""
    kept = {(link, key) for link, key, _ in new}
    return {e for e in old - new if e[:2] not in kept}, set(new - old)
