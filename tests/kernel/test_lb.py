"""The routing mesh and service VIPs on a 3-node lab, with the nftables load balancer (this kernel
has no ip_vs; tests/kernel/test_lb_backends.py runs both backends, the IPVS one inside the VM).

Clients are real: curl and Python sockets in the test's host namespace (which reaches every node's
underlay address) and inside tasks (`mesh exec`)."""
import re
import subprocess
import time

import pytest

from mesh.lb.base import kernel_has_ipvs

from labkit import SYSTEM_PYTHON, curl, no_connect, sh, wait_for
from meshclients import (HOST_ADDRESS, answers, churn, client_loop, hostnames, nodes, spread,
                         udp_ask, up)

MESH = """
services:
  web:
    command: "@ECHO@ 80"
    deploy: {replicas: 2, placement: {constraints: ["node.hostname==n1"]}}
    ports: ["8080:80"]
  hosted:
    command: "@ECHO@ 81"
    deploy: {placement: {constraints: ["node.hostname==n3"]}}
    ports: [{target: 81, published: 8081, mode: host}]
  masq:
    command: "@ECHO@ 82"
    deploy: {placement: {constraints: ["node.hostname==n2"]}}
    ports: ["8082:82"]
    x-mesh: {preserve_client_ip: false}
  sticky:
    command: "@ECHO@ 83"
    deploy: {replicas: 3}
    ports: ["8083:83"]
    x-mesh: {affinity: client-ip}
  local:
    command: "@ECHO@ 84"
    deploy: {placement: {constraints: ["node.hostname==n1"]}}
    ports: ["127.0.0.1:8084:84"]
  dgram:
    command: "@ECHO@ 90 udp"
    deploy: {replicas: 2, placement: {constraints: ["node.hostname==n1"]}}
    ports: ["9090:90/udp"]
  client:
    command: sleep 300
    deploy: {mode: global}
"""
def test_vips_ingress_host_mode_masquerade_affinity_udp_and_port_release(lab):
    up(lab, MESH)
    addr = nodes(lab)
    web_hosts = hostnames(lab, "web")
    # ingress: every node answers, n2 and n3 have no replica; spread over both; client kept
    for node in ("n1", "n2", "n3"):
        got = spread(f"http://{addr[node]}:8080/", lab.host, web_hosts)
        assert {a.split()[0][5:] for a in got} == web_hosts, (node, got)
        assert all(a.endswith(f"client={HOST_ADDRESS}") for a in got), got
    # a VIP from a task on every node, balanced over the tasks on n1
    for node in ("n1", "n2", "n3"):
        out = lab.exec(f"client.{node}", "sh", "-c",
                       "getent hosts web; for i in $(seq 20); do "
                       "curl -sS --max-time 2 http://web/; done").stdout.split("\n")
        vip = out[0].split()[0]
        assert vip not in {t["networks"]["default"]["address"] for t in lab.json("ps")}
        seen = {line.split()[0][5:] for line in out[1:] if line.startswith("host=")}
        assert seen == web_hosts, (node, out)
        client_ip = lab.task(f"client.{node}")["networks"]["default"]["address"]
        assert all(line.endswith(f"client={client_ip}") for line in out[1:] if line), out
    # host mode: only n3 (its replica) listens; the task sees the client's address
    assert curl(f"http://{addr['n3']}:8081/", lab.host).strip().endswith(f"client={HOST_ADDRESS}")
    assert no_connect(f"http://{addr['n1']}:8081/", lab.host)
    assert no_connect(f"http://{addr['n2']}:8081/", lab.host)
    # a port published on 127.0.0.1 answers there on every node (n3 runs no task), never on a
    # node's address from outside
    assert curl("http://127.0.0.1:8084/", f"{lab.host}-n3").startswith("host=")
    assert all(no_connect(f"http://{addr[n]}:8084/", lab.host) for n in ("n1", "n2", "n3"))
    # preserve_client_ip: false -> the task sees the ingress namespace's address instead
    masq = curl(f"http://{addr['n1']}:8082/", lab.host).strip()
    assert masq.startswith("host=") and not masq.endswith(f"client={HOST_ADDRESS}"), masq
    # affinity: one client address always reaches the same task (3 replicas, one per node)
    assert len({a.split()[0] for a in answers(f"http://{addr['n2']}:8083/", lab.host, 10)}) == 1
    # UDP through the routing mesh, from a node with no replica, spread by source port
    want, seen = hostnames(lab, "dgram"), set()
    for _ in range(40):
        seen.add(udp_ask(lab.host, addr["n3"], 9090).split()[0][5:])
        if seen == want:
            break
    assert seen == want
    # ports are released with their service: a new service claims 8080; addresses are not:
    # allocation is serial, so the new service's VIP is not the one clients may have cached
    web_vip = lab.json("network", "inspect", "default")["vips"]["web"]
    up(lab, MESH.replace("  web:\n", "  other:\n"))
    assert not hostnames(lab, "web")
    assert lab.json("network", "inspect", "default")["vips"]["other"] != web_vip
    other = hostnames(lab, "other")
    got = spread(f"http://{addr['n3']}:8080/", lab.host, other)
    assert {a.split()[0][5:] for a in got} == other, got


