"""A cluster of separate processes for tests and bench/converge: a real etcd, lab node namespaces,
one `mesh agent` per node inside its namespace, `mesh manager`s, the CLI pointed at a manager.

    with EtcdLab(tmp, host="mesh-t1a2b3c", nodes=3, ttl=3) as c:
        c.start_agent("n1"); c.start_manager("m1"); c.wait_ready()
        c.cli("m1", "up", "-f", path); c.tasks("m1")

etcd runs inside the host namespace on the underlay bridge's address (10.97.0.254), where every
node reaches it; agents and managers are started with `nsenter --net=/run/netns/NS`, which enters
only the network namespace (`ip netns exec` would also give them a private mount namespace, and
the sandboxes an agent names would be visible to it alone). Every process is started and stopped
by its PID; close() removes every process, namespace and file it made, even after a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mesh.lab import HOST_ADDRESS, make_lab, remove_lab
from mesh.netlink import Netlink
from mesh.runtime import kill_leftovers

from store_etcd import EtcdServer


def enter(netns: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}"]


# run a command with /run/netns empty (a private mount namespace: nothing leaks to the host's)
HIDE_NETNS = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount -t tmpfs mesh-elsewhere /run/netns && exec "$0" "$@"']



class NetnsEtcd(EtcdServer):
    """EtcdServer listening on the lab's host address inside the host namespace."""

    def __init__(self, workdir: Path, netns: str):
        super().__init__(workdir)
        self.netns = netns

    @property
    def endpoint(self) -> str:
        return f"{HOST_ADDRESS}:{self.client_port}"

    @property
    def probed(self) -> str:
        return self.endpoint

    def argv(self) -> list[str]:
        local = f"127.0.0.1:{self.client_port}"
        argv = [a.replace(local, self.endpoint) for a in super().argv()]
        return enter(self.netns) + argv

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log_tail()}")
            probe = subprocess.run(enter(self.netns) + ["curl", "-s", "--max-time", "1",
                                                        f"http://{self.probed}/health"],
                                   capture_output=True, text=True)
            if '"health":"true"' in probe.stdout.replace(" ", ""):
                return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"etcd did not become healthy in {timeout}s:\n{self.log_tail()}")


class HostEtcd(NetnsEtcd):
    """EtcdServer inside a namespace made before any lab (mesh up --store makes the lab):
    listening on every address there, so 10.97.0.254 answers once the lab's bridge has it."""

    def argv(self) -> list[str]:
        local = f"http://127.0.0.1:{self.client_port}"
        argv = EtcdServer.argv(self)
        at = argv.index("--listen-client-urls") + 1
        argv[at] = argv[at].replace(local, f"http://0.0.0.0:{self.client_port}")
        return enter(self.netns) + argv

    @property
    def probed(self) -> str:
        return f"127.0.0.1:{self.client_port}"         # the lab's bridge is not there yet


