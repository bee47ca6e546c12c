"""The single-host controller: holds the stack and run-time changes, allocates, asks the agent to apply.

It is what the API calls; it knows nothing of HTTP. Every change is: validate -> build the whole
desired state (pure, mesh.allocator) -> agent.apply (kernel + processes). A change that fails to
allocate touches nothing.
"""
from __future__ import annotations

import asyncio

from mesh.allocator import build_desired
from mesh.errors import Conflict, NotFound
from mesh.model import DnsOptions, Stack
from mesh.state import DesiredState, TaskState


class Controller:
    def __init__(self, agent, netlink):
        self.agent = agent
        self.nl = netlink
        self.stack: Stack | None = None
        self.connections: tuple[tuple[str, str], ...] = ()
        self.disconnections: tuple[tuple[str, str], ...] = ()

    @property
    def desired(self) -> DesiredState:
        return self.agent.applied

    async def _routes(self):
        host = self.agent.host
        if host and not self.nl.netns_exists(host):
            return []
        return await asyncio.to_thread(self.nl.routes, host)

    async def _build_and_apply(self, stack: Stack, conns, disconns) -> DesiredState:
        desired = build_desired(stack, self.desired, await self._routes(), self.agent.host,
                                conns, disconns)
        await self.agent.apply(desired)
        self.stack, self.connections, self.disconnections = stack, conns, disconns
        return desired

    async def up(self, stack: Stack) -> DesiredState:
        keep = lambda pairs: tuple((t, n) for t, n in pairs if self.desired.tasks.get(t))
        dns = self.agent.dns
        if dns is not None:
            dns.configure(stack.dns)
        try:
            return await self._build_and_apply(stack, keep(self.connections), keep(self.disconnections))
        except Exception:
            if dns is not None:
                dns.configure(self.stack.dns if self.stack else DnsOptions())
            raise

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
        await self.agent.teardown()
        self.stack, self.connections, self.disconnections = None, (), ()
