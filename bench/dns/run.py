"""Our embedded resolver (mesh.dns.server) against dnsmasq, side by side on this machine, over UDP.

What it measures, in one run (about 90 s; `--quick` about 30 s):

  * peak queries per second: dnsperf with no rate limit against each server, alternately
    (ours, dnsmasq, ours, dnsmasq), each run the same length; the better run of each counts;
  * p99 latency at 80% of each server's own peak: dnsperf -Q <0.8 x peak> -v, which reports the
    latency of every response; the 99th percentile is computed here from those per-query figures
    (dnsperf 2.10 prints only the average). Queries that time out count as lost, not as latency;
  * the same latency run for dnsmasq at *our* 80% rate, so both are also compared at one load.

Both servers know the same names with the same addresses (N services `svc-NNNN` with one address,
and `tasks.svc-NNNN` with three): ours from a View, dnsmasq from a hosts file (--addn-hosts). Both
forward unknown names (`xNNNN.ext.test`, 10% of the queries) to one stub upstream on 127.0.0.1: a
second dnsmasq that answers ext.test itself and never forwards anything (--no-resolv, no --server).
All traffic stays on 127.0.0.1; this machine's own resolver is never used. Each server runs in its
own process; with two or more CPUs the server under test gets the last CPU to itself and dnsperf and
the stub share the others. Every process started here is stopped by its PID, on errors too. CPU use
of each process and of each CPU is recorded per run, so a saturated client or other work shows.

The figures are ratios measured side by side, not a test: nothing is asserted. The targets (peak
ratio >= 1.0, our p99 <= 1 ms at 80% of peak) are printed as met / not met.

    python bench/dns/run.py [--quick] [--names N] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dnslib import QTYPE, RCODE, DNSRecord

HERE = Path(__file__).resolve().parent
TTL = 600
EXT_SHARE = 0.10            # share of queries for unknown names, forwarded to the stub
STUB_ADDRESS = "192.0.2.1"  # what the stub answers for *.ext.test (documentation range, never used)
LOCAL = "127.0.0.1"


@dataclass(frozen=True)
class Settings:
    seconds: int            # length of every dnsperf run
    peak_rounds: int        # alternating unlimited runs per server; the best counts
    clients: int            # dnsperf -c
    outstanding: int        # dnsperf -q


@dataclass(frozen=True)
class Target:
    name: str               # "ours", "dnsmasq" or "stub"
    port: int
    pid: int


FULL = Settings(seconds=10, peak_rounds=2, clients=8, outstanding=200)
QUICK = Settings(seconds=4, peak_rounds=1, clients=8, outstanding=200)


# --- inputs ---------------------------------------------------------------------------------------
def make_names(services: int) -> dict[str, tuple[str, ...]]:
    """svc-NNNN -> one address (10.1.x.y); tasks.svc-NNNN -> three (10.2/10.3/10.4.x.y)."""
    names: dict[str, tuple[str, ...]] = {}
    for i in range(1, services + 1):
        x, y = divmod(i, 250)
        names[f"svc-{i:04d}"] = (f"10.1.{x}.{y + 1}",)
        names[f"tasks.svc-{i:04d}"] = tuple(f"10.{k}.{x}.{y + 1}" for k in (2, 3, 4))
    return names


def write_inputs(tmp: Path, names: dict[str, tuple[str, ...]], stub_port: int) -> dict[str, Path]:
    """The View (JSON for serve.py), the same names as a hosts file, and the dnsperf query file."""
    view = {"a": names, "ttl": TTL, "upstreams": [f"{LOCAL}:{stub_port}"]}
    (tmp / "view.json").write_text(json.dumps(view))
    hosts = "".join(f"{addr} {name}\n" for name, addrs in names.items() for addr in addrs)
    (tmp / "hosts").write_text(hosts)
    n_unknown = round(len(names) * EXT_SHARE / (1 - EXT_SHARE))
    unknown = [f"x{i:04d}.ext.test" for i in range(n_unknown)]
    queries = list(names) + unknown
    random.Random(1).shuffle(queries)
    (tmp / "queries").write_text("".join(f"{q} A\n" for q in queries))
    os.chmod(tmp, 0o755)                        # dnsmasq reads the hosts file as user nobody
    os.chmod(tmp / "hosts", 0o644)
    return {"view": tmp / "view.json", "hosts": tmp / "hosts", "queries": tmp / "queries",
            "unknown": len(unknown), "total": len(queries)}


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((LOCAL, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((LOCAL, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port on 127.0.0.1")


# --- processes ------------------------------------------------------------------------------------
def cpu_split() -> tuple[set[int], set[int]]:
    """(CPUs for the server under test, CPUs for dnsperf and the stub)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[-1]}, set(cpus[:-1])


