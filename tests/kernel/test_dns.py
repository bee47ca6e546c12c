"""The embedded resolver on the real kernel, asked by real clients (dig, getent) inside sandboxes."""
import ipaddress
import sys
import time

import pytest

from labkit import DNS_STUB, Background, sh

STACK = """
services:
  web:
    command: "@ECHO@ 80"
    deploy: {replicas: 2}
    hostname: webhost
    ports: [{target: 80, name: http}]
    networks:
      front: {aliases: [www]}
  db:
    command: sleep 300
    deploy: {replicas: 2, endpoint_mode: dnsrr}
    networks: [back]
  api:
    command: sleep 300
    container_name: the-api
    networks: [front, back]
  legacy:
    network_mode: bridge
    command: sleep 300
networks:
  front: {}
  back: {}
"""


def dig(lab, task, *args):
    return lab.exec(task, "dig", "+time=2", "+tries=1", "@127.0.0.11", *args).stdout


def short(lab, task, *args):
    return sorted(dig(lab, task, "+short", *args).split())


def getent(lab, task, name):
    proc = lab.exec(task, "getent", "ahostsv4", name, check=False)
    return sorted({line.split()[0] for line in proc.stdout.splitlines()})


def addr(lab, task, net):
    return lab.task(task)["networks"][net]["address"]


def vip(lab, service, net):
    return lab.json("network", "inspect", net)["vips"][service]


@pytest.fixture
def shop(lab):
    lab.up(STACK)
    return lab


def test_every_kind_of_name(shop):
    lab = shop
    web1, web2 = addr(lab, "web.1", "front"), addr(lab, "web.2", "front")
    web_vip = vip(lab, "web", "front")
    for name, expected in [("web", [web_vip]), ("www", [web_vip]), ("web.front", [web_vip]),
                           ("WEB", [web_vip]), ("web.1", [web1]), ("web.1.front", [web1]),
                           ("tasks.web", sorted([web1, web2])), ("tasks.www", sorted([web1, web2])),
                           ("the-api", [addr(lab, "the-api", "front"), addr(lab, "the-api", "back")])]:
        assert short(lab, "the-api", name) == sorted(expected), name
        assert getent(lab, "the-api", name) == sorted(expected), name
    short_id = lab.task("web.1")["id"][:12]
    assert short(lab, "the-api", short_id) == [web1]
    assert sorted(short(lab, "the-api", "webhost")) == sorted([web1, web2])
    db = sorted([addr(lab, "db.1", "back"), addr(lab, "db.2", "back")])
    assert short(lab, "the-api", "db") == db and short(lab, "the-api", "tasks.db") == db
    answer = dig(lab, "the-api", "db")
    assert "\t5\tIN\tA\t" in answer or " 5 IN A " in answer.replace("\t", " ")
    assert " 600 IN A " in dig(lab, "the-api", "web").replace("\t", " ")


def test_scoping_ptr_srv_aaaa_mx(shop):
    lab = shop
    # web is only on front: names on back never resolve for it (they are forwarded like any unknown
    # name, and this lab's host has no upstream, so SERVFAIL)
    assert short(lab, "web.1", "db") == [] and short(lab, "web.1", "db.1") == []
    assert "status: NOERROR" not in dig(lab, "web.1", "db.1")
    web1 = addr(lab, "web.1", "front")
    assert short(lab, "the-api", "-x", web1) == ["web.1.front."]
    assert short(lab, "the-api", "-x", vip(lab, "web", "front")) == ["web.front."]
    srv = short(lab, "the-api", "SRV", "_http._tcp.web")
    assert srv == sorted(["0", "0", "80", "web."])
    aaaa = dig(lab, "the-api", "AAAA", "web")
    assert "status: NOERROR" in aaaa and "ANSWER: 0" in aaaa
    mx = dig(lab, "the-api", "MX", "web.1")
    assert "status: NOERROR" in mx and "ANSWER: 0" in mx


def test_resolv_conf_and_default_bridge(shop):
    lab = shop
    resolv = lab.exec("the-api", "cat", "/etc/resolv.conf").stdout
    assert resolv.splitlines() == ["nameserver 127.0.0.11", "search lab.test", "options ndots:0"]
    legacy = lab.exec("legacy.1", "cat", "/etc/resolv.conf").stdout
    assert "127.0.0.11" not in legacy and "search lab.test" in legacy
    assert "web" not in [l.split()[-1] for l in lab.exec("legacy.1", "cat", "/etc/hosts").stdout.splitlines()]


