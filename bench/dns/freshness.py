"""How fast DNS answers follow the stack: the real figure behind the test suite's 2 s bound.

    PYTHONSAFEPATH=1 .venv/bin/python bench/dns/freshness.py [--rounds N]

Inside a host namespace of its own (never the machine's root namespace), it runs a small stack,
starts a prober inside one task's sandbox that asks the embedded resolver (127.0.0.11) every
millisecond, and then, for each kind of change — scale up (a new task's name appears), scale down
(it disappears), connect (the names of another network appear), disconnect (they go) — records
the time from the start of the `mesh` command to the first answer that shows it, beside the time
the command itself took. Prints median and worst per kind. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

STACK = """
services:
  web:
    command: sleep 600
    deploy: {{replicas: {n}}}
    networks: [front]
  probe:
    command: sleep 600
    networks: [front]
  other:
    command: sleep 600
    networks: [back]
networks:
  front: {{}}
  back: {{}}
"""

PROBER = r"""
import socket, struct, sys, time
name, want = sys.argv[1], sys.argv[2] == "present"
q = struct.pack("!HHHHHH", 1, 0x100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.05)
print("ready", flush=True)
deadline = time.time() + 30
while time.time() < deadline:
    try:
        s.sendto(q, ("127.0.0.11", 53)); r = s.recv(512)
        present = (r[3] & 15) == 0 and struct.unpack("!H", r[6:8])[0] > 0
        if present == want:
            print(time.time(), flush=True); sys.exit(0)
    except socket.timeout:
        pass
    time.sleep(0.001)
sys.exit(1)
"""


class Lab:
    def __init__(self):
        self.host = f"mesh-b{secrets.token_hex(3)}"
        self.tmp = tempfile.mkdtemp()
        self.env = {**os.environ, "MESH_RUN_DIR": os.path.join(self.tmp, "run"), "PYTHONSAFEPATH": "1"}
        subprocess.run(["ip", "netns", "add", self.host], check=True)
        os.makedirs(f"/etc/netns/{self.host}", exist_ok=True)
        with open(f"/etc/netns/{self.host}/resolv.conf", "w") as f:
            f.write("search bench.test\n")            # no upstream: nothing is forwarded anywhere

    def mesh(self, *args: str) -> float:
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "mesh", "--host-netns", self.host, *args],
                              env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            log = os.path.join(self.env["MESH_RUN_DIR"], self.host, "daemon.log")
            tail = open(log).read()[-300000:] if os.path.exists(log) else ""
            raise SystemExit(f"mesh {' '.join(args)} failed: {proc.stderr.strip()}\n{tail}")
        return started

    def up(self, n: int) -> float:
        path = os.path.join(self.tmp, "stack.yaml")
        with open(path, "w") as f:
            f.write(STACK.format(n=n))
        return self.mesh("up", "-f", path)

    def close(self) -> None:
        subprocess.run([sys.executable, "-m", "mesh", "--host-netns", self.host, "down"], env=self.env,
                       capture_output=True)
        subprocess.run(["ip", "netns", "del", self.host])
        shutil.rmtree(f"/etc/netns/{self.host}", ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def measure(lab: Lab, name: str, present: bool, change) -> tuple[float, float]:
    """(seconds from the command's start to the first answer showing the change, command seconds)."""
    prober = subprocess.Popen(["ip", "netns", "exec", f"{lab.host}-probe.1", sys.executable, "-c", PROBER,
                               name, "present" if present else "absent"], stdout=subprocess.PIPE, text=True)
    try:
        assert prober.stdout.readline().strip() == "ready"
        started = change()
        done = time.time()
        seen = float(prober.stdout.readline())
        return seen - started, done - started
    finally:
        prober.kill()
        prober.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    lab = Lab()
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in
                                                     ("scale up", "scale down", "connect", "disconnect")}
    try:
        lab.up(1)
        for _ in range(args.rounds):
            results["scale up"].append(measure(lab, "web.2", True, lambda: lab.up(2)))
            results["scale down"].append(measure(lab, "web.2", False, lambda: lab.up(1)))
            results["connect"].append(measure(lab, "other.1", True,
                                              lambda: lab.mesh("network", "connect", "back", "probe.1")))
            results["disconnect"].append(measure(lab, "other.1", False,
                                                 lambda: lab.mesh("network", "disconnect", "back", "probe.1")))
    finally:
        lab.close()
    print(f"DNS freshness, {args.rounds} rounds (ms from the start of the mesh command):")
    print(f"{'change':<12} {'answer median':>14} {'answer worst':>13} {'command median':>15}")
    summary = {}
    for kind, rows in results.items():
        seen, cmd = [r[0] * 1000 for r in rows], [r[1] * 1000 for r in rows]
        summary[kind] = {"answer_median_ms": statistics.median(seen), "answer_worst_ms": max(seen),
                         "command_median_ms": statistics.median(cmd)}
        print(f"{kind:<12} {statistics.median(seen):>14.0f} {max(seen):>13.0f} {statistics.median(cmd):>15.0f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
