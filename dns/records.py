"""Build each sandbox's View from the desired state, pure (no sockets, no kernel).

    views = build_views(desired, live={"web.1", ...}, upstreams=("10.0.0.2",))
    views["mesh-h-web.1"]  -> View of every name on the networks that sandbox joined

Names on a network N (Docker's embedded DNS, then further): a task's name (`web.1` or its
container_name), its hostname, its 12-character short id, and each of those qualified as
`name.N`; a service name and its network aliases -> the service's VIP on N (endpoint_mode vip) or
every live task address (dnsrr, short TTL); `tasks.<service>` and `tasks.<alias>` -> every live task
address (short TTL); PTR of a task address -> `<task>.<N>`, of a VIP -> `<service>.<N>`;
SRV `_<port name>._<protocol>.<service>` for each named port. Nothing on the default bridge (it has
no embedded DNS) and nothing of a network the sandbox has not joined.
"""
from __future__ import annotations

from collections import defaultdict
from ipaddress import ip_address

from mesh.dns.view import View
from mesh.model import Service
from mesh.state import DesiredState, TaskState

DEFAULT_TTL = 600
TASKS_TTL = 5


class _Names:
    """Accumulates records of one network, then is merged into the views of its members."""

    def __init__(self, ttl: int):
        self.ttl, self.short = ttl, min(ttl, TASKS_TTL)
        self.a: dict[str, tuple[list[str], int]] = {}
        self.ptr: dict[str, tuple[str, int]] = {}
        self.srv: dict[str, tuple[list, int]] = {}

    def add(self, name: str, address: str, ttl: int) -> None:
        key = name.lower()
        addresses, old_ttl = self.a.setdefault(key, ([], ttl))
        if address not in addresses:
            addresses.append(address)
        self.a[key] = (addresses, min(old_ttl, ttl))

    def add_ptr(self, address: str, target: str) -> None:
        self.ptr.setdefault(ip_address(address).reverse_pointer, (target.lower(), self.ttl))


def _network_names(desired: DesiredState, services: dict[str, Service], network: str,
                   live: set[str], ttl: int) -> _Names:
    out = _Names(ttl)
    members: dict[str, list[tuple[TaskState, str]]] = defaultdict(list)
    for task, ep in desired.endpoints_on(network):
        if task.name not in live:
            continue
        members[task.service].append((task, ep.address))
        for name in dict.fromkeys(n for n in (task.name, task.hostname, task.id[:12]) if n):
            out.add(name, ep.address, ttl)
            out.add(f"{name}.{network}", ep.address, ttl)
        out.add_ptr(ep.address, f"{task.name}.{network}")
    for service, tasks in members.items():
        svc = services.get(service)
        aliases = next((ep.aliases for t, _ in tasks for ep in t.endpoints if ep.network == network), ())
        _service_names(out, svc, service, network, tasks, aliases, desired.vip(service, network))
    return out


def _service_names(out: _Names, svc: Service | None, service: str, network: str, tasks, aliases,
                   vip: str | None) -> None:
    for name in (service, *aliases):
        for address in ([vip] if vip else [a for _, a in tasks]):
            out.add(name, address, out.ttl if vip else out.short)
            out.add(f"{name}.{network}", address, out.ttl if vip else out.short)
        for _, address in tasks:
            out.add(f"tasks.{name}", address, out.short)
    if vip:
        out.add_ptr(vip, f"{service}.{network}")
    for port in (svc.ports if svc else ()):
        if not port.name:
            continue
        targets = [(0, 0, port.target, service)] if vip else \
                  [(0, 0, port.target, t.name) for t, _ in tasks]
        out.srv[f"_{port.name}._{port.protocol}.{service}".lower()] = (targets, out.ttl if vip else out.short)


def _merge(parts: list[_Names], forward: bool, upstreams: tuple[str, ...]) -> View:
    a: dict[str, tuple[tuple[str, ...], int]] = {}
    ptr: dict[str, tuple[str, int]] = {}
    srv: dict[str, tuple[tuple, int]] = {}
    for part in parts:
        for name, (addresses, ttl) in part.a.items():
            old, old_ttl = a.get(name, ((), ttl))
            a[name] = (tuple(dict.fromkeys(old + tuple(addresses))), min(ttl, old_ttl))
        for name, record in part.ptr.items():
            ptr.setdefault(name, record)
        for name, (targets, ttl) in part.srv.items():
            srv.setdefault(name, (tuple(targets), ttl))
    return View(a=a, ptr=ptr, srv=srv, forward=forward, upstreams=upstreams[:3])


def build_views(desired: DesiredState, live: set[str], upstreams: tuple[str, ...],
                ttl: int = DEFAULT_TTL, node: str = "") -> dict[str, View]:
    """sandbox name -> View, for every sandbox of `node` that has an embedded resolver (names come
    from the tasks of every node)."""
    services = desired.services
    cache: dict[str, _Names] = {}
    views = {}
    for task in desired.tasks.values():
        if not (task.embedded_dns and task.owns_sandbox and task.sandbox) or task.node != node:
            continue
        nets = [desired.networks[e.network] for e in task.endpoints
                if not (desired.networks[e.network].builtin or desired.networks[e.network].ingress)]
        for net in nets:
            if net.name not in cache:
                cache[net.name] = _network_names(desired, services, net.name, live, ttl)
        forward = any(not n.internal for n in nets)
        svc = services.get(task.service)
        own = svc.dns if svc and svc.dns else upstreams
        views[task.sandbox] = _merge([cache[n.name] for n in nets], forward, tuple(own))
    return views