ROLLING = """
services:
  web:
    command: "@ECHO@ 80"
    deploy: {replicas: 2, placement: {constraints: ["node.hostname==n1"]}}
    ports: ["8080:80"]
    environment: {GENERATION: "@GEN@"}
"""


def test_no_failed_request_during_scale_up_down_and_replacement(lab):
    up(lab, ROLLING.replace("@GEN@", "1"))
    addr = nodes(lab)
    assert curl(f"http://{addr['n2']}:8080/", lab.host).startswith("host=")
    result = churn(lab, f"http://{addr['n2']}:8080/", ROLLING, "replicas: 2")
    assert result["failed"] == 0, result
    assert result["ok"] > 20, result
    assert len(result["hosts"]) >= 3, result      # replicas came and went while it ran


def test_no_failed_request_while_a_placement_change_moves_every_task(lab):
    """A constraint that moves every task of `web` from n1 to n3 moves them one at a time, as
    Swarm's rolling update does: a task takes connections at every moment."""
    up(lab, ROLLING.replace("@GEN@", "1"))
    addr = nodes(lab)
    with client_loop(lab, f"http://{addr['n2']}:8080/") as result:
        up(lab, ROLLING.replace("@GEN@", "1").replace("hostname==n1", "hostname==n3"))
    assert {t["node"] for t in lab.json("ps") if t["service"] == "web"} == {"n3"}
    assert result["failed"] == 0, result
    assert result["ok"] > 20, result


SWAP = """
services:
  a:
    command: "@ECHO@ 80"
    deploy: {placement: {constraints: ["node.hostname==n1"]}}
    ports: [{target: 80, published: 9000, mode: host}]
  b:
    command: "@ECHO@ 81"
    deploy: {placement: {constraints: ["node.hostname==n3"]}}
    ports: [{target: 81, published: 9000, mode: host}]
"""


def test_services_share_a_host_mode_port_on_different_nodes_and_swap_them(lab):
    """As in Swarm, two services publish 9000 in host mode: each node's port leads to the task it
    runs, also after they swap nodes (moving them one at a time would put both on one node in
    between, so they move at once: tests/unit/test_rolling.py)."""
    up(lab, SWAP)
    addr = nodes(lab)
    a, b = hostnames(lab, "a"), hostnames(lab, "b")
    assert curl(f"http://{addr['n1']}:9000/", lab.host).split()[0][5:] in a
    assert curl(f"http://{addr['n3']}:9000/", lab.host).split()[0][5:] in b
    assert no_connect(f"http://{addr['n2']}:9000/", lab.host)
    swapped = SWAP.replace("hostname==n1", "hostname==nX").replace("hostname==n3", "hostname==n1") \
        .replace("hostname==nX", "hostname==n3")
    up(lab, swapped)
    assert {t["service"]: t["node"] for t in lab.json("ps")} == {"a": "n3", "b": "n1"}
    assert curl(f"http://{addr['n1']}:9000/", lab.host).split()[0][5:] in b
    assert curl(f"http://{addr['n3']}:9000/", lab.host).split()[0][5:] in a


FIRST = """
services:
  web:
    command: "@ECHO@ 80"
    deploy: {replicas: 2}
    ports: ["8080:80"]
  client:
    command: sleep 300
    deploy: {mode: global}
"""


def test_every_node_answers_the_first_connection_once_mesh_up_returns(lab):
    """`mesh up` returns when every task listens and every node's balancers send to it: on a
    fresh lab, the first connection to each node, without a retry, answers (four rounds)."""
    for round_ in range(4):
        up(lab, FIRST)
        addr = nodes(lab)
        for node in ("n1", "n2", "n3"):
            once = sh(["curl", "-sS", "--max-time", "2", f"http://{addr[node]}:8080/"], lab.host,
                      check=False)
            assert once.returncode == 0 and once.stdout.startswith("host="), (round_, node, once.stderr)
        waiting = [t["waiting"] for t in lab.json("ps")]
        assert waiting == [None] * 5, waiting
        lab.mesh("down")


