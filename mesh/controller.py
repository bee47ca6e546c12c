"""The controller: holds the stack and run-time changes, allocates, asks the agents to apply.

It is what the API calls; it knows nothing of HTTP. Every change is: validate -> (in a cluster:
place tasks on nodes) -> build the whole desired state (pure, mesh.allocator) -> every agent applies
its part (kernel + processes). A change that fails to allocate touches nothing; one that fails in
an agent is undone everywhere by applying the previous state again.

    Controller([agent], netlink, host_netns)                       # one host: one agent, node ""
    Controller(agents, netlink, host_netns, placer=lab_placer)     # a cluster (mesh.cluster)
"""
from __future__ import annotations

import asyncio
from dataclasses import replace

from mesh.allocator import build_desired
from mesh.errors import Conflict, NotFound
from mesh.model import DnsOptions, Stack
from mesh.state import DesiredState, TaskState


class Controller:
    def __init__(self, agents, netlink, host_netns: str | None, placer=None, extra_routes=()):
        self.agents = {a.node: a for a in agents}
        self.nl = netlink
        self.host = host_netns
        self.placer = placer                 # (stack, previous) -> ClusterPlacement, or None
        self.extra_routes = list(extra_routes)
        self.desired = DesiredState()
        self.stack: Stack | None = None
        self.connections: tuple[tuple[str, str], ...] = ()
        self.disconnections: tuple[tuple[str, str], ...] = ()

    def agent_of(self, task: str):
        return self.agents[self.task(task).node]

    def status(self, task: str) -> dict:
        return self.agent_of(task).sup.status(task)

    def log_path(self, task: str) -> str:
        return self.agent_of(task).sup.log_path(task)

    async def _routes(self):
        if self.host and not self.nl.netns_exists(self.host):
            return list(self.extra_routes)
        return await asyncio.to_thread(self.nl.routes, self.host) + self.extra_routes

    async def _apply_all(self, desired: DesiredState) -> None:
        results = await asyncio.gather(*(a.apply(desired) for a in self.agents.values()),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            if len(self.agents) > 1:
                await asyncio.gather(*(a.apply(self.desired) for a in self.agents.values()),
                                     return_exceptions=True)
            raise failed[0]

    async def _build_and_apply(self, stack: Stack, conns, disconns) -> DesiredState:
        cluster = self.placer(stack, self.desired) if self.placer else None
        desired = build_desired(stack, self.desired, await self._routes(), self.host,
                                conns, disconns, cluster)
        await self._apply_all(desired)
        self.desired = desired
        self.stack, self.connections, self.disconnections = stack, conns, disconns
        return desired

    def _configure_dns(self, options: DnsOptions) -> None:
        for agent in self.agents.values():
            if agent.dns is not None:
                agent.dns.configure(options)

    async def up(self, stack: Stack) -> DesiredState:
        keep = lambda pairs: tuple((t, n) for t, n in pairs if self.desired.tasks.get(t))
        self._configure_dns(stack.dns)
        try:
            return await self._build_and_apply(stack, keep(self.connections), keep(self.disconnections))
        except Exception:
            self._configure_dns(self.stack.dns if self.stack else DnsOptions())
            raise

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
        self._service(name)
        services = {k: v for k, v in self.stack.services.items() if k != name}
        if not services:
            raise Conflict(f"'{name}' is the stack's last service: use mesh down to remove the stack")
        return await self._build_and_apply(replace(self.stack, services=services),
                                           self.connections, self.disconnections)

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

    async def down(self) -> None:
        await asyncio.gather(*(a.teardown() for a in self.agents.values()))
        self.desired = DesiredState()
        self.stack, self.connections, self.disconnections = None, (), ()
