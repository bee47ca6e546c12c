"""The agent's overlay step (mesh.agent.Agent._sync_overlay), pure: the order in which it writes
and removes VXLAN FDB and neighbour entries, with a netlink fake that records the calls. A task moved
to another node keeps its address and MAC, so its entry must be rewritten in place (never deleted,
which drops its frames until the new one lands). Kernel test: test_overlay.py
(test_a_task_moved_to_another_node_has_one_fdb_entry_all_along)."""
from mesh.agent import Agent
from mesh.overlay import mac_for
from mesh.state import DesiredState, EndpointState, NetworkState, TaskState

UNDERLAY = {"n1": "10.98.0.1", "n2": "10.98.0.2", "n3": "10.98.0.3"}
FRONT = NetworkState(name="front", driver="overlay", subnet="10.0.1.0/24", gateway=None, vni=10)


class Recorder:
    """The two netlink calls the overlay step makes, recorded in order."""
    def __init__(self):
        self.calls: list[tuple] = []

    def set_fdb(self, netns, link, mac, remote, present):
        self.calls.append(("fdb", mac, remote, present))

    def set_neigh(self, netns, link, address, mac, present):
        self.calls.append(("neigh", address, present))


class Supervisor:
    on_change = None


def task(name: str, node: str, address: str) -> TaskState:
    return TaskState(name=name, id=name, service=name.split(".")[0], slot=1, netmode="sandbox",
                     sandbox=f"mesh-{name}", owns_sandbox=True, hostname=name, node=node,
                     endpoints=(EndpointState("front", "eth0", address, 24, f"l-{name}"),))


def state(*tasks: TaskState) -> DesiredState:
    return DesiredState(networks={"front": FRONT}, tasks={t.name: t for t in tasks},
                        underlay=UNDERLAY)


def test_a_moved_task_is_rewritten_in_place_and_only_a_gone_one_is_removed_after_the_writes():
    nl = Recorder()
    agent = Agent("mesh-host", nl, None, Supervisor(), node="n2")
    agent._sync_overlay(state(task("web.1", "n1", "10.0.1.2"), task("web.2", "n1", "10.0.1.3"),
                              task("db.1", "n2", "10.0.1.9")))
    assert sorted(c for c in nl.calls if c[0] == "fdb") == [
        ("fdb", mac_for("10.0.1.2"), "10.98.0.1", True), ("fdb", mac_for("10.0.1.3"), "10.98.0.1", True)]
    nl.calls.clear()
    # web.1 moves to n3 (same address), web.2 goes
    agent._sync_overlay(state(task("web.1", "n3", "10.0.1.2"), task("db.1", "n2", "10.0.1.9")))
    assert nl.calls[0] == ("fdb", mac_for("10.0.1.2"), "10.98.0.3", True)
    assert ("fdb", mac_for("10.0.1.2"), "10.98.0.1", False) not in nl.calls
    removals = [i for i, c in enumerate(nl.calls) if c[-1] is False]
    writes = [i for i, c in enumerate(nl.calls) if c[-1] is True]
    assert removals and max(writes) < min(removals)
    assert set(nl.calls[i][:2] for i in removals) == {("fdb", mac_for("10.0.1.3")),
                                                     ("neigh", "10.0.1.3")}
    # nothing changed: nothing written
    nl.calls.clear()
    agent._sync_overlay(state(task("web.1", "n3", "10.0.1.2"), task("db.1", "n2", "10.0.1.9")))
    assert nl.calls == []