def test_tcp_and_truncation(lab):
    lab.up("""
services:
  many:
    command: sleep 300
    deploy: {replicas: 36, endpoint_mode: dnsrr}
    networks: [front]
networks:
  front: {}
""")
    udp = dig(lab, "many.1", "+noedns", "+ignore", "many")
    flags = udp.split("flags:")[1].split(";")[0].split()
    assert "tc" in flags
    tcp = short(lab, "many.1", "+tcp", "many")
    assert len(tcp) == 36
    assert len(short(lab, "many.1", "+bufsize=4096", "many")) == 36


def test_forwarding_nxdomain_and_servfail(lab):
    stub_ns, _ = lab.client()
    lab.up("""
services:
  app:
    command: sleep 300
    dns: [10.250.1.2]
    networks: [front]
  vaulted:
    command: sleep 300
    dns: [10.250.1.2]
    networks: [vault]
networks:
  front: {}
  vault: {internal: true}
""")
    with Background(stub_ns, [sys.executable, DNS_STUB, "10.250.1.2"]):
        deadline = time.monotonic() + 10
        while short(lab, "app.1", "www.ext.test") != ["192.0.2.1"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert short(lab, "app.1", "www.ext.test") == ["192.0.2.1"]
        assert short(lab, "app.1", "+tcp", "tcp.ext.test") == ["192.0.2.1"]
        assert getent(lab, "app.1", "getent.ext.test") == ["192.0.2.1"]
        assert "status: NXDOMAIN" in dig(lab, "app.1", "nothing.example")
        assert "status: SERVFAIL" in dig(lab, "vaulted.1", "www.ext.test")
        assert short(lab, "vaulted.1", "vaulted.1") != []        # its own names still resolve


def test_a_container_that_binds_port_53_still_resolves(lab):
    lab.up("""
services:
  dnsish:
    command: "@ECHO@ 53 udp"
    networks: [front]
  peer:
    command: sleep 300
    networks: [front]
networks:
  front: {}
""")
    time.sleep(0.5)
    assert short(lab, "dnsish.1", "peer.1") == [addr(lab, "peer.1", "front")]
    reply = lab.exec("dnsish.1", "python3", "-c",
                     "import socket;s=socket.socket(2,2);s.settimeout(3);"
                     "s.sendto(b'x',('127.0.0.1',53));print(s.recv(99).decode())").stdout
    assert reply.startswith("host=")


def _eventually(check, bound=2.0):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_answers_follow_start_stop_scale_and_connect(lab):
    stack = """
services:
  web:
    command: sleep 300
    deploy: {{replicas: {n}}}
    networks: [front]
  probe:
    command: sleep 300
    networks: [front]
  other:
    command: sleep 300
    networks: [back]
networks:
  front: {{}}
  back: {{}}
"""
    lab.up(stack.format(n=1))
    assert len(short(lab, "probe.1", "tasks.web")) == 1
    lab.up(stack.format(n=3))
    assert _eventually(lambda: len(short(lab, "probe.1", "tasks.web")) == 3)
    assert _eventually(lambda: short(lab, "probe.1", "web.3") == [addr(lab, "web.3", "front")])
    lab.up(stack.format(n=2))
    assert _eventually(lambda: short(lab, "probe.1", "web.3") == [])
    assert _eventually(lambda: len(short(lab, "probe.1", "tasks.web")) == 2)
    assert short(lab, "probe.1", "other.1") == []
    lab.mesh("network", "connect", "back", "probe.1")
    assert _eventually(lambda: short(lab, "probe.1", "other.1") == [addr(lab, "other.1", "back")])
    lab.mesh("network", "disconnect", "back", "probe.1")
    assert _eventually(lambda: short(lab, "probe.1", "other.1") == [])


def test_ttl_upstreams_and_timeout_are_configurable(lab):
    stub_ns, _ = lab.client()
    lab.up("""
x-mesh:
  dns: {ttl: 30, upstreams: ["10.250.1.2"], upstream_timeout: 1s}
services:
  app:
    command: sleep 300
    networks: [front]
  web:
    command: sleep 300
    networks: [front]
networks:
  front: {}
""")
    assert " 30 IN A " in dig(lab, "app.1", "web").replace("\t", " ")
    assert " 5 IN A " in dig(lab, "app.1", "tasks.web").replace("\t", " ")
    started = time.monotonic()
    assert "status: SERVFAIL" in dig(lab, "app.1", "+time=5", "www.ext.test")   # stub not running yet
    assert time.monotonic() - started < 3.5          # one upstream, 1 s timeout (not the default 4 s)
    with Background(stub_ns, [sys.executable, DNS_STUB, "10.250.1.2"]):
        deadline = time.monotonic() + 10
        while short(lab, "app.1", "www.ext.test") != ["192.0.2.1"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert short(lab, "app.1", "www.ext.test") == ["192.0.2.1"]
