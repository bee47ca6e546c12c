"""Single-host networking on the real kernel: user-defined bridges, published ports, default bridge."""
import json

from labkit import curl, no_connect, sh

TWO_SERVICES = """
services:
  web:
    command: @ECHO@ 80
    networks: [front]
    ports: ["8080:80", "9090:90/udp"]
  api:
    command: @ECHO@ 80
    networks: [front]
networks:
  front:
    ipam:
      config: [{subnet: 172.28.5.0/24}]
"""


def test_two_services_on_a_user_defined_bridge(lab):
    lab.up(TWO_SERVICES)
    web, api = lab.task("web.1"), lab.task("api.1")
    assert web["state"] == api["state"] == "running"
    web_ip = web["networks"]["front"]["address"]
    api_ip = api["networks"]["front"]["address"]
    assert web_ip.startswith("172.28.5.") and api_ip.startswith("172.28.5.")
    # container to container, by address
    out = lab.exec("web.1", "curl", "-sS", "--max-time", "3", f"http://{api_ip}/").stdout
    assert f"client={web_ip}" in out and f"host={api['hostname']}" in out


def test_published_port_from_outside_host_localhost_and_hairpin(lab):
    client, host_addr = lab.client()
    lab.up(TWO_SERVICES)
    web = lab.task("web.1")
    web_ip = web["networks"]["front"]["address"]
    # from another "host": the client namespace keeps its own address (DNAT, no SNAT)
    assert "client=10.250.1.2" in curl(f"http://{host_addr}:8080/", client)
    # from the host namespace itself: its own address and localhost
    assert f"host={web['hostname']}" in curl(f"http://{host_addr}:8080/", lab.host)
    assert f"host={web['hostname']}" in curl("http://localhost:8080/", lab.host)
    assert f"host={web['hostname']}" in curl("http://127.0.0.1:8080/", lab.host)
    # hairpin: a container on the same bridge through the host's address, and the task itself
    api_out = lab.exec("api.1", "curl", "-sS", "--max-time", "3", f"http://{host_addr}:8080/").stdout
    assert f"host={web['hostname']}" in api_out
    self_out = lab.exec("web.1", "curl", "-sS", "--max-time", "3", f"http://{host_addr}:8080/").stdout
    assert f"host={web['hostname']}" in self_out
    assert web_ip not in self_out.split("client=")[1]   # masqueraded, so the reply finds its way


def test_published_udp_port(lab):
    client, host_addr = lab.client()
    # a UDP server that publishes only its UDP port (mesh up waits for published TCP ports)
    lab.up(TWO_SERVICES.replace('@ECHO@ 80\n    networks: [front]\n    ports: ["8080:80", ',
                                '@ECHO@ 90 udp\n    networks: [front]\n    ports: [', 1))
    reply = sh(["python3", "-c",
                "import socket,sys;s=socket.socket(2,2);s.settimeout(3);"
                f"s.sendto(b'x',('{host_addr}',9090));print(s.recv(100).decode())"], client)
    assert "client=10.250.1.2" in reply.stdout


def test_random_published_port_is_allocated(lab):
    lab.up("""
services:
  web:
    command: "@ECHO@ 80"
    ports: ["80"]
""")
    ports = lab.task("web.1")["ports"]
    published = int(ports[0].split("->")[0])
    assert 30000 <= published <= 32767
    assert "host=" in curl(f"http://127.0.0.1:{published}/", lab.host)


def test_default_bridge_has_links_and_no_embedded_dns(lab):
    lab.up("""
services:
  db:
    network_mode: bridge
    command: "@ECHO@ 5432"
    ports: ["15432:5432"]
    environment: {POSTGRES_DB: shop}
  app:
    network_mode: bridge
    links: ["db:database"]
""")
    nets = {n["name"]: n for n in lab.json("network", "ls")}
    assert {"bridge", "host", "none"} <= set(nets)
    assert nets["bridge"]["embedded_dns"] is False
    db_ip = lab.task("db.1")["networks"]["bridge"]["address"]
    hosts = lab.exec("app.1", "cat", "/etc/hosts").stdout
    assert any(line.split()[:2] == [db_ip, "database"] for line in hosts.splitlines())
    env = dict(line.split("=", 1) for line in lab.exec("app.1", "env").stdout.splitlines() if "=" in line)
    assert env["DATABASE_PORT_5432_TCP_ADDR"] == db_ip
    assert env["DATABASE_PORT"] == f"tcp://{db_ip}:5432"
    assert env["DATABASE_ENV_POSTGRES_DB"] == "shop"
    assert "host=" in lab.exec("app.1", "curl", "-sS", "--max-time", "3", f"http://database:5432/").stdout
    resolv = lab.exec("app.1", "cat", "/etc/resolv.conf").stdout
    assert "127.0.0.11" not in resolv and "nameserver 127." not in resolv


def test_hostname_and_sandbox_files(lab):
    proc = lab.up("""
services:
  web:
    image: nginx:latest
    hostname: shop-frontend
    command: "@ECHO@ 80"
    volumes: ["./data:/data"]
""")
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1
    assert "services.web.image" in warnings[0] and "services.web.volumes" in warnings[0]
    assert lab.exec("web.1", "hostname").stdout.strip() == "shop-frontend"
    hosts = lab.exec("web.1", "cat", "/etc/hosts").stdout
    address = lab.task("web.1")["networks"]["default"]["address"]
    assert f"{address}\tshop-frontend web.1" in hosts
    assert "shop-frontend" in curl(f"http://{address}/", lab.host)
