"""Direct server return (x-mesh: {ingress: dsr}, mesh.lb.dsr) on a 3-node lab: every node's address
answers, the task sees the client, the node the client addressed keeps no state (it only hands the
requests over), flows stay on their node while nodes come and go, and no request fails while the
service scales and is replaced. Clients: curl and Python sockets in the test's host namespace, which
sits on the lab's underlay link (10.97.0.254)."""
import ipaddress
import re

from labkit import curl, sh

from meshclients import (HOST_ADDRESS, churn, client_loop, hostnames, nodes, spread, udp_ask,
                         up)

DSR = """
services:
  web:
    command: "@ECHO@ 80"
    deploy: {replicas: 2, placement: {constraints: ["node.hostname==n1"]}}
    ports: ["8080:80"]
    x-mesh: {ingress: dsr}
  dgram:
    command: "@ECHO@ 90 udp"
    deploy: {replicas: 2, placement: {constraints: ["node.hostname==n1"]}}
    ports: ["9090:90/udp"]
    x-mesh: {ingress: dsr}
"""


def flows(netns: str, port: int) -> list[str]:
    """The node's conntrack entries of connections to `port` (/proc: no conntrack tool needed)."""
    text = sh(["cat", "/proc/net/nf_conntrack"], netns).stdout
    return [line for line in text.splitlines() if re.search(rf"\bdport={port}\b", line)]


def test_every_node_answers_the_task_sees_the_client_and_the_addressed_node_keeps_no_state(lab):
    shown = up(lab, DSR).stdout
    assert re.search(r"web\s+8080/tcp\s+80\s+ingress \(dsr\)\s+10\.97\.0\.1:8080", shown), shown
    addr = nodes(lab)
    node_ns = {n: f"{lab.host}-{n}" for n in addr}
    web = hostnames(lab, "web")
    for node in ("n1", "n2", "n3"):
        got = spread(f"http://{addr[node]}:8080/", lab.host, web)
        assert {a.split()[0][5:] for a in got} == web, (node, got)
        assert all(a.endswith(f"client={HOST_ADDRESS}") for a in got), got
    # n2 and n3 run no task: they handed the requests over in their device's ingress hook, before
    # their IP stack, so neither they nor their ingress namespaces hold any state of them; n1 DNAT'd
    # the connections addressed to n2 and n3 and answered from there
    for node in ("n2", "n3"):
        assert flows(node_ns[node], 8080) == [], node
        assert flows(f"{node_ns[node]}-ingress", 8080) == [], node
        assert any(f"src={HOST_ADDRESS} dst={addr[node]} " in f for f in flows(node_ns["n1"], 8080))
    flows_map = sh(["nft", "list", "map", "netdev", "mesh_dsr", "flows"], node_ns["n2"]).stdout
    assert f"{HOST_ADDRESS} . " in flows_map and ". tcp . 8080" in flows_map, flows_map
    # UDP the same way, spread by source port
    want, seen = hostnames(lab, "dgram"), set()
    for _ in range(40):
        answer = udp_ask(lab.host, addr["n3"], 9090)
        assert answer.endswith(f"client={HOST_ADDRESS}"), answer
        seen.add(answer.split()[0][5:])
        if seen == want:
            break
    assert seen == want
    assert flows(node_ns["n3"], 9090) == []
    # a node, and a task, asking another node's address take the ordinary routing mesh (handed
    # over, their packet would come back to n1 with its own address as the source)
    assert curl(f"http://{addr['n2']}:8080/", node_ns["n1"]).strip().endswith(f"client={addr['n1']}")
    assert lab.exec("web.1", "curl", "-sS", "--max-time", "3",
                    f"http://{addr['n3']}:8080/").stdout.startswith("host=")
    # a packet for n2 that reaches n3 (a node whose view lags hands it over there; here the
    # client's route does it) is served through n3's routing mesh, never routed back onto the link
    sh(["ip", "route", "add", f"{addr['n2']}/32", "via", addr["n3"]], lab.host)
    try:
        got = spread(f"http://{addr['n2']}:8080/", lab.host, web)
        assert all(a.endswith(f"client={HOST_ADDRESS}") for a in got), got
        assert flows(f"{node_ns['n3']}-ingress", 8080), "not through n3's ingress namespace"
    finally:
        sh(["ip", "route", "del", f"{addr['n2']}/32"], lab.host)
    # taken down, nothing of it is left on a node
    up(lab, DSR.replace("x-mesh: {ingress: dsr}", "x-mesh: {ingress: nat}"))
    for node in ("n1", "n2", "n3"):
        tables = sh(["nft", "list", "tables"], node_ns[node]).stdout
        assert "mesh_dsr" not in tables, (node, tables)
    got = spread(f"http://{addr['n2']}:8080/", lab.host, web)
    assert {a.split()[0][5:] for a in got} == web, got


