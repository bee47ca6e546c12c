"""A cluster of separate processes against a real etcd: three `mesh agent`s, each inside its lab
node's namespace, and two `mesh manager`s; the CLI talks to a manager (tests/cluster/etcdlab.py).

One scenario, in order: a stack runs on all nodes; tasks on different nodes talk over the overlay
(by address and by name); a node dies (agent killed, namespace removed) and its tasks run
elsewhere; the leading manager dies and the standby leads and scales; an agent is killed with
SIGKILL and restarted and adopts its tasks (same PIDs, nothing made twice); mesh down.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time

from cluster.etcdlab import EtcdLab, HostEtcd
from labkit import ECHO, ROOT, SYSTEM_PYTHON, sh

STACK = f"""
services:
  web:
    command: "{SYSTEM_PYTHON} {ECHO} 80"
    deploy: {{replicas: 3}}
    networks: [front]
  probe:
    command: sleep 600
    deploy: {{mode: global}}
    networks: [front]
networks:
  front: {{}}
"""


def on_node(tasks: dict, node: str) -> dict:
    return {n: t for n, t in tasks.items() if t["node"] == node}


def netns_pids(netns: str) -> set[int]:
    return {int(p) for p in sh(["ip", "netns", "pids", netns]).stdout.split()}


def test_separate_manager_and_agents_on_etcd(tmp_path):
    host = f"mesh-t{secrets.token_hex(3)}"
    sh(["ip", "netns", "add", host])
    try:
        sh(["ip", "link", "set", "lo", "up"], host)
        with EtcdLab(tmp_path, host, nodes=3, ttl=3) as c:
            scenario(c, tmp_path)
    finally:
        sh(["ip", "netns", "del", host])


def scenario(c: EtcdLab, tmp) -> None:
    c.start_agent("n1", "--role", "manager", "--label", "zone=a")
    c.start_agent("n2")
    c.start_agent("n3")
    c.start_manager("m1")
    c.wait_leader("m1")
    c.start_manager("m2")
    nodes = c.wait_nodes("m1", {"n1", "n2", "n3"})
    assert [(n["name"], n["role"], n["address"]) for n in nodes] == [
        ("n1", "manager", "10.97.0.1"), ("n2", "worker", "10.97.0.2"), ("n3", "worker", "10.97.0.3")]

    # a stack on every node
    path = tmp / "stack.yaml"
    path.write_text(STACK)
    c.cli("m1", "up", "-f", str(path))
    names = ["web.1", "web.2", "web.3", "probe.n1", "probe.n2", "probe.n3"]
    ts = c.wait_running("m1", names)
    assert sorted(ts["web.%d" % i]["node"] for i in (1, 2, 3)) == ["n1", "n2", "n3"]
    assert {ts[f"probe.n{i}"]["node"] for i in (1, 2, 3)} == {"n1", "n2", "n3"}

    # cross-node traffic over the overlay: from n1's probe to the web tasks of n2 and n3
    for node in ("n2", "n3"):
        web = next(t for t in on_node(ts, node).values() if t["service"] == "web")
        address = web["networks"]["front"]["address"]
        out = c.cli("m1", "exec", "probe.n1", "--", "curl", "-sS", "--max-time", "3",
                    "--retry", "5", "--retry-connrefused", f"http://{address}:80/").stdout
        assert out.startswith(f"host={web['hostname']} "), out
        assert c.cli("m1", "exec", "probe.n1", "--", "getent", "hosts", web["name"]).stdout.split()[0] \
            == address

    # node death: n3's agent killed, its namespace gone; its web task runs elsewhere
    moved = next(n for n, t in on_node(ts, "n3").items() if t["service"] == "web")
    c.kill_node("n3")
    c.wait(lambda: c.tasks("m1").get(moved, {}).get("node") not in (None, "n3"), 20,
           f"{moved} placed on another node")
    ts = c.wait_running("m1", ["web.1", "web.2", "web.3", "probe.n1", "probe.n2"])
    assert "probe.n3" not in ts and not on_node(ts, "n3")
    assert {n["name"]: n["state"] for n in c.json("m1", "node", "ls")}["n3"] == "down"

    # the leading manager dies: the standby leads and scales
    standby = c.json("m2", "service", "ls")
    assert [s["name"] for s in standby] == ["probe", "web"]            # it mirrored the state
    refused = c.cli("m2", "service", "scale", "web=4", check=False)
    assert refused.returncode == 1 and "standby" in refused.stderr
    c.kill("manager-m1")
    c.wait_leader("m2", timeout=20)
    c.cli("m2", "service", "scale", "web=4")
    ts = c.wait_running("m2", ["web.1", "web.2", "web.3", "web.4"])

    # agent kill -9 and restart: the same task processes, nothing made twice
    before = on_node(ts, "n2")
    assert before
    n2 = c.node("n2").netns
    links = sh(["ip", "-o", "link"], n2).stdout.count(": mh")
    c.kill("agent-n2")
    c.start_agent("n2")
    c.wait(lambda: any("adopted" in line for line in (tmp / "agent-n2.log").read_text().splitlines()),
           20, "the restarted agent to adopt")
    ts = c.wait_running("m2", list(before))
    for name, task in before.items():
        assert ts[name]["node"] == "n2" and ts[name]["pid"] == task["pid"], (name, task, ts[name])
        assert netns_pids(task["sandbox"]) == {task["pid"]}, name
    assert sh(["ip", "-o", "link"], n2).stdout.count(": mh") == links
    c.cli("m2", "service", "scale", "web=5")                          # and it goes on working
    c.wait_running("m2", ["web.5"])

    # down: every agent removes its tasks; the manager stops
    c.cli("m2", "down")
    for node in ("n1", "n2"):
        assert not sh(["ip", "netns", "list"]).stdout.count(f"{c.node(node).netns}-"), node


ROLLING = f"""
services:
  web:
    command: "{SYSTEM_PYTHON} {ECHO} 80"
    deploy: {{replicas: @N@, placement: {{constraints: ["node.hostname==n1"]}}}}
    ports: ["8080:80"]
    environment: {{GENERATION: "@GEN@"}}
