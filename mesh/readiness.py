"""Which of a node's tasks take traffic, and whether a leaving task still holds connections.

    r = own_readiness(desired, "n1", supervisor)   # Readiness: r.ready, r.alive, r.takes(task, port)
    established_connections(pid, addresses)   # TCP connections a task still serves (for draining)

A task is alive while its process runs. It is ready when alive and, if it has a healthcheck,
healthy. A ready task with no healthcheck whose service publishes TCP ports may not listen on all
of them yet (read from /proc/<pid>/net/tcp — the task's own namespace): `missing` names the target
ports it does not listen on, so a balancer never sends a connection to a port nobody has bound yet
(a published port waits for its own target; a VIP waits for any). `waiting` says some task misses
a port: the caller polls again shortly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_address

from mesh.state import DesiredState

TCP_LISTEN, TCP_ESTABLISHED, TCP_SYN_RECV = "0A", "01", "03"


def _sockets(pid: int):
    """(local address, local port, state) of every TCP socket in the namespace of `pid`."""
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4:
                continue
            address, port = fields[1].split(":")
            yield address, int(port, 16), fields[3]


def listening_ports(pid: int) -> set[int]:
    return {port for _, port, state in _sockets(pid) if state == TCP_LISTEN}


def _ipv4_of(hex_address: str) -> str | None:
    if len(hex_address) == 8:
        return str(ip_address(bytes.fromhex(hex_address)[::-1]))
    if hex_address.startswith("0000000000000000FFFF0000"):       # ::ffff:a.b.c.d
        return str(ip_address(bytes.fromhex(hex_address[24:])[::-1]))
    return None


def established_connections(pid: int, addresses: set[str]) -> int:
    """Connections the task serves: accepted or being accepted on one of its listening ports, on
    any of `addresses`, in the namespace of `pid` (its own outgoing connections do not count)."""
    sockets = list(_sockets(pid))
    listening = {port for _, port, state in sockets if state == TCP_LISTEN}
    return sum(1 for address, port, state in sockets
               if state in (TCP_ESTABLISHED, TCP_SYN_RECV) and port in listening
               and _ipv4_of(address) in addresses)


@dataclass
class Readiness:
    """Who takes traffic: ready (running, healthy if checked), alive (running), and the published
    TCP target ports a ready task does not listen on yet (task -> (absent ports, all its targets))."""
    ready: set[str] = field(default_factory=set)
    alive: set[str] = field(default_factory=set)
    missing: dict[str, tuple[frozenset[int], frozenset[int]]] = field(default_factory=dict)

    def takes(self, task: str, port: int | None = None) -> bool:
        """New connections to `task` on target `port` (None: a VIP, any port: it must listen on
        at least one of its published ports)."""
        if task not in self.ready:
            return False
        absent, targets = self.missing.get(task, (frozenset(), frozenset()))
        if port is None:
            return not absent or absent != targets
        return port not in absent

    def add_report(self, task: str, report: dict) -> None:
        """One task as its agent reported it to the store (mesh.nodeagent's status keys)."""
        if report.get("state") == "running":
            self.alive.add(task)
        if report.get("ready"):
            self.ready.add(task)
        if report.get("missing"):
            self.missing[task] = (frozenset(report["missing"]), frozenset(report.get("targets", ())))

    def merge(self, other: "Readiness") -> "Readiness":
        return Readiness(self.ready | other.ready, self.alive | other.alive,
                         {**self.missing, **other.missing})


def own_readiness(desired: DesiredState, node: str, sup) -> Readiness:
    out = Readiness()
    for name, task in desired.on_node(node).items():
        status = sup.status(name)
        if status.get("state") != "running":
            continue
        out.alive.add(name)
        health = status.get("health", "none")
        if health not in ("none", None):
            if health == "healthy":
                out.ready.add(name)
            continue
        out.ready.add(name)
        svc = desired.services.get(task.service)
        targets = frozenset(p.target for p in svc.ports if p.protocol == "tcp") if svc else frozenset()
        if targets and status.get("pid"):
            absent = targets - listening_ports(status["pid"])
            if absent:
                out.missing[name] = (frozenset(absent), targets)
    return out