SPREAD = """
services:
  web:
    command: "@ECHO@ 80"
    deploy: {replicas: 1, placement: {constraints: ["node.hostname!=n2"]}}
    ports: ["8080:80"]
    environment: {GENERATION: "@GEN@"}
    x-mesh: {ingress: dsr}
  dgram:
    command: "@ECHO@ 90 udp"
    deploy: {replicas: 1, placement: {constraints: ["node.hostname!=n2"]}}
    ports: ["9090:90/udp"]
    x-mesh: {ingress: dsr}
"""


def test_a_flow_stays_on_its_node_while_nodes_join_the_service(lab):
    """UDP flows (one client port each) keep their task while the service grows onto another
    node: the flows map holds them, where a hash over the new set of nodes would move about half."""
    up(lab, SPREAD.replace("@GEN@", "1"))
    addr = nodes(lab)
    ports = range(40100, 40110)
    first = {p: udp_ask(lab.host, addr["n2"], 9090, source_port=p).split()[0] for p in ports}
    lab.mesh("service", "scale", "dgram=6")                  # tasks on n1 and n3 now
    assert {t["node"] for t in lab.json("ps") if t["service"] == "dgram"} == {"n1", "n3"}
    for p in ports:
        assert udp_ask(lab.host, addr["n2"], 9090, source_port=p).split()[0] == first[p], p
    others = {udp_ask(lab.host, addr["n2"], 9090, source_port=41000 + i).split()[0]
              for i in range(30)}
    assert len(others) > 1, others                            # new flows spread over the tasks


MOVES = """
services:
  dgram:
    command: "@ECHO@ 90 udp"
    deploy: {replicas: @N@, placement: {constraints: ["@WHERE@"]}}
    ports: ["9090:90/udp"]
    x-mesh: {ingress: dsr, drain_timeout: 1}
"""


def test_a_flow_whose_node_left_is_placed_again_and_stays_on_its_new_node(lab):
    """UDP flows on n1 go to n3 when n1 loses its task of the service (n3 keeps one throughout, so
    the flows map lives on), and stay on n3 when n1 runs tasks again: the packet path forgets the
    stale entry and stores the new node (else the old entry, valid again, takes them back to n1)."""
    def stack(replicas: int, where: str) -> str:
        return MOVES.replace("@N@", str(replicas)).replace("@WHERE@", where)

    def task_nodes() -> dict[str, str]:
        return {t["hostname"]: t["node"] for t in lab.json("ps") if t["service"] == "dgram"}

    def nodes_of_answers(source_ports) -> dict[int, str]:
        node_of = task_nodes()
        return {p: node_of[udp_ask(lab.host, addr["n2"], 9090, source_port=p).split()[0][5:]]
                for p in source_ports}
    up(lab, stack(2, "node.hostname!=n2"))
    addr = nodes(lab)
    ports = range(40200, 40210)
    assert set(task_nodes().values()) == {"n1", "n3"}
    assert set(nodes_of_answers(ports).values()) == {"n1", "n3"}      # (the hash is seeded: fixed)
    up(lab, stack(2, "node.hostname==n3"))                  # n1 loses its task, n3 keeps one
    assert set(task_nodes().values()) == {"n3"}
    assert set(nodes_of_answers(ports).values()) == {"n3"}
    flows_map = sh(["nft", "list", "map", "netdev", "mesh_dsr", "flows"], f"{lab.host}-n2").stdout
    n3_mark = f"{int(ipaddress.IPv4Address(addr['n3'])):#010x}"
    for p in ports:                                         # stored on n3 now
        assert re.search(rf"{HOST_ADDRESS} \. {p} \. udp \. 9090 [^:,]*: {n3_mark}",
                         flows_map), (p, flows_map)
    up(lab, stack(4, "node.hostname!=n2"))                  # n1 runs tasks again
    assert set(task_nodes().values()) == {"n1", "n3"}
    assert set(nodes_of_answers(ports).values()) == {"n3"}
    assert set(nodes_of_answers(range(41200, 41230)).values()) == {"n1", "n3"}   # new flows: both