class Processes:
    """Every process this run starts; stop() ends one, stop_all() the rest, each by its own PID."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], cpus: set[int], **kw) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "wb") as log:
            kw.setdefault("stdout", log)
            proc = subprocess.Popen(argv, stderr=log, stdin=subprocess.DEVNULL,
                                    preexec_fn=lambda: os.sched_setaffinity(0, cpus), **kw)
        self.running[name] = proc
        return proc

    def stop(self, name: str) -> bytes:
        """SIGTERM to that PID, SIGKILL after 5 s; returns what was left on its stdout pipe."""
        proc = self.running.pop(name)
        if proc.poll() is None:
            proc.terminate()
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return out or b""

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.tmp / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def dnsmasq_argv(port: int, tmp: Path, extra: list[str]) -> list[str]:
    return ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--port={port}", f"--listen-address={LOCAL}", "--bind-interfaces",
            f"--pid-file={tmp / f'dnsmasq-{port}.pid'}", "--log-facility=-", *extra]


def start_stub(procs: Processes, tmp: Path, port: int, cpus: set[int]) -> Target:
    """The upstream for unknown names: answers *.ext.test itself, forwards nothing anywhere."""
    extra = [f"--address=/ext.test/{STUB_ADDRESS}", "--local-ttl=60"]     # cacheable answers
    proc = procs.start("stub", dnsmasq_argv(port, tmp, extra), cpus)
    wait_answering("stub", procs, port, "probe.ext.test")
    return Target("stub", port, proc.pid)


def start_anchor(procs: Processes, tmp: Path, port: int, stub_port: int, hosts: Path,
                 cpus: set[int]) -> Target:
    extra = [f"--server={LOCAL}#{stub_port}", f"--addn-hosts={hosts}", "--cache-size=10000",
             f"--local-ttl={TTL}"]
    proc = procs.start("dnsmasq", dnsmasq_argv(port, tmp, extra), cpus)
    wait_answering("dnsmasq", procs, port, "svc-0001")
    return Target("dnsmasq", port, proc.pid)


def start_ours(procs: Processes, view: Path, cpus: set[int]) -> Target:
    """serve.py in its own process, once it printed its UDP port and answers there."""
    proc = procs.start("ours", [sys.executable, str(HERE / "serve.py"), str(view)], cpus,
                       stdout=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline() if ready else b""
    if not line:
        raise RuntimeError(f"our resolver did not start:\n{procs.log_tail('ours')}")
    port = json.loads(line)["udp_port"]
    wait_answering("ours", procs, port, "svc-0001")
    return Target("ours", port, proc.pid)


# --- DNS probes -----------------------------------------------------------------------------------
def ask(port: int, name: str, timeout: float = 1.0) -> tuple[str, tuple[str, ...]]:
    """(rcode, sorted A addresses) for `name` from 127.0.0.1:`port` over UDP."""
    query = DNSRecord.question(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(query.pack(), (LOCAL, port))
        reply = DNSRecord.parse(s.recv(65535))
    addrs = sorted(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A)
    return RCODE.get(reply.header.rcode), tuple(addrs)


def wait_answering(name: str, procs: Processes, port: int, probe: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if procs.running[name].poll() is not None:
            break
        try:
            ask(port, probe, timeout=0.3)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} does not answer on port {port}:\n{procs.log_tail(name)}")


def check_same_answers(ours: int, anchor: int, names: dict[str, tuple[str, ...]]) -> int:
    """Both servers give the same addresses for a sample of known names and forwarded names."""
    sample = list(names)[::97] + ["x0000.ext.test", "x0001.ext.test"]
    for name in sample:
        a, b = ask(ours, name), ask(anchor, name)
        expected = tuple(sorted(names.get(name, (STUB_ADDRESS,))))
        if a != ("NOERROR", expected) or b != a:
            raise RuntimeError(f"answers differ for {name}: ours {a}, dnsmasq {b}, want {expected}")
    return len(sample)


# --- dnsperf --------------------------------------------------------------------------------------
@dataclass
class Run:
    server: str
    qps: float
    lost: int
    avg_ms: float
    rcodes: str
    cpu: dict[str, float]   # CPUs' worth used during the run: server, stub, dnsperf, bench, other
    machine: dict[str, float]   # how busy each CPU of the machine was during the run (any process)
    p99_ms: float | None = None
    p50_ms: float | None = None
    p99_known_ms: float | None = None       # only the names the server knows
    p99_forwarded_ms: float | None = None   # only the xNNNN.ext.test names
    rate: int | None = None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_ticks() -> dict[str, tuple[int, int, int]]:
    """Per CPU ("cpu0", ...), jiffies since boot from /proc/stat: (busy, spent in processes, total).
    Busy is everything but idle and iowait, so it counts the kernel's packet work (softirq) too."""
    ticks = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu":
                # user nice system idle iowait irq softirq steal
                v = [int(x) for x in vals[:8]]
                ticks[name] = (sum(v) - v[3] - v[4], v[0] + v[1] + v[2], sum(v))
    return ticks


