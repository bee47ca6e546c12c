"""What every namespace of one node balances, pure: DesiredState + task readiness -> Tables.

    tables = build_balancers(desired, node="n1", readiness=Readiness(ready={...}, alive={...}))
    tables["mesh-h1-n1-api.1"]   # the VIPs that task's sandbox reaches, as VirtualServices
    tables["mesh-h1-n1-ingress"] # the node's ingress namespace: every ingress-mode published port

Where balancing happens (Swarm's shape, kube-proxy's rules):
- a service VIP is balanced inside each client's own sandbox (DNAT in its output path), so the
  backend sees the client's address and replies need no help from anyone;
- a published port in ingress mode: the node DNATs it to its ingress namespace (mesh.hostrules),
  which balances it over the ingress overlay to the service's tasks on any node.

A backend takes new connections when its task is ready (running, and healthy if it has a
healthcheck) and not draining; a task that is alive but not ready stays with weight 0, so its
established connections go on; a task that is neither is left out.

The return path (`return_routes`): with the client address kept, a task answers a client through
the ingress namespace that sent the request. The task's sandbox marks such connections by the
sending namespace's MAC (deterministic, mesh.overlay.mac_for) and routes their replies by mark.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_interface

from mesh.lb.model import PROTOCOLS, Backend, Table, VirtualService, table_of
from mesh.overlay import mac_for
from mesh.readiness import Readiness
from mesh.state import INGRESS_LOCAL, DesiredState, TaskState

# + the ingress namespace's host number on the ingress network (its address, kept for the node's
# life: a node that joins or leaves changes no other node's mark, so established connections keep
# their way back): the connmark of connections from that ingress, and the routing table (u32 ids,
# far from main/local/default) that sends their replies back to it
RETURN_MARK_BASE = 0x4d000000
RETURN_TABLE_BASE = 0x4d000000


def affinity(desired: DesiredState, service: str) -> bool:
    svc = desired.services.get(service)
    return bool(svc) and svc.extensions.get("affinity") == "client-ip"


def keeps_client_ip(desired: DesiredState, service: str) -> bool:
    svc = desired.services.get(service)
    return not svc or svc.extensions.get("preserve_client_ip", True) is not False


def _weight(task: str, port: int | None, rd: Readiness, draining: frozenset[str]) -> int | None:
    if rd.takes(task, port) and task not in draining:
        return 1
    return 0 if task in rd.alive else None


def _backends(pairs, rd: Readiness, draining, port=None) -> tuple[Backend, ...]:
    out = []
    for task, address in sorted(pairs, key=lambda p: p[1]):
        weight = _weight(task, port, rd, draining)
        if weight is not None:
            out.append(Backend(address, port, weight))
    return tuple(out)


def _vip_services(desired: DesiredState, network: str, rd: Readiness) -> list[VirtualService]:
    out = []
    for service, net, vip in desired.vips:
        if net != network:
            continue
        pairs = [(t.name, e.address) for t, e in desired.endpoints_on(network) if t.service == service]
        backends = _backends(pairs, rd, desired.draining)
        out += [VirtualService(vip, proto, None, backends, affinity(desired, service))
                for proto in PROTOCOLS]
    return out


def sandbox_networks(desired: DesiredState, task: TaskState) -> list[str]:
    return [e.network for e in task.endpoints
            if not (desired.networks[e.network].builtin or desired.networks[e.network].ingress)]


def ingress_table(desired: DesiredState, rd: Readiness) -> Table:
    services = []
    for pub in desired.publications:
        if pub.mode != "ingress":
            continue
        pairs = [(t.name, e.address) for t in desired.tasks.values() if t.service == pub.service
                 for e in t.endpoints if desired.networks[e.network].ingress]
        backends = _backends(pairs, rd, desired.draining, pub.target)
        # UDP is masqueraded: a server on 0.0.0.0 would answer a kept client address from the
        # address of its default route, which no conntrack entry maps back (Swarm masquerades all)
        masquerade = pub.protocol == "udp" or not keeps_client_ip(desired, pub.service)
        services.append(VirtualService(INGRESS_LOCAL, pub.protocol, pub.published, backends,
                                       affinity(desired, pub.service), masquerade=masquerade))
    return table_of(services)


def build_balancers(desired: DesiredState, node: str, rd: Readiness) -> dict[str, Table]:
    """namespace -> its balancer, for every namespace of `node` that balances anything."""
    per_network: dict[str, list[VirtualService]] = {}
    out: dict[str, Table] = {}
    for task in desired.on_node(node).values():
        if not (task.owns_sandbox and task.sandbox) or task.netmode != "sandbox":
            continue
        services: list[VirtualService] = []
        for net in sandbox_networks(desired, task):
            if net not in per_network:
                per_network[net] = _vip_services(desired, net, rd)
            services += per_network[net]
        if services:
            out[task.sandbox] = table_of(services)
    ingress = desired.ingress.get(node)
    if ingress is not None:
        out[ingress.sandbox] = ingress_table(desired, rd)
    return out


@dataclass(frozen=True)
class ReturnRoutes:
    """How a task's sandbox sends replies back through the ingress namespace that sent the request."""
    ifname: str                                      # the task's interface on the ingress network
    macs: tuple[tuple[str, int], ...]                # ingress namespace MAC -> connmark
    routes: tuple[tuple[int, int, str], ...]         # (mark, routing table, gateway)


def return_routes(desired: DesiredState, task: TaskState) -> ReturnRoutes | None:
    """None when the task needs none (no ingress endpoint, or its service masquerades)."""
    ep = next((e for e in task.endpoints if desired.networks[e.network].ingress), None)
    if ep is None or not desired.ingress or not keeps_client_ip(desired, task.service):
        return None
    macs, routes = [], []
    for node in sorted(desired.ingress):
        ing = desired.ingress[node]
        where = ip_interface(f"{ing.address}/{ing.prefixlen}")
        host = int(where.ip) - int(where.network.network_address)
        macs.append((mac_for(ing.address), RETURN_MARK_BASE + host))
        routes.append((RETURN_MARK_BASE + host, RETURN_TABLE_BASE + host, ing.address))
    return ReturnRoutes(ep.ifname, tuple(macs), tuple(routes))


def render_return_table(rr: ReturnRoutes | None) -> str:
    """The sandbox's `mesh_return` table: connmark new connections from an ingress namespace by its
    MAC, and put that mark on the packets of the reply so policy routing sends them back (pure)."""
    head = "table ip mesh_return\ndelete table ip mesh_return\n"
    if rr is None:
        return head
    elements = ", ".join(f"{mac} : {mark:#x}" for mac, mark in rr.macs)
    return head + (
        "table ip mesh_return {\n"
        "  chain prerouting { type filter hook prerouting priority mangle; policy accept;\n"
        f'    iifname "{rr.ifname}" ct state new ct mark set ether saddr map {{ {elements} }}; }}\n'
        "  chain output { type route hook output priority mangle; policy accept;\n"
        "    ct mark != 0 meta mark set ct mark; }\n"
        "}\n")
