"""A 3-node lab in one daemon on the embedded store: node namespaces on an underlay bridge in the
test's host namespace, a manager and one agent per node around a MemoryStore, tasks spread by the
scheduler, overlay networks across nodes."""
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from labkit import curl, sh, wait_for

STACK = """
services:
  web:
    command: "@ECHO@ 80"
    deploy: {{replicas: {web}}}
    networks: [front]
    ports: [{{target: 80, published: 8080, mode: host}}]
  agent:
    command: sleep 300
    deploy: {{mode: global}}
    networks: [front]
  boss:
    command: sleep 300
    deploy: {{placement: {{constraints: ["node.role==manager"]}}, replicas: 2}}
    networks: [front]
  api:
    command: sleep 300
    networks: [front]
  nowhere:
    command: sleep 300
    deploy: {{placement: {{constraints: ["node.labels.zone==mars"]}}}}
networks:
  front: {{}}
"""


@pytest.fixture
def cluster(lab):
    path = lab.tmp / "cluster.yaml"
    lab.write = lambda web: path.write_text(STACK.format(web=web).replace("@ECHO@", lab.echo))
    lab.write(3)
    lab.first_up = lab.mesh("up", "-f", str(path), "--nodes", "3")
    lab.stack_path = str(path)
    return lab


def tasks(lab):
    return {t["name"]: t for t in lab.json("ps")}


def test_nodes_spread_global_constraints_and_pending(cluster):
    lab = cluster
    nodes = lab.json("node", "ls")
    assert [(n["name"], n["role"], n["state"]) for n in nodes] == [
        ("n1", "manager", "ready"), ("n2", "worker", "ready"), ("n3", "worker", "ready")]
    for n in nodes:       # every node's address answers from the host namespace
        assert sh(["ip", "route", "get", n["address"]], lab.host).returncode == 0
    ts = tasks(lab)
    assert sorted(ts[f"web.{i}"]["node"] for i in (1, 2, 3)) == ["n1", "n2", "n3"]
    assert sorted(t["node"] for n, t in ts.items() if n.startswith("agent.")) == ["n1", "n2", "n3"]
    assert {ts["boss.1"]["node"], ts["boss.2"]["node"]} == {"n1"}
    ps = json.loads(lab.mesh("service", "ps", "nowhere", "--json").stdout)
    assert ps["tasks"] == [] and "node.labels.zone==mars" in ps["pending"][0]["reason"]
    assert "pending" in lab.mesh("service", "ps", "nowhere").stdout
    assert "mesh: warning: nowhere.1 is pending: no node satisfies node.labels.zone==mars" in \
        lab.first_up.stderr, lab.first_up.stderr


def test_the_lab_runs_a_manager_and_an_agent_per_node_on_the_embedded_store(cluster):
    lab = cluster
    ping = json.loads(sh(["curl", "-sS", "--unix-socket", f"{lab.env['MESH_RUN_DIR']}/{lab.host}/api.sock",
                          "http://mesh/v1/ping"]).stdout)
    assert (ping["nodes"], ping["manager"], ping["leader"], ping["leading"]) == (3, "manager", "manager", True)
    # each node's agent applied its own part of the desired state it read from the store
    ts = tasks(lab)
    for node in ("n1", "n2", "n3"):
        applied = json.loads((Path(lab.env["MESH_RUN_DIR"]) / lab.host / "nodes" / node /
                              "applied.json").read_text())
        mine = {n for n, t in ts.items() if t["node"] == node}
        assert mine and {n for n, t in applied["tasks"].items() if t.get("node") == node} == mine


def test_overlay_dns_and_host_mode_ports_across_nodes(cluster):
    lab = cluster
    ts = tasks(lab)
    by_node = {ts[f"web.{i}"]["node"]: f"web.{i}" for i in (1, 2, 3)}
    here, there = by_node["n1"], by_node["n2"]
    there_ip = ts[there]["networks"]["front"]["address"]
    out = lab.exec(here, "curl", "-sS", "--max-time", "3", f"http://{there_ip}/").stdout
    assert f"host={ts[there]['hostname']}" in out
    assert lab.exec(here, "dig", "+short", "@127.0.0.11", there).stdout.split() == [there_ip]
    assert sorted(lab.exec(here, "dig", "+short", "@127.0.0.11", "tasks.web").stdout.split()) == \
        sorted(ts[f"web.{i}"]["networks"]["front"]["address"] for i in (1, 2, 3))
    for node in lab.json("node", "ls"):   # host mode: each node publishes its own replica
        body = curl(f"http://{node['address']}:8080/", lab.host)
        assert f"host={ts[by_node[node['name']]]['hostname']}" in body


