"""The local lab in one daemon, on the embedded store: `mesh up -f FILE --nodes N`.

The same pieces as a cluster of separate daemons on etcd (`mesh manager`, `mesh agent`), in one
process around a MemoryStore: lab node namespaces (mesh.lab), the manager's ClusterController
(elected through the store, mirroring it, writing /mesh/desired) and one NodeAgent per node
(registered with a lease, applying its part with its own mesh.agent.Agent in its namespace,
reporting its tasks). Every change goes through the store as it would on etcd.

    lab = LocalCluster(host_netns, 3, paths, make_agent, lb)   # blocking: makes the namespaces
    await lab.start()        # the manager leads and every node has registered
    lab.ctl                  # what the API calls (mesh.api.build_app + mesh.manager.cluster_middleware)
    await lab.stop()         # the stack down, each node's leftovers removed, then the namespaces

Node n1 is a manager node, the others workers (node.role in placement constraints). Each node
keeps its files in <run dir>/nodes/<name>/ (applied.json, logs/; `mesh down` sweeps them when the
daemon was killed). Each node registers its own routes and the host namespace's (a network's subnet
overlaps none), and its lease lives 30 s (in one process no node dies alone; a stalled loop must not
expire them all). Stopping waits for a change under way, takes the stack down, then each agent
finishes its apply and removes what it made. Each phase of stopping is bounded (STOP_PHASE): one
that hangs is logged with what every asyncio task waits on, and the lab goes all the same.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from mesh.codec import NodeInfo
from mesh.dumps import bounded
from mesh.election import Election
from mesh.errors import MeshError
from mesh.lab import LabNode, make_lab, remove_lab
from mesh.manager import ClusterController
from mesh.netlink import Netlink
from mesh.nodeagent import NodeAgent, route_strings
from mesh.paths import Paths
from mesh.runtime import kill_leftovers
from mesh.store import MemoryStore
from mesh.storeops import counted

log = logging.getLogger("mesh.cluster")
START_TIMEOUT = 30.0
MANAGER = "manager"
LEASE_TTL = 30.0    # in one process no node dies alone; a stalled loop must not expire every lease
STOP_PHASE = 30.0   # the longest each phase of stop() may take (a task's drain is before them)


def lab_node_info(node: LabNode, index: int, routes) -> NodeInfo:
    """What a lab node's agent registers (n1 is a manager node, as in the etcd lab)."""
    return NodeInfo(name=node.name, address=node.address, role="manager" if index == 0 else "worker",
                    netns=node.netns, routes=route_strings(routes))


class LocalCluster:
    def __init__(self, host_netns: str | None, count: int, paths: Paths, make_agent, lb: str):
        """Make the lab's namespaces and wire its pieces; `make_agent(netns, node, paths)` builds a
        node's mesh.agent.Agent (mesh.daemon.node_agent)."""
        self.host, self.lb = host_netns, lb
        self.nl = Netlink()
        # a lab that makes the host namespace removes it; a marker remembers it across a
        # killed daemon, whose successor finds the namespace there
        self.made_marker = paths.made_host_marker
        self.made_host = bool(host_netns) and (not self.nl.netns_exists(host_netns)
                                               or os.path.exists(self.made_marker))
        if self.made_host:
            os.makedirs(paths.root, exist_ok=True)
            open(self.made_marker, "w").close()
        self.nodes = make_lab(host_netns, count, self.nl)
        self.store = counted(MemoryStore(), "lab", "embedded")
        self.ctl = ClusterController(self.store, MANAGER)
        self.ctl.lb_name = lb
        self.election = Election(self.store, MANAGER, ttl=LEASE_TTL)
        self.agents: list[NodeAgent] = []
        host_routes = self.nl.routes(host_netns)
        for i, node in enumerate(self.nodes):
            own = paths.node(node.name)
            os.makedirs(own.root, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):   # a new lab has applied nothing yet
                os.unlink(os.path.join(own.root, "applied.json"))
            # a subnet must overlap neither the node's routes nor the host namespace's
            info = lab_node_info(node, i, self.nl.routes(node.netns) + host_routes)
            self.agents.append(NodeAgent(self.store, info, make_agent(node.netns, node.name, own), own,
                                         ttl=LEASE_TTL))
        self.manager_jobs: list[asyncio.Future] = []
        self.agent_jobs: list[asyncio.Future] = []
        self.agents_stop = asyncio.Event()
        self.stopped = False

    @property
    def ping(self) -> dict:
        return {"host_netns": self.host, "nodes": len(self.nodes), "lb": self.lb}

    async def start(self) -> None:
        """Run the manager and the node agents; return once it leads and every node is ready."""
        self.manager_jobs = [
            asyncio.ensure_future(self.ctl.mirror()),
            asyncio.ensure_future(self.election.run(self.ctl.on_elected, self.ctl.on_deposed))]
        self.agent_jobs = [asyncio.ensure_future(a.run(self.agents_stop)) for a in self.agents]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        names = {n.name for n in self.nodes}
        while not (self.ctl.leading and names <= {n.name for n in self.ctl.doc.nodes
                                                  if n.state == "ready"}):
            failed = [job for job in self.manager_jobs + self.agent_jobs if job.done()]
            if failed:
                raise MeshError(f"the lab could not start: {failed[0].exception()!r}")
            if loop.time() > deadline:
                raise MeshError(f"the lab did not start within {START_TIMEOUT:.0f} s: nodes "
                                f"registered: {sorted(self.ctl.live)}, leading: {self.ctl.leading}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """The stack down (the agents remove their tasks), every node agent gone with what it
        made, the manager stopped, the namespaces removed. Safe to call twice."""
        if self.stopped:
            return
        self.stopped = True
        if self.ctl.leading:        # waits for a change under way (the first `up` too)
            try:
                await self.ctl.down()
            except Exception:
                log.exception("taking the stack down failed: the agents remove what is left")
        # each phase is bounded: a hung one is logged with what every task waits on, and the
        # lab goes all the same (mesh down must finish; the namespaces take the rest with them)
        await bounded("the manager resigning", self.election.resign(), STOP_PHASE)
        for job in self.manager_jobs + [self.ctl.replacing.task]:
            if job is not None:
                job.cancel()
        await bounded("the manager stopping",
                      asyncio.gather(*self.manager_jobs, return_exceptions=True), STOP_PHASE)
        self.agents_stop.set()                # each agent finishes the apply under way first
        await bounded("the node agents stopping",
                      asyncio.gather(*self.agent_jobs, return_exceptions=True), STOP_PHASE)
        for agent in self.agents:
            try:
                if not await bounded(f"node {agent.node} removing what it made", agent.leave(),
                                     STOP_PHASE):
                    kill_leftovers(agent.agent.sup.log_dir)
            except Exception:
                log.exception("node %s: removing what it made failed", agent.node)
        await asyncio.to_thread(self.remove)

    def jobs(self) -> list[asyncio.Future]:
        """What runs while the lab serves: one ending means the lab no longer works."""
        return self.manager_jobs + self.agent_jobs

    def remove(self) -> None:
        remove_lab(self.host, self.nodes, self.nl)
        if self.made_host:               # the lab made the host namespace: it goes with the lab
            if self.nl.netns_exists(self.host):
                self.nl.delete_netns(self.host)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.made_marker)
