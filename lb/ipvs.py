"""The IPVS load balancer, as Docker Swarm does it: fwmark virtual services fed by a small nft table.

Per namespace:
- nft table `mesh_lbmark` (family ip): an interval map `marks` on `ip daddr . meta l4proto . th
  dport` (a VIP takes every port, `0-65535`; a published port takes one) sets the packet mark in
  prerouting (type filter, priority mangle: traffic arriving, e.g. ingress to the namespace's own
  address) and output (type route, priority mangle, so the marked packet is re-routed: a client in
  the balancer's own namespace, as Swarm does inside each sandbox). A service with no active
  backend is in the set `closed`: its new connections are refused at once (TCP reset, ICMP port
  unreachable), as the nftables backend does. Postrouting masquerades packets whose mark is in the
  set `masq` (the fwmarks of masquerading services; IPVS leaves the mark on what it forwards, and
  `net.ipv4.vs.conntrack=1` lets netfilter NAT them).
- one IPVS fwmark service per VirtualService (fwmark: `fwmark_of(key)`, stable across processes
  and nodes; see `assign_fwmarks`), one real server per backend, always masquerade (NAT)
  forwarding, port = the backend's port, else the published port, else 0 (a VIP: IPVS keeps the
  port the client asked for). Scheduler: VirtualService.scheduler ("rr"); affinity=True uses "sh"
  (source hashing on the client address), which, unlike persistence, has no timeout to expire.
  "sh" always gets the sh-fallback flag so a draining (weight 0) backend hands its clients to
  another backend instead of refusing them. Weight 0 = drain: no new connections, established
  ones go on (`expire_nodest_conn=1` drops connections only when the backend is removed).
- idle timeouts: IPVS forgets an idle TCP connection after 900 s (its default), long before
  netfilter does (nf_conntrack_tcp_timeout_established, 5 days): Swarm's silent drop of idle
  connections. mesh sets IPVS's established-TCP timeout to the namespace's conntrack one
  (IPVS_CMD_SET_CONFIG, `ipvsadm --set`; pyroute2 has no helper for it: `set_tcp_timeout`).
- sysctls: net.ipv4.vs.conntrack=1 (NAT by netfilter on IPVS traffic), expire_nodest_conn=1
  (connections to a removed backend fail at once instead of hanging), conn_reuse_mode=1 (the
  kernel default, set explicitly: a new TCP connection reusing the tuple of an old one is
  scheduled afresh, and with expire_nodest_conn it is never sent to a draining backend; since 5.9
  this no longer drops the SYN under conntrack=1. 0 would send it to the old, maybe drained, one).

    lb = IpvsLb(NftCli())
    lb.apply("mesh-h1-web.1", table)   # IPVS changes from memory; nft: one transaction of the difference
    lb.resync("mesh-h1-web.1")         # nft table rewritten whole; IPVS read back and repaired

The first apply to a namespace by a fresh object (and every resync) reads the namespace's IPVS
services and removes whatever is not desired (in the process's own namespace, netns None, only
fwmark services in mesh's mark range are touched). Pure decisions: `assign_fwmarks`, `build_view`,
`plan_ops`, `render_full`, `render_changes`. IPVS is reached with pyroute2 from the calling thread,
which enters the namespace (mesh.netns.entered) and opens and closes the socket inside it.
"""
from __future__ import annotations

import hashlib
import os
import struct
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from socket import AF_INET

from mesh.errors import MeshError
from mesh.lb.model import Table, VirtualService
from mesh.nft import Nft

TABLE = "mesh_lbmark"
MARK_BASE, MARK_SPAN = 0x6d000000, 1 << 24      # mesh's fwmarks: 0x6d000001 .. 0x6dffffff
FWD_MASQ = 0                                     # IP_VS_CONN_F_MASQ (pyroute2 defaults to 3, DR)
F_HASHED, F_SH_FALLBACK = 0x0002, 0x0008         # IP_VS_SVC_F_HASHED (kernel-internal), _SCHED1
SYSCTLS = {"conntrack": "1", "expire_nodest_conn": "1", "conn_reuse_mode": "1"}
CONNTRACK_TCP_ESTABLISHED = 432000               # netfilter's default, when it cannot be read

# A service id: an int is an IPv4 fwmark service (mesh makes only those); anything else the kernel
# holds is (af, protocol, address, port, fwmark).


@dataclass
class KService:
    """One IPVS virtual service as the kernel holds it: dests {(address, port): (weight, forwarding)}."""
    sched: str
    flags: int = 0
    timeout: int = 0
    dests: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Op:
    kind: str                      # add-service | set-service | del-service | add-dest | set-dest | del-dest
    service: object                # a service id (see above)
    sched: str = ""
    flags: int = 0
    dest: tuple[str, int] | None = None
    weight: int = 0