def test_scale_up_and_down(cluster):
    lab = cluster
    lab.mesh("service", "scale", "api=5")
    ts = tasks(lab)
    assert {f"api.{i}" for i in range(1, 6)} <= set(ts)
    assert all(t["state"] == "running" for n, t in ts.items() if n.startswith("api."))
    counts = [sum(1 for n, t in ts.items() if n.startswith("api.") and t["node"] == node)
              for node in ("n1", "n2", "n3")]
    assert sorted(counts) == [1, 2, 2]
    lab.mesh("service", "scale", "api=1")
    assert [n for n in tasks(lab) if n.startswith("api.")] == ["api.1"]
    # a host-mode port fits once per node: the 4th and 5th web replicas wait, saying why
    lab.mesh("service", "scale", "web=5")
    ps = json.loads(lab.mesh("service", "ps", "web", "--json").stdout)
    assert len(ps["tasks"]) == 3
    assert [p["name"] for p in ps["pending"]] == ["web.4", "web.5"]
    assert "host-mode port 8080/tcp taken" in ps["pending"][0]["reason"]
    services = {s["name"]: s for s in lab.json("service", "ls")}
    assert services["api"]["replicas"] == 1 and services["agent"]["replicas"] == 3
    assert services["web"]["running"] == 3 and services["web"]["replicas"] == 5


def test_mesh_up_without_nodes_applies_to_the_running_lab(cluster):
    """As `docker stack deploy` on a swarm: a changed stack goes to the lab that runs, with no
    --nodes again; asking for another number of nodes is still an error."""
    lab = cluster
    lab.write(2)
    again = lab.mesh("up", "-f", lab.stack_path)
    assert sorted(n for n in tasks(lab) if n.startswith("web.")) == ["web.1", "web.2"], again.stderr
    assert "ROLE" in again.stdout and ":8080 10.97.0." in again.stdout   # the lab summary: nodes, ports
    other = lab.mesh("up", "-f", lab.stack_path, "--nodes", "2", check=False)
    assert other.returncode == 1 and "already runs here with 3 lab nodes" in other.stderr


def test_down_removes_the_lab(cluster):
    lab = cluster
    lab.mesh("down")
    assert namespaces(lab.host + "-") == []
    links = sh(["ip", "-o", "link", "show"], lab.host).stdout
    assert "mhlab" not in links and "mhl1" not in links


def test_mesh_down_after_the_lab_daemon_was_killed_removes_everything(cluster):
    lab = cluster
    pids = [t["pid"] for t in lab.json("ps") if t["pid"]]
    assert pids and all(os.path.exists(f"/proc/{p}") for p in pids)
    daemon = int((Path(lab.env["MESH_RUN_DIR"]) / lab.host / "daemon.pid").read_text())
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{daemon}") or
             open(f"/proc/{daemon}/stat").read().split()[2] == "Z", what="the daemon killed")
    lab.mesh("down")                                  # no daemon answers: mesh down sweeps
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 10), \
        [p for p in pids if os.path.exists(f"/proc/{p}")]
    assert namespaces(lab.host + "-") == []


def test_mesh_down_with_no_daemon_leaves_the_namespaces_of_another_host_namespace(lab):
    """The sweep of host H removes H's sandboxes, not a host named H-b (whose name and whose
    sandboxes' names start with H's prefix) nor its sandboxes (a host namespace holds mesh links,
    a sandbox does not)."""
    ours, other = f"{lab.host}-web.1", f"{lab.host}-b"
    theirs = [other, f"{other}-web.1"]
    try:
        for ns in [ours, *theirs]:                   # lab.host is the Lab's
            sh(["ip", "netns", "add", ns])
        sh(["ip", "link", "add", "mhb0sweeptest", "type", "bridge"], other)   # a host has bridges
        out = lab.mesh("down").stdout                 # no daemon answers: mesh down sweeps
        left = namespaces("")
        assert ours not in left and f"namespace {ours}" in out, (out, left)
        assert all(t in left for t in theirs), (out, left)
    finally:
        for ns in [ours, *theirs]:
            sh(["ip", "netns", "del", ns], check=False)


def another_host(lab, suffix: str):
    """(host, mesh, pid file): a host namespace the lab makes (not the Lab's), the `mesh` CLI for
    it, and the pid file of its daemon."""
    host = lab.host + suffix
    mesh = lambda *args, check=True: subprocess.run(
        [*lab.mesh_argv()[:-2], "--host-netns", host, *args], env=lab.env, capture_output=True,
        text=True, timeout=120, check=check)
    return host, mesh, Path(lab.env["MESH_RUN_DIR"]) / host / "daemon.pid"


