"""What keeps a running task from new connections through every node (mesh.controller
Controller.waiting), pure: `mesh up` waits until nothing does, so the first connection to any node
answers once it returns. Kernel test: test_lb.py
(test_every_node_answers_the_first_connection_once_mesh_up_returns)."""
from mesh.codec import NodeInfo
from mesh.controller import Controller
from mesh.manager import ClusterController, node_table
from mesh.readiness import Readiness
from mesh.state import DesiredState, TaskState


def task(name: str, node: str) -> TaskState:
    return TaskState(name=name, id=name, service=name.split(".")[0], slot=1, netmode="sandbox",
                     sandbox=f"mesh-{name}", owns_sandbox=True, hostname=name, node=node)


class Seen(Controller):
    """A controller whose readiness and nodes' balancers are given (no agents)."""
    def __init__(self, ready: Readiness, balancers: dict[str, frozenset[str]]):
        super().__init__([], None, None)
        self.ready, self.balancers = ready, balancers

    def readiness(self) -> Readiness:
        return self.ready

    def _balancers(self) -> dict[str, frozenset[str]]:
        return self.balancers


def test_a_ready_task_waits_for_its_ports_then_for_every_nodes_balancers():
    ready = Readiness(ready={"web.1", "web.2", "db.1"}, alive={"web.1", "web.2", "db.1", "old.1"},
                      missing={"web.2": (frozenset({80}), frozenset({80, 81}))})
    ctl = Seen(ready, {"n1": frozenset({"web.1", "db.1"}), "n2": frozenset({"db.1"})})
    ctl.desired = DesiredState(tasks={t.name: t for t in (
        task("web.1", "n1"), task("web.2", "n1"), task("db.1", "n2"), task("old.1", "n2"))})
    assert ctl.waiting() == {"web.1": "not in the balancers of n2 yet",
                             "web.2": "not listening on 80/tcp yet"}
    # old.1 runs but is not ready (its health says why); db.1 is everywhere
    ctl.balancers["n2"] = frozenset({"db.1", "web.1", "web.2"})
    ctl.ready.missing.clear()
    assert ctl.waiting() == {"web.2": "not in the balancers of n1 yet"}
    ctl.desired = DesiredState(tasks=ctl.desired.tasks, draining=frozenset({"web.2"}))
    assert ctl.waiting() == {}                       # a draining task waits for nothing


def test_a_cluster_reads_each_registered_nodes_balancers_from_its_record():
    ctl = ClusterController(None, "m1")
    ctl.live = {"n1": NodeInfo("n1", "10.0.0.1", balanced=("web.1",)),
                "n2": NodeInfo("n2", "10.0.0.2")}
    assert ctl._balancers() == {"n1": frozenset({"web.1"}), "n2": frozenset()}
    # the node table the leader writes into /mesh/desired does not carry them
    assert [n.balanced for n in node_table((), ctl.live)] == [(), ()]


# -- what a node's agent says its balancers take (mesh.agent.Agent.balanced) ---------------------

class FakeLb:
    """The load-balancer calls of a data-plane sync, recorded; `failing` namespaces raise."""
    def __init__(self):
        self.tables: dict[str, object] = {}
        self.failing: set[str] = set()

    def apply(self, netns, table):
        if netns in self.failing:
            raise OSError(f"{netns}: the kernel refused the table")
        self.tables[netns] = table

    def forget(self, netns):
        self.tables.pop(netns, None)


class FakeNft:
    def __init__(self):
        self.texts: list[str] = []

    def apply(self, netns, text):
        self.texts.append(text)


class QuietSup:
    on_change = None


class NoUnderlayDevice:
    """Netlink as the host table's DSR plan asks it: the node's address is on no device (no
    stack here asks for DSR, so there is nothing to hand over)."""
    def interface_of(self, netns, address):
        return None


def test_a_node_claims_the_ready_listening_tasks_that_do_not_drain_once_every_balancer_took_them():
    import asyncio
    from dataclasses import replace
    from mesh.agent import Agent
    from mesh.allocator import build_desired
    from mesh.manager import placement
    from mesh.spec import load_stack
    stack = load_stack("services:\n  web: {command: sleep 300, deploy: {replicas: 3,"
                       " placement: {constraints: [node.hostname==n1]}}, ports: ['8080:80']}\n",
                       name="s")
    nodes = (NodeInfo("n1", "10.97.0.1", "manager", routes=("10.97.0.0/24",)),
             NodeInfo("n2", "10.97.0.2", "worker", routes=("10.97.0.0/24",)))
    desired = build_desired(stack, DesiredState(), [], None,
                            cluster=placement(stack, DesiredState(), nodes))
    web = sorted(desired.tasks)
    lb, synced = FakeLb(), []
    agent = Agent("mesh-h-n2", NoUnderlayDevice(), FakeNft(), QuietSup(), node="n2", lb=lb)
    agent.on_synced = lambda: synced.append(agent.balanced)
    # web 1 ready; web 2 ready but not listening on 80 yet; web 3 ready but draining
    agent.applied = replace(desired, draining=frozenset([web[2]]))
    agent.readiness = lambda: Readiness(ready=set(web), alive=set(web),
                                        missing={web[1]: (frozenset({80}), frozenset({80}))})

    async def sync():
        await agent.sync_dataplane()
        if agent.relisten is not None:        # it looks again for the port soon: not here
            agent.relisten.cancel()
            agent.relisten = None
    asyncio.run(sync())
    assert lb.tables, "n2 balances the published port (its ingress namespace)"
    assert agent.balanced == {web[0]} and synced == [{web[0]}]
    # a balancer that fails to take its table: the claim stays what it was
    agent.readiness = lambda: Readiness(ready=set(web), alive=set(web))
    lb.failing = set(lb.tables)
    asyncio.run(sync())
    assert agent.balanced == {web[0]} and synced[-1] == {web[0]}
    lb.failing.clear()
    asyncio.run(sync())
    assert agent.balanced == {web[0], web[1]}
