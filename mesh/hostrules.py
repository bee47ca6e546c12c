"""The `mesh` nftables table of a host namespace, pure: render_host_table(desired) -> nft text.

What it holds (Docker's bridge driver behaviour, one table, nothing else touched):
- outbound MASQUERADE for each non-internal bridge subnet;
- isolation: a bridge forwards to no other mesh bridge; an internal bridge forwards nowhere;
- published ports: DNAT in prerouting and output for local destinations (another host, the host
  itself, hairpin from a container) and on `localhost`: mesh bridges get route_localnet, packets
  from 127.0.0.0/8 that were DNAT'd are masqueraded, and a raw-priority guard drops packets to
  127.0.0.0/8 arriving on any other interface than `lo` (the kube-proxy CVE-2020-8558 lesson);
- several backends of one published port are chosen with `numgen random`.
The whole table is replaced in one transaction, so a reader never sees half a ruleset.
"""
from __future__ import annotations

from mesh.state import DesiredState, NetworkState, Publication

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


def _dnat(p: Publication) -> str | None:
    if not p.backends:
        return None
    match = f"ip daddr {p.host_ip} " if p.host_ip else ""
    match += f"meta l4proto {p.protocol} th dport {p.published}"
    if len(p.backends) == 1:
        return f"{match} dnat to {p.backends[0]}:{p.target}"
    choices = ", ".join(f"{i} : {b} . {p.target}" for i, b in enumerate(p.backends))
    return f"{match} dnat ip addr . port to numgen random mod {len(p.backends)} map {{ {choices} }}"


def _chain(name: str, hook: str | None, rules: list[str]) -> list[str]:
    lines = [f"  chain {name} {{"]
    if hook:
        lines.append(f"    {hook}")
    lines += [f"    {r}" for r in rules]
    lines.append("  }")
    return lines


def render_host_table(desired: DesiredState) -> str:
    """The transaction that makes the host's `mesh` table exactly what `desired` needs."""
    bridges = [n for n in desired.networks.values() if n.bridged and n.link]
    dnats = [r for r in (_dnat(p) for p in desired.publications) if r]
    out = [f"table ip {TABLE}", f"delete table ip {TABLE}", f"table ip {TABLE} {{"]
    out += _chain("localhost_guard", "type filter hook prerouting priority raw; policy accept;",
                  ['iifname != "lo" ip daddr 127.0.0.0/8 drop'])
    out += _chain("prerouting", "type nat hook prerouting priority dstnat; policy accept;",
                  ["fib daddr type local jump published"])
    out += _chain("output", "type nat hook output priority -100; policy accept;",
                  ["fib daddr type local jump published"])
    out += _chain("published", None, dnats)
    out += _chain("postrouting", "type nat hook postrouting priority srcnat; policy accept;",
                  _masquerade(bridges))
    out += _chain("forward", "type filter hook forward priority filter; policy accept;",
                  _isolation(bridges))
    out.append("}")
    return "\n".join(out) + "\n"


def render_delete_table() -> str:
    return f"table ip {TABLE}\ndelete table ip {TABLE}\n"
