"""The same behaviour tests for both load-balancer backends (mesh.lb.nftables, mesh.lb.ipvs).

One world per backend (module-scoped, torn down in finally): a balancer namespace `c` (the
client-in-the-sandbox shape: curl runs there against VIPs) with a bridge to three backend
namespaces `b1..b3` (echo servers on TCP and UDP port 80, each with its own hostname in a UTS
namespace of its own), and an outside namespace `x` joined to `c` by a veth (the ingress shape:
traffic arriving at c's address). The backends route back through c, so replies pass the balancer.
Every test uses its own VIPs or ports and a fresh balancer object, forgotten at the end.

The ipvs params skip on a kernel without ip_vs; inside the VM (make test-vm) they never skip.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from labkit import ECHO, SYSTEM_PYTHON, Background, curl, no_connect, sh
from mesh.lb.base import kernel_has_ipvs
from mesh.lb.ipvs import IpvsLb, build_view, ipvs_in, read_view
from mesh.lb.model import Backend, VirtualService, table_of
from mesh.lb.nftables import NftLb
from mesh.netns import entered
from mesh.nft import NftCli

IN_GUEST = os.environ.get("MESH_VM_GUEST") == "1"
NO_IPVS = "this kernel has no ip_vs; the VM run (make test-vm) covers it"
NAMES = ("b1", "b2", "b3")
BRIDGE_NET, OUTSIDE_NET = "10.77.0", "10.77.1"
C_BRIDGE, C_OUTSIDE, X_ADDR = f"{BRIDGE_NET}.1", f"{OUTSIDE_NET}.1", f"{OUTSIDE_NET}.2"
VIPS = "10.77.9"                        # routed to the bridge in c; never on any interface


@dataclass
class World:
    backend: str                        # "nftables" | "ipvs"
    c: str
    x: str
    addr: dict[str, str]                # backend name -> address
    ns: dict[str, str]                  # backend name -> namespace

    def namespaces(self) -> list[str]:
        return [self.c, self.x, *self.ns.values()]

    def lb(self):
        return NftLb(NftCli()) if self.backend == "nftables" else IpvsLb(NftCli())

    def backends(self, *names: str, port: int | None = None, drained: tuple[str, ...] = ()):
        return tuple(Backend(self.addr[n], port, 0 if n in drained else 1) for n in names or NAMES)


def _link(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    sh(["ip", "-n", ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b])
    sh(["ip", "-n", ns_a, "link", "set", name_a, "up"])
    sh(["ip", "-n", ns_b, "link", "set", name_b, "up"])


def _build(w: World, tag: str, servers: list) -> None:
    for ns in w.namespaces():
        sh(["ip", "netns", "add", ns])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
    bridge = f"mh{tag}br"
    sh(["ip", "-n", w.c, "link", "add", bridge, "type", "bridge"])
    sh(["ip", "-n", w.c, "addr", "add", f"{C_BRIDGE}/24", "dev", bridge])
    sh(["ip", "-n", w.c, "link", "set", bridge, "up"])
    sh(["ip", "-n", w.c, "route", "add", f"{VIPS}.0/24", "dev", bridge])
    sh(["ip", "netns", "exec", w.c, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    for i, name in enumerate(NAMES, 1):
        ns = w.ns[name]
        _link(w.c, f"mh{tag}{name}", ns, "mheth0")
        sh(["ip", "-n", w.c, "link", "set", f"mh{tag}{name}", "master", bridge])
        sh(["ip", "-n", ns, "addr", "add", f"{w.addr[name]}/24", "dev", "mheth0"])
        # replies to the outside go back through c; no default route, so the servers' reverse
        # lookup of 0.0.0.0 (HTTPServer.server_bind) fails at once instead of waiting for DNS
        sh(["ip", "-n", ns, "route", "add", f"{OUTSIDE_NET}.0/24", "via", C_BRIDGE])
        for proto in ("tcp", "udp"):     # echo_server answers host=<name> client=<peer address>
            servers.append(Background(ns, ["unshare", "--uts", "sh", "-c",
                                           f"hostname {name} && exec {SYSTEM_PYTHON} {ECHO} 80 {proto}"]))
    _link(w.c, f"mh{tag}x", w.x, "mheth0")
    sh(["ip", "-n", w.c, "addr", "add", f"{C_OUTSIDE}/24", "dev", f"mh{tag}x"])
    sh(["ip", "-n", w.x, "addr", "add", f"{X_ADDR}/24", "dev", "mheth0"])
    sh(["ip", "-n", w.x, "route", "add", "default", "via", C_OUTSIDE])
    for name in NAMES:                   # the servers answer (Python starts slowly in the VM)
        assert curl(f"http://{w.addr[name]}/", w.c, tries=120).startswith(f"host={name} ")
    for name in NAMES:
        assert udp_hits(w.c, w.addr[name], 1, tries=200) == Counter({name: 1})


@pytest.fixture(scope="module", params=["nftables", "ipvs"])
def world(request):
    if request.param == "ipvs" and not kernel_has_ipvs() and not IN_GUEST:
        pytest.skip(NO_IPVS)
    tag = secrets.token_hex(3)
    w = World(request.param, f"mesh-lb{tag}-c", f"mesh-lb{tag}-x",
              {n: f"{BRIDGE_NET}.{10 + i}" for i, n in enumerate(NAMES, 1)},
              {n: f"mesh-lb{tag}-{n}" for n in NAMES})
    servers: list[Background] = []
    try:
        _build(w, tag, servers)
        yield w
    finally:
        for server in servers:
            server.__exit__(None, None, None)
        for ns in w.namespaces():
            sh(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def lb(world):
    balancer = world.lb()
    try:
        yield balancer
    finally:
        balancer.forget(world.c)


# ---------------------------------------------------------------------------------------------
# clients and kernel listings

def _bodies(netns: str, url: str, n: int) -> str:
    """n requests (n connections: echo_server speaks HTTP/1.0) from one curl; it stops at the
    first failure, so a broken balancer shows as missing answers, soon."""
    return sh(["curl", "-sS", "--fail-early", "--max-time", "3", *[url] * n], netns, check=False,
              timeout=120).stdout


def hits(netns: str, url: str, n: int) -> Counter:
    """Backend name -> how many of n requests it answered."""
    return Counter(re.findall(r"^host=(\S+)", _bodies(netns, url, n), re.M))


def clients(netns: str, url: str, n: int) -> Counter:
    """Client address the backends saw -> how many of n requests."""
    return Counter(re.findall(r" client=(\S+)", _bodies(netns, url, n)))


def udp_hits(netns: str, address: str, n: int, tries: int = 1) -> Counter:
    """n datagrams to address:80, each from a fresh socket (so a fresh flow): name -> count."""
    got: Counter = Counter()
    for _ in range(n):
        for attempt in range(tries):
            with entered(netns):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with s:
                s.settimeout(0.3 if tries > 1 else 3.0)
                s.sendto(b"?", (address, 80))
                try:
                    got[re.match(rb"host=(\S+)", s.recv(256)).group(1).decode()] += 1
                    break
                except socket.timeout:
                    if attempt == tries - 1:
                        got["(timeout)"] += 1
    return got


def ipvs_listing(netns: str) -> list[tuple[int, list[tuple[str, str, int]]]]:
    """`ipvsadm -Ln` in netns, as listed: [(fwmark, [(address:port, forwarding, weight), ...])]
    (a service that is not a fwmark service lists as -1)."""
    out: list = []
    for line in sh(["ipvsadm", "-Ln"], netns).stdout.splitlines():
        if m := re.match(r"^(FWM|TCP|UDP)\s+(\S+)\s", line):
            out.append((int(m.group(2)) if m.group(1) == "FWM" else -1, []))
        elif m := re.match(r"^\s+->\s+(\S+)\s+(\S+)\s+(\d+)", line):
            out[-1][1].append((m.group(1), m.group(2), int(m.group(3))))
    return out


def nft_elements(netns: str, table: str) -> list[str]:
    """`addr . proto . ports` of every element in the table's map (mesh_lb's or mesh_lbmark's)."""
    listing = sh(["nft", "list", "table", "ip", table], netns).stdout
    return sorted(re.findall(r"(\d+\.\d+\.\d+\.\d+ \. (?:tcp|udp) \. [\d-]+)", listing))


