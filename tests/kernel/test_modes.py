"""Network modes, macvlan, isolation, internal networks and run-time connect/disconnect."""
import re

from labkit import http_server, sh


def _ifnames(ip_addr_output: str) -> set[str]:
    return set(re.findall(r"^\d+: ([^:@]+)", ip_addr_output, re.M))


def test_host_none_and_container_modes(lab):
    lab.up("""
services:
  web:
    command: "@ECHO@ 80"
  hosty:
    network_mode: host
  lonely:
    network_mode: none
  sidecar:
    network_mode: service:web
  byname:
    network_mode: container:web.1
""")
    host_ifs = _ifnames(sh(["ip", "addr"], lab.host).stdout)
    assert _ifnames(lab.exec("hosty.1", "ip", "addr").stdout) == host_ifs
    assert _ifnames(lab.exec("lonely.1", "ip", "addr").stdout) == {"lo"}
    web_ifs = _ifnames(lab.exec("web.1", "ip", "addr").stdout)
    assert web_ifs == {"lo", "eth0"}
    assert _ifnames(lab.exec("sidecar.1", "ip", "addr").stdout) == web_ifs
    web_ip = lab.task("web.1")["networks"]["default"]["address"]
    assert web_ip in lab.exec("byname.1", "ip", "addr").stdout
    # the sidecar reaches web's server on localhost: one network stack
    assert "host=" in lab.exec("sidecar.1", "curl", "-sS", "--max-time", "3", "http://127.0.0.1/").stdout


def _segment(lab, vlan: int | None):
    """A parent veth in the host namespace whose peer sits in a 'peer' namespace at 10.77.0.50."""
    peer = lab.netns("p" + str(vlan or 0))
    parent = f"mhq{lab.tag}"
    sh(["ip", "link", "add", parent, "netns", lab.host, "type", "veth", "peer", "name", "seg0", "netns", peer])
    sh(["ip", "link", "set", parent, "up"], lab.host)
    sh(["ip", "link", "set", "seg0", "up"], peer)
    dev = "seg0"
    if vlan:
        dev = f"seg0.{vlan}"
        sh(["ip", "link", "add", "link", "seg0", "name", dev, "type", "vlan", "id", str(vlan)], peer)
        sh(["ip", "link", "set", dev, "up"], peer)
    sh(["ip", "addr", "add", "10.77.0.50/24", "dev", dev], peer)
    return peer, parent


MACVLAN = """
services:
  app:
    command: "sleep infinity"
    networks:
      lan: {{ipv4_address: 10.77.0.20}}
networks:
  lan:
    driver: macvlan
    driver_opts: {{parent: {parent}}}
    ipam:
      config: [{{subnet: 10.77.0.0/24, gateway: 10.77.0.1}}]
"""


def test_macvlan_reaches_a_peer_on_the_segment(lab):
    peer, parent = _segment(lab, None)
    lab.up(MACVLAN.format(parent=parent))
    with http_server(peer, "10.77.0.50"):
        reply = lab.exec("app.1", "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--retry", "5",
                         "--retry-connrefused", "--retry-delay", "1", "--max-time", "3",
                         "http://10.77.0.50:8000/").stdout
        assert reply == "200"
        assert "10.77.0.20" in lab.exec("app.1", "ip", "addr", "show", "eth0").stdout
        assert "macvlan" in lab.exec("app.1", "ip", "-d", "link", "show", "eth0").stdout


def _kernel_has_vlan(lab) -> bool:
    """Can this kernel make a VLAN? (on a veth: `lo` never carries VLANs, even with 802.1Q)"""
    sh(["ip", "link", "add", "vlanprobe0", "type", "veth", "peer", "name", "vlanprobe1"], lab.host)
    probe = sh(["ip", "link", "add", "link", "vlanprobe0", "name", "vlanprobe", "type", "vlan", "id", "9"],
               lab.host, check=False)
    sh(["ip", "link", "del", "vlanprobe0"], lab.host, check=False)
    return probe.returncode == 0


