"""mesh.scheduler, pure: spread, stability, scaling, global services, constraints, limits, host ports,
node death, pending reasons, determinism, container_name."""
import random

import pytest

from mesh.model import Placement, Port, Service
from mesh.scheduler import Node, TaskPlacement, host_port_clashes, parse_constraint, schedule

N1 = Node("n1", "id1", "manager", {"zone": "a"})
N2 = Node("n2", "id2", labels={"zone": "b", "disk": "ssd"})
N3 = Node("n3", "id3")                               # no labels at all
NODES = [N1, N2, N3]


def where(placements):
    return {p.task: p.node for p in placements}


def per_node(placements):
    counts = {}
    for p in placements:
        counts[p.node] = counts.get(p.node, 0) + 1
    return counts


def one(svc, nodes=NODES, previous=None):
    return schedule({svc.name: svc}, nodes, previous or {})


def down(node):
    return Node(node.name, node.id, node.role, node.labels, ready=False)


def pending(placements):
    return [p for p in placements if p.node is None]


# --- spread --------------------------------------------------------------------------------------

def test_six_replicas_spread_two_per_node_in_name_order():
    placed = one(Service("web", replicas=6))
    assert [p.task for p in placed] == [f"web.{i}" for i in range(1, 7)]
    assert [p.node for p in placed] == ["n1", "n2", "n3", "n1", "n2", "n3"]
    assert all(p.slot == i and p.service == "web" and p.reason is None
               for i, p in enumerate(placed, 1))


def test_spread_ties_broken_by_fewest_tasks_overall():
    placed = where(schedule({"a": Service("a", replicas=1), "b": Service("b", replicas=2)},
                            NODES, {}))
    assert placed == {"a.1": "n1", "b.1": "n2", "b.2": "n3"}


def test_spread_prefers_fewest_of_the_service_over_fewest_overall():
    svcs = {"a": Service("a", replicas=3), "b": Service("b", replicas=2)}
    previous = {"a.1": "n1", "a.2": "n1", "a.3": "n1", "b.1": "n2"}
    placed = where(schedule(svcs, [N1, N2], previous))
    assert placed["b.2"] == "n1"                      # n1: 0 of b (3 overall); n2: 1 of b (1 overall)


def test_spread_counts_for_new_tasks():
    svcs = {"a": Service("a", replicas=2), "b": Service("b", replicas=2)}
    previous = {"a.1": "n3", "a.2": "n3", "b.1": "n3"}
    placed = where(schedule(svcs, NODES, previous))
    assert placed["b.2"] == "n1"                      # fewest b (0), fewest total (0), first name


def test_output_is_sorted_by_service_then_numeric_slot():
    placed = schedule({"z": Service("z", replicas=1), "a": Service("a", replicas=11)}, NODES, {})
    assert [p.task for p in placed] == [f"a.{i}" for i in range(1, 12)] + ["z.1"]


# --- scaling -------------------------------------------------------------------------------------

def test_scale_up_keeps_every_existing_placement():
    previous = {"web.1": "n3", "web.2": "n3", "web.3": "n1"}   # deliberately lopsided
    placed = where(one(Service("web", replicas=6), previous=previous))
    assert all(placed[t] == n for t, n in previous.items())
    assert sorted(placed[t] for t in ("web.4", "web.5", "web.6")) == ["n1", "n2", "n2"]


def test_scale_down_drops_the_highest_slots_and_moves_nothing():
    first = where(one(Service("web", replicas=6)))
    fewer = where(one(Service("web", replicas=2), previous=first))
    assert fewer == {"web.1": first["web.1"], "web.2": first["web.2"]}
    assert one(Service("web", replicas=0), previous=first) == []


def test_previous_tasks_of_other_or_removed_services_are_ignored():
    placed = where(one(Service("web", replicas=2), previous={"old.1": "n1", "old.2": "n2"}))
    assert placed == {"web.1": "n1", "web.2": "n2"}


# --- global services -----------------------------------------------------------------------------

def test_global_runs_one_task_per_ready_node():
    placed = one(Service("agent", mode="global", replicas=5))
    assert [(p.task, p.slot, p.node) for p in placed] == [
        ("agent.n1", 0, "n1"), ("agent.n2", 0, "n2"), ("agent.n3", 0, "n3")]