def lb_elements(world: World) -> list[str]:
    return nft_elements(world.c, "mesh_lb" if world.backend == "nftables" else "mesh_lbmark")


def assert_ipvs_is(world: World, lb: IpvsLb, table) -> None:
    """The namespace's IPVS holds exactly `table`: one fwmark service per virtual service, one
    masquerading real server per backend, nothing else and nothing twice."""
    listed = ipvs_listing(world.c)
    got = {mark: sorted(dests) for mark, dests in listed}
    assert len(got) == len(listed) and all(len(set(d)) == len(d) for d in got.values()), listed
    marks = lb.marks[world.c]
    with ipvs_in(world.c) as ipvs:       # read back raw: scheduler, flags, masquerade forwarding
        assert read_view(ipvs) == build_view(table, marks)
    assert got == {marks[key]: sorted((f"{b.address}:{b.port if b.port is not None else (s.port or 0)}",
                                       "Masq", b.weight) for b in s.backends)
                   for key, s in table.items()}


# ---------------------------------------------------------------------------------------------
# the scenarios

def test_a_vip_in_the_clients_own_namespace_balances_across_all_backends(world, lb):
    vip = f"{VIPS}.1"
    table = table_of([VirtualService(vip, "tcp", None, world.backends()),
                      VirtualService(vip, "udp", None, world.backends())])
    lb.apply(world.c, table)
    seen = hits(world.c, f"http://{vip}/", 30)
    assert set(seen) == set(NAMES) and sum(seen.values()) == 30, seen
    if world.backend == "ipvs":
        assert_ipvs_is(world, lb, table)     # one fwmark service per protocol, Masq, port 0 (the client's)
        for name in ("conntrack", "expire_nodest_conn"):
            assert sh(["sysctl", "-n", f"net.ipv4.vs.{name}"], world.c).stdout.strip() == "1"
        # no silent drop of idle connections after IPVS's 900 s: as long as conntrack keeps them
        established = sh(["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_timeout_established"],
                         world.c).stdout.strip()
        timeouts = re.search(r"Timeout \(tcp tcpfin udp\): (\d+) (\d+) (\d+)",
                             sh(["ipvsadm", "-L", "--timeout"], world.c).stdout)
        assert timeouts and timeouts.groups() == (established, "120", "300"), timeouts
        assert established != "900"


