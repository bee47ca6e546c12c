"""`mesh down` leaves nothing; invalid input is refused with a clear error and changes nothing."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from labkit import sh


def kernel_snapshot(lab) -> dict:
    netns = sorted(l.split()[0] for l in sh(["ip", "netns", "list"]).stdout.splitlines()
                   if l.startswith(lab.host))
    links = sorted(l.split(": ")[1].split("@")[0]
                   for l in sh(["ip", "-o", "link", "show"], lab.host).stdout.splitlines())
    ruleset = sh(["nft", "list", "ruleset"], lab.host).stdout
    etc = sorted(d for d in os.listdir("/etc/netns") if d.startswith(lab.host)) \
        if os.path.isdir("/etc/netns") else []
    return {"netns": netns, "links": links, "nft": ruleset, "etc": etc,
            "daemon": lab.mesh("ps", check=False).returncode == 0}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_down_leaves_nothing(lab):
    before = kernel_snapshot(lab)
    lab.up("""
services:
  web:
    command: "@ECHO@ 80"
    deploy: {replicas: 2}
    ports: ["8080:80"]
    networks: [front, vault]
  db:
    network_mode: bridge
    command: "sleep 300"
networks:
  front: {}
  vault: {internal: true}
""")
    pids = [t["pid"] for t in lab.json("ps")]
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    during = kernel_snapshot(lab)
    assert len([n for n in during["netns"] if n != lab.host]) == 3 and during["etc"] and "table ip mesh" in during["nft"]
    assert any(l.startswith("mhb") for l in during["links"])
    lab.mesh("down")
    after = kernel_snapshot(lab)
    assert after == before
    assert not any(_alive(p) for p in pids)


STACK_OK = """
services:
  web:
    command: "sleep 300"
    networks: [front]
networks:
  front: {ipam: {config: [{subnet: 10.60.0.0/24}]}}
"""

INVALID = [
    ("services: {web: {ports: ['99999:80']}}", "services.web.ports[0]"),
    ("services: {web: {ports: [{target: 80, published: abc}]}}", "services.web.ports[0].published"),
    ("services: {web: {networks: [nowhere]}}", "services.web.networks[0]"),
    ("services: {web: {links: [ghost]}}", "services.web.links"),
    ("services: {web: {network_mode: host, ports: ['80:80']}}", "services.web.ports"),
    ("services: {web: {network_mode: 'service:web'}}", "services.web.network_mode"),
    ("services: {web: {deploy: {replicas: -1}}}", "services.web.deploy.replicas"),
    ("services: {web: {restart: sometimes}}", "services.web.restart"),
    ("services: {web: {}}\nnetworks: {n: {driver: weave}}", "networks.n.driver"),
    ("services: {web: {}}\nnetworks: {n: {driver: macvlan}}", "networks.n.driver_opts.parent"),
    ("services: {web: {}}\nnetworks: {n: {ipam: {config: [{subnet: 10.0.0.1/24}]}}}",
     "networks.n.ipam.config[0].subnet"),
    ("services: {web: {}}\nnetworks: {n: {ipam: {config: [{subnet: 10.0.0.0/24, gateway: 10.1.0.1}]}}}",
     "networks.n.ipam.config[0].gateway"),
    ("services: {web: {container_name: x, deploy: {replicas: 2}}}", "services.web.container_name"),
    ("services: {web: {environment: {'1BAD': x}}}", "services.web.environment"),
    ("services: {web: {healthcheck: {test: [CMD, 'true'], interval: soon}}}",
     "services.web.healthcheck.interval"),
    ("services: {web: {ports: ['8080:80']}, api: {ports: ['8080:81']}}", "services.api.ports[0]"),
    ("services: [web]", ""),
    ("services: {web: {command: [sleep, 1]\n", "line"),
]


@pytest.mark.parametrize("text,path", INVALID, ids=[p or "top" for _, p in INVALID])
def test_invalid_input_is_refused_with_its_path_and_changes_nothing(lab, text, path):
    before = kernel_snapshot(lab)
    proc = lab.up(text, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("mesh: ")
    assert path in proc.stderr, proc.stderr
    assert kernel_snapshot(lab) == before


def test_allocation_errors_change_nothing_even_on_a_running_stack(lab):
    sh(["ip", "link", "add", "rt0", "type", "bridge"], lab.host)     # a route mesh did not make
    sh(["ip", "addr", "add", "10.61.0.1/16", "dev", "rt0"], lab.host)
    sh(["ip", "link", "set", "rt0", "up"], lab.host)
    before = kernel_snapshot(lab)
    proc = lab.up(STACK_OK.replace("10.60.0.0/24", "10.61.5.0/24"), check=False)
    assert proc.returncode == 1 and "networks.front: subnet 10.61.5.0/24 overlaps the host route 10.61.0.0/16" in proc.stderr
    assert kernel_snapshot(lab) == before
    lab.up(STACK_OK)
    running = kernel_snapshot(lab)
    pid = lab.task("web.1")["pid"]
    proc = lab.up(STACK_OK.replace("10.60.0.0/24", "10.60.0.0/30").replace("sleep 300\"",
                                   "sleep 300\"\n    deploy: {replicas: 3}"), check=False)
    assert proc.returncode == 1 and "networks.front: no free address left in subnet 10.60.0.0/30" in proc.stderr
    assert kernel_snapshot(lab) == running and lab.task("web.1")["pid"] == pid


def test_a_failing_kernel_step_rolls_back(lab):
    lab.up(STACK_OK)
    running = kernel_snapshot(lab)
    pid = lab.task("web.1")["pid"]
    proc = lab.up("""
