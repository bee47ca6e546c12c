"""Direct server return for ingress-mode ports of services that ask for it, pure: what one node does
with a packet that reaches a published port on its underlay address.

    x-mesh: {ingress: dsr}          # in a service of the stack, beside ports in ingress mode

    plan = build_dsr(desired, "n2", readiness, device="eth0", prefixlen=24)   # None: not a cluster
    text = render_dsr(plan, previous_plan)     # the node's `mesh_dsr` netdev table, one transaction
    mesh.hostrules.render_host_table(view, plan)  # DNAT of arriving packets to this node's tasks

The path (IPVS's direct routing, done with nftables): the node the client addressed picks a node
that runs a ready task of the service, in the ingress hook of its underlay device, before its IP
stack, and hands the packet over unchanged (`fwd ip to <node> device <dev>`: a new Ethernet header,
the same IP packet). The chosen node DNATs it to one of its own tasks and the reply goes from there
straight to the client, with the addressed node's address as its source (conntrack undoes the
DNAT). The client's address is kept and the addressed node sees only the requests. This needs every
node on one link (the underlay subnet of the node's device): a node outside it is a clear error.

Which node, per flow: a map `flows` (client address, port, protocol, published port -> node mark,
idle timeout FLOW_TIMEOUT) keeps a connection on the node it started on while nodes come and go; a
new flow is placed by a seeded `jhash` over the nodes' ready tasks (one bucket per task); a flow
whose node no longer has a task of the service is deleted from the map in the packet path and
placed again the same way, so it stays on its new node. The map lives across changes: chains are
flushed and rewritten, the map is never deleted. A node mark is the node's underlay address as a u32.
Traffic that does not come in through the underlay device (the node itself, its containers), or
comes from another node's address, takes the ordinary routing mesh (the ingress namespace), which
balances the same tasks: handed over, a packet from a node would reach a node with its own address
as the source (a martian).

Never a loop: in a cluster every node's plan holds every ingress-mode port (DSR or not), and a
packet addressed to another node for one of them that reaches this node (handed over by a node
whose view is ahead of or behind this one's) is DNAT'd to this node's own tasks or to its ingress
namespace, never routed back onto the link.

Limits: with client-IP affinity the hash takes only the client address, but the map holds each
connection, so a client's new connections follow the hash when nodes come and go. Non-first
fragments of a UDP datagram (no port to match) and ICMP errors (PMTU) for a flow reach the
addressed node, not the serving one.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, ip_interface

from mesh.lb.plan import affinity
from mesh.readiness import Readiness
from mesh.state import DesiredState, publish_address

TABLE = "mesh_dsr"
FLOW_TIMEOUT = "1h"
FLOW_LIMIT = 262144
PRIORITY = -500
SEED = 0x4d455348


class DsrError(ValueError):
    """A stack asks for direct server return where the nodes cannot do it."""


def wants_dsr(desired: DesiredState, service: str) -> bool:
    svc = desired.services.get(service)
    return bool(svc) and svc.extensions.get("ingress") == "dsr"


def dsr_wanted(desired: DesiredState) -> bool:
    """Some service asks for DSR on a port it publishes in ingress mode."""
    return any(p.mode == "ingress" and wants_dsr(desired, p.service) for p in desired.publications)


@dataclass(frozen=True)
class DsrPort:
    protocol: str
    port: int                                   # the published port
    target: int
    buckets: tuple[str, ...] = ()               # node address per ready task: where new flows go
    nodes: tuple[str, ...] = ()                 # nodes a flow may stay on (alive tasks, draining too)
    local: tuple[str, ...] = ()                 # this node's task addresses taking new connections
    affinity: bool = False
    dsr: bool = True                            # False: an ingress port of the NAT routing mesh
    host_ip: str | None = None                  # published on this address only (NAT ports)

    @property
    def handed_over(self) -> bool:
        """The addressed node hands this port's packets to a node (its netdev table)."""
        return self.dsr and bool(self.nodes)


@dataclass(frozen=True)
class DsrPlan:
    device: str                                 # this node's underlay device
    address: str                                # this node's underlay address
    peers: tuple[str, ...]                      # the other nodes' underlay addresses
    ports: tuple[DsrPort, ...]

    @property
    def arrivals(self) -> tuple[str, ...]:
        """Destination addresses of DSR packets this node may receive: its own and its peers'."""
        return (self.address,) + self.peers

    @property
    def handed_over(self) -> tuple[DsrPort, ...]:
        return tuple(p for p in self.ports if p.handed_over)


NO_DSR = DsrPlan("", "", (), ())                # known to hand nothing over (no netdev table)


def mark(address: str) -> int:
    return int(IPv4Address(address))


def needs_plan(desired: DesiredState, node: str) -> bool:
    """A cluster node with ports in ingress mode (its plan guards them, DSR or not)."""
    return node in desired.underlay and bool(desired.ingress) and any(
        p.mode == "ingress" for p in desired.publications)


