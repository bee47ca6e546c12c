"""The `mesh` nftables table of a host namespace, pure: render_host_table(desired) -> nft text.

What it holds (Docker's bridge driver behaviour, one table, nothing else touched):
- outbound MASQUERADE for each non-internal bridge subnet;
- isolation: a bridge forwards to no other mesh bridge; an internal bridge forwards nowhere;
- published ports: DNAT in prerouting and output for local destinations (another host, the host
  itself, hairpin from a container) and on `localhost`: mesh bridges get route_localnet, packets
  from 127.0.0.0/8 that were DNAT'd are masqueraded, and a raw-priority guard drops packets to
  127.0.0.0/8 arriving on any other interface than `lo` (the kube-proxy CVE-2020-8558 lesson);
- several backends of one published port are chosen with `numgen random`.
- in a cluster (mesh.lb.dsr's plan): packets of an ingress-mode port that arrive on the underlay
  device from a client, addressed to this node or handed over by another one, are DNAT'd to this
  node's own tasks (a DSR port with a local task taking new connections) or to its ingress
  namespace (the ordinary routing mesh: no such task, or not a DSR port); such a packet is never
  routed back onto the link it came from.
The whole table is replaced in one transaction, so a reader never sees half a ruleset.
"""
from __future__ import annotations

from mesh.lb.dsr import DsrPlan
from mesh.lb.model import seed_of
from mesh.state import INGRESS_LOCAL, DesiredState, NetworkState, Publication

TABLE = "mesh"


def _masquerade(nets: list[NetworkState]) -> list[str]:
    rules = []
    for n in nets:
        if not n.internal:
            rules.append(f'ip saddr {n.subnet} oifname != "{n.link}" masquerade')
        rules.append(f'ct status dnat oifname "{n.link}" ip saddr {n.subnet} masquerade')
    rules.append("ct status dnat ip saddr 127.0.0.0/8 masquerade")
    return rules


def _isolation(nets: list[NetworkState]) -> list[str]:
    rules = []
    for n in nets:
        if n.internal:
            rules.append(f'iifname "{n.link}" oifname != "{n.link}" drop')
            rules.append(f'oifname "{n.link}" iifname != "{n.link}" drop')
        else:
            rules.append(f'iifname "{n.link}" oifname "mhb*" oifname != "{n.link}" drop')
    return rules


def _port_match(host_ip: str | None, protocol: str, port: int) -> str:
    """Packets to a published port, on its one address if it has one (host_ip)."""
    return (f"ip daddr {host_ip} " if host_ip else "") + f"meta l4proto {protocol} th dport {port}"


def _dnat(p: Publication) -> str | None:
    return _dnat_to(_port_match(p.host_ip, p.protocol, p.published), p.backends, p.target)


def _dnat_to(match: str, backends, target: int, seed: int | None = None) -> str | None:
    """DNAT to one of `backends`: at random, or by a hash of the client address with `seed`."""
    if not backends:
        return None
    if len(backends) == 1:
        return f"{match} dnat to {backends[0]}:{target}"
    pick = f"jhash ip saddr mod {len(backends)} seed {seed:#x}" if seed is not None else \
        f"numgen random mod {len(backends)}"
    choices = ", ".join(f"{i} : {b} . {target}" for i, b in enumerate(backends))
    return f"{match} dnat ip addr . port to {pick} map {{ {choices} }}"


def _dsr(plan: DsrPlan | None) -> tuple[list[str], list[str], list[str]]:
    """(prerouting rules, the dsr chain, forward rules) for packets of ingress-mode ports that
    arrive on the underlay device addressed to this node or handed over by another one (not those
    a node sends: they take the routing mesh)."""
    if plan is None or not plan.ports:
        return [], [], []
    arrivals = ", ".join(plan.arrivals)
    pre = [f'iifname "{plan.device}" ip daddr {{ {arrivals} }} ip saddr != {{ {arrivals} }} '
           "jump dsr"]
    chain = []
    for p in plan.ports:
        match = _port_match(p.host_ip, p.protocol, p.port)
        if p.dsr and p.local:
            seed = seed_of(f"{p.protocol}/{p.port}") if p.affinity else None
            chain.append(_dnat_to(match, p.local, p.target, seed))
        else:                            # the routing mesh: no local task, or not a DSR port
            chain.append(_dnat_to(match, (INGRESS_LOCAL,), p.port))
    ports = ", ".join(f"{p.protocol} . {p.port}" for p in plan.ports)
    fwd = [f'iifname "{plan.device}" ip daddr {{ {", ".join(plan.peers)} }} meta l4proto . th dport '
           f"{{ {ports} }} reject"] if plan.peers else []
    return pre, chain, fwd


def _chain(name: str, hook: str | None, rules: list[str]) -> list[str]:
    lines = [f"  chain {name} {{"]
    if hook:
        lines.append(f"    {hook}")
    lines += [f"    {r}" for r in rules]
    lines.append("  }")
    return lines


def render_host_table(desired: DesiredState, dsr: DsrPlan | None = None) -> str:
    """The transaction that makes the host's `mesh` table exactly what `desired` (and the node's
    direct server return plan) needs."""
    bridges = [n for n in desired.networks.values() if n.bridged and n.link]
    dnats = [r for r in (_dnat(p) for p in desired.publications) if r]
    dsr_pre, dsr_chain, dsr_forward = _dsr(dsr)
    out = [f"table ip {TABLE}", f"delete table ip {TABLE}", f"table ip {TABLE} {{"]
    out += _chain("localhost_guard", "type filter hook prerouting priority raw; policy accept;",
                  ['iifname != "lo" ip daddr 127.0.0.0/8 drop'])
    out += _chain("prerouting", "type nat hook prerouting priority dstnat; policy accept;",
                  dsr_pre + ["fib daddr type local jump published"])
    if dsr_pre:
        out += _chain("dsr", None, dsr_chain)
    out += _chain("output", "type nat hook output priority -100; policy accept;",
                  ["fib daddr type local jump published"])
    out += _chain("published", None, dnats)
    out += _chain("postrouting", "type nat hook postrouting priority srcnat; policy accept;",
                  _masquerade(bridges))
    out += _chain("forward", "type filter hook forward priority filter; policy accept;",
                  dsr_forward + _isolation(bridges))
    out.append("}")
    return "\n".join(out) + "\n"


def render_delete_table() -> str:
    return f"table ip {TABLE}\ndelete table ip {TABLE}\n"
