"""Clients of a 3-node lab's routing mesh, for the kernel tests: bring a stack up on the lab, ask
the published ports from the test's host namespace (on the lab's underlay link, HOST_ADDRESS) with
curl and Python sockets, and run a client loop while the stack changes.

    up(lab, STACK)                  # @ECHO@ in STACK is the echo server; 3 nodes (nodes=N)
    spread(f"http://{nodes(lab)['n2']}:8080/", lab.host, hostnames(lab, "web"))
    result = churn(lab, url, STACK, "replicas: 2")   # a client loop (tests/loadloop.py) meanwhile
    with client_loop(lab, url) as result:           # the same around any change
        up(lab, OTHER_STACK)
"""
import contextlib
import json
import os
import subprocess
import time

from labkit import ROOT, SYSTEM_PYTHON, curl, sh

HOST_ADDRESS = "10.97.0.254"      # the test's host namespace on the lab's underlay
UP_TIMEOUT = 600 if os.environ.get("MESH_VM_GUEST") == "1" else 120   # the VM emulates its CPU


def up(lab, text: str, *extra: str, nodes: int = 3):
    path = lab.tmp / f"stack-{time.monotonic_ns()}.yaml"
    path.write_text(text.replace("@ECHO@", lab.echo))
    return lab.mesh("up", "-f", str(path), "--nodes", str(nodes), *extra, timeout=UP_TIMEOUT)


def nodes(lab) -> dict[str, str]:
    return {n["name"]: n["address"] for n in lab.json("node", "ls")}


def hostnames(lab, service: str) -> set[str]:
    return {t["hostname"] for t in lab.json("ps") if t["service"] == service}


def answers(url: str, netns: str, count: int) -> list[str]:
    out = []
    for _ in range(count):
        body = curl(url, netns)
        assert body.startswith("host="), body
        out.append(body.strip())
    return out


def spread(url: str, netns: str, want: set[str], at_most: int = 40) -> list[str]:
    """Answers from `url` until every host of `want` answered (or `at_most` of them): a random
    balancer may repeat itself, so a fixed small sample would make the test flaky."""
    got = []
    while len(got) < at_most and {a.split()[0][5:] for a in got} != want:
        got += answers(url, netns, 1)
    return got


def udp_ask(netns: str, address: str, port: int, source_port: int = 0) -> str:
    code = ("import socket;s=socket.socket(2,2);s.settimeout(2);"
            f"s.bind(('0.0.0.0',{source_port}));s.connect(('{address}',{port}));s.send(b'x');"
            "print(s.recv(100).decode())")     # connected: a reply from another address is refused
    for _ in range(20):
        proc = sh([SYSTEM_PYTHON, "-c", code], netns, check=False)
        if proc.returncode == 0:
            return proc.stdout.strip()
        time.sleep(0.2)
    raise AssertionError(f"no UDP answer from {address}:{port}: {proc.stderr}")


@contextlib.contextmanager
def client_loop(lab, url: str):
    """A client loop (tests/loadloop.py: a new connection to `url` every 20 ms) runs 0.5 s before,
    during and 0.5 s after the block; the dict yielded holds its result ({"ok", "failed",
    "errors", "hosts"}) once the block is over."""
    run = time.monotonic_ns()            # files of their own: a test may run several loops
    stop, out = lab.tmp / f"stop-{run}", lab.tmp / f"loop-{run}.json"
    proc = subprocess.Popen(["ip", "netns", "exec", lab.host, SYSTEM_PYTHON,
                             str(ROOT / "tests" / "loadloop.py"), url, str(stop), str(out)])
    result: dict = {}
    try:
        time.sleep(0.5)
        yield result
        time.sleep(0.5)
    finally:
        stop.touch()
        proc.wait(30)
        result.update(json.loads(out.read_text()))


def churn(lab, url: str, stack: str, replicas: str, nodes: int = 3) -> dict:
    """The client loop's result while `web` of `stack` (with @GEN@ in its environment) scales to 5,
    then to 1, then is brought up twice with 3 replicas (`replicas` replaced), a new generation each
    time, so every task is replaced. result["phases"]: when each step began (time.time(), as the
    loop's errors are stamped)."""
    phases = []
    with client_loop(lab, url) as result:
        phases.append(("scale 5", time.time()))
        lab.mesh("service", "scale", "web=5")
        time.sleep(0.5)
        phases.append(("scale 1", time.time()))
        lab.mesh("service", "scale", "web=1")
        time.sleep(0.5)
        phases.append(("generation 2", time.time()))
        up(lab, stack.replace("@GEN@", "2").replace(replicas, "replicas: 3"), nodes=nodes)
        time.sleep(0.5)
        phases.append(("generation 3", time.time()))
        up(lab, stack.replace("@GEN@", "3").replace(replicas, "replicas: 3"), nodes=nodes)
        phases.append(("done", time.time()))
    result["phases"] = [f"{t:.3f} {name}" for name, t in phases]
    return result