@pytest.mark.parametrize("masquerade", [True, False])
def test_b_published_port_for_traffic_arriving_in_the_balancer_namespace(world, lb, masquerade):
    port = 8080 if masquerade else 8081
    table = table_of([VirtualService(C_OUTSIDE, "tcp", port, world.backends(port=80),
                                     masquerade=masquerade)])
    lb.apply(world.c, table)
    url = f"http://{C_OUTSIDE}:{port}/"
    assert set(hits(world.x, url, 30)) == set(NAMES)
    assert clients(world.x, url, 6) == Counter({C_BRIDGE if masquerade else X_ADDR: 6})
    lb.apply(world.c, table_of([VirtualService(C_OUTSIDE, "tcp", port, world.backends(port=80),
                                               masquerade=not masquerade)]))
    assert clients(world.x, url, 6) == Counter({X_ADDR if masquerade else C_BRIDGE: 6})


def _backend_of(world: World, sport: int) -> str:
    """The backend holding the established connection from the balancer's port `sport`."""
    peer = re.compile(rf"\s{re.escape(C_BRIDGE)}:{sport}\s")
    owners = [n for n in NAMES
              if peer.search(sh(["ss", "-Htn", "state", "established", "( sport = :80 )"], world.ns[n]).stdout + "\n")]
    assert len(owners) == 1, owners
    return owners[0]


