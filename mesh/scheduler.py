"""The manager's placement decision, pure and deterministic: which node runs each task.

    nodes = [Node("n1", "id1", role="manager", labels={"zone": "a"}), Node("n2", "id2")]
    placements = schedule(stack.services, nodes, previous={"web.1": "n2"})
    # [TaskPlacement(task="db.1", service="db", slot=1, node=None, reason="no node satisfies
    #      node.labels.zone==b (2 ready nodes: n1 zone=a, n2 no zone label)"),
    #  TaskPlacement(task="web.1", service="web", slot=1, node="n2", reason=None)]
    parse_constraint("node.labels.zone != a")   # -> ("node.labels.zone", "!=", "a")

Docker Swarm's rules:
- Replicated services run tasks `<svc>.1 … <svc>.N` (a service with `container_name` runs one task
  of that name, slot 1). A task keeps its previous node while that node is ready and still eligible,
  so scaling up never moves a task and scaling down drops the highest slots. New or displaced tasks
  go to the eligible node with the fewest tasks of the service, then the fewest tasks overall, then
  the first by name (spread).
- Global services run `<svc>.<node name>` (slot 0) on every ready node that meets the constraints.
  When no node qualifies at all, one pending row named `<svc>` says why.
- Eligibility: the node is ready; every placement constraint holds (`node.hostname`, `node.id`,
  `node.role`, `node.labels.<key>`, with == or !=, exact string comparison; a missing label equals
  nothing and differs from everything); fewer than `max_replicas_per_node` tasks of the service are
  there (None or 0 = no limit); none of the service's host-mode published (port, protocol) pairs is
  already taken there by any task of any service.
- Order of decisions, for stability: first every task that keeps its node (all services, by name,
  then slot), then new global tasks, then new replicated tasks. Output is sorted by service name,
  then slot, then task name; the same input always gives the same output.
- A task that fits nowhere has node None and a reason naming the rule and the candidate nodes. An
  invalid constraint (the spec layer rejects them first) makes the service's tasks pending too.

Node labels are stored as a sorted tuple of (key, value) pairs so that Node stays hashable; pass a
mapping or pairs, read them with `node.label(key)`.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

from mesh.model import Service

FIELDS = ("node.hostname", "node.id", "node.role")
LABEL_PREFIX = "node.labels."
OPERATORS = ("==", "!=")
_LABEL_KEY = re.compile(r"[A-Za-z0-9_.\-/]+")

Labels = tuple[tuple[str, str], ...]
Constraint = tuple[str, str, str]            # (field, operator, value)


def _freeze_labels(labels: Union[Mapping[str, str], Iterable[tuple[str, str]], None]) -> Labels:
    pairs = labels.items() if isinstance(labels, Mapping) else (labels or ())
    return tuple(sorted((str(key), str(value)) for key, value in pairs))


@dataclass(frozen=True)
class Node:
    """A cluster node as the scheduler sees it. `name` is also node.hostname."""
    name: str
    id: str
    role: str = "worker"             # "manager" | "worker"
    labels: Labels = ()              # accepts a mapping or (key, value) pairs; kept as sorted pairs
    ready: bool = True               # False: down (heartbeat lost) or drained, gets no task

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _freeze_labels(self.labels))

    def label(self, key: str) -> str | None:
        return next((value for k, value in self.labels if k == key), None)


@dataclass(frozen=True)
class TaskPlacement:
    task: str                        # "<svc>.<slot>", "<svc>.<node>" (global) or the container_name
    service: str
    slot: int                        # 1.. for replicated services, 0 for global ones
    node: str | None                 # None = pending
    reason: str | None = None        # why pending


def parse_constraint(text: str) -> Constraint:
    """'node.labels.zone != a' -> ('node.labels.zone', '!=', 'a'); ValueError on anything else."""
    if not isinstance(text, str):
        raise ValueError(f"constraint {text!r}: expected a string like 'node.role==manager'")
    found = sorted((text.find(op), op) for op in OPERATORS if op in text)
    if not found:
        raise ValueError(f"constraint {text!r}: no operator, expected == or != "
                         f"(like 'node.role==manager')")
    at, op = found[0]
    field, value = text[:at].strip(), text[at + len(op):].strip()
    label = field[len(LABEL_PREFIX):] if field.startswith(LABEL_PREFIX) else None
    if field not in FIELDS and not (label and _LABEL_KEY.fullmatch(label)):
        raise ValueError(f"constraint {text!r}: unknown field {field!r}, expected node.hostname, "
                         f"node.id, node.role or node.labels.<key>")
    if not value:
        raise ValueError(f"constraint {text!r}: no value after {op}")
    if any(other in value for other in OPERATORS):
        raise ValueError(f"constraint {text!r}: more than one operator")
    return field, op, value


def _node_value(node: Node, field: str) -> str | None:
    if field.startswith(LABEL_PREFIX):
        return node.label(field[len(LABEL_PREFIX):])
    return {"node.hostname": node.name, "node.id": node.id, "node.role": node.role}[field]


def satisfies(node: Node, constraint: Constraint) -> bool:
    field, op, value = constraint
    actual = _node_value(node, field)
    return actual == value if op == "==" else actual != value


def _text(constraint: Constraint) -> str:
    return "".join(constraint)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _port_text(port: tuple[int, str]) -> str:
    return f"{port[0]}/{port[1]}"


@dataclass(frozen=True)
class _Rules:
    """What one service asks of a node, parsed once."""
    constraints: tuple[Constraint, ...]
    limit: int | None
    ports: frozenset[tuple[int, str]]
    error: str | None = None


def _rules(svc: Service) -> _Rules:
    ports = frozenset((p.published, p.protocol) for p in svc.ports if p.mode == "host" and p.published)
    limit = svc.placement.max_replicas_per_node or None
    try:
        parsed = tuple(parse_constraint(c) for c in svc.placement.constraints)
    except ValueError as err:
        return _Rules((), limit, ports, f"invalid placement constraint: {err}")
    return _Rules(parsed, limit, ports)


def _describe(node: Node, constraints: Sequence[Constraint]) -> str:
    """'n1 role=manager zone=a': the node with the values the constraints look at."""
    parts = [node.name]
    for field in dict.fromkeys(c[0] for c in constraints):
        value = _node_value(node, field)
        if field.startswith(LABEL_PREFIX):
            key = field[len(LABEL_PREFIX):]
            parts.append(f"no {key} label" if value is None else f"{key}={value}")
        elif field != "node.hostname":
            parts.append(f"{field[len('node.'):]}={value}")
    return " ".join(parts)


class _Board:
    """Running counts while placing: tasks per node and per (service, node), host ports per node."""

    def __init__(self, nodes: Sequence[Node]):
        by_name: dict[str, Node] = {}
        for node in sorted(nodes, key=lambda n: n.name):
            by_name.setdefault(node.name, node)
        self.nodes = list(by_name.values())
        self.total: Counter = Counter()
        self.per_service: Counter = Counter()
        self.ports: dict[str, dict[tuple[int, str], str]] = {n: {} for n in by_name}

    def candidates(self, rules: _Rules) -> list[Node]:
        """Ready nodes that meet every constraint (the static part of eligibility)."""
        if rules.error:
            return []
        return [n for n in self.nodes if n.ready and all(satisfies(n, c) for c in rules.constraints)]

    def room(self, svc: Service, rules: _Rules, node: str) -> str | None:
        """Why a candidate node has no room for one more task of svc now, or None."""
        if rules.limit and self.per_service[(svc.name, node)] >= rules.limit:
            return f"max_replicas_per_node {rules.limit} reached"
        taken = sorted(p for p in rules.ports if p in self.ports[node])
        if not taken:
            return None
        if len(rules.ports) == 1:
            return f"host-mode port {_port_text(taken[0])} taken by {self.ports[node][taken[0]]}"
        held = ", ".join(f"{_port_text(p)} by {self.ports[node][p]}" for p in taken)
        return f"host-mode ports taken ({held})"

    def fits(self, svc: Service, rules: _Rules, node: str | None) -> bool:
        eligible = {n.name for n in self.candidates(rules)}
        return node in eligible and self.room(svc, rules, node) is None

    def take(self, svc: Service, rules: _Rules, node: str, task: str) -> None:
        self.total[node] += 1
        self.per_service[(svc.name, node)] += 1
        for port in rules.ports:
            self.ports[node][port] = task

    def spread(self, svc: Service, rules: _Rules) -> str | None:
        """The eligible node with the fewest tasks of svc, then fewest tasks, then first by name."""
        fit = [n.name for n in self.candidates(rules) if self.room(svc, rules, n.name) is None]
        if not fit:
            return None
        return min(fit, key=lambda n: (self.per_service[(svc.name, n)], self.total[n], n))


def _no_candidate_reason(board: _Board, rules: _Rules) -> str:
    """Why no node is even a candidate: invalid constraint, no nodes, none ready, constraints."""
    if rules.error:
        return rules.error
    if not board.nodes:
        return "no nodes in the cluster"
    ready = [n for n in board.nodes if n.ready]
    if not ready:
        names = ", ".join(n.name for n in board.nodes)
        return f"no ready node ({_count(len(board.nodes), 'node')} down or drained: {names})"
    wanted = " and ".join(_text(c) for c in rules.constraints)
    nodes = ", ".join(_describe(n, rules.constraints) for n in ready)
    return (f"no node satisfies {wanted} ({_count(len(ready), 'ready node')}: {nodes})"
            + _not_ready_note(board))


def _not_ready_note(board: _Board) -> str:
    down = [n.name for n in board.nodes if not n.ready]
    return f"; not ready: {', '.join(down)}" if down else ""


def _pending_reason(board: _Board, svc: Service, rules: _Rules) -> str:
    """Why a replicated task fits nowhere, naming the rule and every candidate node."""
    cands = board.candidates(rules)
    if not cands:
        return _no_candidate_reason(board, rules)
    why = {n.name: board.room(svc, rules, n.name) or "" for n in cands}
    excluded = [n.name for n in board.nodes if n.name not in why]
    note = f"; not eligible: {', '.join(excluded)}" if excluded else ""
    if all(w.startswith("max_replicas_per_node") for w in why.values()):
        return (f"max_replicas_per_node {rules.limit} reached on every eligible node "
                f"({', '.join(why)})" + note)
    if all(w.startswith("host-mode port") for w in why.values()) and len(rules.ports) == 1:
        port = _port_text(next(iter(rules.ports)))
        held = ", ".join(f"{n} {w.split(' taken ', 1)[1]}" for n, w in why.items())
        return f"host-mode port {port} taken on every eligible node ({held})" + note
    detail = "; ".join(f"{n}: {w}" for n, w in why.items())
    return f"no eligible node has room ({detail})" + note


def _replicated_tasks(svc: Service) -> list[tuple[str, int]]:
    count = max(0, svc.replicas)
    if svc.container_name:
        return [(svc.container_name, 1)] if count else []
    return [(f"{svc.name}.{slot}", slot) for slot in range(1, count + 1)]


def _global_tasks(board: _Board, svc: Service, rules: _Rules) -> list[tuple[str, str]]:
    """(task, node) for every candidate node of a global service."""
    return [(f"{svc.name}.{n.name}", n.name) for n in board.candidates(rules)]


def _keep(board: _Board, plan: list, previous: Mapping[str, str]) -> dict[str, TaskPlacement]:
    """Phase 1: every task whose previous node is still ready and eligible stays there."""
    kept: dict[str, TaskPlacement] = {}
    for svc, rules in plan:
        if svc.mode == "global":
            wanted = [(task, 0, node) for task, node in _global_tasks(board, svc, rules)]
        else:
            wanted = [(task, slot, None) for task, slot in _replicated_tasks(svc)]
        for task, slot, own_node in wanted:
            node = previous.get(task)
            if node is None or (own_node is not None and node != own_node):
                continue
            if board.fits(svc, rules, node):
                board.take(svc, rules, node, task)
                kept[task] = TaskPlacement(task, svc.name, slot, node)
    return kept


def _place_global(board: _Board, svc: Service, rules: _Rules,
                  done: Mapping[str, TaskPlacement]) -> list[TaskPlacement]:
    """Phase 2: a task on every candidate node that has none yet, or the reason it cannot run."""
    tasks = _global_tasks(board, svc, rules)
    if not tasks:
        return [TaskPlacement(svc.name, svc.name, 0, None, _no_candidate_reason(board, rules))]
    out = []
    for task, node in tasks:
        if task in done:
            continue
        why = board.room(svc, rules, node)
        if why is None:
            board.take(svc, rules, node, task)
            out.append(TaskPlacement(task, svc.name, 0, node))
        else:
            out.append(TaskPlacement(task, svc.name, 0, None, f"cannot run on {node}: {why}"))
    return out


def _place_replicated(board: _Board, svc: Service, rules: _Rules,
                      done: Mapping[str, TaskPlacement]) -> list[TaskPlacement]:
    """Phase 3: new or displaced replicated tasks, spread over the eligible nodes."""
    out = []
    for task, slot in _replicated_tasks(svc):
        if task in done:
            continue
        node = board.spread(svc, rules)
        if node is None:
            out.append(TaskPlacement(task, svc.name, slot, None, _pending_reason(board, svc, rules)))
        else:
            board.take(svc, rules, node, task)
            out.append(TaskPlacement(task, svc.name, slot, node))
    return out


def host_port_clashes(placed: Iterable[tuple[str, str, str]],
                      services: Mapping[str, Service]) -> set[str]:
    """The tasks of `placed` ((task, service, node) triples) that hold a host-mode published
    (port, protocol) on a node together with another task: what schedule() never places, and a
    rollout's intermediate steps must not have either (mesh.controller)."""
    holders: dict[tuple[str, int, str], list[str]] = {}
    for task, service, node in placed:
        svc = services.get(service)
        for port in _rules(svc).ports if svc is not None and node else ():
            holders.setdefault((node, *port), []).append(task)
    return {t for tasks in holders.values() if len(tasks) > 1 for t in tasks}


def schedule(services: Mapping[str, Service], nodes: Sequence[Node],
             previous: Mapping[str, str]) -> list[TaskPlacement]:
    """Every task of every service with its node (or None and the reason), sorted by service,
    slot, task. `previous` maps task name -> the node it ran on (unknown names are ignored)."""
    board = _Board(nodes)
    plan = [(svc, _rules(svc)) for _, svc in sorted(services.items())]
    done = _keep(board, plan, previous)
    out = list(done.values())
    for svc, rules in plan:
        if svc.mode == "global":
            out += _place_global(board, svc, rules, done)
    for svc, rules in plan:
        if svc.mode != "global":
            out += _place_replicated(board, svc, rules, done)
    return sorted(out, key=lambda p: (p.service, p.slot, p.task))
