"""The cluster's logic against the embedded store (MemoryStore, short leases): election and
failover, the leader placing on registered nodes and re-placing when one's lease expires, standbys
refusing changes, compare-and-swap between two would-be leaders, and a node agent registering,
applying its part, reporting, adopting its saved state and leaving. No kernel: a fake Agent."""
from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import replace

import pytest

from mesh.codec import ClusterDoc, NodeInfo, decode, decode_doc, encode
from mesh.election import Election
from mesh.errors import Conflict
from mesh.manager import ClusterController, cluster_routes, node_table, placement
from mesh.nodeagent import NodeAgent, load_applied, save_applied
from mesh.paths import Paths
from mesh.spec import load_stack
from mesh.state import DesiredState, TaskState
from mesh.store import MemoryStore
from mesh.storeops import DESIRED, LEADER, NODES, STATUS, LeaseKeeper, follow

TTL = 0.3
STACK = """
services:
  web: {command: sleep 300, deploy: {replicas: 3}, networks: [front]}
  mon: {command: sleep 300, deploy: {mode: global}, networks: [front]}
  boss: {command: sleep 300, deploy: {placement: {constraints: ["node.role==manager"]}}}
networks:
  front: {}
"""


def run(coro_fn):
    @functools.wraps(coro_fn)
    def wrapper(*args, **kw):
        asyncio.run(asyncio.wait_for(coro_fn(*args, **kw), 20))
    return wrapper


