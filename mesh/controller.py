"""The controller: holds the stack and run-time changes, allocates, asks the agents to apply.

It is what the API calls; it knows nothing of HTTP. Every change is: validate -> (in a cluster:
place tasks on nodes) -> build the whole desired state (pure, mesh.allocator) -> every agent applies
its part (kernel + processes). A change that fails to allocate touches nothing; one that fails in
an agent is undone everywhere by applying the previous state again.

    Controller([agent], netlink, host_netns)     # one host: one agent, node "" (mesh.daemon)

A cluster (the one-daemon lab and `mesh manager`) is mesh.manager.ClusterController: the same
steps, each written to the store for the nodes' agents, with a placer that asks the scheduler.
"""
from __future__ import annotations

import asyncio
import re
import logging
from dataclasses import replace

from mesh.agent import renewed
from mesh.allocator import build_desired
from mesh.errors import Conflict, NotFound
from mesh.model import Attachment, DnsOptions, Placement, Service, Stack
from mesh.readiness import Readiness, established_connections
from mesh.scheduler import host_port_clashes
from mesh.spec_models import RESERVED_TASK_NAME
from mesh.state import DesiredState, TaskState

log = logging.getLogger("mesh.controller")
DRAIN_TIMEOUT = 10.0         # seconds a leaving task may finish its connections (x-mesh: drain_timeout)
READY_TIMEOUT = 30.0         # a rolling update pauses when a replaced task is not ready by then
START_WAIT = 10.0            # a drain waits at most this long for the service's new tasks to be ready
DRAIN_SETTLE = 0.3           # connections already on their way when the balancers let go of it


