"""Direct server return (mesh.lb.dsr) and its part of the host table (mesh.hostrules), pure: from a
cluster allocation to the node's plan and the nft text. The kernel test is tests/kernel/test_dsr.py."""
import json
from dataclasses import replace

import pytest

from mesh.allocator import ClusterPlacement, build_desired
from mesh.hostrules import render_host_table
from mesh.lb.dsr import NO_DSR, DsrError, build_dsr, mark, render_dsr
from mesh.readiness import Readiness
from mesh.spec import SpecError, load_stack
from mesh.state import INGRESS_LOCAL, DesiredState

STACK = {"services": {
    "web": {"command": "x", "deploy": {"replicas": 3}, "ports": ["8080:80"],
            "x-mesh": {"ingress": "dsr"}},
    "dns": {"command": "x", "deploy": {"replicas": 1}, "ports": ["5353:53/udp"],
            "x-mesh": {"ingress": "dsr", "affinity": "client-ip"}},
    "plain": {"command": "x", "ports": ["9000:90"]}}}
UNDERLAY = {"n1": "10.97.0.1", "n2": "10.97.0.2", "n3": "10.97.0.3"}
PLACED = (("web", 1, "web.1", "n1"), ("web", 2, "web.2", "n1"), ("web", 3, "web.3", "n3"),
          ("dns", 1, "dns.1", "n3"), ("plain", 1, "plain.1", "n1"))
ALL = {t for _, _, t, _ in PLACED}


def desired(underlay=UNDERLAY, stack=STACK):
    cluster = ClusterPlacement({n: f"h-{n}" for n in underlay}, dict(underlay), PLACED)
    return build_desired(load_stack(json.dumps(stack), name="s"), DesiredState(), [], "h",
                         cluster=cluster)


def ports(plan):
    return {(p.protocol, p.port): p for p in plan.ports}


def test_new_flows_go_to_nodes_by_their_ready_tasks_and_the_node_dnats_to_its_own():
    d = desired()
    plan = build_dsr(d, "n2", Readiness(set(ALL), set(ALL)), "eth0", 24)
    assert (plan.device, plan.address, plan.peers) == ("eth0", "10.97.0.2", ("10.97.0.1", "10.97.0.3"))
    web = ports(plan)[("tcp", 8080)]
    assert sorted(web.buckets) == ["10.97.0.1", "10.97.0.1", "10.97.0.3"]    # one bucket per task
    assert web.nodes == ("10.97.0.1", "10.97.0.3") and web.local == () and web.target == 80
    plain = ports(plan)[("tcp", 9000)]                                     # it did not ask: the
    assert not plain.dsr and not plain.handed_over and not plain.nodes     # routing mesh's
    on_n1 = ports(build_dsr(d, "n1", Readiness(set(ALL), set(ALL)), "eth0", 24))[("tcp", 8080)]
    default = {t: e.address for t in ("web.1", "web.2") for e in d.tasks[t].endpoints
               if e.network == "default"}
    assert sorted(on_n1.local) == sorted(default.values())                 # not the ingress address
    assert ports(plan)[("udp", 5353)].affinity


def test_a_draining_or_unready_task_takes_no_new_flow_but_its_node_keeps_its_flows():
    d = replace(desired(), draining=frozenset({"web.3"}))
    rd = Readiness(ready=ALL - {"web.2"}, alive=set(ALL))
    web = ports(build_dsr(d, "n1", rd, "eth0", 24))[("tcp", 8080)]
    assert web.buckets == ("10.97.0.1",)
    assert web.nodes == ("10.97.0.1", "10.97.0.3")
    assert len(web.local) == 1
    gone = Readiness(ready=ALL - {"web.1", "web.2", "web.3"}, alive=ALL - {"web.1", "web.2", "web.3"})
    assert not ports(build_dsr(d, "n1", gone, "eth0", 24))[("tcp", 8080)].handed_over