def build_dsr(desired: DesiredState, node: str, rd: Readiness, device: str,
              prefixlen: int) -> DsrPlan | None:
    """What `node` does with packets of ingress-mode ports that arrive on its underlay device:
    hand DSR ones over, DNAT those handed to it; None when it is not a cluster node with such ports."""
    if not needs_plan(desired, node):
        return None
    own = desired.underlay[node]
    pubs = [p for p in desired.publications if p.mode == "ingress"]
    link = ip_interface(f"{own}/{prefixlen}").network
    for name, address in sorted(desired.underlay.items()) if dsr_wanted(desired) else ():
        if IPv4Address(address) not in link:
            raise DsrError(f"x-mesh ingress: dsr needs every node on one link: node {name}'s "
                           f"address {address} is outside {link}, the subnet of {device} on {node}")
    ports = []
    for p in pubs:
        if not wants_dsr(desired, p.service):
            ports.append(DsrPort(p.protocol, p.published, p.target, dsr=False, host_ip=p.host_ip))
            continue
        tasks = [t for t in desired.tasks.values() if t.service == p.service]
        buckets, nodes, local = [], set(), []
        for t in sorted(tasks, key=lambda t: t.name):
            where = desired.underlay.get(t.node)
            if where is None or t.name not in rd.alive and not rd.takes(t.name, p.target):
                continue
            nodes.add(where)
            if rd.takes(t.name, p.target) and t.name not in desired.draining:
                buckets.append(where)
                address = publish_address(t, desired.networks)
                if t.node == node and address:
                    local.append(address)
        ports.append(DsrPort(p.protocol, p.published, p.target, tuple(buckets),
                             tuple(sorted(nodes, key=mark)), tuple(local),
                             affinity(desired, p.service)))
    peers = tuple(sorted((a for n, a in desired.underlay.items() if n != node), key=mark))
    return DsrPlan(device, own, peers, tuple(ports))


def _port_chain(p: DsrPort) -> str:
    return f"p_{p.protocol}_{p.port}"


def _node_chain(address: str) -> str:
    return "to_" + address.replace(".", "_")


def _chains(plan: DsrPlan | None) -> set[str]:
    if plan is None:
        return set()
    out = {_port_chain(p) for p in plan.handed_over}
    out |= {_node_chain(a) for p in plan.handed_over for a in p.nodes}
    return out


def _port_rules(plan: DsrPlan, p: DsrPort) -> list[str]:
    key = "ip saddr . th sport . meta l4proto . th dport"
    marks = ", ".join(str(mark(a)) for a in p.nodes)
    rules = [f"meta mark set {key} map @flows"]
    # a flow stored on a node that has no task of the service any more is forgotten, so that the
    # node the hash gives it now is stored below (`update` keeps a stored node); else the old node
    # would take the flow back when it runs a task again
    rules.append(f"meta mark != 0 meta mark != {{ {marks} }} delete @flows {{ {key} : meta mark }}")
    if p.buckets:
        hashed = "ip saddr" if p.affinity else "ip saddr . th sport"
        choices = ", ".join(f"{i} : {mark(a)}" for i, a in enumerate(p.buckets))
        rules.append(f"meta mark != {{ {marks} }} meta mark set jhash {hashed} mod {len(p.buckets)} "
                     f"seed {SEED:#x} map {{ {choices} }}")
    rules.append(f"meta mark {{ {marks} }} update @flows {{ {key} : meta mark }}")
    jumps = ", ".join(f"{mark(a)} : jump {_node_chain(a)}" for a in p.nodes)
    rules.append(f"meta mark vmap {{ {jumps} }}")
    rules.append("meta mark set 0")              # nowhere to go: the IP stack's routing mesh
    return rules


def _node_rules(plan: DsrPlan, address: str) -> list[str]:
    if address == plan.address:                  # this node's own tasks: its IP stack DNATs
        return ["meta mark set 0 accept"]
    return [f'meta mark set 0 fwd ip to {address} device "{plan.device}"']


def render_dsr(plan: DsrPlan | None, old: DsrPlan | None) -> str:
    """The transaction that makes the node's `mesh_dsr` table what `plan` needs (None: no table).
    The flows map is kept from one change to the next (chains are flushed and written again); a
    first apply (`old` None: a table left by an earlier agent is unknown, so it goes) or a new
    device starts the table afresh. `old` is the plan last applied, or None for "unknown"."""
    head = f"table netdev {TABLE}\ndelete table netdev {TABLE}\n"
    if plan is None or not plan.handed_over:
        return head if old is None or old.handed_over else ""
    out = head if old is None or not old.handed_over or old.device != plan.device else ""
    gone = _chains(old) - _chains(plan) if out == "" else set()
    out += (f"table netdev {TABLE} {{\n"
            f"  map flows {{ type ipv4_addr . inet_service . inet_proto . inet_service : mark; "
            f"flags dynamic,timeout; timeout {FLOW_TIMEOUT}; size {FLOW_LIMIT}; }}\n"
            f'  chain ingress {{ type filter hook ingress device "{plan.device}" priority {PRIORITY}; '
            f"policy accept; }}\n")
    for name in sorted(_chains(plan) | gone):
        out += f"  chain {name} {{ }}\n"
    out += "}\n"
    for name in ["ingress"] + sorted(_chains(plan) | gone):
        out += f"flush chain netdev {TABLE} {name}\n"
    for name in sorted(gone):
        out += f"delete chain netdev {TABLE} {name}\n"
    ports = ", ".join(f"{p.protocol} . {p.port} : jump {_port_chain(p)}" for p in plan.handed_over)
    # a node (or its containers, masqueraded) asking another node: DSR would hand the packet back
    # to the asking node with its own address as the source, a martian there: the routing mesh
    nodes = ", ".join(plan.arrivals)
    body = [("ingress", [f"ip daddr {plan.address} ip saddr != {{ {nodes} }} "
                         f"meta l4proto . th dport vmap {{ {ports} }}"])]
    body += [(_port_chain(p), _port_rules(plan, p)) for p in plan.handed_over]
    body += [(_node_chain(a), _node_rules(plan, a)) for a in sorted({a for p in plan.handed_over
                                                                    for a in p.nodes}, key=mark)]
    for name, rules in body:
        out += "".join(f"add rule netdev {TABLE} {name} {r}\n" for r in rules)
    return out


def render_delete() -> str:
    return f"table netdev {TABLE}\ndelete table netdev {TABLE}\n"
