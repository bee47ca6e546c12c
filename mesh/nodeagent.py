"""The agent daemon of one node: registers in the store, applies its part of the desired state,
reports its tasks.

    mesh agent --store etcd://10.0.0.5:2379 --node-name n1 --address 10.0.0.11 [--role manager]
               [--label zone=a ...]

Its host namespace is the one it runs in (host_netns None). It
- registers /mesh/nodes/<name> (mesh.codec.NodeInfo: address, role, labels, its namespace's
  name if it has one, its routes) with a lease it keeps alive: the lease is its heartbeat, and
  when it expires the leader marks the node down and moves its tasks;
- watches /mesh/desired and applies the latest ClusterDoc's desired state with mesh.agent.Agent
  (built as the daemon builds a node's agent), which runs only this node's tasks; changes that
  arrive while an apply runs coalesce into the next one; it writes the revision it applied into
  its node record (NodeInfo.applied), or the one that failed with its error (NodeInfo.failed):
  each step of the manager waits for it, as no task report shows that the balancers let go of a
  task, nor that a node without tasks of the change applied it; and, after each data-plane sync,
  the tasks its balancers send new connections to (NodeInfo.balanced: `mesh up` waits for every
  node's);
- reports each task's state at /mesh/status/<name>/<task> (put with its lease, so a dead node's
  reports vanish with it) whenever it changes: running, health, whether it takes traffic
  (mesh.readiness: ready, and the published ports it does not listen on yet), and for a draining
  task whether it still serves connections (`serving`, looked at every 0.2 s while it drains):
  a manager on another host ends the drain when it turns false;
- watches the other nodes' reports: its balancers and DNS send traffic to a task of another node
  only once that node reports it ready (in the one-daemon lab too: mesh.cluster);
- keeps the state it last applied in <run dir>/applied.json. After `kill -9` and a restart it
  loads that state as what it has applied, re-attaches to the task processes still running
  (pid files with their start time), and kills those it no longer knows; the first apply then
  changes only what differs, so running tasks keep their PIDs and nothing is made twice.
- rewrites its balancers whole every MESH_LB_RESYNC seconds (60), as the daemon does;
- on SIGTERM/SIGINT: removes everything it made and revokes its lease (the node leaves at once).

In a lab, start it inside the node's network namespace with `nsenter --net=/run/netns/NODE`, not
`ip netns exec NODE`: ip netns exec also gives the process a private (slave) mount namespace, so
the sandboxes it names (ip netns add) would be visible to it alone.
Its files: MESH_RUN_DIR (default /run/mesh) / node-<name> / applied.json, logs/<task>.log|.pid.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from dataclasses import replace

from mesh.codec import ClusterDoc, CodecError, NodeInfo, decode, decode_doc, encode
from mesh.model import DnsOptions
from mesh.netlink import Netlink
from mesh.netns import NETNS_DIR
from mesh.nft import NftCli
from mesh.paths import Paths
from mesh.readiness import Readiness, established_connections
from mesh.runtime import kill_leftovers
from mesh.state import DesiredState
from mesh.store import Store, StoreError
from mesh.storeops import (DESIRED, LEASE_TTL, NODES, STATUS, LeaseKeeper, connect, follow,
                            status_key)

log = logging.getLogger("mesh.nodeagent")
RETRY = 1.0
POLL = 2.0                      # the supervisor does not report a first start: look this often
BALANCED_EVERY = 0.1            # the node record shows agent.balanced at most this often
DRAIN_POLL = 0.2                # while a task drains: whether it still serves connections
REPORTED = ("state", "pid", "exit_code", "restarts", "started_at", "health", "health_failing_streak")


def agent_paths(node: str) -> Paths:
    base = os.path.dirname(Paths.for_host(None).root)
    return Paths(os.path.join(base, f"node-{node}"))


def current_netns() -> str | None:
    """The name (in /run/netns) of the network namespace this process is in, or None."""
    own = os.stat("/proc/self/ns/net")
    for name in sorted(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else []:
        try:
            st = os.stat(os.path.join(NETNS_DIR, name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            return name
    return None


def load_applied(path: str) -> DesiredState:
    try:
        with open(path, "rb") as f:
            return decode(DesiredState, f.read())
    except FileNotFoundError:
        return DesiredState()
    except (OSError, CodecError) as exc:
        log.error("cannot read the state applied before (%s): starting from nothing", exc)
        return DesiredState()


def save_applied(path: str, desired: DesiredState) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(encode(desired))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class NodeAgent:
    def __init__(self, store: Store, info: NodeInfo, agent, paths: Paths, ttl: float = LEASE_TTL):
        self.store, self.info, self.agent, self.paths, self.ttl = store, info, agent, paths, ttl
        self.node = info.name
        self.state_path = os.path.join(paths.root, "applied.json")
        self.keeper: LeaseKeeper | None = None
        self.wanted: ClusterDoc | None = None
        self.wanted_rev = 0
        self.acked = 0                  # the revision of /mesh/desired the node record shows applied
        self.failed = 0                 # the revision whose apply failed last
        self.applying = asyncio.Lock()
        self.wanted_changed = asyncio.Event()
        self.status_dirty = asyncio.Event()
        self.reported: dict[str, dict] = {}
        self.dns_options: DnsOptions | None = None
        self.error: str | None = None
        self.error_shown: str | None = None
        self.info_balanced: frozenset[str] = frozenset()   # agent.balanced as the record shows it
        self.info_put_at = float("-inf")                  # when the record was put last (loop time)
        self.info_lock = asyncio.Lock()
        self.balanced_timer: asyncio.TimerHandle | None = None   # a put of agent.balanced is due
        self.remote: dict[tuple[str, str], dict] = {}     # other nodes' reports
        self.connections = established_connections      # (pid, addresses) -> connections served
        # every kick of the agent (a task changed state, or started listening) is a report to
        # send; and the agent learns other nodes' readiness from their reports, not from itself
        sup, kick = agent.sup, agent.kick
        sup.on_change = agent.kick = lambda: (kick(), self.status_dirty.set())
        agent.readiness = self.readiness
        agent.on_synced = self.status_dirty.set          # the node record shows agent.balanced

    # -- adoption ----------------------------------------------------------------------------
    async def adopt(self) -> list[str]:
        """Take over what a killed agent left: its applied state and its running tasks."""
        applied = load_applied(self.state_path)
        adopted = [name for name, task in applied.on_node(self.node).items()
                   if await self.agent.sup.adopt(task)]
        killed = kill_leftovers(self.agent.sup.log_dir, keep=set(adopted))
        if killed:
            log.warning("killed task processes this agent no longer knows: %s", killed)
        self.agent.applied = applied
        if applied.tasks:
            log.info("adopted the state applied before: %d tasks here, %d running (%s)",
                     len(applied.on_node(self.node)), len(adopted), ", ".join(adopted) or "none")
        return adopted

    # -- registration ------------------------------------------------------------------------
    async def register(self) -> None:
        self.keeper = LeaseKeeper(self.store, self.ttl)
        await self.keeper.start()
        await self._put_info()
        self.reported = {}              # every report again, with the new lease
        self.status_dirty.set()

    async def _put_info(self) -> None:
        # one put at a time, each made of the values of when it starts: two in flight (the
        # report loop's and the apply loop's) could land in the other order on etcd, and an
        # older acknowledgement last would keep the manager's step waiting for its timeout
        async with self.info_lock:
            info = replace(self.info, agent_pid=os.getpid(), error=self.error, applied=self.acked,
                           failed=self.failed if self.error else 0,
                           balanced=tuple(sorted(self.agent.balanced)))
            await self.store.put(f"{NODES}{self.node}", encode(info), lease=self.keeper.lease)
            self.error_shown, self.info_balanced = info.error, frozenset(info.balanced)
            self.info_put_at = asyncio.get_running_loop().time()

    def _balanced_now(self) -> None:
        self.balanced_timer = None
        self.status_dirty.set()

    async def keep_registered(self) -> None:
        while True:
            await self.keeper.lost.wait()
            log.warning("the node's lease was lost: registering again")
            await self.keeper.stop(revoke=False)
            while True:
                try:
                    await self.register()
                    break
                except (StoreError, OSError) as exc:
                    log.warning("registering: %s", exc)
                    await asyncio.sleep(RETRY)

    # -- desired state -----------------------------------------------------------------------
    async def watch(self) -> None:
        async for kind, item in follow(self.store, DESIRED):
            if kind == "snapshot":
                kv = next((kv for kv in item if kv.key == DESIRED), None)
                self._want(kv.value if kv else None, kv.mod_revision if kv else 0)
            elif item.kv.key == DESIRED:
                self._want(item.kv.value if item.kind == "put" else None, item.kv.mod_revision)

    def _want(self, value: bytes | None, revision: int) -> None:
        try:
            self.wanted = decode_doc(value) if value else ClusterDoc()
        except CodecError as exc:
            log.error("cannot read the desired state: %s", exc)
            return
        self.wanted_rev = revision
        self.wanted_changed.set()

    async def apply_loop(self) -> None:
        while True:
            await self.wanted_changed.wait()
            self.wanted_changed.clear()
            doc, revision, before = self.wanted, self.wanted_rev, self.agent.applied
            options = doc.stack.dns if doc.stack else DnsOptions()
            async with self.applying:          # a stopping agent lets an apply finish
                if doc.desired != before or options != self.dns_options or self.error:
                    await self._apply(doc.desired, options)
                    self.status_dirty.set()
            # the node record says which revision is applied (a drain, a balancer, a node with
            # no task: nothing a task report shows) or which one failed (the manager fails the
            # step at once, also on a node whose tasks did not change)
            ack = not self.error and revision > self.acked
            if ack:
                self.acked = revision
            failed = bool(self.error) and revision != self.failed
            if self.error:
                self.failed = revision
            if ack or failed or self.error != self.error_shown:
                try:
                    await self._put_info()
                except (StoreError, OSError) as exc:
                    log.warning("updating the node record: %s", exc)

    async def _apply(self, desired: DesiredState, options: DnsOptions) -> None:
        if self.agent.dns is not None:
            self.agent.dns.configure(options)
        self.dns_options = options
        try:
            await self.agent.apply(desired)
        except Exception as exc:         # the agent restored the previous state; say so
            log.exception("applying the desired state failed")
            self.error = f"{type(exc).__name__}: {exc}"
        else:
            self.error = None
            await asyncio.to_thread(save_applied, self.state_path, desired)

    # -- task reports ------------------------------------------------------------------------
    def _statuses(self) -> dict[str, dict]:
        sup, out = self.agent.sup, {}
        own = self.agent.own_readiness()
        for name, task in self.agent.applied.on_node(self.node).items():
            st = sup.status(name)
            absent, targets = own.missing.get(name, ((), ()))
            out[name] = {**{k: st[k] for k in REPORTED if k in st}, "id": task.id,
                         "log": sup.log_path(name), "ready": name in own.ready,
                         "missing": sorted(absent), "targets": sorted(targets)}
            if st.get("health_failing_streak") or st.get("health") in ("starting", "unhealthy"):
                out[name]["health_log"] = st.get("health_log", [])   # why (not while it passes)
            if name in self.agent.applied.draining:     # the manager waits for this to be false
                out[name]["serving"] = bool(st.get("pid")) and self.connections(
                    st["pid"], {e.address for e in task.endpoints}) > 0
        return out

    # -- other nodes' tasks ------------------------------------------------------------------
    async def watch_reports(self) -> None:
        """Mirror the other nodes' task reports; a change of who takes traffic kicks the agent
        (its balancers and DNS follow)."""
        async for kind, item in follow(self.store, STATUS):
            before = self._remote_readiness()
            if kind == "snapshot":
                self.remote = {}
                for kv in item:
                    self._absorb_report(kv.key, kv.value)
            else:
                self._absorb_report(item.kv.key, item.kv.value if item.kind == "put" else None)
            if self._remote_readiness() != before:
                self.agent.kick()

    def _absorb_report(self, key: str, value: bytes | None) -> None:
        node, _, task = key[len(STATUS):].partition("/")
        if node == self.node:
            return
        if value is None:
            self.remote.pop((node, task), None)
            return
        try:
            self.remote[(node, task)] = json.loads(value)
        except ValueError:
            log.error("ignoring the report %s", key)

    def _remote_readiness(self) -> Readiness:
        """Other nodes' tasks as their agents report them (a task not reported takes nothing)."""
        out = Readiness()
        for name, task in self.agent.applied.tasks.items():
            st = self.remote.get((task.node, name)) if task.node != self.node else None
            if st and st.get("id") == task.id:
                out.add_report(name, st)
        return out

    def readiness(self) -> Readiness:
        """Who takes traffic cluster-wide: this node's tasks as the agent sees them, the others'
        as their agents report them."""
        return self.agent.own_readiness().merge(self._remote_readiness())

    async def report_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that comes
            # as the event is set, and this loop would run on after NodeAgent.run cancelled it
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_POLL if self.agent.applied.draining else POLL):
                    await self.status_dirty.wait()
            self.status_dirty.clear()
            try:
                await self._report()
            except (StoreError, OSError) as exc:
                log.warning("reporting task states: %s", exc)
                self.status_dirty.set()
                await asyncio.sleep(RETRY)

    async def _report(self) -> None:
        want = self._statuses()
        for name, status in want.items():
            if self.reported.get(name) != status:
                await self.store.put(status_key(self.node, name), json.dumps(status).encode(),
                                     lease=self.keeper.lease)
                self.reported[name] = status
        for name in [n for n in self.reported if n not in want]:
            await self.store.delete(status_key(self.node, name))
            del self.reported[name]
        if self.info_balanced != self.agent.balanced:
            # at most one record per BALANCED_EVERY: a wave of tasks getting ready is one put
            # per node, not one per task per node
            wait = self.info_put_at + BALANCED_EVERY - asyncio.get_running_loop().time()
            if wait <= 0:
                await self._put_info()
            elif self.balanced_timer is None:
                self.balanced_timer = asyncio.get_running_loop().call_later(wait, self._balanced_now)

    async def resync(self) -> None:
        """The balancers' periodic repair, as the daemon's (mesh.daemon.resync_forever calls it)."""
        async with self.agent.lock:
            await asyncio.to_thread(self.agent.resync_lb)

    # -- the whole -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        from mesh.daemon import resync_forever
        await self.adopt()
        await self.register()
        jobs = [asyncio.ensure_future(j) for j in
                (self.watch(), self.apply_loop(), self.report_loop(), self.keep_registered(),
                 self.watch_reports(), resync_forever(self))]
        waiter = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait([waiter, *jobs], return_when=asyncio.FIRST_COMPLETED)
            for job in done:
                if job is not waiter and job.exception():
                    raise job.exception()
        finally:
            async with self.applying:           # not in the middle of making the kernel objects
                for job in jobs + [waiter]:
                    job.cancel()
                await asyncio.gather(*jobs, waiter, return_exceptions=True)
            if self.balanced_timer is not None:
                self.balanced_timer.cancel()
                self.balanced_timer = None
            if self.keeper is not None and not stop.is_set():
                await self.keeper.stop(revoke=False)     # a failed agent stops its heartbeat

    async def leave(self) -> None:
        """Remove everything this agent made, then its registration and reports."""
        await self.agent.teardown()
        if self.agent.dns is not None:
            await self.agent.dns.resolver.close()
        if os.path.exists(self.state_path):
            os.unlink(self.state_path)
        if self.keeper is not None:
            await self.keeper.stop(revoke=True)