def test_global_follows_nodes_joining_and_leaving():
    svc = Service("agent", mode="global")
    before = where(one(svc))
    n4 = Node("n4", "id4")
    joined = where(one(svc, [N1, N2, N3, n4], before))
    assert joined == {**before, "agent.n4": "n4"}
    left = where(one(svc, [N1, down(N2), n4], joined))     # n2 down, n3 gone
    assert left == {"agent.n1": "n1", "agent.n4": "n4"}


def test_global_honours_constraints():
    svc = Service("agent", mode="global", placement=Placement(("node.role!=manager",)))
    assert where(one(svc)) == {"agent.n2": "n2", "agent.n3": "n3"}
    ssd = Service("cache", mode="global", placement=Placement(("node.labels.disk==ssd",)))
    assert where(one(ssd)) == {"cache.n2": "n2"}


def test_global_with_no_eligible_node_shows_one_pending_row():
    svc = Service("agent", mode="global", placement=Placement(("node.labels.gpu==yes",)))
    assert one(svc) == [TaskPlacement(
        "agent", "agent", 0, None,
        "no node satisfies node.labels.gpu==yes (3 ready nodes: n1 no gpu label, n2 no gpu label, "
        "n3 no gpu label)")]


def test_global_task_blocked_by_a_host_port_on_one_node():
    svcs = {"edge": Service("edge", mode="global", ports=(Port(80, 80, mode="host"),)),
            "web": Service("web", ports=(Port(8000, 80, mode="host"),))}
    placed = schedule(svcs, NODES, {"web.1": "n2"})
    assert where(placed) == {"edge.n1": "n1", "edge.n2": None, "edge.n3": "n3", "web.1": "n2"}
    assert pending(placed)[0].reason == "cannot run on n2: host-mode port 80/tcp taken by web.1"


# --- constraints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("constraint, allowed", [
    ("node.hostname==n2", {"n2"}),
    ("node.hostname!=n2", {"n1", "n3"}),
    ("node.id==id3", {"n3"}),
    ("node.id!=id3", {"n1", "n2"}),
    ("node.role==manager", {"n1"}),
    ("node.role==worker", {"n2", "n3"}),
    ("node.role!=manager", {"n2", "n3"}),
    ("node.labels.zone==a", {"n1"}),
    ("node.labels.zone!=a", {"n2", "n3"}),            # n3 has no zone label: != holds
    ("node.labels.disk==ssd", {"n2"}),
    ("node.labels.disk!=ssd", {"n1", "n3"}),
    ("node.labels.zone==", None),                     # invalid: no value
    ("node.labels.zone == b", {"n2"}),                # spaces around the operator
    ("  node.role  !=  manager  ", {"n2", "n3"}),
    ("node.labels.zone==A", set()),                   # exact comparison, case included
])
def test_constraint_decides_which_nodes_get_tasks(constraint, allowed):
    placed = one(Service("s", replicas=6, placement=Placement((constraint,))))
    if allowed is None:
        assert all(p.node is None and "invalid placement constraint" in p.reason for p in placed)
        return
    assert {p.node for p in placed if p.node} == allowed
    assert bool(pending(placed)) == (not allowed)


def test_missing_label_never_equals_anything_and_differs_from_everything():
    nodes = [Node("x", "idx"), Node("y", "idy", labels={"rack": ""}),
             Node("z", "idz", labels={"rack": "r1"})]
    assert set(where(one(Service("s", replicas=3, placement=Placement(("node.labels.rack!=r1",))),
                         nodes)).values()) == {"x", "y"}
    assert set(where(one(Service("s", replicas=3, placement=Placement(("node.labels.rack==r1",))),
                         nodes)).values()) == {"z"}
    nowhere = one(Service("s", placement=Placement(("node.labels.rack==r2",))), nodes[:1])
    assert nowhere[0].reason == "no node satisfies node.labels.rack==r2 (1 ready node: x no rack label)"


def test_several_constraints_must_all_hold():
    svc = Service("s", replicas=3, placement=Placement(("node.role==worker", "node.labels.zone!=b")))
    assert set(where(one(svc)).values()) == {"n3"}