def test_nodes_off_the_link_are_a_clear_error_and_no_service_asking_means_no_plan():
    off = dict(UNDERLAY, n3="10.98.0.3")
    with pytest.raises(DsrError, match=r"node n3's address 10\.98\.0\.3 is outside 10\.97\.0\.0/24, "
                                       r"the subnet of eth0 on n1"):
        build_dsr(desired(off), "n1", Readiness(set(ALL), set(ALL)), "eth0", 24)
    plain = {"services": {k: {kk: vv for kk, vv in v.items() if kk != "x-mesh"}
                          for k, v in STACK["services"].items()}}
    nat = build_dsr(desired(stack=plain), "n1", Readiness(set(ALL), set(ALL)), "eth0", 24)
    assert nat.ports and not nat.handed_over                 # the guard of every ingress port
    assert render_dsr(nat, NO_DSR) == ""                     # and no netdev table
    assert build_dsr(desired(off, stack=plain), "n1", Readiness(set(ALL), set(ALL)), "eth0", 24)
    single = replace(desired(stack=plain), underlay={}, ingress={})
    assert build_dsr(single, "n1", Readiness(set(ALL), set(ALL)), "eth0", 24) is None


def test_the_netdev_table_keeps_its_flows_map_across_changes():
    d = desired()
    rd = Readiness(set(ALL), set(ALL))
    first = build_dsr(d, "n2", rd, "eth0", 24)
    text = render_dsr(first, None)
    assert text.startswith("table netdev mesh_dsr\ndelete table netdev mesh_dsr\n")   # afresh
    assert 'type filter hook ingress device "eth0" priority -500' in text
    assert ("ip daddr 10.97.0.2 ip saddr != { 10.97.0.2, 10.97.0.1, 10.97.0.3 } meta l4proto . "
            "th dport vmap { tcp . 8080 : jump p_tcp_8080, udp . 5353 : jump p_udp_5353 }") in text
    assert 'add rule netdev mesh_dsr to_10_97_0_1 meta mark set 0 fwd ip to 10.97.0.1 device "eth0"' in text
    assert "jhash ip saddr . th sport mod 3 seed" in text and "jhash ip saddr mod 1 seed" in text
    assert f"{mark('10.97.0.1')} : jump to_10_97_0_1" in text
    # a flow stored on a node without a task of the service is forgotten before the hash places it
    stale = (f"meta mark != 0 meta mark != {{ {mark('10.97.0.1')}, {mark('10.97.0.3')} }} delete "
             "@flows { ip saddr . th sport . meta l4proto . th dport : meta mark }")
    assert stale in text and text.index(stale) < text.index("jhash ip saddr . th sport mod 3")
    # web leaves n3: its chain goes, the map stays, nothing is deleted wholesale
    fewer = build_dsr(d, "n2", Readiness(ALL - {"web.3", "dns.1"}, ALL - {"web.3", "dns.1"}), "eth0", 24)
    change = render_dsr(fewer, first)
    assert "delete table" not in change
    assert "flush chain netdev mesh_dsr ingress\n" in change
    assert "delete chain netdev mesh_dsr to_10_97_0_3\n" in change
    assert "delete chain netdev mesh_dsr p_udp_5353\n" in change
    assert render_dsr(None, fewer) == "table netdev mesh_dsr\ndelete table netdev mesh_dsr\n"
    assert render_dsr(None, None) == render_dsr(None, fewer)     # unknown (a restarted agent)
    assert render_dsr(None, NO_DSR) == ""
    assert render_dsr(replace(fewer, device="eth1"), fewer).startswith("table netdev mesh_dsr\ndelete")