def busy_share(before: dict, after: dict) -> dict[str, float]:
    return {c: (after[c][0] - before[c][0]) / max(1, after[c][2] - before[c][2]) for c in after}


def process_share(before: dict, after: dict) -> float:
    """CPUs' worth of time that all processes together got (user + system) between the two."""
    total = sum(after[c][2] - before[c][2] for c in after) / max(1, len(after))
    return sum(after[c][1] - before[c][1] for c in after) / max(1, total)


def background_load(seconds: float = 2.0) -> dict[str, float]:
    """How busy each CPU is while nothing is being measured (other work on this machine)."""
    before = cpu_ticks()
    time.sleep(seconds)
    return busy_share(before, cpu_ticks())


def own_cpu(who: int) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


def dnsperf(t: Target, stub_pid: int, queries: Path, s: Settings, cpus: set[int], out: Path, *,
            rate: int | None = None, seconds: int | None = None) -> Run:
    """One dnsperf run; with `rate`: limited to that many qps, and verbose (per-query latency)."""
    seconds = seconds or s.seconds
    argv = ["dnsperf", "-s", LOCAL, "-p", str(t.port), "-d", str(queries), "-t", "1",
            "-l", str(seconds), "-c", str(s.clients), "-q", str(s.outstanding)]
    if rate is not None:
        argv += ["-Q", str(rate), "-v"]
    ticks = cpu_ticks()
    before = (cpu_seconds(t.pid), cpu_seconds(stub_pid), own_cpu(resource.RUSAGE_CHILDREN),
              own_cpu(resource.RUSAGE_SELF), time.monotonic())
    with open(out, "wb") as f:
        done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              preexec_fn=lambda: os.sched_setaffinity(0, cpus),
                              timeout=seconds + 30)
    if done.returncode:
        tail = out.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{tail}")
    after = (cpu_seconds(t.pid), cpu_seconds(stub_pid), own_cpu(resource.RUSAGE_CHILDREN),
             own_cpu(resource.RUSAGE_SELF), time.monotonic())
    ticks_after = cpu_ticks()
    wall = after[-1] - before[-1]
    keys = ("server", "stub", "dnsperf", "bench")
    cpu = {k: (a - b) / wall for k, a, b in zip(keys, after, before)}
    cpu["other"] = max(0.0, process_share(ticks, ticks_after) - sum(cpu.values()))
    run = parse_summary(t.name, out.read_text(errors="replace"), cpu,
                        busy_share(ticks, ticks_after))
    if rate is not None:
        run.rate = rate
        run.p50_ms, run.p99_ms, run.p99_known_ms, run.p99_forwarded_ms = percentiles(out)
    return run


def parse_summary(server: str, text: str, cpu: dict, machine: dict) -> Run:
    def field(label: str, conv=float):
        m = re.search(rf"^\s*{re.escape(label)}:\s+(\S+)", text, re.M)
        if not m:
            raise RuntimeError(f"dnsperf output has no {label!r}:\n{text[-2000:]}")
        return conv(m.group(1))
    rcodes = re.search(r"^\s*Response codes:\s+(.*)$", text, re.M)
    return Run(server, qps=field("Queries per second"), lost=field("Queries lost", int),
               avg_ms=field("Average Latency (s)") * 1000,
               rcodes=rcodes.group(1).strip() if rcodes else "-", cpu=cpu, machine=machine)


