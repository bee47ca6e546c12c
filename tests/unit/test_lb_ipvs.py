"""The pure decisions of mesh.lb.ipvs: fwmarks, the IPVS view of a table, the operations that turn
one view into another, and the nft text of the marking table. No kernel."""
from __future__ import annotations

from mesh.lb import ipvs
from mesh.lb.ipvs import (F_SH_FALLBACK, FWD_MASQ, MARK_BASE, MARK_SPAN, KService, Op, assign_fwmarks,
                          build_view, fwmark_of, is_mesh_mark, owned, plan_ops, render_changes,
                          render_full)
from mesh.lb.model import Backend, VirtualService, table_of

VIP = VirtualService("10.0.1.2", "tcp", None, (Backend("10.0.1.5"), Backend("10.0.1.6")))
PUBLISHED = VirtualService("169.254.97.2", "tcp", 8080, (Backend("10.255.0.5", 80),), masquerade=True)
UDP = VirtualService("10.0.1.2", "udp", None, (Backend("10.0.1.5"),))


def marks_of(*services):
    return assign_fwmarks([s.key for s in services], {})


# ------------------------------------------------------------------ fwmarks

def test_fwmark_is_stable_per_key_and_in_mesh_range():
    assert fwmark_of(VIP.key) == fwmark_of(VIP.key)
    assert fwmark_of(VIP.key) != fwmark_of(UDP.key)
    for key in (VIP.key, UDP.key, PUBLISHED.key, ""):
        assert is_mesh_mark(fwmark_of(key))
    assert not is_mesh_mark(MARK_BASE) and not is_mesh_mark(MARK_BASE + MARK_SPAN)
    assert not is_mesh_mark(4242) and not is_mesh_mark((2, 6, "10.0.0.1", 80, 0))


def test_assign_keeps_existing_marks_and_drops_removed_keys():
    first = assign_fwmarks(["a", "b"], {})
    assert first == {"a": fwmark_of("a"), "b": fwmark_of("b")}
    again = assign_fwmarks(["b", "c"], {**first, "a": 7})
    assert again == {"b": first["b"], "c": fwmark_of("c")}
    assert assign_fwmarks(["b"], {"b": MARK_BASE + 5}) == {"b": MARK_BASE + 5}   # memory wins


def test_assign_probes_past_a_clash_and_wraps_inside_the_range(monkeypatch):
    top = MARK_BASE + MARK_SPAN - 1
    monkeypatch.setattr(ipvs, "fwmark_of", lambda key: top)
    marks = assign_fwmarks(["x", "y", "z"], {})
    assert sorted(marks.values()) == [MARK_BASE + 1, MARK_BASE + 2, top]
    assert marks["x"] == top                     # sorted order decides who keeps the preferred one
    assert all(is_mesh_mark(m) for m in marks.values())


# ------------------------------------------------------------------ the IPVS view

def test_view_one_fwmark_service_per_virtual_service_masquerade_forwarding():
    table = table_of([VIP, PUBLISHED, UDP])
    marks = marks_of(VIP, PUBLISHED, UDP)
    view = build_view(table, marks)
    assert set(view) == set(marks.values())
    assert view[marks[VIP.key]] == KService("rr", 0, 0, {("10.0.1.5", 0): (1, FWD_MASQ),
                                                         ("10.0.1.6", 0): (1, FWD_MASQ)})
    assert view[marks[PUBLISHED.key]].dests == {("10.255.0.5", 80): (1, FWD_MASQ)}
    assert FWD_MASQ == 0                          # masquerade, never pyroute2's default (3, DR)


def test_view_ports_schedulers_affinity_and_drain():
    s = VirtualService("10.0.0.9", "udp", 53, (Backend("10.0.0.5"), Backend("10.0.0.6", 5353, 0)),
                       scheduler="wrr")
    sticky = VirtualService("10.0.0.8", "tcp", None, (Backend("10.0.0.5"),), affinity=True)
    view = build_view(table_of([s, sticky]), marks_of(s, sticky))
    assert view[fwmark_of(s.key)] == KService("wrr", 0, 0, {("10.0.0.5", 53): (1, 0),
                                                            ("10.0.0.6", 5353): (0, 0)})
    assert (view[fwmark_of(sticky.key)].sched, view[fwmark_of(sticky.key)].flags) == ("sh", F_SH_FALLBACK)


# ------------------------------------------------------------------ plan_ops

def test_plan_from_nothing_adds_services_then_dests_and_nothing_when_equal():
    desired = build_view(table_of([VIP]), marks_of(VIP))
    mark = fwmark_of(VIP.key)
    assert plan_ops({}, desired) == [Op("add-service", mark, "rr", 0),
                                     Op("add-dest", mark, dest=("10.0.1.5", 0), weight=1),
                                     Op("add-dest", mark, dest=("10.0.1.6", 0), weight=1)]
    assert plan_ops(desired, build_view(table_of([VIP]), marks_of(VIP))) == []


