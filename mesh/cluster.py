"""A local cluster in one daemon: lab nodes (mesh.lab), one agent per node, and the placer that
asks the scheduler (mesh.scheduler) where each task runs.

    nodes = make_lab(host_netns, 3)
    placer = lab_placer(nodes)                # (stack, previous desired) -> ClusterPlacement
    Controller(agents, nl, host_netns, placer=placer, extra_routes=[UNDERLAY_NET])

Node n1 is the manager, the others are workers (node.role in placement constraints).
"""
from __future__ import annotations

from ipaddress import ip_network

from mesh.allocator import ClusterPlacement
from mesh.lab import UNDERLAY, UNDERLAY_PREFIX, LabNode
from mesh.model import Stack
from mesh.scheduler import Node, schedule
from mesh.state import DesiredState

UNDERLAY_NET = ip_network(f"{UNDERLAY}.0/{UNDERLAY_PREFIX}")


def scheduler_nodes(nodes: list[LabNode]) -> list[Node]:
    return [Node(name=n.name, id=n.name, role="manager" if i == 0 else "worker")
            for i, n in enumerate(nodes)]


def lab_placer(nodes: list[LabNode]):
    sched = scheduler_nodes(nodes)

    def place(stack: Stack, previous: DesiredState) -> ClusterPlacement:
        before = {t.name: t.node for t in previous.tasks.values() if t.node}
        placements = schedule(stack.services, sched, before)
        return ClusterPlacement(
            node_netns={n.name: n.netns for n in nodes},
            underlay={n.name: n.address for n in nodes},
            tasks=tuple((p.service, p.slot, p.task, p.node) for p in placements if p.node),
            pending=tuple((p.service, p.task, p.reason or "") for p in placements if not p.node))
    return place


def node_list(nodes: list[LabNode], desired: DesiredState) -> list[dict]:
    """`mesh node ls`: name, address (reachable from the host namespace), role, state, tasks."""
    return [{"name": s.name, "address": n.address, "role": s.role, "state": "ready",
             "tasks": len(desired.on_node(n.name))}
            for n, s in zip(nodes, scheduler_nodes(nodes))]
