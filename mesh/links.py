"""Legacy `links:`, pure: /etc/hosts entries and Docker-style environment variables.

For `links: ["db:database"]` on a task of `web`, where db's first task has 172.18.0.3 and port 5432:
hosts gets `172.18.0.3 database db.1 db`, and the environment gets DATABASE_PORT=tcp://172.18.0.3:5432,
DATABASE_PORT_5432_TCP=..., _ADDR, _PORT, _PROTO, DATABASE_NAME=/web.1/database and
DATABASE_ENV_<K> for each of db's environment variables.
"""
from __future__ import annotations

import re

from mesh.errors import AllocationError
from mesh.model import Service, Stack
from mesh.state import EndpointState, TaskState


def _env_prefix(alias: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", alias.upper())


def _target_task(link_service: str, tasks: dict[str, TaskState], names_) -> TaskState | None:
    first = next((t for s, slot, t in names_ if s == link_service and slot == 1), None)
    return tasks.get(first) if first else None


def _shared_address(task: TaskState, target: TaskState, svc: Service, alias: str) -> str:
    mine = {e.network for e in task.endpoints}
    ep: EndpointState | None = next((e for e in target.endpoints if e.network in mine), None)
    if ep is None:
        raise AllocationError(f"services.{svc.name}.links: '{target.service}' (as '{alias}') shares no "
                              f"network with '{svc.name}'; put both on one network")
    return ep.address


def build_link_hosts(task: TaskState, svc: Service, tasks: dict[str, TaskState],
                     names_) -> tuple[tuple[str, str], ...]:
    out = []
    for link in svc.links:
        target = _target_task(link.service, tasks, names_)
        if target is None:
            continue                      # a linked service scaled to zero: nothing to point at
        address = _shared_address(task, target, svc, link.alias)
        names = " ".join(dict.fromkeys([link.alias, target.name, link.service]))
        out.append((address, names))
    return tuple(out)


def build_link_env(task: TaskState, svc: Service, stack: Stack, tasks: dict[str, TaskState],
                   names_) -> dict[str, str]:
    env: dict[str, str] = {}
    for link in svc.links:
        target = _target_task(link.service, tasks, names_)
        if target is None:
            continue
        address = _shared_address(task, target, svc, link.alias)
        prefix = _env_prefix(link.alias)
        linked = stack.services[link.service]
        for i, port in enumerate(linked.ports):
            url = f"{port.protocol}://{address}:{port.target}"
            base = f"{prefix}_PORT_{port.target}_{port.protocol.upper()}"
            if i == 0:
                env[f"{prefix}_PORT"] = url
            env[base] = url
            env[f"{base}_ADDR"] = address
            env[f"{base}_PORT"] = str(port.target)
            env[f"{base}_PROTO"] = port.protocol
        env[f"{prefix}_NAME"] = f"/{task.name}/{link.alias}"
        for key, value in linked.environment.items():
            env[f"{prefix}_ENV_{key}"] = value
    return env
