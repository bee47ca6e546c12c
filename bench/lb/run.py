"""mesh's kernel load balancer against its anchors, side by side on this machine, in one run.

(c) programming time (no lab needed, runs first):
  * nftables (mesh.lb.nftables): NftLb(LibNft.or_cli(NftCli())).apply(netns, table) of 1k and 10k services x 10
    backends into a fresh namespace (render_full + one `nft -f -`), then >= 50 one-service changes
    (one backend of a random service replaced by a new address: NftLb.apply computes the
    incremental transaction from its memory) with that many services loaded: p50 / p99;
  * anchor: an equivalent kube-proxy-iptables-mode nat table (KUBE-SERVICES: one rule per VIP:port
    jumping to KUBE-SVC-*, one KUBE-SEP-* chain per endpoint picked with `-m statistic --mode random
    --probability 1/(n-i)`, KUBE-MARK-MASQ for hairpin, DNAT) loaded with `iptables-restore -w` into a
    fresh namespace (without --noflush: there is nothing to keep, and --noflush makes iptables-nft
    several times slower), and a one-service change done as kube-proxy's iptables mode does it: the whole
    table of its chains restored with `iptables-restore --noflush --counters` (every chain declared,
    so flushed and rewritten; the replaced endpoint's chain deleted with -X). Timed: the
    iptables-restore process only. `iptables-restore` is whichever backend Debian's alternatives
    give (iptables-nft on Debian 12); iptables-legacy-restore is measured as well when present. A
    restore that runs past --cap seconds is stopped (by its PID) and reported as "> cap".
(a)+(b) traffic, on a 3-node lab (`mesh up --nodes 3 --host-netns mesh-benchlb`):
  * a `web` service of 2 replicas, both on n1 (placement constraint), publishing 8080 -> 80 in
    ingress mode; the backend is haproxy answering every request itself (bench/lb/backend.cfg,
    one thread, keep-alive): the same two backend processes serve ingress, direct, spread and
    haproxy;
  * a client namespace (mesh-lbclient) on the lab's underlay bridge, 10.97.0.200, with a route to
    the tasks' subnet via n1 (task addresses are not routed from the host namespace);
  * `webdsr`, the same with 8081 and x-mesh: {ingress: dsr} (direct server return, mesh.lb.dsr);
  * wrk -t2 -c50 keep-alive from that namespace, six paths:
      ingress  http://<n2's address>:8080/  (n2 runs no replica: the routing mesh carries it to n1)
      dsr      http://<n2's address>:8081/  (n2 hands the requests to n1 in its device's ingress
               hook; n1 DNATs them to its tasks and replies straight to the client)
      direct   the task addresses themselves, one wrk thread per task (wrk.lua sets thread.addr)
      spread   direct too, but each connection to a task picked by a hash of its 5-tuple, as a
               balancer picks (the tasks also hold SPREAD_ADDRESS, n1 routes it over them with a
               multipath route): the like-for-like anchor for a balancer, since direct keeps each
               wrk thread on one task, which no balancer does and which is worth ~10% here
      haproxy  haproxy in TCP mode in the client namespace (127.0.0.1:8090), roundrobin over the
               same task addresses, nbthread = number of CPUs (the userland-proxy anchor)
      haproxy@n2  the same haproxy as a task of the stack (`proxy`) on n2, on the tasks' network,
               reached through n2: the userland equivalent of the routing mesh's path (a proxy
               service on the node the client addresses, the overlay to n1), where `haproxy` above
               saves the hop through n2 and the overlay that every routing-mesh path pays
    peak: no rate limit, each --seconds long, --rounds rounds in alternating order; the better run
    of each path counts (plus ingress@n1: the published port on the replicas' own node, a
    diagnostic without the overlay hop between nodes);
    same load: then all six again at one offered load (--latency-share of the slowest peak, each
    connection waiting 4 ms between a response and its next request), where p99 is comparable;
    CPU use (whole machine, softirq, wrk, backends, haproxy) is recorded per run, and the CPUs
    other work kept busy just before.
Targets (issue 5, item 7), for ingress and for dsr: >= 0.9x direct RPS (against spread and
direct), >= 2x haproxy RPS (against haproxy@n2 and haproxy), one-service change p99 <= 50 ms at 10k
services. Printed as met / not met; nothing is asserted.

Everything runs inside namespaces this script makes (mesh-benchlb and the lab's, mesh-lbclient,
mesh-lbprog); traffic goes only to addresses inside them. All of them are removed at the end, on
errors and on Ctrl-C too; every process started here is stopped by its own PID.

    python bench/lb/run.py [--quick] [--only programming|traffic] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from mesh.lb.model import Backend, VirtualService, table_of
from mesh.lb.nftables import NftLb, chain_name, render_changes, render_full
from mesh.libnft import LibNft
from mesh.nft import NftCli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
HOST_NS = "mesh-benchlb"
CLIENT_NS = "mesh-lbclient"
PROG_NS = "mesh-lbprog"
CLIENT_LINK = "mhcbenchlb"
CLIENT_ADDRESS = "10.97.0.200"
UNDERLAY_BRIDGE = "mhlab"
PUBLISHED = 8080
PUBLISHED_DSR = 8081        # the same backends behind direct server return (x-mesh: {ingress: dsr})
ANCHOR_PORT = 8090
SPREAD_ADDRESS = "198.18.0.80"   # RFC 2544's benchmarking range; held by the web tasks only
BACKENDS_PER_SERVICE = 10
LATENCY_DELAY_MS = 4
TARGET_RPS_VS_DIRECT = 0.9
TARGET_RPS_VS_HAPROXY = 2.0
TARGET_CHANGE_P99_MS = 50.0


# --- small helpers --------------------------------------------------------------------------------
def in_ns(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def run(argv: list[str], netns: str | None = None, check: bool = True, timeout: float = 120,
        **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(in_ns(netns, argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(in_ns(netns, argv))} exited {proc.returncode}: "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def secs(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def mesh_argv() -> list[str]:
    cli = Path(sys.executable).parent / "mesh"
    return [str(cli)] if cli.exists() else [sys.executable, "-m", "mesh"]


class Resources:
    """Namespaces and processes made here; close() removes every one (idempotent)."""

    def __init__(self):
        self.namespaces: list[str] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.lab_up = False

    def netns(self, name: str) -> str:
        if netns_exists(name):
            run(["ip", "netns", "del", name], check=False)
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "link", "set", "lo", "up"], name)
        return name

    def drop_netns(self, name: str) -> None:
        run(["ip", "netns", "del", name], check=False)
        if name in self.namespaces:
            self.namespaces.remove(name)

    def start(self, name: str, argv: list[str], log: Path, **kw) -> subprocess.Popen:
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdout=kw.pop("stdout", f), stderr=f,
                                    stdin=kw.pop("stdin", subprocess.DEVNULL), **kw)
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        if self.lab_up or netns_exists(HOST_NS):
            subprocess.run([*mesh_argv(), "down", "--host-netns", HOST_NS], capture_output=True,
                           timeout=120)
            self.lab_up = False
        for ns in list(self.namespaces):
            self.drop_netns(ns)
        if netns_exists(HOST_NS):
            run(["ip", "netns", "del", HOST_NS], check=False)


# --- (c) programming time -------------------------------------------------------------------------
def vip(i: int) -> str:
    return str(ipaddress.IPv4Address("10.96.0.1") + i)


def endpoint(k: int) -> str:
    return str(ipaddress.IPv4Address("10.128.0.1") + k)


class FreshEndpoints:
    """Addresses never used by the initial tables (task replacements)."""

    def __init__(self):
        self.next = 0

    def __call__(self) -> str:
        self.next += 1
        return str(ipaddress.IPv4Address("10.200.0.0") + self.next)


def nft_table(n: int):
    return table_of(VirtualService(vip(i), "tcp", 80,
                                   tuple(Backend(endpoint(i * BACKENDS_PER_SERVICE + j), 8080)
                                         for j in range(BACKENDS_PER_SERVICE)))
                    for i in range(n))


def bench_nft(res: Resources, n: int, samples: int, rng: random.Random,
              fresh: FreshEndpoints) -> dict:
    table = nft_table(n)
    t0 = time.perf_counter()
    render_full(table)
    render = time.perf_counter() - t0
    ns = res.netns(PROG_NS)
    try:
        lb = NftLb(LibNft.or_cli(NftCli()))     # as mesh.lb.base.make_lb builds it
        t0 = time.perf_counter()
        lb.apply(ns, table)
        full = time.perf_counter() - t0
        totals, diffs = [], []
        keys = list(table)
        last = None
        for _ in range(samples):
            old = lb.applied[ns]
            key = keys[rng.randrange(n)]
            vs = old[key]
            backends = list(vs.backends)
            backends[rng.randrange(len(backends))] = Backend(fresh(), 8080)
            new = dict(old)
            new[key] = replace(vs, backends=tuple(backends))
            t0 = time.perf_counter()
            render_changes(old, new)                      # the diff alone, for the breakdown
            diffs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lb.apply(ns, new)                              # what is timed: diff + nft -f -
            totals.append(time.perf_counter() - t0)
            last = new[key]
        # proof that the changes reached the kernel: the last changed chain has the new backend
        chain = run(["nft", "list", "chain", "ip", "mesh_lb", chain_name(last.key)], ns).stdout
        if last.backends and not all(b.address in chain for b in last.backends):
            raise RuntimeError(f"the last one-service change is not in the kernel:\n{chain}")
    finally:
        res.drop_netns(ns)
    return {"services": n, "full_s": full, "render_full_s": render, "samples": len(totals),
            "change_p50_s": percentile(totals, 50), "change_p99_s": percentile(totals, 99),
            "change_max_s": max(totals), "diff_p50_s": percentile(diffs, 50),
            "nft_p50_s": percentile([t - d for t, d in zip(totals, diffs)], 50)}


def kube_chain(prefix: str, text: str) -> str:
    """kube-proxy's chain names: a prefix and 16 base32 characters of a SHA-256."""
    return prefix + base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode()


