"""The nftables load balancer, in the style of kube-proxy's nftables mode.

One table `mesh_lb` per namespace (beside the `mesh` table of mesh.hostrules / mesh.dnsagent, which
is replaced whole on every change; this one is updated in place):
- a verdict map `services` on `ip daddr . meta l4proto . th dport` (an interval map: a VIP takes
  every port, `0-65535`; a published port takes one), looked up in nat prerouting and output;
- one chain per virtual service: one rule per backend, `numgen random mod (n-i) == 0` (or a seeded
  `jhash ip saddr` for client-address affinity), no set or map; no active backend -> reject, so
  clients fail at once, not after a timeout;
- postrouting masquerades what a masquerading service DNAT'd (packet mark MASQ_MARK).

    lb = NftLb(LibNft.or_cli(NftCli()))   # libnftables in process (mesh.libnft), else `nft -f -`
    lb.apply("mesh-h1-web.1", table)   # one atomic `nft -f -` transaction with only the difference
    lb.resync("mesh-h1-web.1")         # the whole table rewritten from memory, also one transaction

`render_changes` and `render_full` are pure and say exactly what is sent to nft.
"""
from __future__ import annotations

import hashlib

from mesh.lb.model import Table, VirtualService, seed_of
from mesh.nft import Nft

TABLE = "mesh_lb"
MASQ_MARK = 0x6d65


def chain_name(key: str) -> str:
    """A stable chain name for a service key (the same on every resync and every node)."""
    return "svc_" + hashlib.blake2s(key.encode(), digest_size=6).hexdigest()


def map_key(s: VirtualService) -> str:
    port = "0-65535" if s.port is None else str(s.port)
    return f"{s.address} . {s.protocol} . {port}"


def service_rules(s: VirtualService) -> list[str]:
    """The rules of one service's chain (pure). No set or map: backend i of n is taken with
    probability 1/(n-i) after the ones before it declined (`numgen random mod (n-i) == 0`, as
    kube-proxy's iptables mode does with `statistic`), or where a seeded hash of the client address
    says (affinity). Anonymous maps would make nft load every set of the table on each change, and
    the kernel scan them all to name each new one: one-service changes stay cheap at 10k services."""
    active = s.active
    if not active:
        return ["meta l4proto tcp reject with tcp reset", "reject"]
    rules = [f"meta mark set {MASQ_MARK:#x}"] if s.masquerade else []
    # a fixed seed per service: every node and every rewrite sends a client to the same backend
    seed = seed_of(s.key)
    n = len(active)
    for i, b in enumerate(active):
        port = b.port if b.port is not None else s.port
        target = f"dnat to {b.address}" + (f":{port}" if port is not None else "")
        if i == n - 1:
            pick = ""
        elif s.affinity:
            pick = f"jhash ip saddr mod {n} seed {seed:#x} == {i} "
        else:
            pick = f"numgen random mod {n - i} == 0 "
        rules.append(f"meta l4proto {s.protocol} {pick}{target}")
    return rules


def _base() -> list[str]:
    lookup = "ip daddr . meta l4proto . th dport vmap @services"
    return [
        f"table ip {TABLE} {{",
        "  map services { type ipv4_addr . inet_proto . inet_service : verdict; flags interval; }",
        f"  chain prerouting {{ type nat hook prerouting priority dstnat - 10; policy accept; {lookup}; }}",
        f"  chain output {{ type nat hook output priority -110; policy accept; {lookup}; }}",
        "  chain postrouting { type nat hook postrouting priority srcnat - 10; policy accept; "
        f"meta mark {MASQ_MARK:#x} masquerade; }}",
        "}",
    ]


def _add(s: VirtualService) -> list[str]:
    chain = chain_name(s.key)
    out = [f"add chain ip {TABLE} {chain}"]
    out += [f"add rule ip {TABLE} {chain} {r}" for r in service_rules(s)]
    out.append(f"add element ip {TABLE} services {{ {map_key(s)} : jump {chain} }}")
    return out


def _delete(s: VirtualService) -> list[str]:
    chain = chain_name(s.key)
    return [f"delete element ip {TABLE} services {{ {map_key(s)} }}", f"delete chain ip {TABLE} {chain}"]


def render_full(table: Table) -> str:
    """The transaction that makes the namespace's `mesh_lb` table exactly `table` (pure)."""
    out = [f"table ip {TABLE}", f"delete table ip {TABLE}"] + _base()
    for s in table.values():
        out += _add(s)
    return "\n".join(out) + "\n"


def render_changes(old: Table, new: Table) -> str:
    """The transaction that turns `old` (applied) into `new`; empty when nothing changed (pure)."""
    out = []
    for key, s in old.items():
        if key not in new:
            out += _delete(s)
    for key, s in new.items():
        was = old.get(key)
        if was is None:
            out += _add(s)
        elif was is not s and was != s and service_rules(was) != service_rules(s):
            chain = chain_name(key)
            out.append(f"flush chain ip {TABLE} {chain}")
            out += [f"add rule ip {TABLE} {chain} {r}" for r in service_rules(s)]
    return "\n".join(out) + "\n" if out else ""


def render_delete() -> str:
    return f"table ip {TABLE}\ndelete table ip {TABLE}\n"


class NftLb:
    name = "nftables"

    def __init__(self, nft: Nft):
        self.nft = nft
        self.applied: dict[str | None, Table] = {}

    def namespaces(self) -> list[str | None]:
        return list(self.applied)

    def apply(self, netns: str | None, table: Table) -> None:
        if netns not in self.applied:
            self.nft.apply(netns, render_full(table))
        else:
            text = render_changes(self.applied[netns], table)
            if text:
                self.nft.apply(netns, text)
        self.applied[netns] = dict(table)

    def resync(self, netns: str | None) -> None:
        if netns in self.applied:
            self.nft.apply(netns, render_full(self.applied[netns]))

    def forget(self, netns: str | None) -> None:
        if self.applied.pop(netns, None) is not None:
            try:
                self.nft.apply(netns, render_delete())
            except Exception:
                pass     # the namespace is gone, and its table with it
        if hasattr(self.nft, "forget"):
            self.nft.forget(netns)