class EtcdLab:
    def __init__(self, tmp: Path, host: str, nodes: int = 3, ttl: float = 3.0):
        self.tmp, self.host, self.ttl = Path(tmp), host, ttl
        self.nl = Netlink()
        self.procs: dict[str, subprocess.Popen] = {}
        self.nodes = []
        self.etcd: NetnsEtcd | None = None
        self.count = nodes
        self.agent_run = self.tmp / "agents"

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "EtcdLab":
        try:
            self.nodes = make_lab(self.host, self.count, self.nl)
            self.etcd = NetnsEtcd(self.tmp / "etcd", self.host)
            self.etcd.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"etcd://{self.etcd.endpoint}"

    def env(self, run_dir: Path) -> dict:
        return {**os.environ, "MESH_RUN_DIR": str(run_dir), "PYTHONSAFEPATH": "1",
                "MESH_LEASE_TTL": str(self.ttl)}

    def node(self, name: str):
        return next(n for n in self.nodes if n.name == name)

    def _spawn(self, key: str, netns: str, args: list[str], run_dir: Path,
               wrap: list[str] = ()) -> subprocess.Popen:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.tmp / f"{key}.log", "ab") as log:
            proc = subprocess.Popen(enter(netns) + [*wrap, sys.executable, "-m", "mesh", *args],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=self.env(run_dir), start_new_session=True)
        self.procs[key] = proc
        return proc

    def start_agent(self, name: str, *extra: str) -> subprocess.Popen:
        node = self.node(name)
        return self._spawn(f"agent-{name}", node.netns,
                           ["agent", "--store", self.url, "--node-name", name,
                            "--address", node.address, *extra], self.agent_run)

    def start_manager(self, name: str, elsewhere: bool = False) -> subprocess.Popen:
        """A manager in the lab's host namespace; `elsewhere`: as on another machine, it cannot
        see the node namespaces (a private mount namespace with an empty /run/netns)."""
        return self._spawn(f"manager-{name}", self.host,
                           ["manager", "--store", self.url, "--node-name", name],
                           self.tmp / name, HIDE_NETNS if elsewhere else [])

    def kill(self, key: str, sig: int = signal.SIGKILL, wait: float = 15.0) -> None:
        """Signal a process by its PID and wait for it (SIGKILL if it outlives `wait`)."""
        proc = self.procs.get(key)
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:       # it outlived the signal: SIGKILL
            self.kill(key, signal.SIGKILL, 5)

    def agent_logs(self, name: str) -> str:
        return str(self.agent_run / f"node-{name}" / "logs")

    def kill_node(self, name: str) -> None:
        """A node dies: its agent (SIGKILL), its task processes, its sandboxes, its namespace."""
        self.kill(f"agent-{name}")
        kill_leftovers(self.agent_logs(name))
        netns = self.node(name).netns
        for ns in self.nl.list_netns(f"{netns}-"):
            self.nl.delete_netns(ns)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        self.nl.delete_netns(netns)

    def close(self) -> None:
        for key in [k for k in self.procs if k.startswith("agent-")]:
            self.kill(key, signal.SIGTERM)        # an agent removes what it made
        for key in list(self.procs):
            self.kill(key, signal.SIGTERM)
        for node in self.nodes:
            kill_leftovers(self.agent_logs(node.name))
            for ns in self.nl.list_netns(f"{node.netns}-"):
                self.nl.delete_netns(ns)
                shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        if self.nodes:
            remove_lab(self.host, self.nodes, self.nl)
        if self.etcd is not None:
            self.etcd.stop()

    # -- the CLI against a manager ----------------------------------------------------------
    def cli(self, manager: str, *args: str, check: bool = True, timeout: float = 60):
        proc = subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True, text=True,
                              env=self.env(self.tmp / manager), timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"mesh {' '.join(args)} (manager {manager}) exited "
                                 f"{proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n{self.logs()}")
        return proc

    def json(self, manager: str, *args: str):
        return json.loads(self.cli(manager, *args, "--json").stdout)

    def ping(self, manager: str) -> dict | None:
        sock = self.tmp / manager / "root" / "api.sock"
        if not sock.exists():
            return None
        proc = subprocess.run(["curl", "-s", "--max-time", "2", "--unix-socket", str(sock),
                               "http://mesh/v1/ping"], capture_output=True, text=True)
        return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout else None

    def tasks(self, manager: str) -> dict[str, dict]:
        return {t["name"]: t for t in self.json(manager, "ps")}

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")
            time.sleep(0.1)

    def wait_leader(self, manager: str, timeout: float = 20.0) -> None:
        self.wait(lambda: (self.ping(manager) or {}).get("leading"), timeout, f"{manager} to lead")

    def wait_nodes(self, manager: str, ready: set[str], timeout: float = 20.0) -> list[dict]:
        def check():
            nodes = self.json(manager, "node", "ls")
            return nodes if {n["name"] for n in nodes if n["state"] == "ready"} == ready else None
        return self.wait(check, timeout, f"nodes {sorted(ready)} ready")

    def wait_running(self, manager: str, names, timeout: float = 30.0) -> dict[str, dict]:
        def check():
            ts = self.tasks(manager)
            return ts if all(ts.get(n, {}).get("state") == "running" for n in names) else None
        return self.wait(check, timeout, f"tasks {sorted(names)} running")

    def logs(self, lines: int = 15) -> str:
        out = []
        for path in sorted(self.tmp.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)