def test_the_host_table_dnats_arrivals_to_local_tasks_else_to_the_ingress_namespace():
    d = desired()
    rd = Readiness(set(ALL), set(ALL))
    on_n1 = build_dsr(d, "n1", rd, "eth0", 24)
    text = render_host_table(d, on_n1)
    assert ('iifname "eth0" ip daddr { 10.97.0.1, 10.97.0.2, 10.97.0.3 } '
            'ip saddr != { 10.97.0.1, 10.97.0.2, 10.97.0.3 } jump dsr') in text
    local = sorted(ports(on_n1)[("tcp", 8080)].local)
    assert (f"meta l4proto tcp th dport 8080 dnat ip addr . port to numgen random mod 2 map "
            f"{{ 0 : {local[0]} . 80, 1 : {local[1]} . 80 }}") in text
    # dns.1 runs on n3: a flow n1 still gets for it goes into the ordinary routing mesh
    assert f"meta l4proto udp th dport 5353 dnat to {INGRESS_LOCAL}:5353" in text
    assert f"meta l4proto tcp th dport 9000 dnat to {INGRESS_LOCAL}:9000" in text   # not DSR
    assert ('iifname "eth0" ip daddr { 10.97.0.2, 10.97.0.3 } meta l4proto . th dport '
            '{ tcp . 8080, udp . 5353, tcp . 9000 } reject') in text
    on_n3 = render_host_table(d, build_dsr(d, "n3", rd, "eth0", 24))    # dns.1 and web.3 run here
    assert "meta l4proto udp th dport 5353 dnat to" in on_n3 and " seed 0x" not in on_n3.split(
        "udp th dport 5353")[1].split("\n")[0]                          # one task: no choice
    two = replace(d, tasks={**d.tasks, "dns.2": replace(d.tasks["dns.1"], name="dns.2")})
    affine = render_host_table(two, build_dsr(two, "n3", Readiness(ALL | {"dns.2"}, ALL | {"dns.2"}),
                                                  "eth0", 24))
    again = render_host_table(two, build_dsr(two, "n3", Readiness(ALL | {"dns.2"}, ALL | {"dns.2"}),
                                                 "eth0", 24))
    assert "jhash ip saddr mod 2 seed 0x" in affine and affine == again   # a fixed seed
    assert "jump dsr" not in render_host_table(d, None)


def test_a_port_published_on_one_address_is_dnatted_on_arrival_only_when_sent_to_it():
    stack = {"services": {**STACK["services"], "plain": {"command": "x", "ports": ["127.0.0.1:9000:90"]},
                          "node1": {"command": "x", "ports": ["10.97.0.1:9001:91"]}}}
    d = desired(stack=stack)
    text = render_host_table(d, build_dsr(d, "n2", Readiness(set(ALL), set(ALL)), "eth0", 24))
    dsr_chain = text.split("chain dsr {")[1].split("}")[0]
    assert f"ip daddr 127.0.0.1 meta l4proto tcp th dport 9000 dnat to {INGRESS_LOCAL}:9000" in dsr_chain
    assert f"ip daddr 10.97.0.1 meta l4proto tcp th dport 9001 dnat to {INGRESS_LOCAL}:9001" in dsr_chain
    assert "\n    meta l4proto tcp th dport 9000" not in dsr_chain


@pytest.mark.parametrize("x_mesh, port, message", [
    ({"ingress": "direct"}, "8080:80", "expected dsr or nat, got 'direct'"),
    ({"ingress": "dsr"}, {"target": 80, "published": 8080, "mode": "host"},
     "dsr applies to ports published in ingress mode; this service publishes none"),
    ({"ingress": "dsr", "preserve_client_ip": False}, "8080:80",
     "dsr always keeps the client's address"),
    ({"ingress": "dsr"}, "127.0.0.1:8080:80",
     "dsr hands a port over on every node's own address: it cannot go with a port published on one"),
])
def test_the_stack_says_clearly_where_dsr_is_asked_wrongly(x_mesh, port, message):
    stack = {"services": {"web": {"command": "x", "ports": [port], "x-mesh": x_mesh}}}
    with pytest.raises(SpecError, match="services.web.x-mesh.ingress: " + message):
        load_stack(json.dumps(stack))