def test_task_moves_when_its_node_no_longer_meets_the_constraints():
    svc = Service("db", replicas=1, placement=Placement(("node.labels.zone==b",)))
    relabeled = [N1, Node("n2", "id2", labels={"zone": "c"}), Node("n3", "id3", labels={"zone": "b"})]
    assert where(one(svc, relabeled, {"db.1": "n2"})) == {"db.1": "n3"}


@pytest.mark.parametrize("text, parsed", [
    ("node.role==manager", ("node.role", "==", "manager")),
    ("node.hostname != n1", ("node.hostname", "!=", "n1")),
    ("node.id==abc123", ("node.id", "==", "abc123")),
    (" node.labels.zone==eu-west-1 ", ("node.labels.zone", "==", "eu-west-1")),
    ("node.labels.com.example.tier!=db", ("node.labels.com.example.tier", "!=", "db")),
])
def test_parse_constraint(text, parsed):
    assert parse_constraint(text) == parsed


@pytest.mark.parametrize("text, message", [
    ("node.role=manager", "no operator"),
    ("node.role", "no operator"),
    ("node.platform.os==linux", "unknown field 'node.platform.os'"),
    ("engine.labels.x==y", "unknown field"),
    ("node.labels.==x", "unknown field 'node.labels.'"),
    ("==manager", "unknown field ''"),
    ("node.role==", "no value after =="),
    ("node.role==a==b", "more than one operator"),
    ("node.role!=a!=b", "more than one operator"),
])
def test_parse_constraint_rejects_bad_input_clearly(text, message):
    with pytest.raises(ValueError, match="constraint .*" + message.replace(".", r"\.")):
        parse_constraint(text)


def test_parse_constraint_rejects_a_non_string():
    with pytest.raises(ValueError, match="expected a string"):
        parse_constraint(None)


# --- max_replicas_per_node -----------------------------------------------------------------------

def test_max_replicas_per_node_leaves_the_rest_pending_with_the_reason():
    placed = one(Service("c", replicas=4, placement=Placement(max_replicas_per_node=1)))
    assert where(placed) == {"c.1": "n1", "c.2": "n2", "c.3": "n3", "c.4": None}
    assert pending(placed)[0].reason == \
        "max_replicas_per_node 1 reached on every eligible node (n1, n2, n3)"


def test_max_replicas_per_node_with_room_places_everything():
    placed = one(Service("c", replicas=6, placement=Placement(max_replicas_per_node=2)))
    assert per_node(placed) == {"n1": 2, "n2": 2, "n3": 2}


def test_max_replicas_per_node_zero_means_no_limit():
    placed = one(Service("c", replicas=4, placement=Placement(max_replicas_per_node=0)), [N1])
    assert per_node(placed) == {"n1": 4}


def test_max_replicas_per_node_lowered_keeps_the_lowest_slots():
    previous = {"c.1": "n1", "c.2": "n1", "c.3": "n2"}
    svc = Service("c", replicas=3, placement=Placement(max_replicas_per_node=1))
    assert where(one(svc, previous=previous)) == {"c.1": "n1", "c.2": "n3", "c.3": "n2"}


def test_limit_reason_names_nodes_excluded_by_constraints():
    svc = Service("c", replicas=3, placement=Placement(("node.role==worker",), 1))
    placed = one(svc, [N1, N2, N3, down(Node("n4", "id4"))])
    assert pending(placed)[0].reason == ("max_replicas_per_node 1 reached on every eligible node "
                                         "(n2, n3); not eligible: n1, n4")


# --- host-mode ports -----------------------------------------------------------------------------

def test_host_port_conflict_across_services_leaves_a_task_pending():
    svcs = {"a": Service("a", replicas=2, ports=(Port(80, 8080, mode="host"),)),
            "b": Service("b", replicas=2, ports=(Port(81, 8080, mode="host"),))}
    placed = schedule(svcs, NODES, {})
    assert where(placed) == {"a.1": "n1", "a.2": "n2", "b.1": "n3", "b.2": None}
    assert pending(placed)[0].reason == ("host-mode port 8080/tcp taken on every eligible node "
                                         "(n1 by a.1, n2 by a.2, n3 by b.1)")


