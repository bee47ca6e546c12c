"""How fast the etcd cluster converges, in one run: separate `mesh manager` and `mesh agent`
processes (three agents in lab node namespaces, a leader and a standby manager) on a real etcd,
the set-up of tests/cluster (tests/cluster/etcdlab.py).

Printed (nothing is asserted):
  * scale: from the API call `service scale web=10` (web at 1 replica, on 3 nodes) to ten web tasks
    reported running; side by side, the same in the one-daemon lab on the embedded store
    (`mesh up --nodes 3`), the anchor, and the ratio;
  * node death: from SIGKILL of a node's agent (its tasks killed, its namespace removed) to every
    web task running on the other nodes; the node's lease TTL is part of it and is printed;
  * store round trips per change: every daemon counts its calls to the store (MESH_STORE_COUNTS,
    mesh.storeops.CountingStore); the sum over all daemons during the change, by daemon and call,
    and the watch events delivered (pushed by etcd on open watches, not round trips).

Times are taken by polling the manager's API every 20 ms (the CLI's own start-up is not counted).

    python bench/converge/run.py [--replicas 10] [--ttl 5] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "cluster")]
from etcdlab import EtcdLab                       # noqa: E402
from labkit import ECHO, SYSTEM_PYTHON, sh        # noqa: E402

STACK = f"""
services:
  web:
    command: "{SYSTEM_PYTHON} {ECHO} 80"
    networks: [front]
networks:
  front: {{}}
