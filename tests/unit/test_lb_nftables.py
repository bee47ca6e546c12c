"""The nftables load balancer's rendering, pure: what is sent to nft for a full sync and for a change."""
from mesh.lb.model import Backend, VirtualService, table_of
from mesh.lb.nftables import (MASQ_MARK, NftLb, chain_name, map_key, render_changes, render_full,
                              service_rules)

VIP = VirtualService("10.0.1.2", "tcp", None, (Backend("10.0.1.5"), Backend("10.0.1.6")))
PUB = VirtualService("169.254.97.2", "udp", 9090, (Backend("10.255.0.5", 90),), masquerade=True)


def test_a_vip_takes_every_port_and_keeps_the_port_asked_for():
    assert map_key(VIP) == "10.0.1.2 . tcp . 0-65535"
    assert service_rules(VIP) == ["meta l4proto tcp numgen random mod 2 == 0 dnat to 10.0.1.5",
                                  "meta l4proto tcp dnat to 10.0.1.6"]


def test_a_published_port_maps_to_the_target_port_and_can_masquerade():
    assert map_key(PUB) == "169.254.97.2 . udp . 9090"
    assert service_rules(PUB) == [f"meta mark set {MASQ_MARK:#x}", "meta l4proto udp dnat to 10.255.0.5:90"]


def test_affinity_hashes_the_client_address_and_draining_backends_take_nothing_new():
    s = VirtualService("10.0.1.2", "tcp", 80, (Backend("a", 80), Backend("b", 80, 0), Backend("c", 80)),
                       affinity=True)
    rules = service_rules(s)
    assert len(rules) == 2 and "jhash ip saddr mod 2 seed 0x" in rules[0] and rules[0].endswith("== 0 dnat to a:80")
    assert rules[1] == "meta l4proto tcp dnat to c:80"               # b drains: nothing new
    assert service_rules(s) == rules                  # the same seed on every node and rewrite


def test_no_active_backend_rejects_at_once():
    s = VirtualService("10.0.1.2", "tcp", None, (Backend("10.0.1.5", None, 0),))
    assert service_rules(s) == ["meta l4proto tcp reject with tcp reset", "reject"]


def test_full_sync_replaces_the_table_in_one_transaction():
    text = render_full(table_of([VIP, PUB]))
    assert text.startswith("table ip mesh_lb\ndelete table ip mesh_lb\n")
    assert text.count("add element ip mesh_lb services") == 2
    assert "ip daddr . meta l4proto . th dport vmap @services" in text


def test_a_change_touches_only_what_changed():
    old = table_of([VIP, PUB])
    moved = VirtualService(VIP.address, "tcp", None, (Backend("10.0.1.7"),))
    new = table_of([moved])
    text = render_changes(old, new)
    chain = chain_name(VIP.key)
    assert f"flush chain ip mesh_lb {chain}" in text
    assert f"add rule ip mesh_lb {chain} meta l4proto tcp dnat to 10.0.1.7" in text
    assert f"delete element ip mesh_lb services {{ {map_key(PUB)} }}" in text
    assert f"delete chain ip mesh_lb {chain_name(PUB.key)}" in text
    assert "table ip mesh_lb {" not in text           # never the whole table
    assert render_changes(new, new) == ""


class Recorder:
    def __init__(self):
        self.sent = []

    def apply(self, netns, text):
        self.sent.append((netns, text))


def test_the_backend_keeps_what_it_applied_and_sends_only_differences():
    nft = Recorder()
    lb = NftLb(nft)
    lb.apply("ns1", table_of([VIP]))
    lb.apply("ns1", table_of([VIP]))               # nothing changed: nothing sent
    lb.apply("ns1", table_of([VIP, PUB]))
    assert len(nft.sent) == 2 and "delete table" in nft.sent[0][1] and "delete table" not in nft.sent[1][1]
    lb.resync("ns1")
    assert render_full(table_of([VIP, PUB])) == nft.sent[-1][1]
    lb.forget("ns1")
    assert lb.namespaces() == [] and nft.sent[-1][1].endswith("delete table ip mesh_lb\n")