def test_host_port_two_replicas_of_one_service_never_share_a_node():
    placed = one(Service("a", replicas=3, ports=(Port(80, 8080, mode="host"),)), [N1, N2])
    assert where(placed) == {"a.1": "n1", "a.2": "n2", "a.3": None}


@pytest.mark.parametrize("other", [
    Port(53, 8080, protocol="udp", mode="host"),      # same number, other protocol
    Port(81, 8080, mode="ingress"),                    # ingress ports are not per node
    Port(81, None, mode="host"),                       # host mode, port picked at run time
    Port(81, 8081, mode="host"),                       # another port
])
def test_host_ports_that_do_not_conflict(other):
    svcs = {"a": Service("a", ports=(Port(80, 8080, mode="host"),)),
            "b": Service("b", ports=(other,))}
    assert where(schedule(svcs, [N1], {})) == {"a.1": "n1", "b.1": "n1"}


def test_kept_task_keeps_its_host_port_against_a_new_service():
    svcs = {"a": Service("a", ports=(Port(80, 8080, mode="host"),)),
            "b": Service("b", ports=(Port(80, 8080, mode="host"),))}
    assert where(schedule(svcs, [N1, N2], {"b.1": "n1"})) == {"a.1": "n2", "b.1": "n1"}


def test_mixed_blockers_are_listed_per_node():
    svcs = {"a": Service("a", ports=(Port(80, 8080, mode="host"),)),
            "b": Service("b", replicas=3, ports=(Port(80, 8080, mode="host"),),
                         placement=Placement(max_replicas_per_node=1))}
    placed = schedule(svcs, [N1, N2], {"a.1": "n1"})
    assert where(placed) == {"a.1": "n1", "b.1": "n2", "b.2": None, "b.3": None}
    assert pending(placed)[0].reason == ("no eligible node has room (n1: host-mode port 8080/tcp "
                                         "taken by a.1; n2: max_replicas_per_node 1 reached)")


def test_several_host_ports_are_named_in_the_reason():
    ports = (Port(80, 80, mode="host"), Port(53, 53, protocol="udp", mode="host"))
    svcs = {"a": Service("a", ports=ports), "b": Service("b", ports=ports)}
    placed = schedule(svcs, [N1], {})
    assert pending(placed)[0].reason == \
        "no eligible node has room (n1: host-mode ports taken (53/udp by a.1, 80/tcp by a.1))"


# --- node death ----------------------------------------------------------------------------------

def test_node_down_moves_only_its_tasks():
    svc = Service("web", replicas=6)
    first = where(one(svc))
    after = where(one(svc, [N1, down(N2), N3], first))
    assert all(after[t] == n for t, n in first.items() if n != "n2")
    moved = [t for t, n in first.items() if n == "n2"]
    assert sorted(after[t] for t in moved) == ["n1", "n3"]          # spread over the survivors
    assert "n2" not in after.values() and None not in after.values()


def test_node_gone_from_the_list_is_like_down():
    svc = Service("web", replicas=3)
    first = where(one(svc))
    assert where(one(svc, [N1, N3], first)) == {"web.1": "n1", "web.2": "n1", "web.3": "n3"}


def test_node_back_does_not_rebalance():
    svc = Service("web", replicas=3)
    survivors = where(one(svc, [N1, N3]))
    assert where(one(svc, NODES, survivors)) == survivors


def test_dead_node_with_host_ports_and_limit_leaves_pending():
    svc = Service("web", replicas=3, ports=(Port(80, 80, mode="host"),))
    first = where(one(svc))
    placed = one(svc, [N1, down(N2), N3], first)
    assert where(placed) == {"web.1": "n1", "web.2": None, "web.3": "n3"}
    assert pending(placed)[0].reason == ("host-mode port 80/tcp taken on every eligible node "
                                         "(n1 by web.1, n3 by web.3); not eligible: n2")


# --- nowhere to go -------------------------------------------------------------------------------

def test_no_node_satisfies_the_constraints_every_task_pending():
    placed = one(Service("db", replicas=3, placement=Placement(("node.labels.zone==c",
                                                                  "node.role==worker"))))
    assert [p.node for p in placed] == [None, None, None]
    assert {p.reason for p in placed} == {
        "no node satisfies node.labels.zone==c and node.role==worker (3 ready nodes: "
        "n1 zone=a role=manager, n2 zone=b role=worker, n3 no zone label role=worker)"}