def route_strings(routes) -> tuple[str, ...]:
    """A node's routes as it registers them (NodeInfo.routes): distinct, sorted, as text."""
    return tuple(sorted({str(r) for r in routes}))


def node_info(name: str, address: str, role: str, labels: list[str]) -> NodeInfo:
    """The registration of this node; MeshError-free checks are done by the CLI."""
    pairs = tuple(sorted(tuple(label.split("=", 1)) for label in labels))
    return NodeInfo(name=name, address=address, role=role, labels=pairs, netns=current_netns(),
                    routes=route_strings(Netlink().routes(None)))


def build_agent(name: str, paths: Paths):
    """This node's Agent, wired as the daemon wires a lab node's (mesh.daemon.node_agent), with
    this namespace as its host namespace and the load balancer MESH_LB names (auto by default)."""
    from mesh import daemon
    return daemon.node_agent(None, name, Netlink(), NftCli(), paths, os.environ.get("MESH_LB", "auto"))


async def serve_agent(url: str, name: str, address: str, role: str, labels: list[str]) -> None:
    paths = agent_paths(name)
    os.makedirs(paths.root, exist_ok=True)
    store = await connect(url, "agent", name)
    info = await asyncio.to_thread(node_info, name, address, role, labels)
    agent = await asyncio.to_thread(build_agent, name, paths)
    node = NodeAgent(store, info, agent, paths)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    log.info("mesh agent %s (%s, namespace %s) joining %s", name, address, info.netns or "root", url)
    try:
        await node.run(stop)
        log.info("mesh agent %s leaving: removing what it made", name)
        await node.leave()
    finally:                  # an error leaves the tasks running: a restarted agent adopts them
        await store.close()