def kube_ruleset(svcs: dict[str, tuple[str, list[str]]], *, with_jumps: bool,
                 stale: tuple[str, ...] = ()) -> str:
    """The nat table kube-proxy's iptables mode writes for these services (ClusterIP, tcp/80 ->
    endpoints' 8080), with the MASQUERADE postrouting it also keeps."""
    chains = [":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-POSTROUTING - [0:0]",
              ":KUBE-MARK-MASQ - [0:0]"]
    rules = []
    if with_jumps:       # kube-proxy adds these with iptables -I, outside its restores
        rules += ['-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
                  '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
                  '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" '
                  '-j KUBE-POSTROUTING']
    rules += ["-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
              "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
              '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
              "-j MASQUERADE --random-fully",
              "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"]
    for name, (address, eps) in svcs.items():
        svc = kube_chain("KUBE-SVC-", name)
        chains.append(f":{svc} - [0:0]")
        rules.append(f'-A KUBE-SERVICES -d {address}/32 -p tcp -m comment --comment "{name} cluster IP" '
                     f"-m tcp --dport 80 -j {svc}")
        for j, ep in enumerate(eps):
            sep = kube_chain("KUBE-SEP-", name + ep)
            chains.append(f":{sep} - [0:0]")
            pick = (f" -m statistic --mode random --probability {1 / (len(eps) - j):0.10f}"
                    if j < len(eps) - 1 else "")
            rules.append(f'-A {svc} -m comment --comment "{name} -> {ep}:8080"{pick} -j {sep}')
            rules.append(f'-A {sep} -s {ep}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ')
            rules.append(f'-A {sep} -p tcp -m comment --comment "{name}" -m tcp '
                         f"-j DNAT --to-destination {ep}:8080")
    rules.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports" '
                 "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    chains += [f":{c} - [0:0]" for c in stale]
    return ("*nat\n" + "\n".join(chains) + "\n" + "\n".join(rules) + "\n"
            + "".join(f"-X {c}\n" for c in stale) + "COMMIT\n")


