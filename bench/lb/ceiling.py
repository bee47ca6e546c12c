"""What limits the routing mesh's traffic ratio on this machine: the bench's lab (bench/lb/run.py),
then a few hand-made variants of the path from the client to a task on n1, each measured with wrk
beside the direct path and undone before the next. Nothing is asserted; figures in README.md.

    PYTHONSAFEPATH=1 .venv/bin/python bench/lb/ceiling.py [--seconds 6]

Variants (all inside the lab's namespaces, all removed with the lab at the end):
  mesh         the published port on n2 (no replica): n2 -> ingress namespace -> VXLAN -> n1 -> task
  notrack      the same with `notrack` for VXLAN's UDP (port 4789) in every node
  routed-nat   n2 DNATs the published port itself to the tasks and masquerades, the tasks' /32
               routed over the underlay via n1: no ingress namespace, no VXLAN
  routed       no NAT, no balancing: the client routes the task addresses via n2, n2 via n1, and
               n1 routes the client via n2: plain forwarding through n2 both ways
  requests     the same for the requests only: replies go from n1 straight to the client
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench                                   # noqa: E402

N1, N2 = f"{bench.HOST_NS}-n1", f"{bench.HOST_NS}-n2"


def sh(netns: str, *argv: str) -> None:
    bench.run(list(argv), netns)


def nft(netns: str, text: str) -> None:
    subprocess.run(bench.in_ns(netns, ["nft", "-f", "-"]), input=text.encode(), check=True)


def variants(lab: dict) -> dict:
    a, b = lab["task_addresses"]
    n1, client = lab["replica_node"]["address"], bench.CLIENT_ADDRESS
    n2 = lab["idle_node"]["address"]

    def notrack(undo=False):
        for ns in (N1, N2, f"{bench.HOST_NS}-n3"):
            nft(ns, "delete table ip ceiling\n" if undo else
                "table ip ceiling {\n chain pre { type filter hook prerouting priority raw; "
                "udp dport 4789 notrack; }\n chain out { type filter hook output priority raw; "
                "udp dport 4789 notrack; }\n}\n")

    def routed_nat(undo=False):
        verb = "del" if undo else "replace"
        for t in (a, b):
            sh(N2, "ip", "route", verb, f"{t}/32", "via", n1)
        nft(N2, "delete table ip ceiling\n" if undo else
            f"table ip ceiling {{\n chain pre {{ type nat hook prerouting priority -150; tcp dport "
            f"{bench.PUBLISHED} dnat to numgen inc mod 2 map {{ 0 : {a}, 1 : {b} }} : 80; }}\n"
            f" chain post {{ type nat hook postrouting priority 50; ip daddr {{ {a}, {b} }} "
            f"masquerade; }}\n}}\n")

    def requests(undo=False):
        verb = "del" if undo else "replace"
        for t in (a, b):
            sh(N2, "ip", "route", verb, f"{t}/32", "via", n1)
            sh(bench.CLIENT_NS, "ip", "route", verb, f"{t}/32", "via", n2)

    def routed(undo=False):
        if not undo:
            requests()
        sh(N1, "ip", "route", "del" if undo else "replace", f"{client}/32", "via", n2)
        if undo:
            requests(undo=True)

    return {"notrack": ("mesh", notrack), "routed-nat": ("mesh", routed_nat),
            "routed": ("direct", routed), "requests": ("direct", requests)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=6)
    args = p.parse_args()
    res = bench.Resources()
    tmp = Path(tempfile.mkdtemp(prefix="mesh-ceiling-"))
    try:
        lab = bench.start_lab(res, tmp, 2)
        bench.attach_client(res, lab)
        anchor = bench.start_anchor(res, tmp, lab)
        urls = {"mesh": (f"http://{lab['idle_node']['address']}:{bench.PUBLISHED}/", None),
                "direct": (f"http://{lab['task_addresses'][0]}:80/",
                           [f"{x}:80" for x in lab["task_addresses"]])}

        def measure(path: str) -> dict:
            url, addrs = urls[path]
            return bench.wrk(res, tmp, url, args.seconds, 50, addrs, lab, anchor.pid)
        for path in urls:                                        # warm-up
            bench.wrk(res, tmp, urls[path][0], 2, 50, urls[path][1], lab, anchor.pid)
        rows = [("direct", measure("direct")), ("mesh", measure("mesh"))]
        for name, (path, change) in variants(lab).items():
            change()
            try:
                rows.append((name, measure(path)))
            finally:
                change(undo=True)
            rows.append((f"direct (after {name})", measure("direct")))
    finally:
        res.close()
    base = rows[0][1]["rps"]
    print(f"\n{'path':<24} {'req/s':>9} {'CPU/req':>8} {'vs direct':>9}")
    last_direct = base
    for name, r in rows:
        if name.startswith("direct"):
            last_direct = r["rps"]
        ratio = r["rps"] / (base if name in ("direct", "mesh") else last_direct)
        print(f"{name:<24} {r['rps']:>9,.0f} {r['cpu_us_per_req']:>6.1f} us {ratio:>8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