def test_c_drain_keeps_established_connections_and_sends_new_ones_elsewhere(world, lb):
    vip = f"{VIPS}.3"
    lb.apply(world.c, table_of([VirtualService(vip, "tcp", None, world.backends())]))
    with entered(world.c):
        held = socket.create_connection((vip, 80), timeout=10)
    with held:
        x = _backend_of(world, held.getsockname()[1])
        lb.apply(world.c, table_of([VirtualService(vip, "tcp", None, world.backends(drained=(x,)))]))
        seen = hits(world.c, f"http://{vip}/", 20)
        assert set(seen) == set(NAMES) - {x} and sum(seen.values()) == 20, seen
        held.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := held.recv(4096):
            answer += chunk
        assert f"host={x} ".encode() in answer, answer


def test_d_removing_a_backend_then_a_whole_service(world, lb):
    vip, other = f"{VIPS}.4", f"{VIPS}.14"
    keep = VirtualService(other, "tcp", None, world.backends("b1"))
    lb.apply(world.c, table_of([VirtualService(vip, "tcp", None, world.backends()), keep]))
    assert set(hits(world.c, f"http://{vip}/", 30)) == set(NAMES)
    smaller = table_of([VirtualService(vip, "tcp", None, world.backends("b1", "b2")), keep])
    lb.apply(world.c, smaller)
    seen = hits(world.c, f"http://{vip}/", 20)
    assert set(seen) == {"b1", "b2"} and sum(seen.values()) == 20, seen
    if world.backend == "ipvs":
        assert_ipvs_is(world, lb, smaller)
    lb.apply(world.c, table_of([keep]))
    assert no_connect(f"http://{vip}/", world.c)
    assert hits(world.c, f"http://{other}/", 2) == Counter(b1=2)
    assert lb_elements(world) == [f"{other} . tcp . 0-65535"]
    if world.backend == "ipvs":
        assert_ipvs_is(world, lb, table_of([keep]))


def test_e_a_new_object_leaves_exactly_the_desired_state_and_resync_repairs_drift(world, lb):
    a, b, c = f"{VIPS}.5", f"{VIPS}.6", f"{VIPS}.7"
    old = world.lb()                     # the reconciler before its restart: never forgotten
    old.apply(world.c, table_of([VirtualService(a, "tcp", None, world.backends("b1", "b2")),
                                 VirtualService(b, "tcp", None, world.backends("b3"))]))
    if world.backend == "ipvs":          # and something older still: a service of another layout
        sh(["ipvsadm", "-A", "-f", "4242", "-s", "rr"], world.c)
        sh(["ipvsadm", "-a", "-f", "4242", "-r", f"{world.addr['b1']}:0", "-m"], world.c)
    desired = table_of([VirtualService(a, "tcp", None, world.backends("b2", "b3")),
                        VirtualService(c, "tcp", None, world.backends("b1"))])
    lb.apply(world.c, desired)

    def exactly_desired():
        assert lb_elements(world) == sorted([f"{a} . tcp . 0-65535", f"{c} . tcp . 0-65535"])
        if world.backend == "ipvs":
            assert_ipvs_is(world, lb, desired)
        seen = hits(world.c, f"http://{a}/", 20)
        assert set(seen) == {"b2", "b3"} and sum(seen.values()) == 20, seen
        assert no_connect(f"http://{b}/", world.c)

    exactly_desired()
    # drift behind mesh's back, then the periodic repair
    sh(["nft", "delete", "table", "ip", "mesh_lb" if world.backend == "nftables" else "mesh_lbmark"], world.c)
    if world.backend == "ipvs":
        sh(["ipvsadm", "-C"], world.c)
    lb.resync(world.c)
    exactly_desired()


def test_f_udp_vip_is_balanced(world, lb):
    vip = f"{VIPS}.8"
    lb.apply(world.c, table_of([VirtualService(vip, "udp", None, world.backends())]))
    seen = udp_hits(world.c, vip, 30)
    assert set(seen) == set(NAMES) and sum(seen.values()) == 30, seen