VERBOSE_LINE = re.compile(rb"^> \S+ (\S+) \S+ ([0-9.]+)$", re.M)     # > RCODE name type seconds


def percentiles(out: Path) -> tuple[float | None, ...]:
    """In ms over the answered queries in verbose dnsperf output (timeouts have no latency):
    p50 and p99 of all, p99 of the known names only, p99 of the forwarded names only."""
    known, forwarded = [], []
    for m in VERBOSE_LINE.finditer(out.read_bytes()):
        (forwarded if m.group(1).endswith(b".ext.test") else known).append(float(m.group(2)))

    def pick(lat: list[float], p: float) -> float | None:
        return lat[max(0, math.ceil(p * len(lat)) - 1)] * 1000 if lat else None
    everything = sorted(known + forwarded)
    known.sort()
    forwarded.sort()
    return (pick(everything, 0.50), pick(everything, 0.99), pick(known, 0.99),
            pick(forwarded, 0.99))


def show(label: str, run: Run) -> None:
    cpu = ", ".join(f"{k} {v:.0%}" for k, v in run.cpu.items())
    cpu += "; busy " + ", ".join(f"{k} {v:.0%}" for k, v in run.machine.items())
    p99 = "" if run.p99_ms is None else f", p99 {run.p99_ms:.3f} ms"
    print(f"  {label:28s} {run.qps:9.0f} qps{p99}, lost {run.lost}; CPU: {cpu}", flush=True)


def measure(targets: list[Target], stub_pid: int, queries: Path, s: Settings, cpus: set[int],
            tmp: Path) -> tuple[dict[str, Run], dict[str, Run], list[Run]]:
    """Warm-up, alternating peak runs (the best of each counts), then latency runs at fixed rates:
    each server at 80% of its own peak, and dnsmasq also at our rate (the same load for both)."""
    for t in targets:                           # one short pass: fills caches, nothing recorded
        dnsperf(t, stub_pid, queries, s, cpus, tmp / f"warm-{t.name}.out", seconds=1)
    runs: list[Run] = []
    for r in range(s.peak_rounds):
        for t in targets:
            runs.append(dnsperf(t, stub_pid, queries, s, cpus, tmp / f"peak-{t.name}-{r}.out"))
            show(f"peak {t.name} #{r + 1}", runs[-1])
    peak = {t.name: max((x for x in runs if x.server == t.name), key=lambda x: x.qps)
            for t in targets}
    latency = {}
    plan = [(t, t.name, peak[t.name].qps) for t in targets]
    plan += [(t, "dnsmasq@ours", peak["ours"].qps) for t in targets if t.name == "dnsmasq"]
    for t, label, qps in plan:
        rate = max(1, int(qps * 0.8))
        latency[label] = dnsperf(t, stub_pid, queries, s, cpus, tmp / f"lat-{label}.out", rate=rate)
        show(f"{label} at {rate} qps", latency[label])
    return peak, latency, runs + list(latency.values())


# --- report ---------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    def first(argv: list[str], pattern: str) -> str:
        try:
            text = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        m = re.search(pattern, text)
        return m.group(1) if m else "?"
    return {"dnsperf": first(["dnsperf", "-h"], r"Version (\S+)"),
            "dnsmasq": first(["dnsmasq", "--version"], r"version (\S+)"),
            "python": sys.version.split()[0]}


def summary(peak: dict[str, Run], latency: dict[str, Run], runs: list[Run],
            stats: dict | None) -> dict:
    """The figures, as plain data (also what --json-out writes)."""
    ratio = peak["ours"].qps / peak["dnsmasq"].qps if peak["dnsmasq"].qps else float("nan")
    p99 = latency["ours"].p99_ms
    hits = stats["cache_hits"] / stats["queries"] if stats and stats.get("queries") else None
    return {"peak": {k: asdict(v) for k, v in peak.items()},
            "latency": {k: asdict(v) for k, v in latency.items()},
            "peak_ratio": ratio, "cache_hit_share": hits, "resolver_stats": stats,
            "other_cpu_max": max(r.cpu["other"] for r in runs),
            "targets": {"peak ratio >= 1.0": ratio >= 1.0,
                        "our p99 <= 1 ms at 80% of peak": p99 is not None and p99 <= 1.0}}