"""


@contextlib.contextmanager
def two_nodes_on_etcd(tmp_path, elsewhere: bool = False):
    """(lab, host namespace): a real etcd in a fresh host namespace, agents on n1 and n2, a leading
    manager m1 that sees both (`elsewhere`: as on another machine, not their namespaces)."""
    host = f"mesh-t{secrets.token_hex(3)}"
    sh(["ip", "netns", "add", host])
    try:
        sh(["ip", "link", "set", "lo", "up"], host)
        with EtcdLab(tmp_path, host, nodes=2, ttl=3) as c:
            c.start_agent("n1")
            c.start_agent("n2")
            c.start_manager("m1", elsewhere=elsewhere)
            c.wait_leader("m1")
            c.wait_nodes("m1", {"n1", "n2"})
            yield c, host
    finally:
        sh(["ip", "netns", "del", host])


def test_changes_drain_and_replace_one_at_a_time_on_etcd(tmp_path):
    """As tests/kernel/test_lb.py's in-process test, with the manager and agents as processes on
    etcd: a client going through n2 (no replica) sees no failed request while web scales up and
    down and its tasks are replaced (the agents learn readiness from each other's reports)."""
    with two_nodes_on_etcd(tmp_path) as (c, host):

        def up(gen: int, replicas: int) -> None:
            path = tmp_path / f"stack-{gen}.yaml"
            path.write_text(ROLLING.replace("@GEN@", str(gen)).replace("@N@", str(replicas)))
            c.cli("m1", "up", "-f", str(path))

        up(1, 1)
        c.wait_running("m1", ["web.1"])
        url = "http://10.97.0.2:8080/"
        c.wait(lambda: sh(["curl", "-s", "--max-time", "2", url], host, check=False)
               .stdout.startswith("host="), 20, "web through n2")
        stop, out = tmp_path / "stop", tmp_path / "loop.json"
        proc = subprocess.Popen(["ip", "netns", "exec", host, SYSTEM_PYTHON,
                                 str(ROOT / "tests" / "loadloop.py"), url, str(stop), str(out)])
        try:
            time.sleep(0.5)
            c.cli("m1", "service", "scale", "web=3")
            time.sleep(0.5)
            c.cli("m1", "service", "scale", "web=1")
            time.sleep(0.5)
            started = {n: t["pid"] for n, t in c.tasks("m1").items()}
            up(2, 2)                       # web.1 replaced (new environment), web.2 added
            time.sleep(0.5)
            replaced = {n: t["pid"] for n, t in c.tasks("m1").items()}
            up(3, 2)                       # both replaced, one at a time
            time.sleep(0.5)
        finally:
            stop.touch()
            proc.wait(30)
        result = json.loads(out.read_text())
        assert result["failed"] == 0, result
        assert result["ok"] > 20, result
        ts = c.tasks("m1")
        assert ts["web.1"]["pid"] != started["web.1"] and ts["web.1"]["state"] == "running"
        assert all(ts[n]["pid"] != replaced[n] and ts[n]["state"] == "running"
                   for n in ("web.1", "web.2")), (replaced, ts)
        assert len(result["hosts"]) >= 3, result      # replicas came and went while it ran
        c.cli("m1", "down")


UP_STACK = f"""
services:
  web:
    command: "{SYSTEM_PYTHON} {ECHO} 80"
    deploy: {{replicas: 3}}
    ports: ["8080:80"]
"""


def test_mesh_up_with_store_runs_the_lab_as_separate_daemons(tmp_path):
    """`mesh up --nodes 3 --store etcd://…`: a manager and three agents as processes (an etcd in
    the host namespace, listening on every address, reached at 10.97.0.254); clear errors; down."""
    host = f"mesh-t{secrets.token_hex(3)}"
    sh(["ip", "netns", "add", host])
    etcd = HostEtcd(tmp_path / "etcd", host)
    env = {**os.environ, "MESH_RUN_DIR": str(tmp_path / "run"), "PYTHONSAFEPATH": "1",
           "MESH_LEASE_TTL": "3"}
    path = tmp_path / "stack.yaml"
    path.write_text(UP_STACK)

    def mesh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "mesh", "--host-netns", host, *args], env=env,
                              capture_output=True, text=True, timeout=120)
        assert not check or proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    def lab_namespaces() -> list[str]:
        return [ns for ns in sh(["ip", "netns", "list"]).stdout.split() if ns.startswith(f"{host}-")]

    try:
        sh(["ip", "link", "set", "lo", "up"], host)
        etcd.start()
        url = f"etcd://10.97.0.254:{etcd.client_port}"
        no_nodes = mesh("up", "-f", str(path), "--store", url, check=False)
        assert no_nodes.returncode == 1 and "--nodes" in no_nodes.stderr, no_nodes.stderr
        unreachable = mesh("up", "-f", str(path), "--nodes", "2", "--store", "etcd://10.97.0.254:9",
                           check=False)
        assert unreachable.returncode == 1 and "etcd does not answer" in unreachable.stderr, \
            unreachable.stderr
        assert not lab_namespaces()                                  # all undone

        mesh("up", "-f", str(path), "--nodes", "3", "--store", url)
        nodes = json.loads(mesh("node", "ls", "--json").stdout)
        assert [(n["name"], n["address"], n["role"], n["state"]) for n in nodes] == [
            ("n1", "10.97.0.1", "manager", "ready"), ("n2", "10.97.0.2", "worker", "ready"),
            ("n3", "10.97.0.3", "worker", "ready")]
        tasks = json.loads(mesh("ps", "--json").stdout)
        assert sorted(t["node"] for t in tasks) == ["n1", "n2", "n3"]
        deadline = time.monotonic() + 20
        while not sh(["curl", "-s", "--max-time", "2", "http://10.97.0.2:8080/"], host,
                     check=False).stdout.startswith("host="):
            assert time.monotonic() < deadline, "the published port does not answer"
            time.sleep(0.2)
        again = mesh("up", "-f", str(path), "--nodes", "2", "--store", url, check=False)
        assert again.returncode == 1 and "mesh down" in again.stderr, again.stderr
        agents = json.loads((tmp_path / "run" / host / "etcdlab.json").read_text())["procs"]
        assert sorted(agents) == ["agent-n1", "agent-n2", "agent-n3", "manager"]

        mesh("down")
        assert not lab_namespaces()
        assert not (tmp_path / "run" / host / "etcdlab.json").exists()
        for pid, _ in agents.values():
            assert not os.path.exists(f"/proc/{pid}") or \
                "zombie" in open(f"/proc/{pid}/status").read().lower(), pid
    finally:
        if (tmp_path / "run" / host / "etcdlab.json").exists():
            mesh("down", check=False)
        etcd.stop()
        sh(["ip", "netns", "del", host])