def fwmark_of(key: str) -> int:
    """The preferred fwmark of a service key: the same in every process and on every node."""
    h = int.from_bytes(hashlib.blake2s(key.encode(), digest_size=4).digest(), "big") % MARK_SPAN
    return MARK_BASE + (h or 1)


def is_mesh_mark(service) -> bool:
    return isinstance(service, int) and MARK_BASE < service < MARK_BASE + MARK_SPAN


def assign_fwmarks(keys, kept: dict[str, int]) -> dict[str, int]:
    """A fwmark per key: kept ones stay; new keys (in sorted order) get fwmark_of, probing on a clash."""
    keys = set(keys)
    marks = {k: m for k, m in kept.items() if k in keys}
    used = set(marks.values())
    for key in sorted(keys - marks.keys()):
        mark = fwmark_of(key)
        while mark in used:
            mark = MARK_BASE + (mark - MARK_BASE) % (MARK_SPAN - 1) + 1
        marks[key] = mark
        used.add(mark)
    return marks


def sched_of(s: VirtualService) -> tuple[str, int]:
    sched = "sh" if s.affinity else s.scheduler
    return sched, (F_SH_FALLBACK if sched == "sh" else 0)


def build_view(table: Table, marks: dict[str, int]) -> dict:
    """What the kernel's IPVS should hold for `table`: {fwmark: KService} (pure)."""
    view = {}
    for key, s in table.items():
        sched, flags = sched_of(s)
        dests = {}
        for b in s.backends:
            port = b.port if b.port is not None else (s.port or 0)
            dests[(b.address, port)] = (b.weight, FWD_MASQ)
        view[marks[key]] = KService(sched, flags, 0, dests)
    return view


def plan_ops(current: dict, desired: dict) -> list[Op]:
    """The IPVS operations that turn `current` into `desired` (pure). Within a service, backends
    that come or take connections again go first, then those that drain, then those that leave:
    the operations are one by one, and a service whose backends are replaced in one change must
    not pass through a moment with none to take a connection (IPVS answers it with ICMP port
    unreachable, a refused connection). Service deletions come last, so the caller can remove the
    nft marks before the services they point to."""
    ops = []
    gone = [Op("del-service", sid) for sid in current if sid not in desired]
    for sid, want in desired.items():
        have = current.get(sid)
        if have is None:
            ops.append(Op("add-service", sid, want.sched, want.flags))
            have = KService(want.sched, want.flags)
        elif (have.sched, have.flags, have.timeout) != (want.sched, want.flags, want.timeout):
            ops.append(Op("set-service", sid, want.sched, want.flags))
        draining = []
        for dest, (weight, fwd) in want.dests.items():
            if dest not in have.dests:
                ops.append(Op("add-dest", sid, dest=dest, weight=weight))
            elif have.dests[dest] != (weight, fwd):
                step = Op("set-dest", sid, dest=dest, weight=weight)
                (draining if weight < have.dests[dest][0] else ops).append(step)
        ops += draining
        ops += [Op("del-dest", sid, dest=dest) for dest in have.dests if dest not in want.dests]
    return ops + gone


# ---------------------------------------------------------------------------------------------
# nft text (pure)

def element(s: VirtualService) -> str:
    port = "0-65535" if s.port is None else str(s.port)
    return f"{s.address} . {s.protocol} . {port}"


def _base() -> list[str]:
    key = "ip daddr . meta l4proto . th dport"
    hook = f"policy accept; ct state new {key} @closed jump refuse; meta mark set {key} map @marks;"
    return [
        f"table ip {TABLE} {{",
        "  map marks { type ipv4_addr . inet_proto . inet_service : mark; flags interval; }",
        "  set closed { type ipv4_addr . inet_proto . inet_service; flags interval; }",
        "  set masq { type mark; }",
        "  chain refuse { meta l4proto tcp reject with tcp reset; reject; }",
        f"  chain prerouting {{ type filter hook prerouting priority mangle; {hook} }}",
        f"  chain output {{ type route hook output priority mangle; {hook} }}",
        "  chain postrouting { type nat hook postrouting priority srcnat - 10; policy accept; "
        "meta mark @masq masquerade; }",
        "}",
    ]


def _member(verb: str, name: str, value: str) -> str:
    return f"{verb} element ip {TABLE} {name} {{ {value} }}"