async def until(predicate, timeout: float = 5.0, what: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def info(name: str, i: int, role: str = "worker") -> NodeInfo:
    return NodeInfo(name, f"10.97.0.{i}", role, netns=f"mesh-h-{name}", routes=("10.97.0.0/24",))


class FakeNode:
    """A node's registration: a kept-alive lease and its NodeInfo; crash() lets the lease lapse."""

    def __init__(self, store, node: NodeInfo):
        self.store, self.info = store, node
        self.keeper = LeaseKeeper(store, TTL)

    async def join(self):
        await self.keeper.start()
        await self.store.put(NODES + self.info.name, encode(self.info), lease=self.keeper.lease)
        return self

    async def crash(self):
        await self.keeper.stop(revoke=False)


class Manager:
    def __init__(self, store, name):
        self.ctl = ClusterController(store, name)
        self.ctl.apply_timeout = 0          # fake nodes report nothing: a step does not wait
        self.election = Election(store, name, ttl=TTL)
        self.jobs = [asyncio.ensure_future(self.ctl.mirror()),
                     asyncio.ensure_future(self.election.run(self.ctl.on_elected, self.ctl.on_deposed))]

    async def crash(self):
        for job in self.jobs:
            job.cancel()
        await asyncio.gather(*self.jobs, return_exceptions=True)


def on(ctl, node):
    return sorted(ctl.desired.on_node(node))


# -- pure parts ---------------------------------------------------------------------------------

def test_node_table_marks_unregistered_nodes_down_and_keeps_them():
    known = (info("n1", 1), info("n2", 2))
    live = {"n2": info("n2", 2), "n3": info("n3", 3)}
    table = node_table(known, live)
    assert [(n.name, n.state) for n in table] == [("n1", "down"), ("n2", "ready"), ("n3", "ready")]
    assert cluster_routes(table) == [__import__("ipaddress").ip_network("10.97.0.0/24")]


def test_placement_avoids_down_nodes_and_names_sandboxes_after_node_namespaces():
    stack = load_stack(STACK, name="s")
    table = node_table((info("n1", 1, "manager"), info("n2", 2)), {"n2": info("n2", 2)})
    p = placement(stack, DesiredState(), table)
    assert {node for _, _, _, node in p.tasks} == {"n2"}
    assert p.underlay == {"n2": "10.97.0.2"} and p.node_netns["n1"] == "mesh-h-n1"
    assert [(s, t) for s, t, _ in p.pending] == [("boss", "boss.1")]


# -- election -------------------------------------------------------------------------------------

@run
async def test_election_one_leads_resign_hands_over_and_a_crash_expires():
    store = MemoryStore()
    log = []

    def candidate(name):
        e = Election(store, name, ttl=TTL)

        async def elected():
            log.append(("elected", name))

        async def deposed():
            log.append(("deposed", name))
        return e, asyncio.ensure_future(e.run(elected, deposed))

    a, ta = candidate("a")
    await until(lambda: a.leading, what="a leads")
    b, tb = candidate("b")
    await asyncio.sleep(TTL * 2)
    assert not b.leading and await b.leader() == "a"
    await a.resign()                                   # a steps down: b leads at once
    await until(lambda: b.leading, timeout=TTL, what="b leads after a resigned")
    await until(lambda: ("deposed", "a") in log, what="a deposed")
    ta.cancel()
    await asyncio.gather(ta, return_exceptions=True)
    c, tc = candidate("c")
    tb.cancel()                                        # b crashes: its lease lapses after TTL
    await asyncio.gather(tb, return_exceptions=True)
    await until(lambda: c.leading, timeout=TTL * 4, what="c leads after b's lease expired")
    assert json.loads((await store.get(LEADER)).value)["name"] == "c"
    tc.cancel()
    await asyncio.gather(tc, return_exceptions=True)
    await store.close()


# -- the leading manager ------------------------------------------------------------------------

@run
async def test_leader_places_replaces_on_node_death_follows_joins_and_fails_over():
    store = MemoryStore()
    nodes = [await FakeNode(store, info(f"n{i}", i, "manager" if i == 1 else "worker")).join()
             for i in (1, 2, 3)]
    m1 = Manager(store, "m1")
    await until(lambda: m1.ctl.leading and len(m1.ctl.doc.nodes) == 3, what="m1 leads, knows 3 nodes")
    m2 = Manager(store, "m2")
    stack = load_stack(STACK, name="s")
    await m1.ctl.up(stack)
    webs = {n: [t for t in on(m1.ctl, n) if t.startswith("web.")] for n in ("n1", "n2", "n3")}
    assert all(len(w) == 1 for w in webs.values()), webs          # spread
    assert "mon.n3" in on(m1.ctl, "n3") and "boss.1" in on(m1.ctl, "n1")
    doc = decode_doc((await store.get(DESIRED)).value)
    assert doc.desired == m1.ctl.desired and doc.stack == stack and doc.leader == "m1"
    await until(lambda: m2.ctl.desired == m1.ctl.desired, what="the standby mirrors")
    with pytest.raises(Conflict, match="standby.*the leader is m1"):
        await m2.ctl.scale("web", 5)

    moved = webs["n3"][0]
    await nodes[2].crash()                              # n3 dies: its web task moves, mon.n3 goes
    await until(lambda: not on(m1.ctl, "n3"), timeout=TTL * 5, what="n3's tasks moved")
    assert moved in m1.ctl.desired.tasks and "mon.n3" not in m1.ctl.desired.tasks
    assert [n["state"] for n in m1.ctl.node_list()] == ["ready", "ready", "down"]
    task = m1.ctl.desired.tasks[moved]
    assert task.node != "n3" and task.sandbox == f"mesh-h-{task.node}-{moved}"

    await FakeNode(store, info("n4", 4)).join()         # a node joins: the global service follows
    await until(lambda: "mon.n4" in m1.ctl.desired.tasks, what="mon.n4 placed")

    await m1.crash()                                    # the leader dies: m2 takes over
    await until(lambda: m2.ctl.leading, timeout=TTL * 5, what="m2 leads")
    await m2.ctl.scale("web", 5)
    assert {f"web.{i}" for i in range(1, 6)} <= set(m2.ctl.desired.tasks)
    assert decode_doc((await store.get(DESIRED)).value).leader == "m2"
    await m2.crash()
    for n in nodes:
        await n.crash()
    await store.close()


@run
async def test_a_deposed_leader_cannot_overwrite_the_new_leaders_state():
    store = MemoryStore()
    await FakeNode(store, info("n1", 1)).join()
    m1 = Manager(store, "m1")
    await until(lambda: m1.ctl.leading, what="m1 leads")
    await m1.ctl.up(load_stack(STACK, name="s"))
    stale = ClusterController(store, "ghost")           # believes it leads, with an old revision
    stale.leading = True
    stale._load(ClusterDoc(), 0)
    stale.live = dict(m1.ctl.live)
    with pytest.raises(Conflict, match="changed by another manager"):
        await stale.down()
    assert stale.desired == m1.ctl.desired                # it re-read the truth
    await m1.crash()
    await store.close()


class ReportingNodes:
    """Nodes whose 'agents' apply every /mesh/desired at once, report each task running and
    ready (a new start time whenever its definition changes) and acknowledge each revision in
    their node record (what a step that only drains waits for); `docs` is every state they saw."""

    def __init__(self, store, names, ack: bool = True):
        self.store, self.names, self.ack = store, names, ack
        self.docs: list[DesiredState] = []
        self.starts: dict[str, tuple] = {}
        self.seen = 0
        self.job = asyncio.ensure_future(self.run())

    async def run(self):
        keeper = LeaseKeeper(self.store, TTL)
        await keeper.start()
        for i, name in enumerate(self.names, start=1):
            await self.store.put(NODES + name, encode(info(name, i)), lease=keeper.lease)
        reported = set()
        async for kind, item in follow(self.store, DESIRED):
            kvs = item if kind == "snapshot" else [item.kv] if item.kind == "put" else []
            for kv in kvs:
                desired = decode_doc(kv.value).desired
                self.docs.append(desired)
                for name, task in desired.tasks.items():
                    if self.starts.get(name, (None,))[0] != task.environment:
                        self.starts[name] = (task.environment, len(self.docs))
                    status = {"id": task.id, "state": "running", "ready": True,
                              "started_at": str(self.starts[name][1])}
                    await self.store.put(f"{STATUS}{task.node}/{name}", json.dumps(status).encode(),
                                         lease=keeper.lease)
                for key in reported - {(t.node, n) for n, t in desired.tasks.items()}:
                    await self.store.delete(f"{STATUS}{key[0]}/{key[1]}")
                for i, name in enumerate(self.names if self.ack else ()):
                    acked = kv.mod_revision - (1 if self.ack == "late" else 0)
                    await self.store.put(NODES + name, encode(replace(info(name, i + 1), applied=acked)),
                                         lease=keeper.lease)
                reported = {(t.node, n) for n, t in desired.tasks.items()}
                self.seen = kv.mod_revision


@run
async def test_a_change_on_the_store_drains_and_replaces_one_task_at_a_time():
    store = MemoryStore()
    nodes = ReportingNodes(store, ["n1", "n2"])
    m1 = Manager(store, "m1")
    m1.ctl.apply_timeout = 2.0
    await until(lambda: m1.ctl.leading and len(m1.ctl.doc.nodes) == 2, what="m1 leads, knows 2 nodes")
    rolling = "services:\n  web: {command: sleep 300, deploy: {replicas: 2}, environment: {GEN: '@'}}\n"
    await m1.ctl.up(load_stack(rolling.replace("@", "1"), name="s"))
    await until(lambda: m1.ctl.readiness().ready == {"web.1", "web.2"}, what="reports read")
    assert m1.ctl.status("web.1")["state"] == "running"

    nodes.docs.clear()
    await m1.ctl.up(load_stack(rolling.replace("@", "2"), name="s"))
    await until(lambda: nodes.seen == m1.ctl.doc_rev, what="the last step seen")
    gen = lambda d, t: dict(d.tasks[t].environment)["GEN"]
    steps = [(gen(d, "web.1"), gen(d, "web.2"), sorted(d.draining)) for d in nodes.docs]
    assert steps == [
        ("1", "1", []),                   # the new stack (no task of it yet: rolling)
        ("1", "1", ["web.1"]),            # web.1 drained, web.2 serves
        ("2", "1", ["web.1"]),            # web.1 restarts out of the balancers...
        ("2", "1", []),                   # ...and is back once reported anew
        ("2", "1", ["web.2"]),            # then web.2, the same way
        ("2", "2", ["web.2"]),
        ("2", "2", []),
    ], steps
    assert decode_doc((await store.get(DESIRED)).value).stack.services["web"].environment

    nodes.docs.clear()
    await m1.ctl.scale("web", 1)                    # the leaving task is drained before it goes
    await until(lambda: nodes.seen == m1.ctl.doc_rev, what="the last step seen")
    assert [(sorted(d.tasks), sorted(d.draining)) for d in nodes.docs] == [
        (["web.1", "web.2"], ["web.2"]), (["web.1"], [])]
    nodes.job.cancel()
    await m1.crash()
    await store.close()


@run
async def test_every_step_waits_until_every_node_acknowledges_it(caplog):
    store = MemoryStore()
    nodes = ReportingNodes(store, ["n1", "n2"], ack=False)
    m1 = Manager(store, "m1")
    m1.ctl.apply_timeout = 0.5
    await until(lambda: m1.ctl.leading and len(m1.ctl.doc.nodes) == 2, what="m1 leads")
    await m1.ctl.up(load_stack("services:\n  web: {command: sleep 300, deploy: {replicas: 2}}\n",
                               name="s"))
    await until(lambda: m1.ctl.readiness().ready == {"web.1", "web.2"}, what="reports read")
    waited = [r.getMessage() for r in caplog.records if "going on after" in r.getMessage()]
    assert waited and "n1" in waited[0] and "n2" in waited[0], waited   # the task reports alone
    caplog.clear()                                                      # do not suffice
    await m1.ctl.scale("web", 1)                         # drains web.2: no report shows that
    waited = [r.getMessage() for r in caplog.records if "going on after" in r.getMessage()]
    assert waited and "n1" in waited[0] and "n2" in waited[0], waited
    caplog.clear()
    nodes.ack = "late"                                   # an acknowledgement of the revision before
    await m1.ctl.scale("web", 2)
    await m1.ctl.scale("web", 1)
    waited = [r.getMessage() for r in caplog.records if "going on after" in r.getMessage()]
    assert waited and "n1" in waited[0] and "n2" in waited[0], waited
    caplog.clear()
    nodes.ack = True                                     # nodes that acknowledge: no waiting
    await m1.ctl.scale("web", 2)
    await m1.ctl.scale("web", 1)
    assert "going on after" not in caplog.text
    nodes.job.cancel()
    await m1.crash()
    await store.close()


@run
async def test_a_leader_dying_mid_change_leaves_it_to_the_next_one_to_finish():
    store = MemoryStore()
    nodes = ReportingNodes(store, ["n1", "n2"])
    m1 = Manager(store, "m1")
    await until(lambda: m1.ctl.leading and len(m1.ctl.doc.nodes) == 2, what="m1 leads")
    await m1.ctl.up(load_stack("services:\n  web: {command: sleep 300, deploy: {replicas: 2}}\n",
                               name="s"))
    await m1.ctl._publish(replace(m1.ctl.doc, desired=replace(m1.ctl.desired, draining=frozenset(
        ["web.1"]))), record=False)              # a drain written, then the leader dies
    await m1.crash()
    m2 = Manager(store, "m2")
    await until(lambda: m2.ctl.leading, timeout=TTL * 10, what="m2 leads")
    await until(lambda: not m2.ctl.doc.desired.draining, what="m2 finishes the change")
    assert not decode_doc((await store.get(DESIRED)).value).desired.draining
    assert sorted(m2.ctl.doc.desired.tasks) == ["web.1", "web.2"]
    nodes.job.cancel()
    await m2.crash()
    await store.close()


# -- the node agent -------------------------------------------------------------------------------

class FakeSup:
    def __init__(self, log_dir, alive=()):
        self.log_dir, self.alive = str(log_dir), set(alive)
        self.runs: dict[str, str] = {}
        self.on_change = lambda: None

    async def adopt(self, task: TaskState) -> bool:
        if task.name in self.alive:
            self.runs[task.name] = "adopted"
        return task.name in self.alive

    def status(self, name):
        return {"state": "running" if name in self.runs else "stopped", "pid": 4242,
                "exit_code": None, "restarts": 0, "health": "none"}

    def log_path(self, name):
        return f"{self.log_dir}/{name}.log"


class FakeAgent:
    def __init__(self, node, sup):
        self.node, self.sup, self.dns = node, sup, None
        self.applied = DesiredState()
        self.applies = []
        self.kicks = 0
        self.readiness = None
        self.balanced, self.on_synced = frozenset(), None

    def kick(self):
        self.kicks += 1

    def own_readiness(self):
        from mesh.readiness import Readiness
        mine = {n for n in self.applied.on_node(self.node) if n in self.sup.runs}
        return Readiness(ready=set(mine), alive=set(mine))

    async def apply(self, desired):
        self.applies.append(desired)
        if getattr(self, "fail", None):
            raise RuntimeError(self.fail)
        for name in desired.on_node(self.node):
            self.sup.runs.setdefault(name, "started")
        for name in [n for n in self.sup.runs if n not in desired.on_node(self.node)]:
            del self.sup.runs[name]
        self.applied = desired

    async def teardown(self):
        await self.apply(DesiredState())


def agent_setup(store, tmp_path, alive=(), node="n1"):
    paths = Paths(str(tmp_path / f"node-{node}"))
    (tmp_path / f"node-{node}" / "logs").mkdir(parents=True, exist_ok=True)
    agent = FakeAgent(node, FakeSup(tmp_path / f"node-{node}" / "logs", alive))
    return NodeAgent(store, info(node, int(node[1:])), agent, paths, ttl=TTL), agent


@run
async def test_node_agent_registers_applies_reports_and_leaves(tmp_path):
    store = MemoryStore()
    stack = load_stack(STACK, name="s")
    table = (info("n1", 1, "manager"), info("n2", 2))
    from mesh.allocator import build_desired
    desired = build_desired(stack, DesiredState(), [], None, cluster=placement(stack, DesiredState(), table))
    node, agent = agent_setup(store, tmp_path)
    stop = asyncio.Event()
    job = asyncio.ensure_future(node.run(stop))
    await until(lambda: node.keeper is not None and node.keeper.lease, what="registered")
    registered = NodeInfo(**{**json.loads((await store.get(NODES + "n1")).value)})
    assert registered.name == "n1" and registered.agent_pid
    first = await store.put(DESIRED, encode(ClusterDoc(desired=desired, stack=stack)))
    await until(lambda: agent.applied == desired, what="applied")
    mine = sorted(desired.on_node("n1"))

    async def reported():
        items, _ = await store.list(STATUS)
        return {kv.key.rsplit("/", 1)[1]: json.loads(kv.value) for kv in items}
    for _ in range(200):
        if sorted(await reported()) == mine:
            break
        await asyncio.sleep(0.01)
    statuses = await reported()
    assert sorted(statuses) == mine and statuses[mine[0]]["state"] == "running"
    assert statuses[mine[0]]["id"] == desired.tasks[mine[0]].id
    assert load_applied(node.state_path) == desired
    async def acknowledged(revision):                  # the node record says it is applied
        for _ in range(200):
            if decode(NodeInfo, (await store.get(NODES + "n1")).value).applied == revision:
                return True
            await asyncio.sleep(0.01)
        return False
    assert await acknowledged(first)
    n_applies = len(agent.applies)
    same = await store.put(DESIRED, encode(ClusterDoc(desired=desired, stack=stack, serial=9)))
    assert await acknowledged(same)
    assert len(agent.applies) == n_applies             # nothing of this node changed: no apply
    agent.balanced = frozenset(mine)                   # a data-plane sync: the record shows it
    agent.on_synced()
    for _ in range(200):
        if decode(NodeInfo, (await store.get(NODES + "n1")).value).balanced == tuple(mine):
            break
        await asyncio.sleep(0.01)
    assert decode(NodeInfo, (await store.get(NODES + "n1")).value).balanced == tuple(mine)
    revision = await store.put(DESIRED, encode(ClusterDoc(
        desired=replace(desired, draining=frozenset([mine[0]])), stack=stack, serial=10)))
    assert await acknowledged(revision)
    stop.set()
    await job
    await node.leave()
    assert await store.get(NODES + "n1") is None and not await reported()
    assert agent.applied == DesiredState()
    await store.close()


@run
async def test_a_draining_task_is_reported_serving_until_its_connections_end(tmp_path, monkeypatch):
    store = MemoryStore()
    stack = load_stack(STACK, name="s")
    from mesh.allocator import build_desired
    desired = build_desired(stack, DesiredState(), [], None,
                            cluster=placement(stack, DesiredState(), (info("n1", 1, "manager"),)))
    monkeypatch.setattr("mesh.nodeagent.POLL", 600.0)   # only the drain's own poll can tell
    node, agent = agent_setup(store, tmp_path)
    open_connections = {"n": 2}
    node.connections = lambda pid, addresses: open_connections["n"]
    stop = asyncio.Event()
    job = asyncio.ensure_future(node.run(stop))

    async def report(task):
        kv = await store.get(f"{STATUS}n1/{task}")
        return json.loads(kv.value) if kv else {}
    await store.put(DESIRED, encode(ClusterDoc(desired=desired, stack=stack)))
    await until(lambda: agent.applied == desired, what="applied")
    for _ in range(200):
        if (await report("web.1")).get("state") == "running":
            break
        await asyncio.sleep(0.01)
    assert "serving" not in await report("web.1")       # not draining: nothing to say
    await store.put(DESIRED, encode(ClusterDoc(desired=replace(desired, draining=frozenset(["web.1"])),
                                               stack=stack)))
    for _ in range(200):
        if (await report("web.1")).get("serving") is True:
            break
        await asyncio.sleep(0.01)
    assert (await report("web.1"))["serving"] is True
    assert "serving" not in await report("boss.1")      # only the draining task
    open_connections["n"] = 0                            # the last client went away
    for _ in range(300):
        if (await report("web.1")).get("serving") is False:
            break
        await asyncio.sleep(0.01)
    assert (await report("web.1"))["serving"] is False
    stop.set()
    await job
    await node.leave()
    await store.close()


def test_a_manager_on_another_host_reads_a_drain_from_the_report():
    ctl = ClusterController(MemoryStore(), "m1")
    stack = load_stack("services:\n  web: {command: sleep 300}\n", name="s")
    table = (info("n1", 1),)                    # its namespace mesh-h-n1 is not on this machine
    from mesh.allocator import build_desired
    ctl.desired = build_desired(stack, DesiredState(), [], None,
                                cluster=placement(stack, DesiredState(), table))
    ctl.live = {"n1": table[0]}
    task = ctl.desired.tasks["web.1"]
    ctl.statuses[("n1", "web.1")] = {"id": task.id, "state": "running", "pid": 4242}
    assert ctl._serving("web.1")                # no word yet: it may still serve
    ctl.statuses[("n1", "web.1")]["serving"] = True
    assert ctl._serving("web.1")
    ctl.statuses[("n1", "web.1")]["serving"] = False
    assert not ctl._serving("web.1")
    ctl.statuses[("n1", "web.1")] = {"id": "another", "state": "running", "pid": 4242, "serving": True}
    assert not ctl._serving("web.1")            # a report of an older task says nothing of this one


@run
async def test_every_failed_apply_is_named_by_its_revision_in_the_node_record(tmp_path):
    """The same error twice is still two failures: the manager fails the step whose revision
    the record names, not only when the error text changes."""
    store = MemoryStore()
    stack = load_stack(STACK, name="s")
    from mesh.allocator import build_desired
    desired = build_desired(stack, DesiredState(), [], None,
                            cluster=placement(stack, DesiredState(), (info("n1", 1, "manager"),)))
    node, agent = agent_setup(store, tmp_path)
    agent.fail = "no room"
    stop = asyncio.Event()
    job = asyncio.ensure_future(node.run(stop))
    await until(lambda: node.keeper is not None and node.keeper.lease, what="registered")

    async def record():
        return decode(NodeInfo, (await store.get(NODES + "n1")).value)
    for serial in (1, 2):
        revision = await store.put(DESIRED, encode(ClusterDoc(desired=desired, stack=stack,
                                                              serial=serial)))
        for _ in range(200):
            if (await record()).failed == revision:
                break
            await asyncio.sleep(0.01)
        got = await record()
        assert (got.failed, got.applied) == (revision, 0) and "no room" in got.error, got
    agent.fail = None
    revision = await store.put(DESIRED, encode(ClusterDoc(desired=desired, stack=stack, serial=3)))
    for _ in range(200):
        if not (await record()).error:
            break
        await asyncio.sleep(0.01)
    assert ((await record()).error, (await record()).failed) == (None, 0)
    stop.set()
    await job
    await node.leave()
    await store.close()


@run
async def test_node_agent_adopts_what_it_had_applied(tmp_path):
    store = MemoryStore()
    stack = load_stack(STACK, name="s")
    from mesh.allocator import build_desired
    desired = build_desired(stack, DesiredState(), [], None,
                            cluster=placement(stack, DesiredState(), (info("n1", 1, "manager"),)))
    node, agent = agent_setup(store, tmp_path, alive={"web.1", "boss.1"})
    save_applied(node.state_path, desired)
    adopted = await node.adopt()
    assert sorted(adopted) == ["boss.1", "web.1"]
    assert agent.applied == desired                    # the next apply diffs against it
    assert agent.sup.runs == {"web.1": "adopted", "boss.1": "adopted"}
    await store.close()


@run
async def test_agents_learn_other_nodes_readiness_from_their_reports(tmp_path):
    store = MemoryStore()
    stack = load_stack(STACK, name="s")
    from mesh.allocator import build_desired
    table = (info("n1", 1, "manager"), info("n2", 2))
    desired = build_desired(stack, DesiredState(), [], None, cluster=placement(stack, DesiredState(), table))
    (a1, f1), (a2, f2) = agent_setup(store, tmp_path, node="n1"), agent_setup(store, tmp_path, node="n2")
    assert f1.readiness == a1.readiness                  # the agent asks the node agent
    stop = asyncio.Event()
    jobs = [asyncio.ensure_future(a.run(stop)) for a in (a1, a2)]
    await store.put(DESIRED, encode(ClusterDoc(desired=desired, stack=stack)))
    theirs = set(desired.on_node("n2"))
    await until(lambda: theirs <= a1.readiness().ready, what="n1 sees n2's tasks ready")
    assert set(desired.on_node("n1")) <= a1.readiness().ready          # and its own
    kicks = f1.kicks
    gone = sorted(theirs)[0]
    del f2.sup.runs[gone]                                # a task of n2 stops...
    f2.sup.on_change()
    await until(lambda: gone not in a1.readiness().ready, what="n1 sees it stop")
    assert gone not in a1.readiness().alive and f1.kicks > kicks   # ...n1's balancers follow
    stop.set()
    await asyncio.gather(*jobs)
    await store.close()


# -- the supervisor re-attaches to a process it did not start (mesh.runtime) -----------------------

def _spawn_task(log_dir, name: str, restart: str = "no"):
    import subprocess
    from mesh.runtime import start_time
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    (log_dir / f"{name}.pid").write_text(f"{proc.pid} {start_time(proc.pid)}\n")
    task = TaskState(name=name, id="x", service=name.split(".")[0], slot=1, netmode="host",
                     sandbox=None, owns_sandbox=False, hostname="", restart=restart)
    return proc, task


@run
async def test_supervisor_adopts_a_live_process_and_sees_it_exit(tmp_path):
    import signal
    from mesh.runtime import Supervisor, kill_leftovers
    kept, task = _spawn_task(tmp_path, "web.1")
    stray, _ = _spawn_task(tmp_path, "old.1")
    (tmp_path / "gone.1.pid").write_text("999999999 123\n")       # a process long gone
    sup = Supervisor(str(tmp_path), None)
    changes = []
    sup.on_change = lambda: changes.append(sup.status("web.1")["state"])
    try:
        assert await sup.adopt(task)
        assert not await sup.adopt(TaskState(name="gone.1", id="y", service="gone", slot=1,
                                             netmode="host", sandbox=None, owns_sandbox=False,
                                             hostname=""))
        assert sup.status("web.1")["state"] == "running" and sup.status("web.1")["pid"] == kept.pid
        assert kill_leftovers(str(tmp_path), keep={"web.1"}) == [stray.pid]
        await asyncio.to_thread(stray.wait, 5)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["web.1.pid"]
        kept.send_signal(signal.SIGKILL)                  # it dies: restart "no" -> exited
        await until(lambda: sup.status("web.1")["state"] == "exited", what="exit seen")
        assert changes == ["exited"] and not (tmp_path / "web.1.pid").exists()
    finally:
        for p in (kept, stray):
            p.kill()
            p.wait()


@run
async def test_supervisor_stops_an_adopted_process(tmp_path):
    from mesh.runtime import Supervisor
    proc, task = _spawn_task(tmp_path, "web.1", restart="always")
    sup = Supervisor(str(tmp_path), None)
    try:
        assert await sup.adopt(task)
        await sup.stop("web.1", grace=2)
        assert await asyncio.to_thread(proc.wait, 5) is not None and "web.1" not in sup.runs
    finally:
        proc.kill()
        proc.wait()


# -- the daemons' command lines -------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["manager", "--store", "foo://x"], "--store foo://x: unknown store URL"),
    (["manager", "--store", "etcd://"], "expected etcd://HOST:PORT"),
    (["agent", "--store", "memory://", "--address", "10.0.0.1"], "separate manager and agent daemons share an etcd"),
])
def test_a_bad_store_url_is_a_clear_error(argv, message, capsys, tmp_path, monkeypatch):
    from mesh.cli import main
    monkeypatch.setenv("MESH_RUN_DIR", str(tmp_path))
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_an_unreachable_etcd_is_a_clear_error(capsys, tmp_path, monkeypatch):
    from mesh.cli import main
    from store_etcd import free_port
    monkeypatch.setenv("MESH_RUN_DIR", str(tmp_path))
    url = f"etcd://127.0.0.1:{free_port()}"
    assert main(["manager", "--store", url]) == 1
    err = capsys.readouterr().err
    assert f"--store {url}: etcd does not answer" in err, err
    assert not list(tmp_path.rglob("api.sock"))          # nothing left listening