LINES = f"""
services:
  lines:
    command: "{SYSTEM_PYTHON} {ECHO} 85 lines"
    deploy: {{replicas: 2, placement: {{constraints: ["node.hostname==n1"]}}}}
    ports: ["8085:85"]
    x-mesh: {{drain_timeout: 60}}
"""

HOLD = """import socket, sys
while True:
    s = socket.create_connection((sys.argv[1], 8085), timeout=5); f = s.makefile('rw')
    f.write('hi\\n'); f.flush(); line = f.readline()
    if sys.argv[2] in line: break
    s.close()
print('connected', flush=True)
for l in sys.stdin:
    f.write('again\\n'); f.flush(); print(f.readline().strip(), flush=True)
"""


def test_a_manager_on_another_host_ends_a_drain_when_the_agent_reports_it_idle(tmp_path):
    """The manager cannot see the nodes' namespaces (as on another machine): whether a draining
    task still serves connections comes from its agent's report. A scale-down waits while a
    client holds a connection to the leaving task and ends soon after the client closes, long
    before the drain timeout (60 s)."""
    with two_nodes_on_etcd(tmp_path, elsewhere=True) as (c, host):
        path = tmp_path / "lines.yaml"
        path.write_text(LINES)
        c.cli("m1", "up", "-f", str(path))
        ts = c.wait_running("m1", ["lines.1", "lines.2"])
        held = subprocess.Popen(["ip", "netns", "exec", host, SYSTEM_PYTHON, "-c", HOLD,
                                 "10.97.0.2", ts["lines.2"]["hostname"]],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert held.stdout.readline().strip() == "connected"
            scale = subprocess.Popen([sys.executable, "-m", "mesh", "service", "scale", "lines=1"],
                                     env=c.env(c.tmp / "m1"), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
            time.sleep(2.0)
            assert scale.poll() is None, "the scale-down did not wait for the open connection"
            held.stdin.write("x\n")
            held.stdin.flush()
            assert ts["lines.2"]["hostname"] in held.stdout.readline()   # it goes on
            held.stdin.close()                                         # the client finishes
            held.wait(10)
            closed = time.monotonic()
            assert scale.wait(60) == 0, scale.stderr.read()
            waited = time.monotonic() - closed
        finally:
            held.kill()
            held.wait()
        assert waited < 20, f"the drain ran {waited:.1f} s after the last connection closed"
        assert sorted(c.tasks("m1")) == ["lines.1"]
        c.cli("m1", "down")