def _add(s: VirtualService, mark: int) -> list[str]:
    out = [_member("add", "marks", f"{element(s)} : {mark:#x}")]
    if not s.active:
        out.append(_member("add", "closed", element(s)))
    if s.masquerade:
        out.append(_member("add", "masq", f"{mark:#x}"))
    return out


def _delete(s: VirtualService, mark: int) -> list[str]:
    out = [_member("delete", "marks", element(s))]
    if not s.active:
        out.append(_member("delete", "closed", element(s)))
    if s.masquerade:
        out.append(_member("delete", "masq", f"{mark:#x}"))
    return out


def render_full(table: Table, marks: dict[str, int]) -> str:
    """The transaction that makes the namespace's `mesh_lbmark` table exactly `table` (pure)."""
    out = [f"table ip {TABLE}", f"delete table ip {TABLE}"] + _base()
    for key, s in table.items():
        out += _add(s, marks[key])
    return "\n".join(out) + "\n"


def render_changes(old: Table, new: Table, marks: dict[str, int]) -> str:
    """The transaction that turns `old` into `new` (`marks` covers the keys of both); empty when
    nothing nft holds changed (pure)."""
    out = []
    for key, s in old.items():
        if key not in new:
            out += _delete(s, marks[key])
    for key, s in new.items():
        was, mark = old.get(key), marks[key]
        if was is None:
            out += _add(s, mark)
            continue
        if bool(was.active) != bool(s.active):
            out.append(_member("delete" if s.active else "add", "closed", element(s)))
        if was.masquerade != s.masquerade:
            out.append(_member("add" if s.masquerade else "delete", "masq", f"{mark:#x}"))
    return "\n".join(out) + "\n" if out else ""


def render_delete() -> str:
    return f"table ip {TABLE}\ndelete table ip {TABLE}\n"


# ---------------------------------------------------------------------------------------------
# the adapter: pyroute2's IPVS from the calling thread, inside the namespace

def _service(sid, sched: str = "rr", flags: int = 0):
    from pyroute2 import IPVSService
    if isinstance(sid, int):
        key = {"af": AF_INET, "fwmark": sid}
    else:
        af, protocol, address, port, fwmark = sid
        key = {"af": af, "fwmark": fwmark} if fwmark else \
              {"af": af, "protocol": protocol, "addr": address, "port": port}
    return IPVSService(**key, sched_name=sched, flags={"flags": flags, "mask": 0xFFFF}, timeout=0,
                       netmask="255.255.255.255")


def read_view(ipvs) -> dict:
    """Every IPVS service of the socket's namespace, read back raw (IPVSDest.from_message reports
    pyroute2's default forwarding method, not the kernel's)."""
    view = {}
    for msg in list(ipvs.service("dump")):
        a = dict(msg.get("IPVS_CMD_ATTR_SERVICE")["attrs"])
        af, fwmark = a.get("IPVS_SVC_ATTR_AF"), a.get("IPVS_SVC_ATTR_FWMARK", 0)
        sid = fwmark if af == AF_INET and fwmark else \
            (af, a.get("IPVS_SVC_ATTR_PROTOCOL"), a.get("IPVS_SVC_ATTR_ADDR"), a.get("IPVS_SVC_ATTR_PORT"), fwmark)
        flags = a.get("IPVS_SVC_ATTR_FLAGS")
        ks = KService(a.get("IPVS_SVC_ATTR_SCHED_NAME", ""), (flags["flags"] if flags else 0) & ~F_HASHED,
                      a.get("IPVS_SVC_ATTR_TIMEOUT", 0))
        for d in list(ipvs.dest("dump", service=_service(sid))):
            da = dict(d.get("IPVS_CMD_ATTR_DEST")["attrs"])
            ks.dests[(da["IPVS_DEST_ATTR_ADDR"], da["IPVS_DEST_ATTR_PORT"])] = (
                da["IPVS_DEST_ATTR_WEIGHT"], da["IPVS_DEST_ATTR_FWD_METHOD"] & 0x7)
        view[sid] = ks
    return view


def run_ops(ipvs, ops: list[Op]) -> None:
    from pyroute2 import IPVSDest
    for op in ops:
        if op.kind in ("add-service", "set-service", "del-service"):
            ipvs.service(op.kind[:3], service=_service(op.service, op.sched or "rr", op.flags))
        else:
            address, port = op.dest
            dest = IPVSDest(addr=address, port=port, fwd_method=FWD_MASQ, weight=op.weight)
            ipvs.dest(op.kind[:3], service=_service(op.service), dest=dest)


