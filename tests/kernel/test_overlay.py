"""The overlay driver on the real kernel: two node namespaces joined by an underlay link, one VXLAN
network programmed from the plan (static FDB and neighbour entries, no learning, no flooding)."""
import secrets

import pytest

from labkit import http_server, sh
from mesh.netlink import Netlink
from mesh.overlay import build_overlay_plan, mac_for

SUBNET_PREFIX = 24


@pytest.fixture
def two_nodes():
    tag = secrets.token_hex(2)
    nodes = {f"mesh-o{tag}n1": "10.98.0.1", f"mesh-o{tag}n2": "10.98.0.2"}
    made = []
    try:
        for ns in nodes:
            sh(["ip", "netns", "add", ns])
            made.append(ns)
        (n1, a1), (n2, a2) = nodes.items()
        sh(["ip", "link", "add", "ul0", "netns", n1, "type", "veth", "peer", "name", "ul0", "netns", n2])
        for ns, address in nodes.items():
            sh(["ip", "addr", "add", f"{address}/24", "dev", "ul0"], ns)
            sh(["ip", "link", "set", "ul0", "up"], ns)
            sh(["ip", "link", "set", "lo", "up"], ns)
        yield tag, nodes, made
    finally:
        for ns in reversed(made):
            sh(["ip", "netns", "del", ns], check=False)


def _apply(nl, node, nodes, networks, endpoints, bridges):
    plan = build_overlay_plan(node, nodes, networks, endpoints)
    for dev in plan.devices.values():
        nl.add_vxlan(node, bridges[dev.network], dev.link, dev.vni, dev.local, dev.mtu)
    for link, mac, remote in plan.fdb:
        nl.set_fdb(node, link, mac, remote, True)
    for link, address, mac in plan.neigh:
        nl.set_neigh(node, link, address, mac, True)
    return plan


def test_tasks_on_two_nodes_reach_each_other_over_vxlan(two_nodes):
    tag, nodes, made = two_nodes
    (n1, _), (n2, _) = nodes.items()
    nl = Netlink()
    networks = {"front": 4100}
    tasks = {n1: ("web.1", "10.0.42.2"), n2: ("api.1", "10.0.42.3")}
    endpoints = [("front", node, address) for node, (_, address) in tasks.items()]
    bridges = {"front": f"mhb{tag}ov"}
    for node, (task, address) in tasks.items():
        plan = _apply(nl, node, nodes, networks, endpoints, bridges)
        sandbox = f"{node}-{task}"
        nl.ensure_netns(sandbox)
        made.append(sandbox)
        mtu = plan.devices["front"].mtu
        nl.add_veth_endpoint(node, bridges["front"], f"mhv{tag}{task[0]}", sandbox, "eth0", address,
                             SUBNET_PREFIX, None, mtu)
    assert "nolearning" in sh(["ip", "-d", "link", "show", plan.devices["front"].link], n2).stdout
    assert f"mtu {1500 - 50}" in sh(["ip", "link", "show", "eth0"], f"{n2}-api.1").stdout
    assert mac_for("10.0.42.3") in sh(["ip", "link", "show", "eth0"], f"{n2}-api.1").stdout
    fdb = sh(["bridge", "fdb", "show", "dev", plan.devices["front"].link], n1).stdout
    assert f"{mac_for('10.0.42.3')} dst 10.98.0.2" in fdb
    neigh = sh(["ip", "neigh", "show", "dev", plan.devices["front"].link], n1).stdout
    assert "10.0.42.3 lladdr 02:42:0a:00:2a:03 PERMANENT" in neigh
    with http_server(f"{n2}-api.1", "10.0.42.3"):
        code = sh(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--retry", "5",
                   "--retry-connrefused", "--retry-delay", "1", "--max-time", "3",
                   "http://10.0.42.3:8000/"], f"{n1}-web.1").stdout
    assert code == "200"


def test_a_task_moved_to_another_node_has_one_fdb_entry_all_along(two_nodes):
    """Setting a MAC's entry again replaces its VTEP in place (a task that moved keeps its MAC):
    never two VTEPs for one MAC, never none between the two writes."""
    tag, nodes, _ = two_nodes
    (n1, _), _ = nodes.items()
    nl = Netlink()
    plan = _apply(nl, n1, nodes, {"front": 4101}, [("front", n1, "10.0.43.2")],
                  {"front": f"mhb{tag}mv"})
    link, mac = plan.devices["front"].link, mac_for("10.0.43.9")
    for remote in ("10.98.0.2", "10.98.0.3"):
        nl.set_fdb(n1, link, mac, remote, True)
        entries = [l for l in sh(["bridge", "fdb", "show", "dev", link], n1).stdout.splitlines()
                   if l.startswith(mac)]
        assert len(entries) == 1 and f"dst {remote} " in entries[0] + " ", entries
    nl.set_fdb(n1, link, mac, "10.98.0.3", False)
    assert mac not in sh(["bridge", "fdb", "show", "dev", link], n1).stdout