def test_g_affinity_sends_a_client_address_always_to_the_same_backend(world, lb):
    vip = f"{VIPS}.9"
    published = VirtualService(C_OUTSIDE, "tcp", 8090, world.backends(port=80), affinity=True)
    lb.apply(world.c, table_of([VirtualService(vip, "tcp", None, world.backends(), affinity=True),
                                published]))
    from_c = hits(world.c, f"http://{vip}/", 12)
    from_x = hits(world.x, f"http://{C_OUTSIDE}:8090/", 12)
    assert len(from_c) == 1 and sum(from_c.values()) == 12, from_c
    assert len(from_x) == 1 and sum(from_x.values()) == 12, from_x
    if world.backend == "ipvs":
        assert re.search(r"^FWM\s+\d+\s+sh\b", sh(["ipvsadm", "-Ln"], world.c).stdout, re.M)
    # its backend drained, the client moves to one other backend and stays there
    chosen = next(iter(from_c))
    lb.apply(world.c, table_of([VirtualService(vip, "tcp", None, world.backends(drained=(chosen,)),
                                               affinity=True), published]))
    moved = hits(world.c, f"http://{vip}/", 12)
    assert len(moved) == 1 and chosen not in moved and sum(moved.values()) == 12, moved


def test_h_no_active_backend_refuses_at_once(world, lb):
    vip = f"{VIPS}.10"
    lb.apply(world.c, table_of([VirtualService(vip, "tcp", None, world.backends("b1", drained=("b1",))),
                                VirtualService(C_OUTSIDE, "tcp", 8095, ())]))
    for netns, target in ((world.c, (vip, 80)), (world.x, (C_OUTSIDE, 8095))):
        with entered(netns):
            s = socket.socket()
        with s:                          # errno, not curl's exit code: curl says 7 for "no route" too
            s.settimeout(8)
            t0 = time.monotonic()
            assert s.connect_ex(target) == errno.ECONNREFUSED, target
            assert time.monotonic() - t0 < 6, "refused only after a wait: a timeout, not a reject"


ASK_LOOP = """
import errno, json, os, socket, sys
address, stop, results = sys.argv[1], sys.argv[2], {}
while not os.path.exists(stop):
    with socket.socket() as s:
        s.settimeout(5)
        code = s.connect_ex((address, 80))
        try:
            if code == 0:
                s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
                code = "answered" if b"host=" in answer else "no answer"
        except OSError as exc:
            code = exc.errno or type(exc).__name__
    code = errno.errorcode.get(code, code)
    results[code] = results.get(code, 0) + 1
print(json.dumps(results))
"""


def test_i_replacing_every_backend_in_one_change_refuses_no_connection(world, lb, tmp_path):
    """A client asking without a pause while the service's one backend is replaced, as mesh
    replaces a task: one change adds the new backend and drains the old one, the next (once its
    requests are answered) removes it. No request fails. IPVS changes backends one operation at a
    time, so the new one must be added before the old one drains (a service with none to take a
    connection answers ICMP port unreachable: refused); nftables changes them in one transaction."""
    vip, stop = f"{VIPS}.11", tmp_path / "stop"
    lb.apply(world.c, table_of([VirtualService(vip, "tcp", None, world.backends("b1"))]))
    client = subprocess.Popen(["ip", "netns", "exec", world.c, SYSTEM_PYTHON, "-c", ASK_LOOP,
                               vip, str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        for i in range(30):
            old, new = ("b1", "b2") if i % 2 == 0 else ("b2", "b1")
            lb.apply(world.c, table_of([VirtualService(vip, "tcp", None,
                                                       world.backends(old, new, drained=(old,)))]))
            time.sleep(0.15)
            lb.apply(world.c, table_of([VirtualService(vip, "tcp", None, world.backends(new))]))
    finally:
        stop.touch()
        out, _ = client.communicate(timeout=30)
    results = json.loads(out)
    assert set(results) == {"answered"} and results["answered"] >= 30, results
