"""The manager's placement decision, pure and deterministic: which node runs each task.

    placements = schedule(services, nodes, previous={"web.1": "n2", ...})
    [TaskPlacement(task="web.1", service="web", slot=1, node="n2", reason=None), ...]

Docker Swarm's rules: replicated tasks `<svc>.<slot>` (or container_name) keep their node while it
is ready and still eligible, new ones go to the eligible node with the fewest tasks of the service,
then the fewest tasks, then by name (spread); scaling down drops the highest slots. Global services
run `<svc>.<node>` on every eligible ready node. Placement constraints (`node.hostname`, `node.id`,
`node.role`, `node.labels.<key>` with == and !=; a missing label equals nothing),
`max_replicas_per_node`, and host-mode published ports (never twice on one node) decide
eligibility. A task that fits nowhere stays pending with the reason.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from mesh.model import Service

_CONSTRAINT = re.compile(r"\s*node\.(hostname|id|role|labels\.[A-Za-z0-9_.-]+)\s*(==|!=)\s*(\S.*?)\s*")


@dataclass(frozen=True)
class Node:
    name: str
    id: str
    role: str = "worker"             # "manager" | "worker"
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True               # False: down or drained, gets no task


@dataclass(frozen=True)
class TaskPlacement:
    task: str
    service: str
    slot: int                        # 1.. for replicated services, 0 for global ones
    node: str | None                 # None = pending
    reason: str | None = None


def parse_constraint(text: str) -> tuple[str, str, str]:
    match = _CONSTRAINT.fullmatch(text)
    if not match:
        raise ValueError(f"constraint {text!r}: expected node.hostname|node.id|node.role|"
                         f"node.labels.KEY followed by == or != and a value")
    return match.group(1), match.group(2), match.group(3)


def _node_value(node: Node, key: str) -> str | None:
    if key.startswith("labels."):
        return node.labels.get(key[len("labels."):])
    return {"hostname": node.name, "id": node.id, "role": node.role}[key]


def _satisfies(node: Node, constraint: str) -> bool:
    key, op, value = parse_constraint(constraint)
    actual = _node_value(node, key)
    return (actual == value) if op == "==" else (actual != value)


def _host_ports(svc: Service) -> set[tuple[int, str]]:
    return {(p.published, p.protocol) for p in svc.ports if p.mode == "host" and p.published}


class _Board:
    """Running counts while placing: tasks per node, per (service, node), host ports per node."""

    def __init__(self, nodes: Sequence[Node]):
        self.nodes = [n for n in sorted(nodes, key=lambda n: n.name)]
        self.total: Counter = Counter()
        self.per_service: Counter = Counter()
        self.ports: dict[str, set] = {n.name: set() for n in self.nodes}

    def blockers(self, svc: Service, node: Node) -> str | None:
        if not node.ready:
            return "not ready"
        failed = [c for c in svc.placement.constraints if not _satisfies(node, c)]
        if failed:
            return "constraint " + ", ".join(c.replace(" ", "") for c in failed)
        limit = svc.placement.max_replicas_per_node
        if limit and self.per_service[(svc.name, node.name)] >= limit:
            return f"max_replicas_per_node {limit} reached"
        taken = _host_ports(svc) & self.ports[node.name]
        if taken:
            return "host-mode port " + ", ".join(f"{p}/{proto}" for p, proto in sorted(taken)) + " taken"
        return None

    def take(self, svc: Service, node: str) -> None:
        self.total[node] += 1
        self.per_service[(svc.name, node)] += 1
        self.ports[node] |= _host_ports(svc)

    def best(self, svc: Service) -> tuple[str | None, str | None]:
        fit = [n for n in self.nodes if self.blockers(svc, n) is None]
        if not fit:
            why = "; ".join(f"{n.name}: {self.blockers(svc, n)}" for n in self.nodes)
            return None, f"no node can run it ({why or 'no nodes'})"
        pick = min(fit, key=lambda n: (self.per_service[(svc.name, n.name)], self.total[n.name], n.name))
        return pick.name, None


def _task_names(svc: Service) -> list[tuple[str, int]]:
    if svc.container_name:
        return [(svc.container_name, 1)] if svc.replicas else []
    return [(f"{svc.name}.{slot}", slot) for slot in range(1, svc.replicas + 1)]


def _keep(board: _Board, svc: Service, previous: Mapping[str, str], task: str) -> str | None:
    node = next((n for n in board.nodes if n.name == previous.get(task)), None)
    return node.name if node and board.blockers(svc, node) is None else None


def schedule(services: Mapping[str, Service], nodes: Sequence[Node],
             previous: Mapping[str, str]) -> list[TaskPlacement]:
    board = _Board(nodes)
    out: list[TaskPlacement] = []
    replicated = [s for _, s in sorted(services.items()) if s.mode != "global"]
    for svc in sorted(services.values(), key=lambda s: s.name):
        if svc.mode == "global":
            out += _place_global(board, svc)
    for svc in replicated:                      # first every task that keeps its node...
        for task, slot in _task_names(svc):
            kept = _keep(board, svc, previous, task)
            if kept:
                board.take(svc, kept)
                out.append(TaskPlacement(task, svc.name, slot, kept))
    placed = {p.task for p in out}
    for svc in replicated:                      # ...then the new or displaced ones, spread
        for task, slot in _task_names(svc):
            if task in placed:
                continue
            node, reason = board.best(svc)
            if node:
                board.take(svc, node)
            out.append(TaskPlacement(task, svc.name, slot, node, reason))
    return sorted(out, key=lambda p: (p.service, p.slot, p.task))


def _place_global(board: _Board, svc: Service) -> list[TaskPlacement]:
    out = []
    for node in board.nodes:
        if not node.ready:
            continue
        why = board.blockers(svc, node)
        if why is None:
            board.take(svc, node.name)
            out.append(TaskPlacement(f"{svc.name}.{node.name}", svc.name, 0, node.name))
        elif not why.startswith("constraint"):
            out.append(TaskPlacement(f"{svc.name}.{node.name}", svc.name, 0, None,
                                     f"cannot run on {node.name}: {why}"))
    if not out and svc.placement.constraints:
        out.append(TaskPlacement(f"{svc.name}", svc.name, 0, None,
                                 "no node satisfies " + ", ".join(svc.placement.constraints)))
    return out
