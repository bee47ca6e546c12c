"""JSON views of tasks and networks for the API and `--json` listings (pure)."""
from __future__ import annotations

from mesh.lb.dsr import wants_dsr
from mesh.state import DesiredState, NetworkState, TaskState

PSEUDO_NETWORKS = ({"name": "host", "driver": "host", "subnet": None, "gateway": None,
                    "internal": False, "builtin": True, "tasks": []},
                   {"name": "none", "driver": "null", "subnet": None, "gateway": None,
                    "internal": False, "builtin": True, "tasks": []})


def task_view(task: TaskState, status: dict, desired: DesiredState, waiting: str | None = None) -> dict:
    """A task as the API shows it; `waiting`: what keeps it, running, from new connections
    (mesh.controller.Controller.waiting)."""
    ports = [f"{p.host_ip + ':' if p.host_ip else ''}{p.published}->{p.target}/{p.protocol}"
             for p in desired.publications if p.service == task.service]
    return {
        "name": task.name, "id": task.id, "service": task.service, "slot": task.slot,
        "node": task.node or None,
        "state": status["state"], "pid": status["pid"], "exit_code": status["exit_code"],
        "restarts": status["restarts"], "health": status.get("health", "none"),
        "health_failing_streak": status.get("health_failing_streak", 0),
        "health_log": status.get("health_log", []),
        "network_mode": task.netmode, "sandbox": task.sandbox,
        "hostname": task.hostname, "ports": ports,
        "networks": {e.network: {"ifname": e.ifname, "address": e.address,
                                 "prefixlen": e.prefixlen, "aliases": list(e.aliases),
                                 "gateway": e.default_gateway} for e in task.endpoints},
        "environment": dict(task.environment), "command": list(task.command),
        "restart": task.restart, "workdir": task.workdir,
        "healthcheck": _healthcheck_view(task), "waiting": waiting,
    }


def _healthcheck_view(task: TaskState) -> dict | None:
    check = task.healthcheck
    return None if check is None else {
        "test": list(check.test), "interval": check.interval, "timeout": check.timeout,
        "retries": check.retries, "start_period": check.start_period}


def network_view(net: NetworkState, desired: DesiredState) -> dict:
    return {
        "name": net.name, "driver": net.driver, "subnet": net.subnet, "gateway": net.gateway,
        "ip_range": net.ip_range, "internal": net.internal, "builtin": net.builtin,
        "link": net.link, "parent": net.parent,
        "embedded_dns": not net.builtin,
        "vips": {s: a for s, n, a in desired.vips if n == net.name},
        "tasks": [{"name": t.name, "address": e.address, "ifname": e.ifname}
                  for t, e in desired.endpoints_on(net.name)],
    }


def network_list(desired: DesiredState) -> list[dict]:
    return [network_view(n, desired) for n in desired.networks.values()] + list(PSEUDO_NETWORKS)


def service_list(desired: DesiredState, status) -> list[dict]:
    """`mesh service ls` / `ps`: each service with its tasks (running or not) and pending tasks."""
    out = []
    for name, svc in desired.services.items():
        tasks = [t for t in desired.tasks.values() if t.service == name]
        statuses = {t.name: status(t.name) for t in tasks}
        states = {n: s["state"] for n, s in statuses.items()}
        pending = [{"name": task, "reason": reason} for s, task, reason in desired.pending if s == name]
        out.append({
            "name": name, "mode": svc.mode,
            "replicas": len(tasks) + len(pending) if svc.mode == "global" else svc.replicas,
            "running": sum(1 for s in states.values() if s == "running"),
            "ports": sorted({f"{p.published}->{p.target}/{p.protocol}"
                             for p in desired.publications if p.service == name}),
            "vips": {n: a for s, n, a in desired.vips if s == name},
            "published": [{"published": p.published, "target": p.target, "protocol": p.protocol,
                           "mode": p.mode, "host_ip": p.host_ip,
                           "dsr": p.mode == "ingress" and wants_dsr(desired, name)}
                          for p in desired.publications if p.service == name],
            "tasks": [{"name": t.name, "node": t.node or None, "state": states[t.name],
                       "health": statuses[t.name].get("health", "none"),
                       "addresses": {e.network: e.address for e in t.endpoints}} for t in tasks],
            "pending": pending,
        })
    return out
