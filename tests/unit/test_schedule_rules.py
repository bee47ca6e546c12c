"""Placement, pure: spread, stability, scale down, global, constraints, limits, host ports, node death."""
from mesh.model import Placement, Port, Service
from mesh.scheduler import Node, schedule

NODES = [Node("n1", "id1", "manager", {"zone": "a"}), Node("n2", "id2", labels={"zone": "b"}),
         Node("n3", "id3")]


def where(placements):
    return {p.task: p.node for p in placements}


def test_spread_and_stability_and_scale_down():
    first = where(schedule({"web": Service("web", replicas=6)}, NODES, {}))
    assert sorted(first.values()) == ["n1", "n1", "n2", "n2", "n3", "n3"]
    more = where(schedule({"web": Service("web", replicas=8)}, NODES, first))
    assert all(more[t] == n for t, n in first.items())
    fewer = where(schedule({"web": Service("web", replicas=2)}, NODES, more))
    assert set(fewer) == {"web.1", "web.2"} and fewer["web.1"] == first["web.1"]


def test_global_follows_nodes_and_constraints():
    svc = {"agent": Service("agent", mode="global", placement=Placement(("node.role!=manager",)))}
    assert where(schedule(svc, NODES, {})) == {"agent.n2": "n2", "agent.n3": "n3"}
    down = [NODES[0], Node("n2", "id2", ready=False), NODES[2], Node("n4", "id4")]
    assert where(schedule(svc, down, {})) == {"agent.n3": "n3", "agent.n4": "n4"}


def test_labels_missing_label_and_pending_reason():
    svc = {"db": Service("db", replicas=2, placement=Placement(("node.labels.zone==b",)))}
    assert set(where(schedule(svc, NODES, {})).values()) == {"n2"}
    other = {"x": Service("x", placement=Placement(("node.labels.zone!=a",)))}
    assert where(schedule(other, NODES, {}))["x.1"] in ("n2", "n3")   # n3 has no zone: != a holds
    nowhere = schedule({"y": Service("y", placement=Placement(("node.hostname==mars",)))}, NODES, {})
    assert nowhere[0].node is None and "node.hostname==mars" in nowhere[0].reason


def test_max_replicas_per_node_and_host_ports():
    capped = schedule({"c": Service("c", replicas=4, placement=Placement(max_replicas_per_node=1))},
                      NODES, {})
    assert sum(p.node is None for p in capped) == 1
    assert "max_replicas_per_node 1 reached" in [p for p in capped if p.node is None][0].reason
    ports = {"a": Service("a", replicas=2, ports=(Port(80, 8080, mode="host"),)),
             "b": Service("b", replicas=2, ports=(Port(81, 8080, mode="host"),))}
    placed = schedule(ports, NODES, {})
    used = [p.node for p in placed if p.node]
    assert len(used) == 3 and len(set(used)) == 3
    assert "host-mode port 8080/tcp taken" in [p for p in placed if p.node is None][0].reason


def test_node_death_moves_only_its_tasks_and_is_deterministic():
    svc = {"web": Service("web", replicas=3)}
    first = where(schedule(svc, NODES, {}))
    dead = [NODES[0], Node("n2", "id2", ready=False), NODES[2]]
    after = schedule(svc, dead, first)
    moved = {p.task: p.node for p in after}
    assert all(moved[t] == n for t, n in first.items() if n != "n2")
    assert "n2" not in moved.values() and None not in moved.values()
    assert after == schedule(svc, dead, first)