def row(label: str, ours: str, anchor: str, ratio: str = "", target: str = "") -> None:
    print(f"{label:36s}{ours:>14s}{anchor:>14s}{ratio:>14s}   {target}")


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def div(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def print_header(meta: dict) -> None:
    idle = ", ".join(f"{k} {v:.0%}" for k, v in meta["background"].items())
    print(f"\nDNS over UDP on {LOCAL}: ours (mesh.dns, Python {meta['python']}, one process) vs "
          f"dnsmasq {meta['dnsmasq']} (anchor); dnsperf {meta['dnsperf']} -c {meta['clients']} "
          f"-q {meta['outstanding']}, {meta['seconds']} s per run")
    print(f"{meta['names']} names, {meta['queries']} queries in the file, {meta['unknown']} of "
          f"them forwarded to a stub dnsmasq; CPUs: server {meta['server_cpus']}, dnsperf + stub "
          f"{meta['client_cpus']}; busy before measuring (servers idle): {idle}\n")


def print_table(res: dict, meta: dict) -> None:
    pk, lat, tg = res["peak"], res["latency"], res["targets"]
    met = {True: "met", False: "NOT met"}
    print_header(meta)
    row("", "ours", "dnsmasq", "ours/dnsmasq", "target")
    row(f"peak qps (best of {meta['rounds']})", f"{pk['ours']['qps']:.0f}",
        f"{pk['dnsmasq']['qps']:.0f}", f"{res['peak_ratio']:.2f}",
        f"ratio >= 1.0: {met[tg['peak ratio >= 1.0']]}")
    row("  CPU at peak: server / dnsperf", *(cpu_pair(pk[k]["cpu"]) for k in ("ours", "dnsmasq")))
    row("  response codes at peak", *(short_rcodes(pk[k]["rcodes"]) for k in ("ours", "dnsmasq")))
    o, d = lat["ours"], lat["dnsmasq"]
    row("p99 ms at 80% of own peak", ms(o["p99_ms"]), ms(d["p99_ms"]),
        div(o["p99_ms"], d["p99_ms"]), f"ours <= 1 ms: {met[tg['our p99 <= 1 ms at 80% of peak']]}")
    row("  p50 ms", ms(o["p50_ms"]), ms(d["p50_ms"]), div(o["p50_ms"], d["p50_ms"]))
    row("  p99 ms, known names only", ms(o["p99_known_ms"]), ms(d["p99_known_ms"]),
        div(o["p99_known_ms"], d["p99_known_ms"]))
    row("  p99 ms, forwarded names only", ms(o["p99_forwarded_ms"]), ms(d["p99_forwarded_ms"]),
        div(o["p99_forwarded_ms"], d["p99_forwarded_ms"]))
    row("  rate qps / lost", f"{o['rate']} / {o['lost']}", f"{d['rate']} / {d['lost']}")
    if "dnsmasq@ours" in lat:
        e = lat["dnsmasq@ours"]
        row("p99 ms, both at our 80% rate", ms(o["p99_ms"]), ms(e["p99_ms"]),
            div(o["p99_ms"], e["p99_ms"]))
    st = res["resolver_stats"]
    if st:
        print(f"\nours, all runs: {st['queries']} queries, "
              f"cache hits {res['cache_hit_share']:.1%} (of them cached forwarded replies "
              f"{st.get('relay_hits', 0)}), forwarded {st['forwarded']}, "
              f"refused {st['refused']} (max_inflight), servfail {st['servfail']}, "
              f"dropped {st['dropped']}")
    for note in notes(res, meta):
        print(f"note: {note}")
    print("p99: 99th percentile of the per-query latencies that dnsperf -v reports during a run "
          "limited with -Q to the rate shown\n(dnsperf's own clock, send to receive; timeouts "
          "count as lost, not in the percentile).")


def notes(res: dict, meta: dict) -> list[str]:
    """What may bend the figures: other work on the machine, a saturated client, an overrun rate."""
    out = []
    busy = [c for c, v in meta["background"].items() if v > 0.10]
    if busy:
        out.append(f"other work kept {', '.join(busy)} busy before measuring: "
                   "figures are disturbed")
    if res["other_cpu_max"] > 0.15:
        out.append(f"other processes used up to {res['other_cpu_max']:.0%} of a CPU during a run: "
                   "figures are disturbed")
    client = [f"cpu{c}" for c in meta["client_cpus"]]
    for name, run in res["peak"].items():
        if run["cpu"]["server"] < 0.9 and min(run["machine"].get(c, 0) for c in client) > 0.9:
            out.append(f"the peak of {name} was bound by the client CPU ({', '.join(client)} "
                       f"busy), not by {name} ({run['cpu']['server']:.0%} of its CPU)")
    for name, run in res["latency"].items():
        if run["cpu"]["server"] >= 0.85:
            out.append(f"{name} used {run['cpu']['server']:.0%} of its CPU at {run['rate']} qps: "
                       "near saturation, its p99 there is mostly queueing in the server")
        elif min(run["machine"].get(c, 0) for c in client) > 0.9:
            out.append(f"the client CPU was busy during the {name} latency run "
                       f"({', '.join(client)}): that p99 may include dnsperf's own delays")
        if run["qps"] < 0.97 * run["rate"]:
            out.append(f"{name} did not keep up with {run['rate']} qps ({run['qps']:.0f} "
                       "answered per second): its p99 there includes queueing")
    return out


def cpu_pair(cpu: dict[str, float]) -> str:
    return f"{cpu['server']:.0%} / {cpu['dnsperf']:.0%}"


def short_rcodes(text: str) -> str:
    """'NOERROR 1000 (97.40%), REFUSED 26 (2.60%)' -> 'REFUSED 2.6%' (only what is not NOERROR)."""
    other = [f"{m[0]} {float(m[1]):.1f}%" for m in re.findall(r"(\w+) \d+ \(([\d.]+)%\)", text)
             if m[0] != "NOERROR"]
    return ", ".join(other) or "all NOERROR"


# --- main -----------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~30 s smoke run (shorter, fewer runs)")
    ap.add_argument("--names", type=int, default=1000, help="services, each gives two names "
                    "(at least 500)")
    ap.add_argument("--json-out", type=Path, help="also write the figures as JSON to this file")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    s = QUICK if args.quick else FULL
    for tool in ("dnsperf", "dnsmasq"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install dnsperf dnsmasq-base (or: make bench-dns)")
    server_cpus, client_cpus = cpu_split()
    names = make_names(max(args.names, 500))
    meta = {**versions(), "clients": s.clients, "outstanding": s.outstanding, "seconds": s.seconds,
            "rounds": s.peak_rounds, "names": len(names), "server_cpus": sorted(server_cpus),
            "client_cpus": sorted(client_cpus)}
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmpdir:
        procs = Processes(Path(tmpdir))
        try:
            res = run_all(procs, Path(tmpdir), names, s, (server_cpus, client_cpus), meta)
        finally:
            procs.stop_all()
    print_table(res, meta)
    if args.json_out:
        args.json_out.write_text(json.dumps({"meta": meta, **res}, indent=2) + "\n")
    return 0


def run_all(procs: Processes, tmp: Path, names: dict, s: Settings,
            cpus: tuple[set[int], set[int]], meta: dict) -> dict:
    """Start the stub, dnsmasq and ours; check they agree; measure; stop ours for its counters."""
    server_cpus, client_cpus = cpus
    stub_port, anchor_port = free_port(), free_port()
    files = write_inputs(tmp, names, stub_port)
    meta.update(queries=files["total"], unknown=files["unknown"])
    stub = start_stub(procs, tmp, stub_port, client_cpus)
    anchor = start_anchor(procs, tmp, anchor_port, stub_port, files["hosts"], server_cpus)
    ours = start_ours(procs, files["view"], server_cpus)
    checked = check_same_answers(ours.port, anchor.port, names)
    meta["background"] = background_load()
    print(f"both servers give the same answers for {checked} sampled names; measuring "
          f"({s.peak_rounds} x 2 peak runs, then 3 rate-limited runs, {s.seconds} s each)",
          flush=True)
    peak, latency, runs = measure([ours, anchor], stub.pid, files["queries"], s, client_cpus, tmp)
    stats = None
    for line in procs.stop("ours").decode(errors="replace").splitlines():
        if line.startswith('{"stats"'):
            stats = json.loads(line)["stats"]
    return summary(peak, latency, runs, stats)


if __name__ == "__main__":
    sys.exit(main())