def test_the_report_loop_ends_when_cancelled_as_it_is_woken(tmp_path):
    """NodeAgent.run cancels its report loop and waits for it: a cancel that comes as the loop is
    woken (a data-plane sync sets status_dirty all the time) must end it (asyncio.wait_for
    swallowed such a cancel, and mesh down hung: see test_cancel)."""
    from cancelling import TURNS, cancel_after, ended

    async def main():
        store = MemoryStore()
        node, _ = agent_setup(store, tmp_path)
        for turns in TURNS:
            loop = asyncio.ensure_future(node.report_loop())
            await asyncio.sleep(0.01)
            node.status_dirty.set()
            landed = cancel_after(loop, turns)
            assert await ended(loop, landed, f"the report loop cancelled {turns} turns after its "
                                             "wake-up")
        await store.close()
    asyncio.run(main())


@run
async def test_the_node_record_shows_a_burst_of_balancer_changes_in_one_put(tmp_path, monkeypatch):
    """agent.balanced changing three times within BALANCED_EVERY of the last record put is one
    more put, at least BALANCED_EVERY after that one, showing the last set; a change after that
    is put at once."""
    monkeypatch.setattr("mesh.nodeagent.BALANCED_EVERY", 0.3)
    monkeypatch.setattr("mesh.nodeagent.POLL", 600.0)      # only the kicks wake the report loop
    store = MemoryStore()
    node, agent = agent_setup(store, tmp_path)
    stop = asyncio.Event()
    job = asyncio.ensure_future(node.run(stop))
    await until(lambda: node.keeper is not None and node.keeper.lease, what="registered")
    loop = asyncio.get_running_loop()
    registered = (await store.get(NODES + "n1")).mod_revision
    puts: list[tuple[float, tuple]] = []

    async def record_puts():
        async for kind, item in follow(store, NODES + "n1"):
            if kind == "event" and item.kind == "put" and item.kv.mod_revision > registered:
                puts.append((loop.time(), decode(NodeInfo, item.kv.value).balanced))
    watcher = asyncio.ensure_future(record_puts())
    first = node.info_put_at
    for tasks in (("s_web.1",), ("s_web.1", "s_web.2"), ("s_web.2",)):
        agent.balanced = frozenset(tasks)
        agent.on_synced()
        await asyncio.sleep(0.02)
    await until(lambda: puts, what="the record put")
    await asyncio.sleep(0.4)                                # nothing more comes
    assert [b for _, b in puts] == [("s_web.2",)]
    assert puts[0][0] - first >= 0.3 - 0.01
    agent.balanced = frozenset()
    agent.on_synced()
    await until(lambda: len(puts) == 2, timeout=0.25, what="the second record put, at once")
    assert puts[1][1] == ()
    stop.set()
    await job
    assert node.balanced_timer is None
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    await node.leave()
    await store.close()
