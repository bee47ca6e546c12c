"""A cluster of separate processes against a real etcd: three `mesh agent`s, each inside its lab
node's namespace, and two `mesh manager`s; the CLI talks to a manager (tests/cluster/etcdlab.py).

One scenario, in order: a stack runs on all nodes; tasks on different nodes talk over the overlay
(by address and by name); a node dies (agent killed, namespace removed) and its tasks run
elsewhere; the leading manager dies and the standby leads and scales; an agent is killed with
SIGKILL and restarted and adopts its tasks (same PIDs, nothing made twice); mesh down.
"""
from __future__ import annotations

import secrets

from cluster.etcdlab import EtcdLab
from labkit import ECHO, SYSTEM_PYTHON, sh

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
