"""`mesh up -f F --nodes N --store etcd://HOST:PORT`: the lab of `mesh up --nodes N` (node
namespaces on an underlay bridge, the host namespace at 10.97.0.254), with a `mesh manager` and N
`mesh agent`s as separate processes against that etcd instead of one daemon on the embedded store.

    start(host_netns, 3, "etcd://10.97.0.254:2379", "auto")   # MeshError (all undone) on failure
    load(host_netns)            # the running lab's record, or None
    stop(host_netns)            # `mesh down`: agents and manager by PID, sandboxes, namespaces

The manager runs in the host namespace and serves the CLI's socket for it (--host-netns); each
agent runs inside its node's namespace (`nsenter --net`, not `ip netns exec`: see mesh.nodeagent),
n1 with --role manager. The etcd must answer at the URL from the host namespace and from every
node, e.g. an etcd inside the host namespace listening on 0.0.0.0 (or 10.97.0.254) and
--store etcd://10.97.0.254:PORT. What was started is recorded in <run dir>/etcdlab.json (PIDs with
their start times, so a reused PID is never signalled); logs go to <run dir>/manager.log and
agent-<node>.log, the agents' files to <run dir>/agents/.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from mesh.errors import MeshError
from mesh.lab import LabNode, make_lab, remove_lab
from mesh.netlink import Netlink
from mesh.paths import Paths
from mesh.runtime import kill_leftovers, start_time

START_TIMEOUT = float(os.environ.get("MESH_START_TIMEOUT", "60"))
STOP_TIMEOUT = 20.0


def state_path(host_netns: str | None) -> str:
    return os.path.join(Paths.for_host(host_netns).root, "etcdlab.json")


def agents_dir(host_netns: str | None) -> str:
    return os.path.join(Paths.for_host(host_netns).root, "agents")


def load(host_netns: str | None) -> dict | None:
    try:
        with open(state_path(host_netns)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _save(host_netns: str | None, state: dict) -> None:
    tmp = state_path(host_netns) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, state_path(host_netns))


def _enter(netns: str | None) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []


def _spawn(state: dict, key: str, netns: str | None, args: list[str], env: dict) -> None:
    root = Paths.for_host(state["host"]).root
    with open(os.path.join(root, f"{key}.log"), "ab") as log:
        proc = subprocess.Popen(_enter(netns) + [sys.executable, "-m", "mesh", *args],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env={**os.environ, "PYTHONSAFEPATH": "1", **env},
                                start_new_session=True)
    state["procs"][key] = [proc.pid, start_time(proc.pid)]
    _save(state["host"], state)


def _alive(entry) -> bool:
    """The process we started still runs (not a PID reused since, not a zombie)."""
    pid, started = entry
    if not started or start_time(pid) != started:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)          # ours (mesh up started it): reap it
                return False
    except OSError:
        return False
    return True


def _log_tail(host_netns: str | None, key: str, lines: int = 3) -> str:
    try:
        with open(os.path.join(Paths.for_host(host_netns).root, f"{key}.log"),
                  errors="replace") as f:
            return " | ".join(line.strip() for line in f.read().splitlines()[-lines:])
    except OSError:
        return ""


def start(host_netns: str | None, count: int, url: str, lb: str, ping, nodes_ready) -> None:
    """Make the lab and start its daemons; `ping()` is the manager's /v1/ping answer or None,
    `nodes_ready()` the number of nodes it sees ready. MeshError (everything undone) on failure."""
    if not url.startswith("etcd://"):
        raise MeshError(f"--store {url}: a lab of separate daemons shares an etcd: "
                        f"--store etcd://HOST:PORT")
    root = Paths.for_host(host_netns).root
    os.makedirs(root, exist_ok=True)
    nl = Netlink()
    state = {"host": host_netns, "store": url, "made_host": bool(host_netns) and
             not nl.netns_exists(host_netns), "nodes": [], "procs": {}}
    _save(host_netns, state)
    try:
        lab = make_lab(host_netns, count, nl)
        state["nodes"] = [[n.name, n.netns, n.address] for n in lab]
        _save(host_netns, state)
        _spawn(state, "manager", host_netns, ["manager", "--store", url, "--node-name", "m1"] +
               (["--host-netns", host_netns] if host_netns else []), {})
        _wait(host_netns, state, lambda: (ping() or {}).get("leading"), "the manager to lead")
        for i, n in enumerate(lab):
            _spawn(state, f"agent-{n.name}", n.netns,
                   ["agent", "--store", url, "--node-name", n.name, "--address", n.address] +
                   (["--role", "manager"] if i == 0 else []),
                   {"MESH_RUN_DIR": agents_dir(host_netns), "MESH_LB": lb})
        _wait(host_netns, state, lambda: nodes_ready() >= count, f"{count} nodes to register")
    except BaseException:
        stop(host_netns)
        raise


def _wait(host_netns, state: dict, predicate, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not predicate():
        for key, entry in state["procs"].items():
            if not _alive(entry):
                raise MeshError(f"the lab's {key.replace('-', ' ')} exited: "
                                f"{_log_tail(host_netns, key) or 'no output'}")
        if time.monotonic() > deadline:
            raise MeshError(f"timed out after {START_TIMEOUT:.0f}s waiting for {what}; see the logs "
                            f"in {Paths.for_host(host_netns).root}")
        time.sleep(0.1)


def _signal(entry, sig: int) -> None:
    if _alive(entry):
        try:
            os.kill(entry[0], sig)
        except ProcessLookupError:
            pass


def _wait_exit(entries: list, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(e) for e in entries):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(host_netns: str | None) -> list[str]:
    """Stop the lab's processes (agents first: each removes what it made and leaves the store),
    then remove what is left and the namespaces. Returns what it did."""
    state = load(host_netns)
    if state is None:
        return []
    done = []
    procs = state["procs"]
    agents = [e for k, e in procs.items() if k.startswith("agent-")]
    others = [e for k, e in procs.items() if not k.startswith("agent-")]
    for group in (agents, others):
        for entry in group:
            _signal(entry, signal.SIGTERM)
        if not _wait_exit(group, STOP_TIMEOUT):
            for entry in group:
                _signal(entry, signal.SIGKILL)
            _wait_exit(group, 5)
    done.append(f"{len(agents)} agents and the manager stopped")
    nl = Netlink()
    nodes = [LabNode(*n) for n in state["nodes"]]
    for node in nodes:
        kill_leftovers(os.path.join(agents_dir(host_netns), f"node-{node.name}", "logs"))
        for ns in nl.list_netns(f"{node.netns}-"):
            nl.delete_netns(ns)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    if nodes:
        remove_lab(host_netns, nodes, nl)
        done.append(f"{len(nodes)} node namespaces removed")
    if state.get("made_host") and host_netns:
        nl.delete_netns(host_netns)
    shutil.rmtree(agents_dir(host_netns), ignore_errors=True)
    os.unlink(state_path(host_netns))
    return done