HEALTH = """
services:
  web:
    command: "@ECHO@ 80"
    deploy: {replicas: 2, placement: {constraints: ["node.hostname==n1"]}}
    ports: ["8080:80"]
    healthcheck:
      test: ["CMD-SHELL", "test -f @DIR@/healthy-$$(hostname)"]
      interval: 200ms
      timeout: 1s
      retries: 1
  lines:
    command: "@ECHO@ 85 lines"
    deploy: {replicas: 2, placement: {constraints: ["node.hostname==n1"]}}
    ports: ["8085:85"]
    x-mesh: {drain_timeout: 60}
"""




def test_health_gates_the_balancer_and_a_leaving_task_is_drained(lab):
    up(lab, HEALTH.replace("@DIR@", str(lab.tmp)), "--wait", "0")   # unhealthy until told
    addr = nodes(lab)
    url = f"http://{addr['n2']}:8080/"
    web = {t["name"]: t["hostname"] for t in lab.json("ps") if t["service"] == "web"}
    # nobody healthy: nobody takes connections (refused at once by the balancer)
    assert no_connect(url, lab.host)
    (lab.tmp / f"healthy-{web['web.1']}").touch()
    wait_for(lambda: curl(url, lab.host).startswith("host="), what="web.1 healthy")
    assert {a.split()[0][5:] for a in answers(url, lab.host, 8)} == {web["web.1"]}
    (lab.tmp / f"healthy-{web['web.2']}").touch()
    wait_for(lambda: len({a.split()[0] for a in answers(url, lab.host, 8)}) == 2, what="both healthy")
    (lab.tmp / f"healthy-{web['web.1']}").unlink()        # web.1 turns unhealthy: it leaves
    wait_for(lambda: {a.split()[0][5:] for a in answers(url, lab.host, 8)} == {web["web.2"]},
             what="web.1 out of the balancer")

    # draining: a long-lived connection to lines.2 keeps working while `scale lines=1` waits
    lines = {t["name"]: t["hostname"] for t in lab.json("ps") if t["service"] == "lines"}
    code = (f"import socket,sys,time\n"
            f"while True:\n"
            f" s=socket.create_connection(('{addr['n3']}',8085),timeout=5);f=s.makefile('rw')\n"
            f" f.write('hi\\n');f.flush();line=f.readline()\n"
            f" if '{lines['lines.2']}' in line: break\n"
            f" s.close()\n"
            f"print('connected', flush=True)\n"
            f"for l in sys.stdin:\n"
            f" f.write('again\\n');f.flush();print(f.readline().strip(), flush=True)\n")
    held = subprocess.Popen(["ip", "netns", "exec", lab.host, SYSTEM_PYTHON, "-c", code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "connected"
        scale = subprocess.Popen([*lab.mesh_argv(), "service", "scale", "lines=1"], env=lab.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert scale.poll() is None, "the scale-down did not wait for the open connection"
        held.stdin.write("x\n")
        held.stdin.flush()
        assert lines["lines.2"] in held.stdout.readline()     # the established one goes on
        new = {a.split()[0][5:] for a in answers_tcp(addr["n2"], 8085, lab.host, 6)}
        assert new == {lines["lines.1"]}                      # new ones go elsewhere
        held.stdin.close()                                    # the client finishes
        held.wait(10)
        assert scale.wait(30) == 0, scale.stderr.read()
    finally:
        held.kill()
        held.wait()
    assert [t["name"] for t in lab.json("ps") if t["service"] == "lines"] == ["lines.1"]


def answers_tcp(address: str, port: int, netns: str, count: int) -> list[str]:
    code = (f"import socket\nfor _ in range({count}):\n"
            f" s=socket.create_connection(('{address}',{port}),timeout=5);f=s.makefile('rw')\n"
            f" f.write('x\\n');f.flush();print(f.readline().strip());s.close()\n")
    return sh([SYSTEM_PYTHON, "-c", code], netns).stdout.split("\n")[:-1]


UDP = """
services:
  dgram:
    command: "@ECHO@ 90 udp"
    deploy: {replicas: 2, placement: {constraints: ["node.hostname==n1"]}}
    ports: ["9090:90/udp"]
"""


def test_udp_flows_of_a_removed_backend_are_flushed(lab):
    up(lab, UDP)
    addr = nodes(lab)
    hosts = {t["name"]: t["hostname"] for t in lab.json("ps")}
    # find a source port whose flow lands on dgram.2, the task a scale-down removes
    for source in range(40000, 40040):
        if hosts["dgram.2"] in udp_ask(lab.host, addr["n2"], 9090, source):
            break
    else:
        raise AssertionError("no flow reached dgram.2")
    assert hosts["dgram.2"] in udp_ask(lab.host, addr["n2"], 9090, source)   # conntrack keeps it
    lab.mesh("service", "scale", "dgram=1")
    # the same flow (same source port) now reaches the task that is left, not a dead address
    assert hosts["dgram.1"] in udp_ask(lab.host, addr["n2"], 9090, source)


def test_a_balancer_changed_behind_meshs_back_is_repaired_by_the_periodic_resync(lab):
    lab.env["MESH_LB_RESYNC"] = "0.5"
    lab.up("""
services:
  web:
    command: "@ECHO@ 80"
    deploy: {replicas: 2}
  client:
    command: sleep 300
""")
    sandbox = lab.task("client.1")["sandbox"]
    ask = lambda: lab.exec("client.1", "curl", "-sS", "--max-time", "2", "http://web/", check=False)
    wait_for(lambda: ask().returncode == 0, what="the VIP answers")
    sh(["nft", "delete", "table", "ip", "mesh_lb"], sandbox)      # someone removes it (it existed)
    wait_for(lambda: ask().returncode == 0, what="the resync repairs it")
    assert "vmap @services" in sh(["nft", "list", "table", "ip", "mesh_lb"], sandbox).stdout


IPVS_LAB = ROLLING + """  client:
    command: sleep 600
    deploy: {placement: {constraints: ["node.hostname==n2"]}}
"""


@pytest.mark.skipif(not kernel_has_ipvs(), reason="this kernel has no ip_vs; the VM run "
                    "(make test-vm, part of make test) runs this test on a stock Debian kernel")
def test_the_routing_mesh_on_the_ipvs_backend(lab):
    """A 2-node lab with --lb ipvs: the ingress namespaces and the client's sandbox balance with
    IPVS fwmark services in masquerade mode; every node answers; the VIP balances from a task."""
    path = lab.tmp / "ipvs.yaml"
    path.write_text(IPVS_LAB.replace("@ECHO@", lab.echo).replace("@GEN@", "1"))
    lab.mesh("up", "-f", str(path), "--nodes", "2", "--lb", "ipvs", timeout=600)
    assert lab.json("node", "ls")       # the daemon runs
    addr = nodes(lab)
    web_hosts = hostnames(lab, "web")
    for node in ("n1", "n2"):
        got = answers(f"http://{addr[node]}:8080/", lab.host, 8)
        assert {a.split()[0][5:] for a in got} == web_hosts, (node, got)
        assert all(a.endswith(f"client={HOST_ADDRESS}") for a in got), got
    ingress = f"{lab.host}-n2-ingress"
    table = sh(["ipvsadm", "-Ln"], ingress).stdout
    assert "FWM" in table and table.count("Masq") == 2, table
    timeouts = sh(["ipvsadm", "-L", "--timeout"], ingress).stdout      # no idle drop at 900 s
    assert re.search(r"Timeout \(tcp tcpfin udp\): (\d+) ", timeouts).group(1) == \
        sh(["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_timeout_established"], ingress).stdout.strip()
    out = lab.exec("client.1", "sh", "-c", "for i in 1 2 3 4 5 6 7 8; do curl -sS --max-time 5 "
                   "http://web/; done", timeout=300).stdout
    assert {line.split()[0][5:] for line in out.splitlines() if line} == web_hosts, out


@pytest.mark.skipif(not kernel_has_ipvs(), reason="this kernel has no ip_vs; run it in the VM by "
                    "hand (tests/vm/run.py -- this test): it takes ~10 min under emulation")
def test_no_failed_request_on_the_ipvs_backend_while_web_scales_is_replaced_and_moves(lab):
    """The churn and the placement change of the nftables tests above, on a 2-node lab with --lb
    ipvs: a client loop through n2 (no replica until the move) sees no failed request."""
    lab.env["MESH_LB"] = "ipvs"
    up(lab, IPVS_LAB.replace("@GEN@", "1"), nodes=2)
    url = f"http://{nodes(lab)['n2']}:8080/"
    result = churn(lab, url, IPVS_LAB, "replicas: 2", nodes=2)
    assert result["failed"] == 0, (result["errors"], result["phases"])
    assert result["ok"] > 20 and len(result["hosts"]) >= 3, result
    moved = IPVS_LAB.replace("@GEN@", "3").replace("replicas: 2", "replicas: 3")
    with client_loop(lab, url) as result:
        up(lab, moved.replace("hostname==n1", "hostname==n2"), nodes=2)
    assert {t["node"] for t in lab.json("ps") if t["service"] == "web"} == {"n2"}
    assert result["failed"] == 0 and result["ok"] > 20, result
