"""Records per sandbox, pure: names, scoping, VIP vs dnsrr, tasks., PTR, SRV, TTLs, live tasks."""
from mesh.allocator import build_desired
from mesh.dns.records import build_views
from mesh.model import Attachment, Network, Port, Service, Stack
from mesh.state import DesiredState


def _desired(services, networks):
    st = Stack("t", {s.name: s for s in services}, {n.name: n for n in networks})
    return st, build_desired(st, DesiredState(), [], "mesh-h")


def _views(services, networks, live=None, upstreams=("10.0.0.53",)):
    st, d = _desired(services, networks)
    live = set(d.tasks) if live is None else live
    return d, build_views(d, live, upstreams)


FRONT, BACK, VAULT = Network("front"), Network("back"), Network("vault", internal=True)


def test_names_vip_tasks_and_scoping():
    d, views = _views([
        Service("web", replicas=2, ports=(Port(80, name="http"),),
                networks=(Attachment("front", ("www",)),)),
        Service("db", endpoint_mode="dnsrr", replicas=2, hostname="database",
                networks=(Attachment("back"),)),
        Service("api", networks=(Attachment("front"), Attachment("back"))),
    ], [FRONT, BACK])
    web = views["mesh-h-web.1"]
    vip = d.vip("web", "front")
    assert web.a["web"] == ((vip,), 600) and web.a["www"] == ((vip,), 600)
    assert web.a["web.front"] == ((vip,), 600)
    tasks = {d.tasks[t].endpoints[0].address for t in ("web.1", "web.2")}
    assert set(web.a["tasks.web"][0]) == tasks and web.a["tasks.web"][1] == 5
    assert set(web.a["tasks.www"][0]) == tasks
    assert web.a["web.2"][0] == (d.tasks["web.2"].endpoints[0].address,)
    assert web.a["web.2.front"] == web.a["web.2"]
    assert web.a[d.tasks["web.2"].id[:12]] == web.a["web.2"]
    assert "db" not in web.a and "db.1" not in web.a          # not on a network web joined
    api = views["mesh-h-api.1"]
    assert set(api.a["db"][0]) == {d.tasks[t].endpoints[0].address for t in ("db.1", "db.2")}
    assert api.a["db"][1] == 5 and "database" in api.a
    reverse = __import__("ipaddress").ip_address(d.tasks["web.1"].endpoints[0].address).reverse_pointer
    assert web.ptr[reverse] == ("web.1.front", 600)
    assert web.srv["_http._tcp.web"] == (((0, 0, 80, "web"),), 600)
    assert web.upstreams == ("10.0.0.53",) and web.forward


def test_default_bridge_only_sandbox_has_no_view_and_internal_does_not_forward():
    _, views = _views([Service("old", network_mode="bridge"),
                       Service("safe", networks=(Attachment("vault"),), dns=("10.1.1.1",))], [VAULT])
    assert "mesh-h-old.1" not in views
    assert views["mesh-h-safe.1"].forward is False
    assert views["mesh-h-safe.1"].upstreams == ("10.1.1.1",)


def test_only_live_tasks_are_named():
    d, views = _views([Service("web", replicas=2, endpoint_mode="dnsrr", networks=(Attachment("front"),))],
                      [FRONT], live={"web.1"})
    view = views["mesh-h-web.1"]
    assert "web.2" not in view.a
    assert view.a["web"][0] == (d.tasks["web.1"].endpoints[0].address,)


def test_case_insensitive_keys():
    _, views = _views([Service("Web", container_name="Front-End", networks=(Attachment("front"),))], [FRONT])
    assert "front-end" in views["mesh-h-Front-End"].a and "web" in views["mesh-h-Front-End"].a