class Controller:
    def __init__(self, agents, netlink, host_netns: str | None, placer=None):
        self.agents = {a.node: a for a in agents}
        self.nl = netlink
        self.host = host_netns
        self.placer = placer                 # (stack, previous) -> ClusterPlacement, or None
        self.lb_name = "nftables"            # which load balancer the agents use (for the API)
        self.changing = asyncio.Lock()
        self.standalone: dict[str, Service] = {}   # mesh run: standalone containers, by name
        self.start_wait = START_WAIT
        self.desired = DesiredState()
        self.stack: Stack | None = None
        self.connections: tuple[tuple[str, str], ...] = ()
        self.disconnections: tuple[tuple[str, str], ...] = ()
        for agent in self.agents.values():
            agent.readiness = self.readiness
            agent.sup.on_change = self.kick

    def readiness(self) -> Readiness:
        """Who takes traffic, cluster-wide: each agent knows its own tasks."""
        out = Readiness()
        for agent in self.agents.values():
            out = out.merge(agent.own_readiness())
        return out

    def waiting(self) -> dict[str, str]:
        """Task -> what still keeps it from new connections through every node, for the tasks
        that run (and are healthy, if checked): a published TCP port it does not listen on, or a
        node whose balancers do not send to it yet. `mesh up` waits for these too."""
        ready, balancers = self.readiness(), self._balancers()
        out = {}
        for name in self.desired.tasks:
            if name not in ready.ready or name in self.desired.draining:
                continue
            absent = ready.missing.get(name, (frozenset(), frozenset()))[0]
            lagging = sorted(node or "this host" for node, has in balancers.items() if name not in has)
            if absent:
                out[name] = "not listening on " + ", ".join(f"{p}/tcp" for p in sorted(absent)) + " yet"
            elif lagging:
                out[name] = "not in the balancers of " + ", ".join(lagging) + " yet"
        return out

    def _balancers(self) -> dict[str, frozenset[str]]:
        """Node -> the tasks its balancers send new connections to (mesh.agent.Agent.balanced)."""
        return {node: agent.balanced for node, agent in self.agents.items()}

    def kick(self) -> None:
        """A task changed state somewhere: every node's DNS and balancers follow."""
        for agent in self.agents.values():
            agent.kick()

    def agent_of(self, task: str):
        return self.agents[self.task(task).node]

    def status(self, task: str) -> dict:
        return self.agent_of(task).sup.status(task)

    def log_path(self, task: str) -> str:
        return self.agent_of(task).sup.log_path(task)

    async def _routes(self):
        if self.host and not self.nl.netns_exists(self.host):
            return []
        return await asyncio.to_thread(self.nl.routes, self.host)

    async def _apply_all(self, desired: DesiredState) -> None:
        """One step of a change: every node applies `desired` (raises if one fails; the caller
        restores). The one place a change reaches the nodes: a cluster on a store overrides it
        (mesh.manager.ClusterController) and inherits draining, rolling replacement and restore."""
        results = await asyncio.gather(*(a.apply(desired) for a in self.agents.values()),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]

    async def _restore(self) -> None:
        """Every node back to the last recorded state (also undoes a drain that was under way)."""
        try:
            await self._apply_all(self.desired)
        except Exception:
            log.exception("restoring the last recorded state failed")

    async def _build_and_apply(self, stack: Stack, conns, disconns) -> DesiredState:
        async with self.changing:        # one change at a time: each builds on the last
            try:
                return await self._change(stack, conns, disconns)
            except Exception:
                await self._restore()
                raise

    async def _change(self, stack: Stack, conns, disconns) -> DesiredState:
        cluster = self.placer(stack, self.desired) if self.placer else None
        desired = build_desired(stack, self.desired, await self._routes(), self.host,
                                conns, disconns, cluster)
        rolling = self._rolling(desired)
        if rolling:
            # one task at a time, as Swarm's update_config (parallelism 1, stop-first): the others
            # keep serving while each is drained, restarted (or started on its new node) and back
            # in the balancers
            first = replace(desired, tasks={n: self.desired.tasks[n] if n in rolling else t
                                            for n, t in desired.tasks.items()})
            await self._drain(self._leaving(first))
            await self._apply_all(first)
            self.desired = first
            for name in rolling:
                if not self._node_up(desired.tasks[name].node):
                    break            # its new node went down meanwhile: the rest goes at once below
                step = replace(self.desired, tasks={**self.desired.tasks, name: desired.tasks[name]})
                await self._drain(frozenset([name]))
                await self._apply_all(step)
                self.desired = step
                if not await self._until_ready(name):
                    if not self._node_up(desired.tasks[name].node):
                        break        # (the reconcile that follows places its tasks again)
                    # Swarm's failure_action "pause": the other tasks keep the old definition
                    self.stack, self.connections, self.disconnections = stack, conns, disconns
                    raise Conflict(f"update paused: task '{name}' did not become ready with the new "
                                   f"definition or node ({self.status(name).get('state')}, health "
                                   f"{self.status(name).get('health', 'none')}); the other tasks "
                                   f"keep the old one. Fix the stack and run mesh up again "
                                   f"(mesh logs {name} may say why)")
        await self._drain(self._leaving(desired))
        await self._apply_all(desired)
        self.desired = desired
        self.stack, self.connections, self.disconnections = stack, conns, disconns
        return desired

    def _node_up(self, node: str) -> bool:
        """The node can run tasks (a cluster's node registered with a live lease)."""
        return True

    def _rolling(self, desired: DesiredState) -> list[str]:
        """Tasks replaced one at a time: restarted in place (same node, new definition) or, while
        they run, moved to another node (a changed placement), when the change leaves the networks
        as they were (otherwise the change applies at once). Tasks that no longer run (their node
        is gone: its reports went with its lease) move at once."""
        if desired.networks != self.desired.networks:
            return []
        alive = self.readiness().alive
        rolling = [n for n, old in self.desired.tasks.items()
                   if n in desired.tasks and renewed(old, desired.tasks[n], n in alive)]
        while clash := self._clashing(desired, rolling):
            rolling = [n for n in rolling if n not in clash]      # these go at once, stop-first
        return rolling

    def _clashing(self, desired: DesiredState, rolling: list[str]) -> set[str]:
        """Tasks of `rolling` that some step of the rollout (those before it moved, those after
        it not yet) would leave on a node with another task holding the same host-mode port:
        services sharing a port that swap nodes, say."""
        out: set[str] = set()
        for step in range(len(rolling) + 1):
            tasks = {**desired.tasks, **{n: self.desired.tasks[n] for n in rolling[step:]}}
            out |= host_port_clashes([(n, t.service, t.node) for n, t in tasks.items()],
                                     desired.services)
        return out & set(rolling)

    async def _until_ready(self, task: str, timeout: float = READY_TIMEOUT) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and self._node_up(self.desired.tasks[task].node):
            if self.readiness().takes(task):
                return True
            if self.status(task).get("state") == "exited":
                return False
            await asyncio.sleep(0.05)
        return False

    def _leaving(self, desired: DesiredState) -> frozenset[str]:
        """Running tasks the change stops: removed, moved to another node, or restarted."""
        out = set()
        for name, old in self.desired.tasks.items():
            new = desired.tasks.get(name)
            if new is None or renewed(old, new, running=True):
                out.add(name)
        return frozenset(out)

    async def _drain(self, leaving: frozenset[str]) -> None:
        """Take the leaving tasks out of every balancer and DNS answer (their established
        connections go on), then wait until they serve no connection or their drain timeout.
        First, the tasks of the same services that just started get a bounded while to take
        connections: a replacement's first task must not be left alone before it listens."""
        alive = self.readiness().alive
        leaving = frozenset(n for n in leaving if n in alive)
        if not leaving:
            return
        await self._others_ready(leaving)
        await self._apply_all(replace(self.desired, draining=self.desired.draining | leaving))
        await asyncio.sleep(DRAIN_SETTLE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self._drain_timeout(n) for n in leaving)
        while loop.time() < deadline:
            if not any(self._serving(n) for n in leaving):
                return
            await asyncio.sleep(0.1)

    async def _others_ready(self, leaving: frozenset[str]) -> None:
        services = {self.desired.tasks[n].service for n in leaving}
        starting = [n for n, t in self.desired.tasks.items() if t.service in services
                    and n not in leaving and self.status(n).get("state") == "running"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_wait
        while starting and loop.time() < deadline:
            ready = self.readiness()
            starting = [n for n in starting if not ready.takes(n)
                        and self.status(n).get("state") == "running"]
            if starting:
                await asyncio.sleep(0.05)

    def _drain_timeout(self, task: str) -> float:
        svc = self.desired.services.get(self.desired.tasks[task].service)
        value = svc.extensions.get("drain_timeout") if svc else None
        return float(value) if isinstance(value, (int, float)) else DRAIN_TIMEOUT

    def _serving(self, task: str) -> bool:
        pid = self.status(task).get("pid")
        addresses = {e.address for e in self.desired.tasks[task].endpoints}
        return bool(pid) and established_connections(pid, addresses) > 0

    def _configure_dns(self, options: DnsOptions) -> None:
        for agent in self.agents.values():
            if agent.dns is not None:
                agent.dns.configure(options)

    async def up(self, stack: Stack) -> DesiredState:
        keep = lambda pairs: tuple((t, n) for t, n in pairs if self.desired.tasks.get(t))
        stack = self._with_standalone(stack)
        self._configure_dns(stack.dns)
        try:
            return await self._build_and_apply(stack, keep(self.connections), keep(self.disconnections))
        except Exception:
            self._configure_dns(self.stack.dns if self.stack else DnsOptions())
            raise

    def _with_standalone(self, stack: Stack) -> Stack:
        """Standalone containers (mesh run) outlive stack updates, as `docker run` ones do."""
        clash = sorted(n for n in self.standalone if n in stack.services)
        if clash:
            raise Conflict(f"services.{clash[0]}: a standalone container already has this name "
                           f"(mesh service rm {clash[0]} first)")
        kept = {n: s for n, s in self.standalone.items() if s.networks[0].network in stack.networks}
        self.standalone = kept
        return replace(stack, services={**stack.services, **kept})

    async def run(self, name: str, network: str, command: list[str], node: str | None = None):
        """A standalone container (`docker run --network NET`): a one-task service of its own on a
        network of the stack; on an overlay only when the network is `attachable: true`."""
        if self.stack is None:
            raise Conflict("no stack is up: a standalone container joins a network of a stack "
                           "(mesh up -f FILE first)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name or ""):
            raise Conflict(f"--name: '{name}' is not a valid name (letters, digits, '_', '.', '-')")
        if name == RESERVED_TASK_NAME:
            raise Conflict(f"--name: the name '{name}' is reserved: each node's routing-mesh "
                           f"namespace is named after it")
        if name in self.stack.services or name in self.desired.tasks:
            raise Conflict(f"--name: '{name}' is already a service or task (mesh ps lists them)")
        net = self.stack.networks.get(network)
        if net is None or network not in self.desired.networks:
            raise NotFound(f"--network: no network named '{network}' in the stack "
                           f"(mesh network ls lists them)")
        if self.placer is not None and not net.attachable:
            raise Conflict(f"--network: network '{network}' is not attachable: a standalone "
                           f"container joins an overlay network only when the stack sets "
                           f"`attachable: true` on it (networks.{network}.attachable), as "
                           f"docker network create --attachable")
        placement = Placement(constraints=(f"node.hostname=={node}",)) if node else Placement()
        svc = Service(name=name, command=tuple(command), container_name=name,
                      networks=(Attachment(network),), placement=placement,
                      extensions={"standalone": True})
        self.standalone[name] = svc
        try:
            stack = replace(self.stack, services={**self.stack.services, name: svc})
            desired = await self._build_and_apply(stack, self.connections, self.disconnections)
        except Exception:
            self.standalone.pop(name, None)
            raise
        if name not in desired.tasks:
            reason = next((r for s, _, r in desired.pending if s == name), "not placed")
            await self._remove_service(name)
            raise Conflict(f"--node: the container cannot be placed: {reason}")
        return desired.tasks[name]

    def _service(self, name: str):
        if self.stack is None or name not in self.stack.services:
            raise NotFound(f"no service named '{name}' (mesh service ls lists them)")
        return self.stack.services[name]

    async def scale(self, name: str, replicas: int) -> DesiredState:
        service = self._service(name)
        if service.mode == "global":
            raise Conflict(f"service '{name}' is global (one task per node): it cannot be scaled")
        if not isinstance(replicas, int) or replicas < 0:
            raise Conflict(f"replicas: expected a non-negative integer, got {replicas!r}")
        if replicas > 1 and service.container_name:
            raise Conflict(f"service '{name}' has container_name '{service.container_name}': "
                           f"it can run one replica only")
        stack = replace(self.stack, services={**self.stack.services,
                                              name: replace(service, replicas=replicas)})
        return await self._build_and_apply(stack, self.connections, self.disconnections)

    async def remove_service(self, name: str) -> DesiredState:
        return await self._remove_service(name)

    async def _remove_service(self, name: str) -> DesiredState:
        self._service(name)
        services = {k: v for k, v in self.stack.services.items() if k != name}
        if not services:
            raise Conflict(f"'{name}' is the stack's last service: use mesh down to remove the stack")
        desired = await self._build_and_apply(replace(self.stack, services=services),
                                              self.connections, self.disconnections)
        self.standalone.pop(name, None)
        return desired

    def task(self, name: str) -> TaskState:
        task = self.desired.tasks.get(name)
        if task is None:
            raise NotFound(f"no task named '{name}' (mesh ps lists them)")
        return task

    def _connectable(self, network: str, task_name: str) -> TaskState:
        task = self.task(task_name)
        if network not in self.desired.networks:
            raise NotFound(f"no network named '{network}' (mesh network ls lists them)")
        if task.netmode != "sandbox":
            raise Conflict(f"task '{task_name}' uses network mode '{task.netmode}': it has no network "
                           f"stack of its own to connect")
        return task

    async def connect(self, network: str, task_name: str) -> TaskState:
        task = self._connectable(network, task_name)
        if any(e.network == network for e in task.endpoints):
            raise Conflict(f"task '{task_name}' is already connected to network '{network}'")
        conns = self.connections + ((task_name, network),)
        disconns = tuple(p for p in self.disconnections if p != (task_name, network))
        return (await self._build_and_apply(self.stack, conns, disconns)).tasks[task_name]

    async def disconnect(self, network: str, task_name: str) -> TaskState:
        task = self._connectable(network, task_name)
        if not any(e.network == network for e in task.endpoints):
            raise Conflict(f"task '{task_name}' is not connected to network '{network}'")
        conns = tuple(p for p in self.connections if p != (task_name, network))
        disconns = self.disconnections + ((task_name, network),)
        return (await self._build_and_apply(self.stack, conns, disconns)).tasks[task_name]

    async def resync(self) -> None:
        """The periodic repair: every balancer of every node rewritten from memory."""
        for agent in self.agents.values():
            async with agent.lock:
                await asyncio.to_thread(agent.resync_lb)

    async def down(self) -> None:
        async with self.changing:
            await asyncio.gather(*(a.teardown() for a in self.agents.values()))
            self.desired = DesiredState()
            self.stack, self.connections, self.disconnections = None, (), ()
            self.standalone = {}