def timed_restore(res: Resources, binary: str, ns: str, args: list[str], text: str, cap: float,
                  tmp: Path) -> float | None:
    """Seconds the restore took, or None when it ran past `cap` (then it is stopped)."""
    src = tmp / "ruleset.txt"
    src.write_text(text)
    with open(src, "rb") as stdin:
        t0 = time.perf_counter()
        proc = res.start("iptables-restore", in_ns(ns, [binary, "-w", *args]), tmp / "restore.log",
                         stdin=stdin)
        try:
            rc = proc.wait(cap)
        except subprocess.TimeoutExpired:
            res.stop("iptables-restore")
            return None
        took = time.perf_counter() - t0
    res.procs.pop("iptables-restore", None)
    if rc != 0:
        raise RuntimeError(f"{binary} exited {rc}: {(tmp / 'restore.log').read_text()[-500:]}")
    return took


def iptables_flavours() -> list[tuple[str, str]]:
    """[(binary, backend name)]: `iptables-restore` as the system gives it, then legacy if present."""
    out = []
    for binary in ("iptables-restore", "iptables-legacy-restore"):
        if not shutil.which(binary):
            continue
        version = run([binary, "--version"], check=False).stdout.strip()
        m = re.search(r"\((\w+)\)", version)
        kind = m.group(1) if m else "?"
        if binary == "iptables-restore" or kind not in [k for _, k in out]:
            out.append((binary, kind))
    return out


def bench_iptables(res: Resources, binary: str, n: int, samples: int, cap: float, budget: float,
                   rng: random.Random, fresh: FreshEndpoints, tmp: Path) -> dict:
    svcs = {f"bench/svc-{i}:http": (vip(i), [endpoint(i * BACKENDS_PER_SERVICE + j)
                                             for j in range(BACKENDS_PER_SERVICE)])
            for i in range(n)}
    ns = res.netns(PROG_NS)
    try:
        full = timed_restore(res, binary, ns, [], kube_ruleset(svcs, with_jumps=True), cap, tmp)
        changes: list[float] = []
        capped = 0
        spent = 0.0
        names = list(svcs)
        while full is not None and len(changes) < samples and spent < budget:
            name = names[rng.randrange(n)]
            address, eps = svcs[name]
            k = rng.randrange(len(eps))
            gone, eps = eps[k], eps[:k] + [fresh()] + eps[k + 1:]
            svcs[name] = (address, eps)
            text = kube_ruleset(svcs, with_jumps=False, stale=(kube_chain("KUBE-SEP-", name + gone),))
            took = timed_restore(res, binary, ns, ["--noflush", "--counters"], text, cap, tmp)
            if took is None:
                capped += 1
                break
            changes.append(took)
            spent += took
    finally:
        res.drop_netns(ns)
    out = {"services": n, "full_s": full, "samples": len(changes), "capped": capped, "cap_s": cap}
    if changes:
        out.update(change_p50_s=percentile(changes, 50), change_p99_s=percentile(changes, 99),
                   change_max_s=max(changes))
    return out


def programming(res: Resources, args, tmp: Path) -> dict:
    rng = random.Random(5)
    fresh = FreshEndpoints()
    sizes = [1000, 10000] if not args.quick else [1000, 3000]
    print(f"== (c) programming time: services x {BACKENDS_PER_SERVICE} backends, in fresh namespaces")
    bg = background_cpus()
    print(f"  other work on the machine: {bg:.2f} CPUs busy (of {os.cpu_count()})"
          + ("  <- figures below are skewed by it" if bg > 0.2 else ""))
    out: dict = {"nftables": [], "iptables": {}, "background_cpus": bg}
    for n in sizes:
        r = bench_nft(res, n, args.samples, rng, fresh)
        out["nftables"].append(r)
        print(f"  nftables        {n:>6} services: full {secs(r['full_s'])}, one-service change "
              f"p50 {ms(r['change_p50_s'])} p99 {ms(r['change_p99_s'])} ({r['samples']} samples)",
              flush=True)
    for binary, kind in iptables_flavours():
        rows = []
        for n in sizes:
            r = bench_iptables(res, binary, n, args.ipt_samples, args.cap, args.ipt_budget, rng,
                               fresh, tmp)
            r["binary"], r["backend"] = binary, kind
            rows.append(r)
            change = (f"p50 {ms(r['change_p50_s'])} p99 {ms(r['change_p99_s'])} ({r['samples']} samples)"
                      if r["samples"] else "-")
            if r["capped"]:
                change += f"{'; ' if r['samples'] else ''}a restore ran past {args.cap:.0f} s and was stopped"
            print(f"  iptables-{kind:<6} {n:>6} services: full "
                  f"{secs(r['full_s']) if r['full_s'] is not None else f'> {args.cap:.0f} s'}, "
                  f"one-service change {change}", flush=True)
        out["iptables"][kind] = rows
    return out