def namespaces(prefix: str) -> list[str]:
    return [line.split()[0] for line in sh(["ip", "netns", "list"]).stdout.splitlines()
            if line.startswith(prefix)]


def test_a_host_namespace_mesh_made_goes_with_it_even_after_a_killed_daemon(lab):
    """A lab's and a single host's: after kill -9, the next daemon or the sweep removes it."""
    host, mesh, pid_file = another_host(lab, "x")   # not made by the test: mesh makes it
    path = lab.tmp / "small.yaml"
    path.write_text("services:\n  web:\n    command: sleep 300\n")
    try:
        for nodes in (["--nodes", "2"], []):
            for finish in ("up again, then down", "down with no daemon (sweep)"):
                mesh("up", "-f", str(path), *nodes)
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                wait_for(lambda: mesh("ps", check=False).returncode != 0, what="the daemon gone")
                if finish.startswith("up again"):
                    mesh("up", "-f", str(path), *nodes)
                mesh("down")
                assert namespaces(host) == [], (nodes, finish)
    finally:
        mesh("down", check=False)
        sh(["ip", "netns", "del", host], check=False)


def test_mesh_down_stops_a_daemon_whose_host_namespace_was_removed_under_it(lab):
    """Someone deletes the host namespace while the daemon runs: mesh down still removes what is
    left (sandboxes, lab nodes, ingress namespaces) and stops the daemon; it used to fail with
    "network namespace ... does not exist" and leave the daemon running."""
    host, mesh, pid_file = another_host(lab, "y")
    path = lab.tmp / "small.yaml"
    path.write_text("services:\n  web:\n    command: sleep 300\n    ports: [\"8080:80\"]\n")
    try:
        for nodes in (["--nodes", "2"], []):
            mesh("up", "-f", str(path), "--wait", "0", *nodes)
            daemon = int(pid_file.read_text())
            sh(["ip", "netns", "del", host])
            down = mesh("down", check=False)
            assert down.returncode == 0 and "daemon stopped" in down.stdout, (nodes, down.stderr)
            assert wait_for(lambda: not os.path.exists(f"/proc/{daemon}") or open(
                f"/proc/{daemon}/stat").read().split()[2] == "Z", 15), nodes
            assert namespaces(host) == [], nodes
    finally:
        mesh("down", check=False)
        sh(["ip", "netns", "del", host], check=False)


ATTACH = """
services:
  web:
    command: "@ECHO@ 80"
    deploy: {replicas: 2}
    networks: [front, back]
networks:
  front: {attachable: true}
  back: {}
"""


def test_standalone_containers_join_attachable_overlays_only(lab):
    path = lab.tmp / "attach.yaml"
    path.write_text(ATTACH.replace("@ECHO@", lab.echo))
    lab.mesh("up", "-f", str(path), "--nodes", "2")
    out = lab.mesh("run", "--name", "probe", "--network", "front", "--node", "n2", "--json", "--",
                   "sleep", "300").stdout
    probe = json.loads(out)[0]
    assert probe["name"] == "probe" and probe["node"] == "n2" and probe["state"] == "running"
    # it reaches the service by name (VIP) and every task by name across nodes, over the overlay
    got = lab.exec("probe", "sh", "-c", "for i in $(seq 30); do curl -sS --max-time 3 "
                   "http://web/; done").stdout       # 30: a random pick of 2 repeats itself often
    assert {line.split()[0] for line in got.splitlines()} == \
        {f"host={t['hostname']}" for t in lab.json("ps") if t["service"] == "web"}
    # not on a network that is not attachable, with the reason and nothing changed
    refused = lab.mesh("run", "--name", "probe2", "--network", "back", "--", "sleep", "300",
                       check=False)
    assert refused.returncode != 0 and "not attachable" in refused.stderr
    assert "networks.back.attachable" in refused.stderr
    assert "probe2" not in {t["name"] for t in lab.json("ps")}
    # not under the name of the nodes' routing-mesh namespaces (<node>-ingress)
    refused = lab.mesh("run", "--name", "ingress", "--network", "front", "--", "sleep", "300",
                       check=False)
    assert refused.returncode != 0 and "'ingress' is reserved" in refused.stderr
    assert "ingress" not in {t["name"] for t in lab.json("ps")}
    # it outlives a stack update, and goes with service rm
    lab.mesh("up", "-f", str(path), "--nodes", "2")
    assert "probe" in {t["name"] for t in lab.json("ps")}
    lab.mesh("service", "rm", "probe")
    assert "probe" not in {t["name"] for t in lab.json("ps")}