"""
POLL = 0.02


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("mesh", timeout=60)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)


def api(sock: str, method: str, path: str, body: dict | None = None):
    conn = UnixHTTP(sock)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json"})
        reply = conn.getresponse()
        data = json.loads(reply.read() or b"null")
    finally:
        conn.close()
    if reply.status >= 300:
        raise RuntimeError(f"{method} {path}: {reply.status} {data}")
    return data


def web_running(sock: str) -> dict[str, str]:
    """Running web tasks -> their node."""
    return {t["name"]: t["node"] for t in api(sock, "GET", "/v1/tasks")
            if t["service"] == "web" and t["state"] == "running"}


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def timed_scale(sock: str, replicas: int, timeout: float = 120) -> float:
    t0 = time.monotonic()
    api(sock, "POST", "/v1/services/web/scale", {"replicas": replicas})
    wait(lambda: len(web_running(sock)) == replicas, timeout, f"{replicas} web tasks running")
    return time.monotonic() - t0


class Counts:
    """The store calls of every daemon, from the files they write (mesh.storeops)."""

    def __init__(self, directory: Path):
        self.dir = directory

    def snapshot(self) -> dict[str, Counter]:
        out = {}
        for path in self.dir.glob("*.json"):
            role, name, _ = path.stem.split("-", 2)
            try:
                counts = json.loads(path.read_text())["counts"]
            except (OSError, ValueError):
                continue
            out.setdefault(f"{role} {name}", Counter()).update(counts)
        return out

    def settled(self, quiet: float = 1.0, timeout: float = 30.0) -> dict[str, Counter]:
        """A snapshot once no call but heartbeats (keepalive) has been made for `quiet` seconds."""
        def work(snap):
            return {who: {k: v for k, v in c.items() if k != "keepalive"} for who, c in snap.items()}
        last = self.snapshot()
        since = start = time.monotonic()
        while time.monotonic() - since < quiet and time.monotonic() - start < timeout:
            time.sleep(0.1)
            now = self.snapshot()
            if work(now) != work(last):
                since = time.monotonic()
            last = now
        return last


def delta(before: dict[str, Counter], after: dict[str, Counter]) -> dict[str, Counter]:
    out = {}
    for who, counts in after.items():
        d = Counter(counts)
        d.subtract(before.get(who, Counter()))
        d = +d
        if d:
            out[who] = d
    return out


def summarize(d: dict[str, Counter]) -> dict:
    """Round trips of the change: every call but the heartbeats (keepalive, which go on at
    ttl/3 whatever happens) and the watch events (pushed on open watches)."""
    calls = Counter()
    for who, c in d.items():
        calls.update({k: v for k, v in c.items() if k not in ("watch_event", "keepalive")})
    events = sum(c.get("watch_event", 0) for c in d.values())
    beats = sum(c.get("keepalive", 0) for c in d.values())
    return {"round_trips": sum(calls.values()), "by_call": dict(calls), "watch_events": events,
            "heartbeats_meanwhile": beats,
            "by_daemon": {who: {k: v for k, v in c.items()} for who, c in sorted(d.items())}}


def etcd_run(tmp: Path, replicas: int, ttl: float) -> dict:
    host = f"mesh-cv{secrets.token_hex(3)}"
    counts_dir = tmp / "counts"
    counts_dir.mkdir()
    os.environ["MESH_STORE_COUNTS"] = str(counts_dir)
    sh(["ip", "netns", "add", host])
    try:
        sh(["ip", "link", "set", "lo", "up"], host)
        with EtcdLab(tmp / "etcd-lab", host, nodes=3, ttl=ttl) as c:
            for name in ("n1", "n2", "n3"):
                c.start_agent(name)
            c.start_manager("m1")
            c.wait_leader("m1")
            c.start_manager("m2")
            c.wait_nodes("m1", {"n1", "n2", "n3"})
            path = tmp / "stack.yaml"
            path.write_text(STACK)
            c.cli("m1", "up", "-f", str(path))
            sock = str(c.tmp / "m1" / "root" / "api.sock")
            wait(lambda: len(web_running(sock)) == 1, 60, "web.1 running")
            counts = Counts(counts_dir)
            before = counts.settled()
            scale_s = timed_scale(sock, replicas)
            scale_calls = summarize(delta(before, counts.settled()))
            on_n3 = sorted(n for n, node in web_running(sock).items() if node == "n3")
            before = counts.settled()
            t0 = time.monotonic()
            c.kill_node("n3")
            wait(lambda: (lambda r: len(r) == replicas and "n3" not in r.values())(web_running(sock)),
                 60 + ttl, "web tasks running off n3")
            death_s = time.monotonic() - t0
            death_calls = summarize(delta(before, counts.settled()))
            return {"scale_s": scale_s, "scale_store": scale_calls, "node_death_s": death_s,
                    "node_death_store": death_calls, "moved": on_n3, "lease_ttl_s": ttl}
    finally:
        os.environ.pop("MESH_STORE_COUNTS", None)
        sh(["ip", "netns", "del", host], check=False)


def lab_run(tmp: Path, replicas: int) -> tuple[float, dict]:
    """The anchor: the same scale in the one-daemon lab (the manager and the three agents in one
    process around the embedded store); its store calls are counted the same way."""
    host = f"mesh-cv{secrets.token_hex(3)}"
    counts_dir = tmp / "lab-counts"
    counts_dir.mkdir()
    env = {**os.environ, "MESH_RUN_DIR": str(tmp / "lab-run"), "PYTHONSAFEPATH": "1",
           "MESH_STORE_COUNTS": str(counts_dir)}
    path = tmp / "stack.yaml"
    path.write_text(STACK)
    mesh = [sys.executable, "-m", "mesh", "--host-netns", host]
    try:
        subprocess.run(mesh + ["up", "-f", str(path), "--nodes", "3"], env=env, check=True,
                       capture_output=True, timeout=120)
        sock = str(tmp / "lab-run" / host / "api.sock")
        wait(lambda: len(web_running(sock)) == 1, 60, "web.1 running")
        counts = Counts(counts_dir)
        before = counts.settled()
        scale_s = timed_scale(sock, replicas)
        return scale_s, summarize(delta(before, counts.settled()))
    finally:
        subprocess.run(mesh + ["down"], env=env, capture_output=True, timeout=120)


def report(etcd: dict, anchor: float, embedded: dict, replicas: int) -> None:
    s, d = etcd["scale_store"], etcd["node_death_store"]
    print(f"\nscale web=1 -> web={replicas} on 3 nodes (API call to {replicas} running):")
    print(f"  etcd, separate manager + agents   {etcd['scale_s']:.2f} s")
    print(f"  one-daemon lab, embedded store    {anchor:.2f} s   (anchor)")
    print(f"  ratio etcd / anchor               {etcd['scale_s'] / anchor:.2f}")
    print(f"\nnode death (n3, running {', '.join(etcd['moved']) or 'no web task'}) -> every web task "
          f"running elsewhere:\n  {etcd['node_death_s']:.2f} s, of which up to {etcd['lease_ttl_s']:.0f} s "
          f"is the node lease's TTL (MESH_LEASE_TTL)")
    for title, st in ((f"scale to {replicas}", s), ("node death", d),
                      (f"scale to {replicas}, one-daemon lab on the embedded store", embedded)):
        print(f"\nstore round trips for the change '{title}': {st['round_trips']} "
              f"(+ {st['watch_events']} watch events pushed; {st['heartbeats_meanwhile']} lease "
              f"keepalives went on meanwhile)")
        print("  by call:   " + ", ".join(f"{k} {v}" for k, v in sorted(st["by_call"].items())))
        for who, c in st["by_daemon"].items():
            print(f"  {who:<12} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=float(os.environ.get("MESH_LEASE_TTL", 5)),
                        help="the agents' and managers' lease TTL in seconds (default 5)")
    parser.add_argument("--json-out")
    parser.add_argument("--keep", metavar="DIR", help="keep the daemons' logs in DIR")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # clean up on `timeout` too
    if os.geteuid() != 0:
        print("bench/converge needs root (network namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mesh-converge-") as tmp:
        etcd = etcd_run(Path(tmp), args.replicas, args.ttl)
        anchor, embedded = lab_run(Path(tmp), args.replicas)
        if args.keep:
            for log in Path(tmp).glob("etcd-lab/*.log"):
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                (Path(args.keep) / log.name).write_bytes(log.read_bytes())
    report(etcd, anchor, embedded, args.replicas)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**etcd, "anchor_scale_s": anchor,
                                                   "anchor_store": embedded}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