# --- (a)+(b) traffic ------------------------------------------------------------------------------
def mesh(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    return run([*mesh_argv(), *args, "--host-netns", HOST_NS], timeout=timeout, env=env)


def mesh_json(*args: str):
    return json.loads(mesh(*args, "--json").stdout)


def write_stack(tmp: Path, replicas: int, proxy_on: str | None = None) -> Path:
    """The bench's stack; with `proxy_on` (a node name) also `proxy`: haproxy in TCP mode
    (tmp/proxy.cfg, start_proxy) as one task on that node, on the same network as the tasks."""
    stack = {
        "name": "benchlb",
        "services": {name: {
            "command": f"haproxy -db -f {HERE / 'backend.cfg'}",
            "deploy": {"replicas": replicas,
                       "placement": {"constraints": ["node.hostname == n1"]}},
            "ports": [{"target": 80, "published": port, "protocol": "tcp", "mode": "ingress"}],
            "x-mesh": {"ingress": ingress},
        } for name, port, ingress in (("web", PUBLISHED, "nat"), ("webdsr", PUBLISHED_DSR, "dsr"))},
    }
    if proxy_on:
        stack["services"]["proxy"] = {
            "command": f"haproxy -db -f {tmp / 'proxy.cfg'}",
            "deploy": {"replicas": 1, "placement": {"constraints": [f"node.hostname == {proxy_on}"]}}}
    path = tmp / "stack.yaml"
    path.write_text(json.dumps(stack, indent=2))          # JSON is YAML
    return path


def curl(netns: str, url: str, tries: float = 15.0) -> str:
    deadline = time.monotonic() + tries
    while True:
        proc = run(["curl", "-sS", "--max-time", "2", url], netns, check=False)
        if proc.returncode == 0:
            return proc.stdout.strip()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} does not answer from {netns}: {proc.stderr.strip()}")
        time.sleep(0.3)


def start_lab(res: Resources, tmp: Path, replicas: int) -> dict:
    if netns_exists(HOST_NS):
        print(f"  removing a lab left in {HOST_NS}")
        subprocess.run([*mesh_argv(), "down", "--host-netns", HOST_NS], capture_output=True, timeout=120)
        run(["ip", "netns", "del", HOST_NS], check=False)
    res.lab_up = True
    mesh("up", "-f", str(write_stack(tmp, replicas)), "--nodes", "3")
    deadline = time.monotonic() + 30
    while True:
        every = [t for t in mesh_json("ps") if t["service"] in ("web", "webdsr")]
        tasks = [t for t in every if t["service"] == "web"]
        if len(every) == 2 * replicas and all(t["state"] == "running" for t in every):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"web tasks not running after 30 s: "
                               f"{[(t['name'], t['state']) for t in tasks]}")
        time.sleep(0.5)
    nodes = {n["name"]: n for n in mesh_json("node", "ls")}
    task_nodes = {t["node"] for t in tasks}
    idle = [n for n in nodes.values() if n["name"] not in task_nodes]
    if not idle:
        raise RuntimeError("every node runs a replica; the bench needs one that does not")
    addrs, subnets = [], set()
    for t in tasks:
        net = next(v for k, v in t["networks"].items() if k != "ingress")
        addrs.append(net["address"])
        subnets.add(str(ipaddress.ip_network(f"{net['address']}/{net['prefixlen']}", strict=False)))
    return {"tasks": tasks, "task_addresses": addrs, "subnets": sorted(subnets),
            "sandboxes": [t["sandbox"] for t in tasks],
            "replica_node": nodes[tasks[0]["node"]], "idle_node": idle[0],
            "backend_pids": [t["pid"] for t in every]}


def attach_client(res: Resources, lab: dict) -> None:
    """mesh-lbclient: a veth into the lab's underlay bridge, routes to the tasks via their node."""
    ns = res.netns(CLIENT_NS)
    run(["ip", "link", "add", CLIENT_LINK, "netns", HOST_NS, "type", "veth", "peer", "name", "eth0",
         "netns", ns])
    run(["ip", "link", "set", CLIENT_LINK, "master", UNDERLAY_BRIDGE, "up"], HOST_NS)
    run(["ip", "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", "eth0"], ns)
    run(["ip", "link", "set", "eth0", "up"], ns)
    for subnet in lab["subnets"]:
        run(["ip", "route", "add", subnet, "via", lab["replica_node"]["address"]], ns)


def attach_spread(lab: dict) -> None:
    """The direct anchor with the mesh's spread: every web task also holds SPREAD_ADDRESS (on lo)
    and n1 routes it over all of them with one multipath route hashed on the 5-tuple
    (fib_multipath_hash_policy=1), so each new connection goes straight to one task, picked per
    connection as a balancer picks, with no NAT and no balancer on the way."""
    for sandbox in lab["sandboxes"]:
        run(["ip", "addr", "add", f"{SPREAD_ADDRESS}/32", "dev", "lo"], sandbox)
    node_ns = f"{HOST_NS}-{lab['replica_node']['name']}"
    run(["sysctl", "-q", "-w", "net.ipv4.fib_multipath_hash_policy=1"], node_ns)
    hops = [w for a in lab["task_addresses"] for w in ("nexthop", "via", a)]
    run(["ip", "route", "replace", f"{SPREAD_ADDRESS}/32", *hops], node_ns)
    run(["ip", "route", "add", f"{SPREAD_ADDRESS}/32", "via", lab["replica_node"]["address"]],
        CLIENT_NS)