def test_plan_changes_dests_in_place_adding_before_draining_before_removing():
    """The operations run one by one: the service never has no backend to take a connection."""
    mark = fwmark_of(VIP.key)
    before = build_view(table_of([VIP]), marks_of(VIP))
    after_svc = VirtualService(VIP.address, "tcp", None, (Backend("10.0.1.5", weight=0), Backend("10.0.1.7")))
    ops = plan_ops(before, build_view(table_of([after_svc]), marks_of(after_svc)))
    assert ops == [Op("add-dest", mark, dest=("10.0.1.7", 0), weight=1),
                   Op("set-dest", mark, dest=("10.0.1.5", 0), weight=0),
                   Op("del-dest", mark, dest=("10.0.1.6", 0))]
    # a drained backend that takes connections again goes before one that drains now
    drained = build_view(table_of([after_svc]), marks_of(after_svc))
    swap = VirtualService(VIP.address, "tcp", None, (Backend("10.0.1.7", weight=0), Backend("10.0.1.5")))
    assert plan_ops(drained, build_view(table_of([swap]), marks_of(swap))) == [
        Op("set-dest", mark, dest=("10.0.1.5", 0), weight=1),
        Op("set-dest", mark, dest=("10.0.1.7", 0), weight=0)]


def test_plan_fixes_scheduler_flags_timeout_and_forwarding_read_from_the_kernel():
    mark = fwmark_of(VIP.key)
    kernel = {mark: KService("wlc", 0x1, 300, {("10.0.1.5", 0): (1, 3), ("10.0.1.6", 0): (1, 0)})}
    ops = plan_ops(kernel, build_view(table_of([VIP]), marks_of(VIP)))
    assert ops == [Op("set-service", mark, "rr", 0), Op("set-dest", mark, dest=("10.0.1.5", 0), weight=1)]


def test_plan_removes_stale_and_foreign_services_last():
    mark = fwmark_of(VIP.key)
    stale, foreign = fwmark_of("gone"), (2, 6, "10.0.0.1", 80, 0)
    kernel = {stale: KService("rr", 0, 0, {("10.0.1.9", 0): (1, 0)}), foreign: KService("rr"),
              mark: KService("rr", 0, 0, {("10.0.1.5", 0): (1, 0), ("10.0.1.6", 0): (1, 0)})}
    ops = plan_ops(kernel, build_view(table_of([VIP]), marks_of(VIP)))
    assert ops == [Op("del-service", stale), Op("del-service", foreign)]
    # in the process's own namespace only mesh's fwmarks are touched
    assert plan_ops(owned(kernel, None), {}) == [Op("del-service", stale), Op("del-service", mark)]
    assert len(plan_ops(owned(kernel, "mesh-x"), {})) == 3


# ------------------------------------------------------------------ nft text

def test_full_table_marks_in_mangle_prerouting_and_route_output():
    text = render_full(table_of([VIP, PUBLISHED]), marks_of(VIP, PUBLISHED))
    assert text.startswith("table ip mesh_lbmark\ndelete table ip mesh_lbmark\n")
    assert "type filter hook prerouting priority mangle" in text
    assert "type route hook output priority mangle" in text
    assert text.count("meta mark set ip daddr . meta l4proto . th dport map @marks") == 2
    assert f"add element ip mesh_lbmark marks {{ 10.0.1.2 . tcp . 0-65535 : {fwmark_of(VIP.key):#x} }}" in text
    assert f"169.254.97.2 . tcp . 8080 : {fwmark_of(PUBLISHED.key):#x}" in text
    assert f"add element ip mesh_lbmark masq {{ {fwmark_of(PUBLISHED.key):#x} }}" in text
    assert "meta mark @masq masquerade" in text
    assert "closed {" in text and "add element ip mesh_lbmark closed" not in text


def test_no_active_backend_is_closed_for_new_connections_only():
    dead = VirtualService("10.0.1.3", "tcp", None, (Backend("10.0.1.5", weight=0),))
    text = render_full(table_of([dead]), marks_of(dead))
    assert "add element ip mesh_lbmark closed { 10.0.1.3 . tcp . 0-65535 }" in text
    assert "ct state new ip daddr . meta l4proto . th dport @closed jump refuse" in text
    assert "reject with tcp reset" in text


def test_changes_only_what_nft_holds():
    marks = marks_of(VIP, PUBLISHED, UDP)
    old = table_of([VIP, PUBLISHED])
    assert render_changes(old, old, marks) == ""
    # dest changes are IPVS only; nft does not change
    moved = VirtualService(VIP.address, "tcp", None, (Backend("10.0.1.9"),))
    assert render_changes(old, table_of([moved, PUBLISHED]), marks) == ""
    text = render_changes(old, table_of([VIP, UDP]), marks)
    assert text.splitlines() == [
        "delete element ip mesh_lbmark marks { 169.254.97.2 . tcp . 8080 }",
        f"delete element ip mesh_lbmark masq {{ {marks[PUBLISHED.key]:#x} }}",
        f"add element ip mesh_lbmark marks {{ 10.0.1.2 . udp . 0-65535 : {marks[UDP.key]:#x} }}",
    ]


def test_changes_toggle_closed_and_masquerade():
    marks = marks_of(VIP)
    drained = VirtualService(VIP.address, "tcp", None, tuple(Backend(b.address, weight=0) for b in VIP.backends),
                             masquerade=True)
    close = render_changes(table_of([VIP]), table_of([drained]), marks).splitlines()
    assert close == ["add element ip mesh_lbmark closed { 10.0.1.2 . tcp . 0-65535 }",
                     f"add element ip mesh_lbmark masq {{ {marks[VIP.key]:#x} }}"]
    reopen = render_changes(table_of([drained]), table_of([VIP]), marks).splitlines()
    assert reopen == [line.replace("add ", "delete ", 1) for line in close]