services:
  web:
    command: "sleep 300"
    networks: [front, lan]
networks:
  front: {ipam: {config: [{subnet: 10.60.0.0/24}]}}
  lan: {driver: macvlan, driver_opts: {parent: mhnothere}}
""", check=False)
    assert proc.returncode == 1 and "macvlan parent interface 'mhnothere' does not exist" in proc.stderr
    assert kernel_snapshot(lab) == running and lab.task("web.1")["pid"] == pid


def test_a_daemon_stopped_while_mesh_up_waits_is_an_error_not_empty_tables(lab):
    """SIGTERM to the daemon while `mesh up` waits for a task that never gets ready: the daemon
    takes the stack down and stops, and mesh up says so (it printed empty tables and exited 0)."""
    path = lab.tmp / "never.yaml"
    path.write_text("services:\n  web:\n    command: sleep 300\n    healthcheck:\n"
                    "      test: [\"CMD\", \"false\"]\n      interval: 1s\n")
    up = subprocess.Popen([*lab.mesh_argv(), "up", "-f", str(path), "--wait", "60"], env=lab.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = Path(lab.env["MESH_RUN_DIR"]) / lab.host / "daemon.pid"
    try:
        deadline = time.monotonic() + 30
        while lab.mesh("ps", check=False).returncode != 0 or not lab.json("ps"):
            assert time.monotonic() < deadline, "the stack never came up"
            time.sleep(0.1)
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode != 0, (out, err)
    assert ("the stack went away while mesh up waited for it" in err
            or "no mesh daemon runs for this host namespace" in err), err
    assert "TASK" not in out, out                    # no empty tables
    assert [n for n in kernel_snapshot(lab)["netns"] if n != lab.host] == []


def test_a_daemon_logs_what_each_task_waits_on_when_sent_sigusr1_and_serves_on(lab):
    """kill -USR1 (what a test's timed-out mesh command does, labkit.Lab.daemon_dump) logs every
    asyncio task's stack and every thread's, in a lab's daemon, without stopping it."""
    lab.up("""
services:
  web:
    command: "@ECHO@ 80"
    deploy: {replicas: 2}
""", "--nodes", "2")
    dump = lab.daemon_dump()
    tail = dump[dump.rindex("mesh.dumps WARNING SIGUSR1: what runs now"):]
    assert " asyncio tasks" in tail
    for waiting in ("NodeAgent.report_loop", "NodeAgent.apply_loop", "ClusterController.mirror",
                    "--- thread MainThread"):
        assert waiting in tail, f"{waiting} is not in the dump:\n{tail[:3000]}"
    assert sorted(t["name"] for t in lab.json("ps")) == ["web.1", "web.2"]