def anchor_cfg(lab: dict, bind: str) -> str:
    servers = "\n".join(f"    server t{i} {a}:80" for i, a in enumerate(lab["task_addresses"]))
    return f"""global
    nbthread {os.cpu_count() or 1}
    maxconn 4000
defaults
    mode tcp
    timeout client 30s
    timeout server 30s
    timeout connect 5s
listen anchor
    bind {bind}
    balance roundrobin
{servers}
"""


def start_proxy(tmp: Path, replicas: int, lab: dict) -> None:
    """haproxy@n2: the same haproxy as a task of the stack on the node without a replica (a
    userland routing mesh, as a proxy service on every node would be), on the tasks' network; the
    client reaches its address through that node. Its pid joins the haproxy CPU figures."""
    idle = lab["idle_node"]
    (tmp / "proxy.cfg").write_text(anchor_cfg(lab, f":{ANCHOR_PORT}"))
    mesh("up", "-f", str(write_stack(tmp, replicas, proxy_on=idle["name"])), "--nodes", "3")
    deadline = time.monotonic() + 30
    while True:
        proxy = [t for t in mesh_json("ps") if t["service"] == "proxy"]
        if proxy and proxy[0]["state"] == "running" and proxy[0]["node"] == idle["name"]:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the proxy task is not running on {idle['name']} after 30 s: {proxy}")
        time.sleep(0.5)
    address = next(v for k, v in proxy[0]["networks"].items() if k != "ingress")["address"]
    run(["ip", "route", "add", f"{address}/32", "via", idle["address"]], CLIENT_NS)
    lab["proxy_address"], lab["proxy_pids"] = address, [proxy[0]["pid"]]


def start_anchor(res: Resources, tmp: Path, lab: dict) -> subprocess.Popen:
    cfg = tmp / "anchor.cfg"
    cfg.write_text(anchor_cfg(lab, f"127.0.0.1:{ANCHOR_PORT}"))
    return res.start("haproxy-anchor", in_ns(CLIENT_NS, ["haproxy", "-db", "-f", str(cfg)]),
                     tmp / "anchor.log")