@contextmanager
def ipvs_in(netns: str | None):
    """A pyroute2 IPVS socket opened inside `netns` by this thread (None: where the thread is)."""
    from pyroute2 import IPVS
    from pyroute2.netlink.exceptions import NetlinkError
    from mesh.netns import entered
    with entered(netns) if netns else nullcontext():
        try:
            if not os.path.exists("/proc/thread-self/net/ip_vs"):     # this thread's namespace
                raise OSError("no /proc/net/ip_vs")
            ipvs = IPVS()
        except (OSError, NetlinkError) as e:
            raise MeshError(f"IPVS is not available in {netns or 'this namespace'} "
                            f"(is the ip_vs module loaded?): {e}") from None
        try:
            yield ipvs
        finally:
            ipvs.close()


def set_sysctls() -> None:
    """The net.ipv4.vs sysctls of the namespace this thread is in (see the module docstring)."""
    for name, value in SYSCTLS.items():
        with open(f"/proc/sys/net/ipv4/vs/{name}", "w") as f:
            f.write(value)


def conntrack_tcp_timeout() -> int:
    """Seconds netfilter keeps an idle established TCP connection, in this thread's namespace."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established") as f:
            return int(f.read())
    except (OSError, ValueError):
        return CONNTRACK_TCP_ESTABLISHED


def set_tcp_timeout(ipvs, seconds: int) -> None:
    """IPVS's idle timeout of established TCP connections (ipvsadm --set TCP 0 0); the others
    (0) stay as they are."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.generic.ipvs import IPVS_CMD_SET_CONFIG, ipvsmsg
    msg = ipvsmsg()
    msg["cmd"], msg["version"] = IPVS_CMD_SET_CONFIG, 1
    # pyroute2 maps the timeouts as raw ("hex") attributes: the kernel's u32, in host byte order
    msg["attrs"] = [("IPVS_CMD_ATTR_TIMEOUT_TCP", struct.pack("=I", seconds))]
    ipvs.nlm_request(msg, msg_type=ipvs.asyncore.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)


def owned(view: dict, netns: str | None) -> dict:
    """The services mesh may change: all of a namespace of its own; only its fwmarks elsewhere."""
    return view if netns is not None else {k: v for k, v in view.items() if is_mesh_mark(k)}


class IpvsLb:
    name = "ipvs"

    def __init__(self, nft: Nft):
        self.nft = nft
        self.applied: dict[str | None, Table] = {}
        self.marks: dict[str | None, dict[str, int]] = {}

    def namespaces(self) -> list[str | None]:
        return list(self.applied)

    def apply(self, netns: str | None, table: Table) -> None:
        old, kept = self.applied.get(netns), self.marks.get(netns, {})
        marks = assign_fwmarks(table, kept)
        try:
            if old is None:
                self._rewrite(netns, table, marks)
            else:
                ops = plan_ops(build_view(old, kept), build_view(table, marks))
                text = render_changes(old, table, {**kept, **marks})
                if ops or text:
                    with ipvs_in(netns) as ipvs:
                        self._run(ipvs, netns, ops, text)
        except Exception:
            self.applied.pop(netns, None)        # memory is no longer what the kernel holds:
            self.marks.pop(netns, None)          # the next apply reads the kernel and rewrites
            raise
        self.applied[netns], self.marks[netns] = dict(table), marks

    def resync(self, netns: str | None) -> None:
        if netns in self.applied:
            self._rewrite(netns, self.applied[netns], self.marks[netns])

    def forget(self, netns: str | None) -> None:
        if self.applied.pop(netns, None) is None:
            return
        self.marks.pop(netns, None)
        try:
            with ipvs_in(netns) as ipvs:
                ops = plan_ops(owned(read_view(ipvs), netns), {})
                self._run(ipvs, netns, ops, render_delete())
        except Exception:
            pass     # the namespace is gone, and its IPVS services and table with it

    def _rewrite(self, netns: str | None, table: Table, marks: dict[str, int]) -> None:
        """Make the kernel exactly `table`, whatever it holds: read IPVS back, rewrite nft whole."""
        with ipvs_in(netns) as ipvs:
            set_sysctls()
            if netns is not None:     # a namespace of mesh's own: the setting is namespace-wide
                set_tcp_timeout(ipvs, conntrack_tcp_timeout())
            ops = plan_ops(owned(read_view(ipvs), netns), build_view(table, marks))
            self._run(ipvs, netns, ops, render_full(table, marks))

    def _run(self, ipvs, netns: str | None, ops: list[Op], text: str) -> None:
        """New and changed services first, then the marks that point at them, then removals."""
        run_ops(ipvs, [op for op in ops if op.kind != "del-service"])
        if text:
            self.nft.apply(netns, text)
        run_ops(ipvs, [op for op in ops if op.kind == "del-service"])
