"""The overlay plan, pure: devices only for networks with a local task, entries only for remote tasks."""
from mesh.overlay import build_overlay_plan, diff_entries, mac_for


def test_plan_programs_only_remote_tasks_of_local_networks():
    nodes = {"n1": "10.98.0.1", "n2": "10.98.0.2", "n3": "10.98.0.3"}
    endpoints = [("front", "n1", "10.0.1.2"), ("front", "n2", "10.0.1.3"), ("back", "n3", "10.0.2.2"),
                 ("front", "n3", "10.0.1.4")]
    plan = build_overlay_plan("n1", nodes, {"front": 10, "back": 11}, endpoints, underlay_mtu=9000)
    assert set(plan.devices) == {"front"} and plan.devices["front"].mtu == 8950
    link = plan.devices["front"].link
    assert plan.fdb == {(link, mac_for("10.0.1.3"), "10.98.0.2"), (link, mac_for("10.0.1.4"), "10.98.0.3")}
    assert (link, "10.0.1.3", mac_for("10.0.1.3")) in plan.neigh and len(plan.neigh) == 2


def test_mac_and_diff():
    assert mac_for("172.18.0.2") == "02:42:ac:12:00:02"
    old, new = frozenset({("x", "a", "1"), ("x", "b", "2")}), frozenset({("x", "b", "2"), ("x", "c", "3")})
    assert diff_entries(old, new) == ({("x", "a", "1")}, {("x", "c", "3")})
    moved = frozenset({("x", "a", "9")})                 # key a stays: rewritten, not removed
    assert diff_entries(old, moved) == ({("x", "b", "2")}, {("x", "a", "9")})