def test_no_failed_request_through_dsr_during_scale_up_down_and_replacement(lab):
    up(lab, SPREAD.replace("@GEN@", "1"))
    addr = nodes(lab)
    assert curl(f"http://{addr['n2']}:8080/", lab.host).startswith("host=")
    result = churn(lab, f"http://{addr['n2']}:8080/", SPREAD, "replicas: 1")    # n1 and n3
    assert result["failed"] == 0, result
    assert result["ok"] > 20, result
    assert len(result["hosts"]) >= 3, result


def test_no_failed_request_through_dsr_while_a_placement_change_moves_every_task(lab):
    """A constraint that moves every task of `web` from n1 to n3 moves them one at a time: n2
    always has a node with a task to hand each new connection to (it fails when all move at once)."""
    stack = SPREAD.replace("@GEN@", "1").replace("replicas: 1", "replicas: 2")
    up(lab, stack.replace("hostname!=n2", "hostname==n1"))
    addr = nodes(lab)
    with client_loop(lab, f"http://{addr['n2']}:8080/") as result:
        up(lab, stack.replace("hostname!=n2", "hostname==n3"))
    assert {t["node"] for t in lab.json("ps") if t["service"] == "web"} == {"n3"}
    assert result["failed"] == 0, result
    assert result["ok"] > 20, result


def test_a_node_off_the_link_refuses_dsr_and_the_change_is_undone(lab):
    up(lab, DSR.replace("{ingress: dsr}", "{ingress: nat}"))
    addr = nodes(lab)
    n3 = f"{lab.host}-n3"
    # n3's address alone on its subnet (/32, the lab's subnet routed): the other nodes are off-link
    sh(["ip", "addr", "del", f"{addr['n3']}/24", "dev", "eth0"], n3)
    sh(["ip", "addr", "add", f"{addr['n3']}/32", "dev", "eth0"], n3)
    sh(["ip", "route", "add", "10.97.0.0/24", "dev", "eth0"], n3)
    stack = lab.tmp / "dsr.yaml"
    stack.write_text(DSR.replace("@ECHO@", lab.echo))
    failed = lab.mesh("up", "-f", str(stack), "--nodes", "3", check=False)
    assert failed.returncode != 0, failed.stdout
    assert (f"node n3 could not apply the change: DsrError: x-mesh ingress: dsr needs every node on "
            f"one link: node n1's address {addr['n1']} is outside {addr['n3']}/32, the subnet of "
            f"eth0 on n3") in failed.stderr, failed.stderr
    # the change is undone on every node: no DSR table, the routing mesh answers as before
    for node in ("n1", "n2", "n3"):
        assert "mesh_dsr" not in sh(["nft", "list", "tables"], f"{lab.host}-{node}").stdout, node
    assert all(not s["published"][0]["dsr"] for s in lab.json("service", "ls"))
    web = hostnames(lab, "web")
    got = spread(f"http://{addr['n2']}:8080/", lab.host, web)
    assert {a.split()[0][5:] for a in got} == web, got
