"""A local multi-node lab: N node namespaces joined by an underlay bridge that lives in the host
namespace, so the host reaches every node's address (for `curl`) without forwarding or NAT in it.

    nodes = make_lab("mesh-h1", 3)      # [LabNode("n1", "mesh-h1-n1", "10.97.0.1"), ...]
    remove_lab("mesh-h1", nodes)

Node namespaces are `<host>-n<i>` (names.sandbox_netns), the underlay bridge is `mhlab` in the host
namespace with the address 10.97.0.254/24, node i has 10.97.0.i on its `eth0`. Each node is what an
agent on a real host would call its host namespace: it enables forwarding inside itself only.
"""
from __future__ import annotations

from dataclasses import dataclass

from mesh import names
from mesh.netlink import Netlink

UNDERLAY = "10.97.0"
UNDERLAY_PREFIX = 24
HOST_ADDRESS = f"{UNDERLAY}.254"
BRIDGE = "mhlab"
MAX_NODES = 250


@dataclass(frozen=True)
class LabNode:
    name: str                        # n1, n2, ...
    netns: str                       # the node's namespace: its agent's host namespace
    address: str                     # its underlay address, reachable from the host namespace


def lab_nodes(host_netns: str | None, count: int) -> list[LabNode]:
    if not 1 <= count <= MAX_NODES:
        raise ValueError(f"--nodes: expected 1 to {MAX_NODES} nodes, got {count}")
    return [LabNode(f"n{i}", names.sandbox_netns(host_netns, f"n{i}"), f"{UNDERLAY}.{i}")
            for i in range(1, count + 1)]


def make_lab(host_netns: str | None, count: int, nl: Netlink | None = None) -> list[LabNode]:
    nl = nl or Netlink()
    nodes = lab_nodes(host_netns, count)
    if host_netns:
        nl.ensure_netns(host_netns)
    nl.add_bridge(host_netns, BRIDGE, HOST_ADDRESS, UNDERLAY_PREFIX)
    for i, node in enumerate(nodes, start=1):
        nl.ensure_netns(node.netns)
        nl.add_veth_endpoint(host_netns, BRIDGE, f"mhl{i}",
                             node.netns, "eth0", node.address, UNDERLAY_PREFIX, None)
        nl.sysctl(node.netns, "net.ipv4.ip_forward", "1")
    nl.pin_mac(host_netns, BRIDGE)
    return nodes


def remove_lab(host_netns: str | None, nodes: list[LabNode], nl: Netlink | None = None) -> None:
    nl = nl or Netlink()
    for node in nodes:
        nl.delete_netns(node.netns)
    if not host_netns or nl.netns_exists(host_netns):    # else the bridge went with it
        nl.delete_link(host_netns, BRIDGE)
