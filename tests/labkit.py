"""Helpers for kernel tests: run commands in namespaces, a `Lab` (a host namespace of the test's own,
a private MESH_RUN_DIR, the `mesh` CLI, client namespaces), curl with a bounded retry.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
ECHO = str(ROOT / "examples" / "echo_server.py")
DNS_STUB = str(ROOT / "tests" / "dnsstub.py")
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def sh(argv: list[str], netns: str | None = None, check: bool = True, timeout: float = 30,
       **kw) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", netns] if netns else []) + argv
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{full} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def leftovers() -> set[str]:
    out = set()
    for line in sh(["ip", "netns", "list"]).stdout.splitlines():
        if line.startswith("mesh-"):
            out.add("netns " + line.split()[0])
    for line in sh(["ip", "-o", "link", "show"]).stdout.splitlines():
        name = line.split(": ")[1].split("@")[0]
        if name.startswith("mh"):
            out.add("link " + name)
    tables = sh(["nft", "list", "tables"], check=False).stdout.split("\n")
    out |= {"table " + t for t in tables if t.strip().endswith(" mesh")}
    return out


class Lab:
    """One test's private world: host namespace `mesh-t…`, run dir, CLI, client namespaces."""

    def __init__(self, tmp: Path):
        self.tag = secrets.token_hex(3)
        self.host = f"mesh-t{self.tag}"
        self.env = {**os.environ, "MESH_RUN_DIR": str(tmp / "run"), "PYTHONSAFEPATH": "1"}
        self.extra_ns: list[str] = []
        self.echo = f"{SYSTEM_PYTHON} {ECHO}"
        self.tmp = tmp
        sh(["ip", "netns", "add", self.host])
        sh(["ip", "link", "set", "lo", "up"], self.host)
        # The host namespace's own resolv.conf: a search list and no nameserver, so nothing a test
        # does can forward DNS to this machine's resolver; tests that forward give `dns:` a stub.
        self.etc = Path("/etc/netns") / self.host
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "resolv.conf").write_text("search lab.test\n")

    def mesh_argv(self) -> list[str]:
        return [sys.executable, "-m", "mesh", "--host-netns", self.host]

    def mesh(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run([*self.mesh_argv(), *args],
                                  capture_output=True, text=True, env=self.env, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"mesh {' '.join(args)} did not return within {timeout:.0f} s; "
                                 f"the daemon's log ends:\n{self.daemon_dump()}") from exc
        if check and proc.returncode != 0:
            raise AssertionError(f"mesh {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def up(self, yaml_text: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """mesh up with this stack; `args`: more options (`--wait 0` for stacks whose tasks are
        meant never to be all ready: mesh up would show progress for its 60 s)."""
        path = self.tmp / f"stack-{secrets.token_hex(2)}.yaml"
        path.write_text(yaml_text.replace("@ECHO@", f"{SYSTEM_PYTHON} {ECHO}"))
        return self.mesh("up", "-f", str(path), *args, check=check)

    def daemon_dump(self, lines: int = 400) -> str:
        """Ask the daemon to log what each of its tasks waits on (SIGUSR1, mesh.dumps), then
        return the end of its log: what a hung command was waiting for."""
        run = Path(self.env["MESH_RUN_DIR"]) / self.host
        try:
            os.kill(int((run / "daemon.pid").read_text()), signal.SIGUSR1)
            time.sleep(1.0)
        except (OSError, ValueError) as exc:
            return f"(no daemon to ask: {exc})"
        try:
            return "\n".join((run / "daemon.log").read_text().splitlines()[-lines:])
        except OSError as exc:
            return f"(no daemon log: {exc})"

    def json(self, *args: str):
        import json
        return json.loads(self.mesh(*args, "--json").stdout)

    def task(self, name: str) -> dict:
        import json
        return json.loads(self.mesh("inspect", name).stdout)

    def exec(self, task: str, *argv: str, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess:
        return self.mesh("exec", task, "--", *argv, check=check, timeout=timeout)

    def netns(self, role: str) -> str:
        name = f"mesh-t{self.tag}{role}"
        sh(["ip", "netns", "add", name])
        sh(["ip", "link", "set", "lo", "up"], name)
        self.extra_ns.append(name)
        return name

    def client(self, subnet_octet: int = 1) -> tuple[str, str]:
        """A namespace joined to the host namespace by a veth: (client netns, host's address)."""
        ns = self.netns(f"c{subnet_octet}")
        host_if, peer_if = f"mhc{self.tag}{subnet_octet}", "eth0"
        sh(["ip", "link", "add", host_if, "netns", self.host, "type", "veth", "peer", "name", peer_if,
            "netns", ns])
        base = f"10.250.{subnet_octet}"
        sh(["ip", "addr", "add", f"{base}.1/24", "dev", host_if], self.host)
        sh(["ip", "link", "set", host_if, "up"], self.host)
        sh(["ip", "addr", "add", f"{base}.2/24", "dev", peer_if], ns)
        sh(["ip", "link", "set", peer_if, "up"], ns)
        sh(["ip", "route", "add", "default", "via", f"{base}.1"], ns)
        return ns, f"{base}.1"

    def close(self) -> None:
        self.mesh("down", check=False)
        for ns in self.extra_ns + [self.host]:
            sh(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(self.etc, ignore_errors=True)


def wait_for(predicate, bound: float = 20.0, what: str | None = None):
    """Poll `predicate` every 0.1 s until it returns something true or `bound` seconds passed;
    returns its last value, or raises naming `what` when given and it never came true."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    value = predicate()
    if what is not None and not value:
        raise AssertionError(f"timed out after {bound:.0f}s waiting for {what}")
    return value


def curl(url: str, netns: str | None, tries: float = 5.0, max_time: float = 2.0) -> str:
    """GET url from netns, retrying until it answers or `tries` seconds passed; returns the body."""
    deadline = time.monotonic() + tries
    while True:
        proc = sh(["curl", "-sS", "--max-time", str(max_time), url], netns, check=False)
        if proc.returncode == 0 or time.monotonic() > deadline:
            return proc.stdout if proc.returncode == 0 else f"FAILED: {proc.stderr.strip()}"
        time.sleep(0.1)


def no_connect(url: str, netns: str | None) -> bool:
    """True when url cannot be reached from netns (connection times out or is refused)."""
    return sh(["curl", "-sS", "--max-time", "1", url], netns, check=False).returncode != 0


class Background:
    """A process a test starts in a namespace and stops by its own PID: `with Background(ns, argv):`."""

    def __init__(self, netns: str | None, argv: list[str]):
        full = (["ip", "netns", "exec", netns] if netns else []) + argv
        self.proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def http_server(netns: str, address: str, port: int = 8000) -> Background:
    return Background(netns, [SYSTEM_PYTHON, "-m", "http.server", str(port), "--bind", address])
