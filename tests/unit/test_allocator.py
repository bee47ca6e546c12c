"""Allocation, pure: Stack -> DesiredState, stable across re-applies, clear errors."""
from ipaddress import IPv4Network

import pytest

from mesh.allocator import build_desired
from mesh.errors import AllocationError
from mesh.hostrules import render_host_table
from mesh.model import Attachment, IpamConfig, Link, Network, Port, Service, Stack
from mesh.state import DesiredState


def stack(services, networks=()):
    return Stack("t", {s.name: s for s in services}, {n.name: n for n in networks})


def build(st, previous=DesiredState(), routes=(), conns=(), disconns=()):
    return build_desired(st, previous, list(routes), "mesh-h", conns, disconns)


FRONT = Network("front", ipam=(IpamConfig(subnet="10.9.0.0/24"),))


def test_tasks_endpoints_and_default_bridge():
    st = stack([Service("web", replicas=2, networks=(Attachment("front", ("www",)),))], [FRONT])
    d = build(st)
    assert set(d.networks) == {"bridge", "front"}
    assert d.networks["bridge"].subnet == "172.17.0.0/16"
    web1, web2 = d.tasks["web.1"], d.tasks["web.2"]
    assert d.vip("web", "front") == "10.9.0.2" and d.vip("web", "bridge") is None
    assert [e.address for e in web1.endpoints + web2.endpoints] == ["10.9.0.3", "10.9.0.4"]
    assert web1.endpoints[0].ifname == "eth0" and web1.endpoints[0].default_gateway == "10.9.0.1"
    assert web1.endpoints[0].aliases == ("www",)
    assert web1.sandbox == "mesh-h-web.1" and web1.embedded_dns
    assert len(web1.hostname) == 12


def test_reapply_keeps_addresses_ids_and_ports():
    st = stack([Service("web", replicas=2, ports=(Port(80),), networks=(Attachment("front"),))], [FRONT])
    first = build(st)
    again = build(st, first)
    assert again.tasks == first.tasks and again.publications == first.publications
    scaled = build(stack([Service("web", replicas=3, ports=(Port(80),),
                                  networks=(Attachment("front"),))], [FRONT]), first)
    assert scaled.tasks["web.2"] == first.tasks["web.2"]
    assert scaled.publications[0].published == first.publications[0].published
    assert 30000 <= scaled.publications[0].published <= 32767
    assert len(scaled.publications[0].backends) == 3


def test_default_pool_skips_host_routes():
    d = build(stack([Service("web")], []), routes=[IPv4Network("172.17.0.0/16")])
    assert d.networks["bridge"].subnet == "172.18.0.0/16"


def test_runtime_connect_and_disconnect():
    back = Network("back")
    st = stack([Service("web", networks=(Attachment("front"),))], [FRONT, back])
    d = build(st, conns=(("web.1", "back"),))
    assert [(e.network, e.ifname) for e in d.tasks["web.1"].endpoints] == [("front", "eth0"), ("back", "eth1")]
    d2 = build(st, d, disconns=(("web.1", "front"),), conns=(("web.1", "back"),))
    assert [(e.network, e.ifname) for e in d2.tasks["web.1"].endpoints] == [("back", "eth1")]
    assert d2.tasks["web.1"].endpoints[0].default_gateway is not None


def test_internal_network_gets_no_default_route():
    inner = Network("inner", internal=True)
    d = build(stack([Service("db", networks=(Attachment("inner"),))], [inner]))
    assert d.tasks["db.1"].endpoints[0].default_gateway is None


def test_container_mode_shares_the_sandbox():
    st = stack([Service("web"), Service("side", network_mode="service:web")])
    d = build(st)
    assert d.tasks["side.1"].sandbox == d.tasks["web.1"].sandbox
    assert not d.tasks["side.1"].owns_sandbox and d.tasks["side.1"].endpoints == ()


def test_host_and_none_modes():
    d = build(stack([Service("h", network_mode="host"), Service("n", network_mode="none")]))
    assert d.tasks["h.1"].sandbox is None and d.tasks["h.1"].netmode == "host"
    assert d.tasks["n.1"].sandbox == "mesh-h-n.1" and d.tasks["n.1"].endpoints == ()


def test_links_need_a_shared_network():
    a, b = Network("a"), Network("b")
    st = stack([Service("db", networks=(Attachment("a"),)),
                Service("app", networks=(Attachment("b"),), links=(Link("db", "database"),))], [a, b])
    with pytest.raises(AllocationError, match="services.app.links: 'db' .* shares no network"):
        build(st)