def test_constraint_reason_mentions_nodes_not_ready():
    placed = one(Service("db", placement=Placement(("node.hostname==n2",))), [N1, down(N2)])
    assert placed[0].reason == "no node satisfies node.hostname==n2 (1 ready node: n1); not ready: n2"


def test_every_node_down():
    placed = one(Service("web", replicas=2), [down(N1), down(N2)])
    assert [(p.node, p.reason) for p in placed] == \
        [(None, "no ready node (2 nodes down or drained: n1, n2)")] * 2
    glob = one(Service("agent", mode="global"), [down(N1)])
    assert glob == [TaskPlacement("agent", "agent", 0, None, "no ready node (1 node down or drained: n1)")]


def test_no_nodes_at_all():
    assert one(Service("web"), []) == [TaskPlacement("web.1", "web", 1, None, "no nodes in the cluster")]


def test_invalid_constraint_makes_the_service_pending_not_the_scheduler_fail():
    svcs = {"bad": Service("bad", replicas=2, placement=Placement(("node.zone==a",))),
            "good": Service("good")}
    placed = schedule(svcs, NODES, {"bad.1": "n1"})
    assert where(placed) == {"bad.1": None, "bad.2": None, "good.1": "n1"}
    assert placed[0].reason.startswith("invalid placement constraint: constraint 'node.zone==a': "
                                       "unknown field 'node.zone'")


# --- determinism, container_name, Node -----------------------------------------------------------

def test_same_input_same_output_whatever_the_order_of_nodes_and_services():
    svcs = {"web": Service("web", replicas=5, ports=(Port(80, 8080, mode="host"),)),
            "api": Service("api", replicas=4, placement=Placement(max_replicas_per_node=2)),
            "agent": Service("agent", mode="global", placement=Placement(("node.role==worker",))),
            "db": Service("db", placement=Placement(("node.labels.zone==b",)))}
    nodes = NODES + [Node("n4", "id4", labels={"zone": "b"}), down(Node("n5", "id5"))]
    previous = {"web.2": "n3", "api.1": "n5", "agent.n2": "n2"}
    expected = schedule(svcs, nodes, previous)
    assert schedule(svcs, nodes, previous) == expected
    rng = random.Random(7)
    for _ in range(10):
        shuffled_nodes = rng.sample(nodes, len(nodes))
        shuffled_svcs = dict(rng.sample(sorted(svcs.items()), len(svcs)))
        assert schedule(shuffled_svcs, shuffled_nodes, previous) == expected


def test_container_name_service_runs_one_task_of_that_name():
    svc = Service("db", container_name="postgres", replicas=3)
    assert one(svc) == [TaskPlacement("postgres", "db", 1, "n1")]
    assert where(one(svc, previous={"postgres": "n3"})) == {"postgres": "n3"}
    assert where(one(svc, [N1, down(N3)], {"postgres": "n3"})) == {"postgres": "n1"}
    assert one(Service("db", container_name="postgres", replicas=0)) == []


def test_node_labels_are_frozen_and_hashable():
    a = Node("n", "i", labels={"b": "2", "a": "1"})
    b = Node("n", "i", labels=[("a", "1"), ("b", "2")])
    assert a == b and hash(a) == hash(b) and a.labels == (("a", "1"), ("b", "2"))
    assert a.label("a") == "1" and a.label("missing") is None
    assert Node("n", "i").labels == ()


def test_host_port_clashes_names_tasks_sharing_a_host_port_on_a_node():
    services = {"a": Service("a", ports=(Port(90, 9000, mode="host"),)),
                "b": Service("b", ports=(Port(91, 9000, mode="host"), Port(92, 9002))),
                "c": Service("c", ports=(Port(93, 9000, protocol="udp", mode="host"),))}
    placed = [("a.1", "a", "n1"), ("b.1", "b", "n1"), ("a.2", "a", "n2"), ("c.1", "c", "n2"),
              ("b.2", "b", None)]
    assert host_port_clashes(placed, services) == {"a.1", "b.1"}   # udp is another port