def test_macvlan_on_a_vlan_sub_interface_made_on_demand(lab):
    if not _kernel_has_vlan(lab):
        # This kernel has no 802.1Q (CONFIG_VLAN_8021Q unset): mesh must say so and change nothing.
        parent = f"mhq{lab.tag}"
        sh(["ip", "link", "add", parent, "type", "veth", "peer", "name", "mhqpeer"], lab.host)
        proc = lab.up(MACVLAN.format(parent=f"{parent}.100"), check=False)
        assert proc.returncode == 1
        assert "802.1Q" in proc.stderr and f"{parent}.100" in proc.stderr
        assert sh(["ip", "netns", "list"]).stdout.count(f"{lab.host}-") == 0
        return
    peer, parent = _segment(lab, 100)
    assert sh(["ip", "link", "show", f"{parent}.100"], lab.host, check=False).returncode != 0
    lab.up(MACVLAN.format(parent=f"{parent}.100"))
    assert "vlan" in sh(["ip", "-d", "link", "show", f"{parent}.100"], lab.host).stdout
    with http_server(peer, "10.77.0.50"):
        reply = lab.exec("app.1", "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--retry", "5",
                         "--retry-connrefused", "--retry-delay", "1", "--max-time", "3",
                         "http://10.77.0.50:8000/").stdout
        assert reply == "200"
    lab.mesh("down")
    assert sh(["ip", "link", "show", f"{parent}.100"], lab.host, check=False).returncode != 0


def test_isolation_between_networks_and_internal(lab):
    remote, host_addr = lab.client()
    lab.up("""
services:
  a:
    command: "@ECHO@ 80"
    networks: [neta]
  b:
    command: "@ECHO@ 80"
    networks: [netb]
  both:
    command: "@ECHO@ 80"
    networks: [neta, netb]
  secret:
    command: "@ECHO@ 80"
    networks: [vault]
networks:
  neta: {}
  netb: {}
  vault: {internal: true}
""")
    ip = lambda t, n: lab.task(t)["networks"][n]["address"]
    assert "host=" in lab.exec("both.1", "curl", "-sS", "--max-time", "3", f"http://{ip('a.1', 'neta')}/").stdout
    assert "host=" in lab.exec("both.1", "curl", "-sS", "--max-time", "3", f"http://{ip('b.1', 'netb')}/").stdout
    assert lab.exec("a.1", "curl", "-sS", "--max-time", "1", f"http://{ip('b.1', 'netb')}/", check=False).returncode != 0
    assert lab.exec("b.1", "curl", "-sS", "--max-time", "1", f"http://{ip('a.1', 'neta')}/", check=False).returncode != 0
    # a normal network reaches the "remote" host (masqueraded); the internal one cannot
    with http_server(remote, "10.250.1.2"):
        assert lab.exec("a.1", "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--retry", "5",
                        "--retry-connrefused", "--retry-delay", "1", "--max-time", "3",
                        "http://10.250.1.2:8000/").stdout == "200"
        assert lab.exec("secret.1", "curl", "-sS", "--max-time", "1", "http://10.250.1.2:8000/",
                        check=False).returncode != 0
        assert "default" not in lab.exec("secret.1", "ip", "route").stdout


def test_connect_and_disconnect_at_run_time(lab):
    lab.up("""
services:
  app:
    command: "@ECHO@ 80"
    networks: [front]
  db:
    command: "@ECHO@ 80"
    networks: [back]
networks:
  front: {}
  back: {}
""")
    pid = lab.task("app.1")["pid"]
    db_ip = lab.task("db.1")["networks"]["back"]["address"]
    assert lab.exec("app.1", "curl", "-sS", "--max-time", "1", f"http://{db_ip}/", check=False).returncode != 0
    lab.mesh("network", "connect", "back", "app.1")
    task = lab.task("app.1")
    assert task["pid"] == pid and task["networks"]["back"]["ifname"] == "eth1"
    assert "eth1" in lab.exec("app.1", "ip", "addr").stdout
    assert "host=" in lab.exec("app.1", "curl", "-sS", "--max-time", "3", f"http://{db_ip}/").stdout
    again = lab.mesh("network", "connect", "back", "app.1", check=False)
    assert again.returncode == 1 and "already connected" in again.stderr
    lab.mesh("network", "disconnect", "back", "app.1")
    assert lab.task("app.1")["pid"] == pid
    assert "eth1" not in lab.exec("app.1", "ip", "addr").stdout
    assert lab.exec("app.1", "curl", "-sS", "--max-time", "1", f"http://{db_ip}/", check=False).returncode != 0
    missing = lab.mesh("network", "connect", "nope", "app.1", check=False)
    assert missing.returncode == 1 and "no network named 'nope'" in missing.stderr