def cpu_ticks() -> tuple[int, int, int]:
    """(busy, softirq, total) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    total = sum(v[:8])
    return total - idle, v[6], total


def background_cpus(seconds: float = 2.0) -> float:
    """CPUs kept busy by other work while this script waits (its own lab idle)."""
    a = cpu_ticks()
    time.sleep(seconds)
    b = cpu_ticks()
    return (b[0] - a[0]) / max(b[2] - a[2], 1) * (os.cpu_count() or 1)


def proc_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def wrk(res: Resources, tmp: Path, url: str, seconds: int, conns: int,
        addrs: list[str] | None, lab: dict, anchor_pid: int, delay_ms: int = 0) -> dict:
    env = {**os.environ, "WRK_ADDRS": ",".join(addrs or []), "WRK_DELAY_MS": str(delay_ms or "")}
    argv = in_ns(CLIENT_NS, ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--timeout", "2s",
                             "-s", str(HERE / "wrk.lua"), url])
    hz = os.sysconf("SC_CLK_TCK")
    pids = {"backends": lab["backend_pids"], "haproxy": [anchor_pid, *lab.get("proxy_pids", [])]}
    before = {k: sum(proc_ticks(p) for p in v) for k, v in pids.items()}
    c0 = cpu_ticks()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = res.start("wrk", argv, tmp / "wrk.log", stdout=subprocess.PIPE, env=env)
    out, _ = proc.communicate(timeout=seconds + 30)     # ip netns exec execs wrk in place
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c1 = cpu_ticks()
    res.procs.pop("wrk", None)
    line = next((l for l in out.decode().splitlines() if l.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk {url} failed ({proc.returncode}): {out.decode()[-500:]} "
                           f"{(tmp / 'wrk.log').read_text()[-500:]}")
    r = json.loads(line[len("WRKJSON "):])
    wall = (c1[2] - c0[2]) / (os.cpu_count() or 1) / hz    # seconds of wall time seen by /proc/stat
    after = {k: sum(proc_ticks(p) for p in v) for k, v in pids.items()}
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["p50_ms"] = r["latency_us"]["50"] / 1000
    r["p99_ms"] = r["latency_us"]["99"] / 1000
    r["errors_total"] = sum(r["errors"].values())
    span = (c1[2] - c0[2]) or 1
    r["cpu"] = {"busy": (c1[0] - c0[0]) / span, "softirq": (c1[1] - c0[1]) / span,
                "wrk": (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / max(wall, 1e-9),
                **{k: (after[k] - before[k]) / hz / max(wall, 1e-9) for k in pids}}
    busy_s = (c1[0] - c0[0]) / hz
    r["cpu_us_per_req"] = busy_s / max(r["requests"], 1) * 1e6     # whole machine, all processes
    return r


def spread(netns: str, url: str, count: int = 20) -> dict[str, int]:
    seen: dict[str, int] = {}
    for _ in range(count):
        body = curl(netns, url, tries=5)
        seen[body] = seen.get(body, 0) + 1
    return seen


def traffic(res: Resources, args, tmp: Path) -> dict:
    print(f"\n== (a)+(b) traffic: 3-node lab in {HOST_NS}, web x{args.replicas} on n1, published "
          f"{PUBLISHED} (ingress mode)", flush=True)
    for tool in ("wrk", "haproxy", "curl"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} is not installed (make bench-lb installs it)")
    lab = start_lab(res, tmp, args.replicas)
    attach_client(res, lab)
    attach_spread(lab)
    start_proxy(tmp, args.replicas, lab)
    anchor = start_anchor(res, tmp, lab)
    idle = lab["idle_node"]
    paths = {
        "ingress": (f"http://{idle['address']}:{PUBLISHED}/", None),
        "dsr": (f"http://{idle['address']}:{PUBLISHED_DSR}/", None),
        "direct": (f"http://{lab['task_addresses'][0]}:80/",
                   [f"{a}:80" for a in lab["task_addresses"]]),
        "spread": (f"http://{SPREAD_ADDRESS}:80/", None),
        "haproxy": (f"http://127.0.0.1:{ANCHOR_PORT}/", None),
        "haproxy@n2": (f"http://{lab['proxy_address']}:{ANCHOR_PORT}/", None),
    }
    if not args.no_local:       # diagnostic: the routing mesh on the node that runs the replicas
        paths["ingress@n1"] = (f"http://{lab['replica_node']['address']}:{PUBLISHED}/", None)
    print(f"  client: {CLIENT_NS} ({CLIENT_ADDRESS} on the underlay, route {', '.join(lab['subnets'])} "
          f"via {lab['replica_node']['name']} {lab['replica_node']['address']})")
    print(f"  ingress: {paths['ingress'][0]}  ({idle['name']}, no local replica)")
    print(f"  dsr:     {paths['dsr'][0]}  (webdsr, the same backends behind x-mesh: {{ingress: dsr}}: "
          f"{idle['name']} hands requests to n1 in its device's ingress hook, replies go straight "
          "to the client)")
    print(f"  direct:  {', '.join(paths['direct'][1])}  (one wrk thread per task)")
    print(f"  spread:  {paths['spread'][0]}  (direct too, but each connection to a task picked by "
          f"a 5-tuple hash: every task holds {SPREAD_ADDRESS}, n1 routes it over them by multipath)")
    print(f"  haproxy: {paths['haproxy'][0]}  (TCP mode, roundrobin over the same task addresses, "
          f"in {CLIENT_NS})")
    print(f"  haproxy@n2: {paths['haproxy@n2'][0]}  (the same haproxy as a task on {idle['name']}, "
          "on the tasks' network, reached through that node: a userland routing mesh)")
    if "ingress@n1" in paths:
        print(f"  ingress@n1: {paths['ingress@n1'][0]}  (diagnostic: the published port on the node "
              "with the replicas: the ingress namespace's NAT without the overlay hop)")
    for a in lab["task_addresses"]:
        curl(CLIENT_NS, f"http://{a}:80/")
    curl(CLIENT_NS, paths["haproxy"][0])
    curl(CLIENT_NS, paths["haproxy@n2"][0])
    curl(CLIENT_NS, paths["dsr"][0])
    seen = spread(CLIENT_NS, paths["ingress"][0])
    print(f"  20 new connections through {idle['name']}:{PUBLISHED} reached: "
          + ", ".join(f"{k} x{v}" for k, v in sorted(seen.items())))
    seen_spread = spread(CLIENT_NS, paths["spread"][0])
    print(f"  20 new connections to {SPREAD_ADDRESS} reached: "
          + ", ".join(f"{k} x{v}" for k, v in sorted(seen_spread.items())))
    if len(seen_spread) < len(lab["task_addresses"]):
        raise RuntimeError(f"the spread anchor reached {len(seen_spread)} of "
                           f"{len(lab['task_addresses'])} tasks: {seen_spread}")
    bg = background_cpus()
    print(f"  other work on the machine before the runs: {bg:.2f} CPUs busy (of {os.cpu_count()})"
          + ("  <- figures below are skewed by it" if bg > 0.2 else ""))
    for name, (url, addrs) in paths.items():                        # warm-up, not counted
        wrk(res, tmp, url, 2, args.connections, addrs, lab, anchor.pid)
    main_paths = ["ingress", "dsr", "direct", "spread", "haproxy", "haproxy@n2"]
    runs: dict[str, list[dict]] = {k: [] for k in paths}

    def one(label: str, name: str, conns: int, delay_ms: int = 0) -> dict:
        url, addrs = paths[name]
        r = wrk(res, tmp, url, args.seconds, conns, addrs, lab, anchor.pid, delay_ms)
        c = r["cpu"]
        print(f"  {label} {name:<10} {r['rps']:>10,.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
              f"p99 {r['p99_ms']:.2f} ms  errors {r['errors_total']}  CPU/req {r['cpu_us_per_req']:.0f} us"
              f" | CPU busy {c['busy']:.0%} (softirq {c['softirq']:.0%}), wrk {c['wrk']:.2f}, "
              f"backends {c['backends']:.2f}, haproxy {c['haproxy']:.2f} CPUs", flush=True)
        return r

    print(f"  peak: wrk -t2 -c{args.connections} -d{args.seconds}s, no rate limit")
    for rnd in range(args.rounds):
        order = main_paths + (["ingress@n1"] if "ingress@n1" in paths else [])
        for name in (order if rnd % 2 == 0 else order[::-1]):
            r = one(f"round {rnd + 1}", name, args.connections)
            r["round"] = rnd + 1
            runs[name].append(r)
    best = {k: max(v, key=lambda r: r["rps"]) for k, v in runs.items() if v}
    # latency at one offered load for every main path, well below the slowest path's peak
    fixed: dict[str, dict] = {}
    if args.latency_share > 0:
        rate = args.latency_share * min(best[k]["rps"] for k in main_paths)
        conns = max(2, round(rate * LATENCY_DELAY_MS / 1000))
        print(f"  same load: about {conns * 1000 / LATENCY_DELAY_MS:,.0f} req/s offered to every path "
              f"({args.latency_share:.0%} of the slowest peak: -c{conns}, {LATENCY_DELAY_MS} ms "
              "between a response and the next request on each connection)")
        for name in main_paths:
            fixed[name] = one("same load", name, conns, LATENCY_DELAY_MS)
    return {"paths": {k: {"url": u, "addresses": a} for k, (u, a) in paths.items()},
            "spread_ingress": seen, "spread_anchor": seen_spread, "runs": runs, "best": best, "same_load": fixed, "background_cpus": bg,
            "lab": {"idle_node": idle, "replica_node": lab["replica_node"],
                    "task_addresses": lab["task_addresses"]}}


# --- report ---------------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "MET" if ok else "NOT MET"


def report(prog: dict | None, traf: dict | None) -> dict:
    summary: dict = {}
    print("\n== summary (ratios measured side by side in this run)")
    if prog:
        print(f"\n  (c) programming, {BACKENDS_PER_SERVICE} backends per service")
        print(f"  {'':<34}{'full load':>12}{'change p50':>13}{'change p99':>13}")
        for r in prog["nftables"]:
            print(f"  {'nftables (NftLb) ' + str(r['services']) + ' svc':<34}{secs(r['full_s']):>12}"
                  f"{ms(r['change_p50_s']):>13}{ms(r['change_p99_s']):>13}")
        for kind, rows in prog["iptables"].items():
            for r in rows:
                full = secs(r["full_s"]) if r["full_s"] is not None else f"> {r['cap_s']:.0f} s"
                if r["samples"]:
                    p50, p99 = ms(r["change_p50_s"]), ms(r["change_p99_s"])
                else:
                    p50 = p99 = f"> {r['cap_s']:.0f} s" if r["capped"] else "-"
                print(f"  {'iptables-' + kind + ' (kube-proxy) ' + str(r['services']) + ' svc':<34}"
                      f"{full:>12}{p50:>13}{p99:>13}")
        print("\n  ratios (anchor time / nftables time; > 1: nftables is faster)")
        for kind, rows in prog["iptables"].items():
            for r, nr in zip(rows, prog["nftables"]):
                n = r["services"]
                parts = []
                if r["full_s"] is not None:
                    parts.append(f"full load {r['full_s'] / nr['full_s']:.2f}x")
                else:
                    parts.append(f"full load > {r['cap_s'] / nr['full_s']:.1f}x")
                if r["samples"]:
                    parts.append(f"change p50 {r['change_p50_s'] / nr['change_p50_s']:.1f}x, "
                                 f"p99 {r['change_p99_s'] / nr['change_p99_s']:.1f}x")
                elif r["capped"]:
                    parts.append(f"change > {r['cap_s'] / nr['change_p99_s']:.0f}x (stopped at cap)")
                print(f"    iptables-{kind} {n} services: " + ", ".join(parts))
                summary[f"iptables_{kind}_{n}"] = parts
        big = prog["nftables"][-1]
        ok = big["change_p99_s"] * 1000 <= TARGET_CHANGE_P99_MS if big["services"] >= 10000 else None
        print(f"\n  one-service change with {big['services']} services: p99 {ms(big['change_p99_s'])} "
              f"(p50 {ms(big['change_p50_s'])}: Python diff {ms(big['diff_p50_s'])} + nft "
              f"{ms(big['nft_p50_s'])}); target p99 <= {TARGET_CHANGE_P99_MS:.0f} ms at 10k: {verdict(ok)}")
        summary["change_p99_target_met"] = ok
    if traf:
        b = traf["best"]
        direct = b["direct"]
        print("\n  (a)+(b) wrk keep-alive; peak: better run of each path (CPU/req: busy CPU time of the "
              "whole machine per request)")
        print(f"  {'path':<12}{'req/s':>12}{'p50':>10}{'p99':>10}{'errors':>8}{'CPU/req':>10}")
        for name in b:
            r = b[name]
            print(f"  {name:<12}{r['rps']:>12,.0f}{r['p50_ms']:>8.2f}ms{r['p99_ms']:>8.2f}ms"
                  f"{r['errors_total']:>8}{r['cpu_us_per_req']:>8.0f}us")
        fixed = traf.get("same_load") or {}
        if fixed:
            print(f"\n  same offered load (p99 comparable: no path saturated)")
            print(f"  {'path':<12}{'req/s':>12}{'p50':>10}{'p99':>10}{'errors':>8}{'CPU/req':>10}")
            for name, r in fixed.items():
                print(f"  {name:<12}{r['rps']:>12,.0f}{r['p50_ms']:>8.2f}ms{r['p99_ms']:>8.2f}ms"
                      f"{r['errors_total']:>8}{r['cpu_us_per_req']:>8.0f}us")

        def p99(a: str, b_: str) -> str:
            peak = f"p99 at peak {b[a]['p99_ms'] / b[b_]['p99_ms']:.2f}x"
            if a in fixed and b_ in fixed:
                return f"p99 at the same load {fixed[a]['p99_ms'] / fixed[b_]['p99_ms']:.2f}x ({peak})"
            return peak
        anchors = [k for k in ("spread", "direct") if k in b]
        targets = [(k, TARGET_RPS_VS_DIRECT) for k in anchors] + \
            [(k, TARGET_RPS_VS_HAPROXY) for k in ("haproxy@n2", "haproxy") if k in b]
        for path in ("ingress", "dsr"):
            if path not in b:
                continue
            r = b[path]
            print()
            for anchor, target in targets:
                ratio = r["rps"] / b[anchor]["rps"]
                print(f"  {path + ' / ' + anchor + ':':<22}RPS {ratio:.2f}x (target >= "
                      f"{target}x: {verdict(ratio >= target)}), "
                      f"{p99(path, anchor)}; CPU per request "
                      f"{r['cpu_us_per_req'] / b[anchor]['cpu_us_per_req']:.2f}x")
                summary[f"{path}_vs_{anchor}_rps"] = ratio
                summary[f"{path}_{anchor}_target_met"] = ratio >= target
                if anchor in fixed and path in fixed:
                    summary[f"{path}_vs_{anchor}_p99_same_load"] = (fixed[path]["p99_ms"]
                                                                    / fixed[anchor]["p99_ms"])
        print()
        for proxy in [k for k in ("haproxy", "haproxy@n2") if k in b]:
            for anchor in anchors:
                print(f"  {proxy + ' / ' + anchor + ':':<22}RPS {b[proxy]['rps'] / b[anchor]['rps']:.2f}x, "
                      f"{p99(proxy, anchor)}")
        if "spread" in b:
            print(f"  {'spread / direct:':<22}RPS {b['spread']['rps'] / direct['rps']:.2f}x (the same "
                  "path; only which wrk thread talks to which task differs)")
            summary["spread_vs_direct_rps"] = b["spread"]["rps"] / direct["rps"]
        if "ingress@n1" in b:
            loc = b["ingress@n1"]
            print(f"  ingress@n1 / direct (diagnostic): RPS {loc['rps'] / direct['rps']:.2f}x, "
                  f"p99 {loc['p99_ms'] / direct['p99_ms']:.2f}x")
            summary["ingress_n1_vs_direct_rps"] = loc["rps"] / direct["rps"]
        busy = max(r["cpu"]["busy"] for v in traf["runs"].values() for r in v)
        if busy > 0.95:
            print(f"  note: the machine's {os.cpu_count()} CPUs were saturated during the runs "
                  f"(busy up to {busy:.0%}): wrk, the backends, haproxy and the kernel's packet path "
                  "share them, so RPS ratios compare the CPU cost of each path per request")
    return summary


def versions() -> dict[str, str]:
    def first(argv):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "missing"
    return {"kernel": os.uname().release, "cpus": str(os.cpu_count()),
            "nft": first(["nft", "--version"]), "iptables": first(["iptables-restore", "--version"]),
            "wrk": first(["wrk", "--version"]), "haproxy": first(["haproxy", "-v"])}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=("programming", "traffic"), help="run one half only")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1k and 3k services, 3 s wrk runs, 1 round")
    p.add_argument("--samples", type=int, default=100, help="one-service changes timed (nftables)")
    p.add_argument("--ipt-samples", type=int, default=5, help="one-service changes timed (iptables)")
    p.add_argument("--ipt-budget", type=float, default=15.0,
                   help="seconds of iptables change samples per backend and size (at least one)")
    p.add_argument("--cap", type=float, default=30.0,
                   help="stop an iptables-restore that runs longer than this (seconds)")
    p.add_argument("--seconds", type=int, default=10, help="length of every wrk run")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of the three paths")
    p.add_argument("--connections", type=int, default=50, help="wrk -c (2 threads)")
    p.add_argument("--latency-share", type=float, default=0.5,
                   help="offered load of the same-load latency runs, as a share of the slowest peak "
                        "(0: skip them)")
    p.add_argument("--replicas", type=int, default=2, help="web replicas, all on n1")
    p.add_argument("--no-local", action="store_true",
                   help="skip the diagnostic path through the published port of n1 (replicas' node)")
    p.add_argument("--json-out", type=Path, help="write every figure here as JSON")
    a = p.parse_args()
    if a.quick:
        a.samples, a.ipt_samples, a.ipt_budget, a.cap = 50, 2, 10.0, 15.0
        a.seconds, a.rounds = 3, 1
    return a


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("bench/lb needs root (namespaces, nft, iptables)", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)    # also when started with it ignored
    info = versions()
    print("bench/lb: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other work on the machine skews both sides)")
    res = Resources()
    results: dict = {"versions": info, "args": {k: str(v) for k, v in vars(args).items()}}
    started = time.monotonic()
    failed = False
    try:
        with tempfile.TemporaryDirectory(prefix="bench-lb-") as d:
            tmp = Path(d)
            os.chmod(tmp, 0o755)
            for part, fn in (("programming", programming), ("traffic", traffic)):
                if args.only in (None, part):
                    try:
                        results[part] = fn(res, args, tmp)
                    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                        failed = True
                        results[f"{part}_error"] = str(e)
                        print(f"\n{part} FAILED: {e}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        res.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    results["summary"] = report(results.get("programming"), results.get("traffic"))
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}; took {time.monotonic() - started:.0f} s; "
          "every namespace made here is removed")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
