"""What each namespace of a node balances (mesh.lb.plan), from a cluster allocation, pure."""
from dataclasses import replace

from mesh.allocator import ClusterPlacement, build_desired
from mesh.lb.plan import build_balancers, render_return_table, return_routes
from mesh.readiness import Readiness
import json

from mesh.spec import load_stack
from mesh.state import INGRESS_LOCAL, DesiredState

STACK = {"services": {
    "web": {"command": "x", "deploy": {"replicas": 2}, "ports": ["8080:80"], "networks": ["front"]},
    "api": {"command": "x", "networks": ["front", "back"], "x-mesh": {"affinity": "client-ip"}},
    "db": {"command": "x", "networks": ["back"], "ports": [{"target": 5432, "published": 5432,
                                                           "mode": "host"}]},
    "masq": {"command": "x", "ports": ["9000:90/udp"], "x-mesh": {"preserve_client_ip": False}}},
    "networks": {"front": {}, "back": {}}}
PLACED = (("web", 1, "web.1", "n1"), ("web", 2, "web.2", "n2"), ("api", 1, "api.1", "n1"),
          ("db", 1, "db.1", "n2"), ("masq", 1, "masq.1", "n1"))


def desired():
    cluster = ClusterPlacement({"n1": "h-n1", "n2": "h-n2"}, {"n1": "10.97.0.1", "n2": "10.97.0.2"},
                               PLACED)
    return build_desired(load_stack(json.dumps(STACK), name="s"), DesiredState(), [], "h", cluster=cluster)


ALL = {t for _, _, t, _ in PLACED}


def test_each_sandbox_balances_the_vips_of_the_networks_it_joined():
    d = desired()
    tables = build_balancers(d, "n1", Readiness(set(ALL), set(ALL)))
    api = tables[d.tasks["api.1"].sandbox]
    vips = {s.address for s in api.values()}
    assert vips == {d.vip("web", "front"), d.vip("api", "front"), d.vip("api", "back"),
                    d.vip("db", "back")}
    web = tables[d.tasks["web.1"].sandbox]
    assert {s.address for s in web.values()} == {d.vip("web", "front"), d.vip("api", "front")}
    web_vip = web[f"{d.vip('web', 'front')}/tcp/any"]
    front = {t: e.address for t, e in [(t.name, e) for t, e in d.endpoints_on("front")]}
    assert {b.address for b in web_vip.backends} == {front["web.1"], front["web.2"]}   # both nodes
    assert web[f"{d.vip('api', 'front')}/udp/any"].affinity


def test_the_ingress_namespace_balances_ingress_ports_to_ingress_addresses():
    d = desired()
    tables = build_balancers(d, "n2", Readiness(set(ALL), set(ALL)))
    ingress = tables[d.ingress["n2"].sandbox]
    assert set(ingress) == {f"{INGRESS_LOCAL}/tcp/8080", f"{INGRESS_LOCAL}/udp/9000"}  # not host mode
    web = ingress[f"{INGRESS_LOCAL}/tcp/8080"]
    on_ingress = {t.name: e.address for t in d.tasks.values() for e in t.endpoints if e.network == "ingress"}
    assert {(b.address, b.port) for b in web.backends} == {(on_ingress["web.1"], 80), (on_ingress["web.2"], 80)}
    assert not web.masquerade and ingress[f"{INGRESS_LOCAL}/udp/9000"].masquerade


def test_readiness_and_draining_decide_the_weights():
    d = desired()
    rd = Readiness(ready={"web.1"}, alive={"web.1", "web.2"})
    ingress = build_balancers(d, "n1", rd)[d.ingress["n1"].sandbox][f"{INGRESS_LOCAL}/tcp/8080"]
    assert sorted(b.weight for b in ingress.backends) == [0, 1]          # web.2 alive, not ready
    drained = build_balancers(replace(d, draining=frozenset({"web.1"})),
                              "n1", rd)[d.ingress["n1"].sandbox][f"{INGRESS_LOCAL}/tcp/8080"]
    assert [b.weight for b in drained.backends] == [0, 0]
    gone = build_balancers(d, "n1", Readiness(set(), set()))[d.ingress["n1"].sandbox]
    assert gone[f"{INGRESS_LOCAL}/tcp/8080"].backends == ()
    listening = Readiness({"web.1", "web.2"}, {"web.1", "web.2"},
                          {"web.2": (frozenset({80}), frozenset({80}))})
    ing = build_balancers(d, "n1", listening)[d.ingress["n1"].sandbox][f"{INGRESS_LOCAL}/tcp/8080"]
    assert sorted(b.weight for b in ing.backends) == [0, 1]              # web.2 not listening yet


def test_tasks_reached_through_ingress_route_replies_back_by_connmark():
    d = desired()
    rr = return_routes(d, d.tasks["web.1"])
    assert rr is not None and len(rr.routes) == 2
    assert {gw for _, _, gw in rr.routes} == {d.ingress["n1"].address, d.ingress["n2"].address}
    # a node's mark and table follow its ingress address, not its place among the nodes: a node
    # that joins or leaves does not change the way back of other nodes' established connections
    n2 = d.ingress["n2"]
    alone = replace(d, ingress={"n2": n2})
    assert [r for r in return_routes(alone, alone.tasks["web.1"]).routes] == \
        [r for r in rr.routes if r[2] == n2.address]
    host = int(n2.address.split(".")[-1]) + 256 * int(n2.address.split(".")[-2])
    assert [r[:2] for r in rr.routes if r[2] == n2.address] == [(0x4d000000 + host, 0x4d000000 + host)]
    text = render_return_table(rr)
    assert f'iifname "{rr.ifname}" ct state new ct mark set ether saddr map' in text
    assert return_routes(d, d.tasks["masq.1"]) is None          # it masquerades: no return route
    assert return_routes(d, d.tasks["db.1"]) is None            # host mode only: no ingress endpoint


def test_the_ingress_network_name_is_reserved_on_every_host():
    import pytest
    from mesh.errors import AllocationError
    text = json.dumps({"services": {"a": {"command": "x", "networks": ["ingress"]}},
                       "networks": {"ingress": {}}})
    with pytest.raises(AllocationError, match="networks.ingress: the name 'ingress' is reserved"):
        build_desired(load_stack(text, name="s"), DesiredState(), [], "h")
