"""The manager daemon: the daemon's API and controller, with the cluster store where the agents were.

    mesh manager --store etcd://10.0.0.5:2379 [--node-name m1] [--host-netns NAME]

It serves the daemon's HTTP API (mesh.api.build_app) on the unix socket of its host namespace,
so `mesh up/ps/service .../node ls/inspect/logs/exec/down` work against it. Several managers may
run; one leads (mesh.election). Every manager mirrors the store (one watch on /mesh/) and answers
reads from that mirror; only the leader changes anything, and a standby answers a change with 409
and the leader's name.

The leader's work: a change (up, scale, rm, connect, disconnect) is placed by the scheduler on the
nodes registered under /mesh/nodes/ (a node whose lease expired is down: its tasks move, global
services follow nodes that join and leave), allocated cluster-wide (mesh.allocator), and written as
ONE key, /mesh/desired (mesh.codec.ClusterDoc: the desired state of every node, the stack, the
node table), by compare-and-swap on its previous revision. Agents watch that key; each applies its
node's part and reports task state under /mesh/status/<node>/<task>, which the API shows.

A change goes through mesh.controller.Controller's steps as in the one-daemon lab — leaving tasks
drained first, changed tasks replaced one at a time (each back in the balancers once ready), one
change at a time, the last state written back when a step fails — because each step is one write
of /mesh/desired (ClusterController._apply_all) followed by a wait, bounded by MESH_APPLY_TIMEOUT
(30 s), until every registered node's reports show it applied: its tasks reported with their ids,
a restarted task reported with a new start, a removed task's report gone, and every node's record
acknowledging the revision of /mesh/desired it applied (NodeInfo.applied: balancers, DNS and the
nodes without tasks of the change show in no task report). A task restarting
is written draining first and back once reported anew, so no other node balances to it on its old
report. Readiness and task states come from the reports; whether a draining task still serves
connections is read from its process when its node is on this machine (a lab), otherwise from its
agent's report (`serving`), bounded by its drain timeout (x-mesh: drain_timeout, 10 s). A node
that reports an error while applying fails the step: the last state is written back.

`mesh down` removes the stack (the agents tear down what they made), waits for the agents to
report nothing left, and stops this manager, as `mesh down` stops the daemon.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import replace
from ipaddress import ip_network

import aiohttp
from aiohttp import web

from mesh.agent import renewed, restart_key
from mesh.allocator import ClusterPlacement
from mesh.codec import ClusterDoc, CodecError, NodeInfo, decode, decode_doc, encode
from mesh.coalesce import Coalescing
from mesh.controller import Controller
from mesh.api import build_app
from mesh.election import Election
from mesh.errors import Conflict, MeshError
from mesh.netns import NETNS_DIR
from mesh.paths import Paths
from mesh.readiness import Readiness
from mesh.scheduler import Node, schedule
from mesh.state import DesiredState
from mesh.store import CasFailed, KeyValue, Store
from mesh.storeops import DESIRED, LEADER, NODES, PREFIX, STATUS, connect, follow

log = logging.getLogger("mesh.manager")
DOWN_TIMEOUT = 60.0
UNREPORTED = {"state": "assigned", "pid": None, "exit_code": None, "restarts": 0}
APPLY_TIMEOUT = float(os.environ.get("MESH_APPLY_TIMEOUT", "30"))   # a step's wait for the reports


def placement(stack, previous: DesiredState, table: tuple[NodeInfo, ...]) -> ClusterPlacement:
    """Where each task runs, on the nodes of `table` (down nodes get nothing; pure)."""
    nodes = [Node(name=n.name, id=n.name, role=n.role, labels=n.labels, ready=n.state == "ready")
             for n in table]
    before = {t.name: t.node for t in previous.tasks.values() if t.node}
    placed = schedule(stack.services, nodes, before)
    return ClusterPlacement(
        node_netns={n.name: n.netns for n in table},
        underlay={n.name: n.address for n in table if n.state == "ready"},
        tasks=tuple((p.service, p.slot, p.task, p.node) for p in placed if p.node),
        pending=tuple((p.service, p.task, p.reason or "") for p in placed if not p.node))


def node_table(known: tuple[NodeInfo, ...], live: dict[str, NodeInfo]) -> tuple[NodeInfo, ...]:
    """Every node the cluster knows, sorted: the registered ones ready, the others down (pure)."""
    out = {n.name: replace(n, state="down") for n in known}
    out.update({name: replace(n, state="ready", agent_pid=None, error=None, applied=0, failed=0,
                              balanced=())
                for name, n in live.items()})
    return tuple(out[name] for name in sorted(out))


def cluster_routes(table: tuple[NodeInfo, ...]) -> list:
    """Every ready node's own routes: a network's subnet must overlap none of them."""
    return sorted({ip_network(r, strict=False) for n in table if n.state == "ready" for r in n.routes},
                  key=str)


class ClusterController(Controller):
    """mesh.controller.Controller's checks and changes (drain, rolling replacement, restore); each
    step goes to the store, and what the agents report comes back as readiness and task states."""

    def __init__(self, store: Store, name: str):
        # host None: names the manager derives (bridge links) must not depend on which manager leads
        super().__init__([], None, None, placer=self._place)
        self.apply_timeout = APPLY_TIMEOUT
        self._next: tuple | None = None          # (stack, conns, disconns, node table) of a change
        self._superseded = False                 # another manager wrote: nothing to restore
        self.store, self.name = store, name
        self.leading = False
        self.leader_name: str | None = None
        self.doc, self.doc_rev = ClusterDoc(), 0
        self.live: dict[str, NodeInfo] = {}
        self.statuses: dict[tuple[str, str], dict] = {}
        self.lock = asyncio.Lock()
        self.synced = asyncio.Event()
        self.replacing = Coalescing(self.reconcile, "re-placing after a node change")

    # -- the mirror of /mesh/ ---------------------------------------------------------------
    async def mirror(self) -> None:
        async for kind, item in follow(self.store, PREFIX):
            if kind == "snapshot":
                self.live.clear()
                self.statuses.clear()
                for kv in item:
                    self._absorb(kv, True)
                self.synced.set()
            else:
                before = self._placement_keys()
                self._absorb(item.kv, item.kind == "put")
                # a node record that changes nothing placement reads (its acknowledgement, the
                # tasks its balancers take) is no reason to re-place: those come with every change
                # and every task getting ready, and each re-placing waits for the manager's lock
                if not item.kv.key.startswith(NODES) or self._placement_keys() == before:
                    continue
            if self.leading:
                self.kick()

    def _placement_keys(self) -> dict[str, tuple]:
        return {name: info.placement_key() for name, info in self.live.items()}

    def _absorb(self, kv: KeyValue, present: bool) -> None:
        key = kv.key
        try:
            if key.startswith(NODES):
                name = key[len(NODES):]
                if present:
                    self.live[name] = decode(NodeInfo, kv.value)
                else:
                    self.live.pop(name, None)
            elif key.startswith(STATUS):
                node, _, task = key[len(STATUS):].partition("/")
                if present:
                    self.statuses[(node, task)] = decode(dict[str, object], kv.value)
                else:
                    self.statuses.pop((node, task), None)
            elif key == DESIRED:
                if not present:
                    self._load(ClusterDoc(), 0)
                elif kv.mod_revision > self.doc_rev:
                    doc = decode_doc(kv.value)
                    # the leader's own step (seen before its put returned): the change under way
                    # keeps its own record (a step's state is not the recorded one)
                    if not (self.leading and doc.leader == self.name):
                        self._load(doc, kv.mod_revision)
            elif key == LEADER:
                self.leader_name = decode(dict[str, object], kv.value).get("name") if present else None
        except CodecError as exc:
            log.error("ignoring %s: %s", key, exc)

    def _load_kv(self, kv: KeyValue | None) -> None:
        if kv is None:
            self._load(ClusterDoc(), 0)
        else:
            self._load(decode_doc(kv.value), kv.mod_revision)

    def _load(self, doc: ClusterDoc, revision: int) -> None:
        self.doc, self.doc_rev = doc, revision
        self.desired, self.stack = doc.desired, doc.stack
        self.connections, self.disconnections = doc.connections, doc.disconnections

    # -- leadership -------------------------------------------------------------------------
    async def on_elected(self) -> None:
        await self.synced.wait()
        async with self.lock:
            self._load_kv(await self.store.get(DESIRED))     # the latest, not the mirror's
            self.leading = True
        self.kick()

    async def on_deposed(self) -> None:
        self.leading = False

    def kick(self) -> None:
        """Nodes changed: re-place soon; a burst of changes coalesces into one write."""
        self.replacing.kick()

    async def reconcile(self) -> None:
        async with self.lock:
            if not self.leading:
                return
            table = node_table(self.doc.nodes, self.live)
            cut_short = self.stack is not None and bool(self.desired.draining)  # a leader died mid-change
            if [n.placement_key() for n in table] == [n.placement_key() for n in self.doc.nodes] \
                    and not cut_short:
                return
            log.info("nodes: %s", ", ".join(f"{n.name} {n.state}" for n in table))
            if self.stack is None:
                await self._publish(replace(self.doc, nodes=table))
            else:
                await self._build_and_apply(self.stack, self.connections, self.disconnections)

    def _require_leader(self) -> None:
        if not self.leading:
            raise Conflict(f"this manager ({self.name}) is a standby and changes nothing; the leader "
                           f"is {self.leader_name or 'being elected'}: ask it, or retry in a moment")

    # -- what the Controller calls ------------------------------------------------------------
    async def _build_and_apply(self, stack, conns, disconns) -> DesiredState:
        self._require_leader()
        self._superseded = False
        return await super()._build_and_apply(stack, conns, disconns)

    async def _change(self, stack, conns, disconns) -> DesiredState:
        self._next = (stack, conns, disconns, node_table(self.doc.nodes, self.live))
        try:
            return await super()._change(stack, conns, disconns)
        finally:
            self._next = None

    def _place(self, stack, previous: DesiredState) -> ClusterPlacement:
        return placement(stack, previous, self._next[3])

    async def _routes(self):
        return cluster_routes(self._next[3])

    async def _restore(self) -> None:
        if self.leading and not self._superseded:
            await super()._restore()

    async def _apply_all(self, desired: DesiredState) -> None:
        """One step: written to the store, then the agents' reports awaited (see the module)."""
        stack, conns, disconns, table = self._next or (
            self.stack, self.connections, self.disconnections, node_table(self.doc.nodes, self.live))
        restarting = self._restarting(self.doc.desired, desired, frozenset(self.live)) \
            - desired.draining
        if restarting:       # out of every balancer while it restarts: back once reported anew
            await self._step(ClusterDoc(replace(desired, draining=desired.draining | restarting),
                                        stack, conns, disconns, table))
        await self._step(ClusterDoc(desired, stack, conns, disconns, table))

    @staticmethod
    def _restarting(before: DesiredState, after: DesiredState, live: frozenset[str]) -> frozenset[str]:
        """Tasks the step starts anew under their name while a report of the old one may still be
        read for them: restarted in place, or moved from a node that is up (no balancer may take
        that report for the new task's). A dead node's reports went with its lease."""
        return frozenset(n for n, t in after.tasks.items() if n in before.tasks
                         and renewed(before.tasks[n], t, before.tasks[n].node in live))

    def _node_up(self, node: str) -> bool:
        return node in self.live

    async def _step(self, doc: ClusterDoc) -> None:
        if replace(doc, leader=self.doc.leader, serial=self.doc.serial) == self.doc:
            return                                   # written already (the last step of a change)
        before, reports = self.doc.desired, dict(self.statuses)
        errors = {name: n.error for name, n in self.live.items()}
        await self._publish(doc, record=False)
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            failed = [(name, n.error) for name, n in self.live.items()
                      if n.error and (n.error != errors.get(name) or n.failed == self.doc_rev)]
            if failed:
                raise MeshError("; ".join(f"node {name} could not apply the change: {error}"
                                          for name, error in failed))
            waiting = self._unapplied(before, doc.desired, reports)
            # what no task report shows (balancers, DNS, a node with no task of the change, its
            # failure): each node acknowledges the revision it applied
            waiting |= {name for name, n in self.live.items() if n.applied < self.doc_rev}
            if not waiting:
                break
            if loop.time() - start >= self.apply_timeout:
                log.warning("going on after %.0f s without reports of %s", self.apply_timeout,
                            ", ".join(sorted(waiting)[:10]))
                break
            await asyncio.sleep(0.05)

    def _unapplied(self, before: DesiredState, after: DesiredState, reports: dict) -> set[str]:
        """node/task of every registered node whose reports do not show `after` applied yet."""
        out = set()
        for node in self.live:
            mine, old = after.on_node(node), before.on_node(node)
            for name, task in mine.items():
                st = self.statuses.get((node, name))
                if st is None or st.get("id") != task.id:
                    out.add(f"{node}/{name}")
                elif name in old and restart_key(old[name]) != restart_key(task):
                    was = reports.get((node, name)) or {}
                    if st.get("state") in ("stopped", "assigned") or \
                            (was and st.get("started_at") == was.get("started_at")):
                        out.add(f"{node}/{name}")
            out.update(f"{n}/{t}" for n, t in self.statuses if n == node and t not in mine)
        return out

    async def _publish(self, doc: ClusterDoc, record: bool = True) -> None:
        """Write `doc` (compare-and-swap); record=False: a step of a change, which keeps its own
        record of the desired state (Controller._change sets self.desired as steps land)."""
        doc = replace(doc, leader=self.name, serial=self.doc.serial + 1)
        try:
            revision = await self.store.put(DESIRED, encode(doc), expect=self.doc_rev)
        except CasFailed as exc:
            self._load_kv(exc.current)
            self._superseded = True
            raise Conflict("the cluster's desired state was changed by another manager; "
                           "this one has re-read it: retry") from None
        if record:
            self._load(doc, revision)
        else:
            self.doc, self.doc_rev = doc, revision

    def _report(self, name: str, task) -> dict | None:
        st = self.statuses.get((task.node, name))
        return st if st is not None and st.get("id", task.id) == task.id else None

    def readiness(self) -> Readiness:
        """Who takes traffic, as the agents report it (what each agent computes of its own tasks)."""
        out = Readiness()
        for name, task in {**self.desired.tasks, **self.doc.desired.tasks}.items():
            st = self._report(name, task)
            if st:
                out.add_report(name, st)
        return out

    def _balancers(self) -> dict[str, frozenset[str]]:
        """Node -> the tasks its balancers send new connections to, as its record says (every
        registered node: a node whose lease expired has no record)."""
        return {name: frozenset(info.balanced) for name, info in self.live.items()}

    def _serving(self, task: str) -> bool:
        """A draining task's connections: seen from its process when its node is on this machine
        (a lab), otherwise as its agent reports them (`serving`; until that report: yes)."""
        node = self.live.get(self.desired.tasks[task].node)
        status = self.status(task)
        if node is None or not status.get("pid"):
            return False
        if node.netns and os.path.exists(os.path.join(NETNS_DIR, node.netns)):
            return super()._serving(task)
        return bool(status.get("serving", True))

    def status(self, task: str) -> dict:
        t = self.task(task)
        return self._report(task, t) or UNREPORTED

    def log_path(self, task: str) -> str:
        return str(self.status(task).get("log") or "")

    async def down(self) -> None:
        async with self.lock:
            self._require_leader()
            await self._publish(ClusterDoc(nodes=node_table(self.doc.nodes, self.live)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DOWN_TIMEOUT
        while self._reported_tasks() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if self._reported_tasks():
            log.warning("mesh down: agents still report %s", sorted(self._reported_tasks()))

    def _reported_tasks(self) -> set[tuple[str, str]]:
        return {key for key in self.statuses if key[0] in self.live}

    def node_list(self) -> list[dict]:
        """`mesh node ls`: every node known, with its state and number of tasks."""
        return [{"name": n.name, "address": n.address, "role": n.role, "state": n.state,
                 "tasks": len(self.desired.on_node(n.name)), "labels": dict(n.labels),
                 "error": self.live[n.name].error if n.name in self.live else None}
                for n in node_table(self.doc.nodes, self.live)]


def _locked(method):
    async def call(self, *args):
        async with self.lock:
            return await method(self, *args)
    call.__name__ = method.__name__
    return call


for _name in ("up", "run", "scale", "remove_service", "connect", "disconnect"):
    setattr(ClusterController, _name, _locked(getattr(Controller, _name)))


def cluster_middleware(ctl: ClusterController, ping: dict | None = None):
    """The routes that differ from the daemon's: nodes come from the store, ping says who leads
    (and adds `ping`: the one-daemon lab's node count and load balancer)."""
    @web.middleware
    async def middleware(request, handler):
        if request.method == "GET" and request.path == "/v1/nodes":
            return web.json_response(ctl.node_list())
        if request.method == "GET" and request.path == "/v1/ping":
            return web.json_response({"host_netns": None, "pid": os.getpid(), "nodes": 0,
                                      "manager": ctl.name, "leader": ctl.leader_name,
                                      "leading": ctl.leading, **(ping or {})})
        return await handler(request)
    return middleware


async def serve_manager(url: str, name: str, host_netns: str | None) -> None:
    paths = Paths.for_host(host_netns)
    os.makedirs(paths.root, exist_ok=True)
    if os.path.exists(paths.socket) and await _answers(paths.socket):
        raise MeshError(f"a mesh daemon or manager already serves {paths.socket}")
    store = await connect(url, "manager", name)
    ctl = ClusterController(store, name)
    election = Election(store, name)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    app = build_app(ctl, stop)
    app.middlewares.append(cluster_middleware(ctl))
    runner = web.AppRunner(app)
    await runner.setup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.socket)                 # a stale socket: nothing answered on it
    await web.UnixSite(runner, paths.socket).start()
    jobs = [asyncio.ensure_future(ctl.mirror()),
            asyncio.ensure_future(election.run(ctl.on_elected, ctl.on_deposed))]
    log.info("mesh manager %s serving %s, store %s", name, paths.socket, url)
    try:
        done, _ = await asyncio.wait([asyncio.ensure_future(stop.wait()), *jobs],
                                     return_when=asyncio.FIRST_COMPLETED)
        for job in done:
            if job in jobs and job.exception():
                raise job.exception()
        await asyncio.sleep(0.05)          # let the answer to /v1/down go out
    finally:
        await election.resign()          # first: its lease is revoked, a standby leads at once
        for job in jobs + [ctl.replacing.task]:
            if job is not None:
                job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await runner.cleanup()
        await store.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.socket)


async def _answers(socket_path: str) -> bool:
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path),
                                         timeout=aiohttp.ClientTimeout(total=2)) as session:
            async with session.get("http://mesh/v1/ping") as resp:
                return resp.status == 200
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return False