def test_errors_name_what_is_wrong():
    with pytest.raises(AllocationError, match="networks.front: subnet 10.9.0.0/24 overlaps the host route"):
        build(stack([Service("web", networks=(Attachment("front"),))], [FRONT]),
              routes=[IPv4Network("10.9.0.0/16")])
    tiny = Network("tiny", ipam=(IpamConfig(subnet="10.8.0.0/30"),))
    with pytest.raises(AllocationError, match="networks.tiny: no free address left"):
        build(stack([Service("web", replicas=2, networks=(Attachment("tiny"),))], [tiny]))
    with pytest.raises(AllocationError, match="services.web.ports: publishing a port needs"):
        build(stack([Service("web", ports=(Port(80, 8080),), networks=(Attachment("i"),))],
                    [Network("i", internal=True)]))
    with pytest.raises(AllocationError, match="external network 'shared' does not exist"):
        build(stack([Service("web")], [Network("shared", external=True)]))
    dup = (Attachment("front", ipv4_address="10.9.0.5"),)
    with pytest.raises(AllocationError, match="services.b.networks.front.ipv4_address: address 10.9.0.5 .* already in use"):
        build(stack([Service("a", networks=dup), Service("b", networks=dup)], [FRONT]))


def test_host_table_renders_every_rule_kind():
    inner = Network("inner", internal=True)
    st = stack([Service("web", replicas=2, ports=(Port(80, 8080), Port(53, 5353, "udp", host_ip="127.0.0.1")),
                        networks=(Attachment("front"),)),
                Service("db", networks=(Attachment("inner"),))], [FRONT, inner])
    d = build(st)
    text = render_host_table(d)
    front, inner_link = d.networks["front"].link, d.networks["inner"].link
    assert f'ip saddr 10.9.0.0/24 oifname != "{front}" masquerade' in text
    assert f'iifname "{inner_link}" oifname != "{inner_link}" drop' in text
    assert "th dport 8080 dnat ip addr . port to numgen random mod 2 map { 0 : 10.9.0.3 . 80, 1 : 10.9.0.4 . 80 }" in text
    assert "ip daddr 127.0.0.1 meta l4proto udp th dport 5353 dnat ip addr . port to numgen" in text
    assert text.startswith("table ip mesh\ndelete table ip mesh\n")


def test_a_new_task_never_takes_an_address_another_task_keeps():
    def st(a_replicas):
        return stack([Service("a", replicas=a_replicas, networks=(Attachment("front"),)),
                      Service("b", networks=(Attachment("front"),)),
                      Service("c", endpoint_mode="dnsrr", networks=(Attachment("front"),))], [FRONT])
    first = build(st(1))
    second = build(st(3), first)
    for task in ("a.1", "b.1", "c.1"):
        assert second.tasks[task].endpoints == first.tasks[task].endpoints
    assert second.vips == first.vips and second.vip("c", "front") is None
    addresses = [e.address for t in second.tasks.values() for e in t.endpoints] + [a for *_, a in second.vips]
    assert len(addresses) == len(set(addresses)) == 7


def test_a_removed_services_addresses_are_not_handed_to_the_next_one():
    """Serial allocation across changes (DesiredState.allocated): a client that cached the VIP of a
    removed service must not reach another service there."""
    first = build(stack([Service("web", networks=(Attachment("front"),))], [FRONT]))
    assert (first.vip("web", "front"), first.allocated["front"]) == ("10.9.0.2", "10.9.0.3")
    gone = build(stack([], [FRONT]), first)
    assert gone.allocated["front"] == "10.9.0.3"          # nothing allocated: the cursor stays
    other = build(stack([Service("api", networks=(Attachment("front"),))], [FRONT]), gone)
    assert other.vip("api", "front") == "10.9.0.4"
    assert [e.address for e in other.tasks["api.1"].endpoints] == ["10.9.0.5"]


def test_a_single_host_refuses_services_sharing_a_host_mode_port():
    shared = stack([Service("a", ports=(Port(80, 8080, mode="host"),)),
                    Service("b", ports=(Port(81, 8080, mode="host"),))])
    with pytest.raises(AllocationError, match="services.b.ports: port 8080/tcp is published in host "
                                              "mode by services.a too; services share a host-mode "
                                              "port only in a cluster"):
        build(shared)
