"""The `mesh` command line. Every listing takes --json; errors print one clear message, exit 1.

    mesh up -f stack.yaml [--nodes N] [--host-netns NAME]    mesh ps | mesh network ls | mesh inspect TASK
    mesh up -f stack.yaml --nodes N --store etcd://HOST:PORT  (the lab's manager and agents as processes)
    mesh node ls    mesh service ls | ps SVC | scale SVC=N | rm SVC
    mesh logs TASK    mesh exec TASK -- CMD...    mesh network connect|disconnect NET TASK
    mesh network inspect NET    mesh down
    mesh manager --store etcd://HOST:PORT [--node-name M]     (a cluster's manager daemon)
    mesh agent --store etcd://HOST:PORT --node-name N --address A [--role R] [--label K=V]...
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from mesh.client import Api
from mesh.errors import MeshError
from mesh.lb.base import LB_CHOICES
from mesh.runtime import exec_argv, task_env
from mesh.spec import load_stack_file, stack_to_dict
from mesh.state import TaskState


def _table(rows: list[list[str]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _print_tasks(tasks: list[dict]) -> None:
    rows = [[t["name"], t["node"] or "-", t["state"], t.get("health", "none"), t["pid"] or "-",
             t["network_mode"],
             ",".join(f"{n}={v['address']}" for n, v in t["networks"].items()) or "-",
             ",".join(t["ports"]) or "-"] for t in tasks]
    print(_table(rows, ["TASK", "NODE", "STATE", "HEALTH", "PID", "MODE", "ADDRESSES", "PORTS"]))


def _emit(args, data, printer) -> None:
    print(json.dumps(data, indent=2)) if args.json else printer(data)


def cmd_up(args, api: Api) -> int:
    stack = load_stack_file(args.file)
    for warning in stack.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    started = _ensure_store_lab(args, api) if args.store else _ensure_daemon(args, api)
    status, data = api.call("POST", "/v1/up", {"stack": stack_to_dict(stack)})
    if status >= 300:
        if started:
            api.call("POST", "/v1/down")
            if args.store:
                from mesh import etcdlab
                etcdlab.stop(api.host)
        raise MeshError(data["error"] if isinstance(data, dict) else str(data))
    if args.json:
        _emit(args, data["tasks"], _print_tasks)
        return 0
    _wait_ready(api, args.wait, bool(data["tasks"]))
    _print_summary(api, api.checked("GET", "/v1/ping").get("nodes") or args.nodes or 0)
    _warn_not_running(api)
    return 0


def _ensure_daemon(args, api: Api) -> bool:
    from mesh import etcdlab
    lab = etcdlab.load(api.host)
    if lab is not None:
        raise MeshError(f"a lab on {lab['store']} runs here (mesh up --store): `mesh down` first, "
                        f"or give the same --store and --nodes")
    return api.ensure_daemon(args.nodes, args.lb)


def _ensure_store_lab(args, api: Api) -> bool:
    """`--store`: a lab whose manager and agents are separate processes on that etcd
    (mesh.etcdlab); True when this call started it."""
    from mesh import etcdlab
    if not args.nodes:
        raise MeshError("--store runs the lab's manager and agents as separate daemons on that etcd: "
                        "give --nodes N too (on real hosts, run mesh manager and mesh agent)")
    lab = etcdlab.load(api.host)
    if lab is not None and api.running():
        if lab["store"] != args.store or len(lab["nodes"]) != args.nodes:
            raise MeshError(f"a lab of {len(lab['nodes'])} nodes on {lab['store']} runs here: "
                            f"`mesh down` first to start another")
        return False
    if lab is not None:                       # its manager is gone: start it afresh
        etcdlab.stop(api.host)
    elif api.running():
        raise MeshError("a mesh daemon (no --store) already runs here: `mesh down` first")

    def ping():
        return api.call("GET", "/v1/ping")[1] if api.running() else None

    def ready() -> int:
        status, nodes = api.call("GET", "/v1/nodes")
        return sum(n["state"] == "ready" for n in nodes) if status == 200 else 0

    print(f"mesh: starting a manager and {args.nodes} agents on {args.store}", file=sys.stderr)
    etcdlab.start(api.host, args.nodes, args.store, args.lb or "auto", ping, ready)
    return True


def _not_ready(task: dict) -> str | None:
    """What a task still waits for, or None when it takes traffic (or has finished)."""
    if task["state"] == "exited":
        return None
    if task["state"] != "running":
        return task["state"]
    if task.get("health", "none") not in ("none", "healthy"):
        return f"health {task['health']}"
    return task.get("waiting")


def _warn_not_running(api: Api) -> None:
    """After the summary, on stderr: tasks that exited with an error and tasks no node can run."""
    for t in api.checked("GET", "/v1/tasks"):
        if t["state"] == "exited" and t.get("exit_code"):
            print(f"mesh: warning: {t['name']} exited with code {t['exit_code']} "
                  f"(mesh logs {t['name']} may say why)", file=sys.stderr)
    for svc in api.checked("GET", "/v1/services"):
        for p in svc.get("pending", []):
            print(f"mesh: warning: {p['name']} is pending: {p['reason']}", file=sys.stderr)


def _wait_ready(api: Api, timeout: float, expect_tasks: bool = True) -> None:
    """Progress on stderr until every task runs (and is healthy, if checked), or `timeout`; an
    error when the stack goes away meanwhile (the daemon stopped, or a mesh down ran)."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        tasks = api.checked("GET", "/v1/tasks")
        if expect_tasks and not tasks:
            raise MeshError("the stack went away while mesh up waited for it: the daemon was "
                            "stopped or mesh down ran")
        waiting = {t["name"]: w for t in tasks if (w := _not_ready(t))}
        exited = sum(t["state"] == "exited" for t in tasks)     # done: not waited for
        line = f"mesh: {len(tasks) - len(waiting) - exited}/{len(tasks)} tasks ready" + (
            f", {exited} exited" if exited else "") + (
            " (waiting: " + ", ".join(f"{n} {w}" for n, w in sorted(waiting.items())[:6]) +
            (", ..." if len(waiting) > 6 else "") + ")" if waiting else "")
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line
        if not waiting:
            return
        if time.monotonic() > deadline:
            print(f"mesh: not ready after {timeout:.0f}s (see the waiting list above; `mesh ps "
                  f"--json` shows each task's `waiting`)", file=sys.stderr)
            return
        time.sleep(0.2)


def _print_summary(api: Api, lab: int) -> None:
    """Tasks, services, nodes and where each published port answers."""
    _print_tasks(api.checked("GET", "/v1/tasks"))
    services = api.checked("GET", "/v1/services")
    print()
    _print_services(services)
    nodes = api.checked("GET", "/v1/nodes") if lab else []
    if nodes:
        print()
        _print_nodes(nodes)
    rows = []
    for svc in services:
        on = {t["node"] for t in svc["tasks"] if t["state"] == "running"}
        for p in svc.get("published", []):
            mode = p["mode"] + (" (dsr)" if p.get("dsr") and nodes else "")
            rows.append([svc["name"], f'{p["published"]}/{p["protocol"]}', p["target"], mode,
                         _answers_on(p, nodes, on)])
    if rows:
        print()
        print(_table(rows, ["SERVICE", "PUBLISHED", "TARGET", "MODE", "ANSWERS ON"]))


def _answers_on(port: dict, nodes: list[dict], on: set) -> str:
    """Where a published port answers: every node (ingress) or the nodes running a task (host),
    on the one address it is published on (host_ip) if it has one."""
    published, host_ip = port["published"], port.get("host_ip")
    if not nodes:
        return f"{host_ip}:{published}" if host_ip else "every address of the host"
    where = [n for n in nodes if port["mode"] == "ingress" or n["name"] in on]
    if not host_ip:
        return " ".join(f'{n["address"]}:{published}' for n in where)
    owner = [n for n in where if n["address"] == host_ip]
    if owner or any(n["address"] == host_ip for n in nodes):
        return f"{host_ip}:{published}" if owner else "nowhere (its node runs no task)"
    return f"{host_ip}:{published} on " + ("every node" if port["mode"] == "ingress" else
                                           " ".join(n["name"] for n in where) or "no node")


def cmd_down(args, api: Api) -> int:
    from mesh import etcdlab
    if etcdlab.load(api.host) is not None:
        if api.running():
            status, data = api.call("POST", "/v1/down")
            if status >= 300:
                print(f"mesh: the manager: {data['error'] if isinstance(data, dict) else data}",
                      file=sys.stderr)
            elif not api.wait_gone():
                print(f"mesh: {api.not_gone()}", file=sys.stderr)
        print("mesh: stack removed; " + ", ".join(etcdlab.stop(api.host)))
        return 0
    if api.running():
        status, data = api.call("POST", "/v1/down")
        if status >= 300:
            raise MeshError(data["error"] if isinstance(data, dict) else str(data))
        if not api.wait_gone():
            raise MeshError(api.not_gone())
        print("mesh: stack removed, daemon stopped")
    else:
        from mesh.sweep import sweep
        removed = sweep(api.host)
        print("mesh: no daemon was running; removed " + (", ".join(removed) or "nothing"))
    return 0


def cmd_ps(args, api: Api) -> int:
    _emit(args, api.checked("GET", "/v1/tasks"), _print_tasks)
    return 0


def _print_networks(nets: list[dict]) -> None:
    rows = [[n["name"], n["driver"], n["subnet"] or "-", n["gateway"] or "-",
             "yes" if n["internal"] else "no", len(n["tasks"])] for n in nets]
    print(_table(rows, ["NETWORK", "DRIVER", "SUBNET", "GATEWAY", "INTERNAL", "TASKS"]))


def cmd_network(args, api: Api) -> int:
    if args.action == "ls":
        _emit(args, api.checked("GET", "/v1/networks"), _print_networks)
    elif args.action == "inspect":
        print(json.dumps(api.checked("GET", f"/v1/networks/{args.network}"), indent=2))
    else:
        task = api.checked("POST", f"/v1/networks/{args.network}/{args.action}", {"task": args.task})
        print(f"{args.task}: {args.action}ed {'to' if args.action == 'connect' else 'from'} "
              f"{args.network}; networks now: {', '.join(task['networks']) or 'none'}")
    return 0


def _print_nodes(nodes: list[dict]) -> None:
    print(_table([[n["name"], n["address"], n["role"], n["state"], n["tasks"]] for n in nodes],
                 ["NODE", "ADDRESS", "ROLE", "STATE", "TASKS"]))


def cmd_node(args, api: Api) -> int:
    _emit(args, api.checked("GET", "/v1/nodes"), _print_nodes)
    return 0


def _print_services(services: list[dict]) -> None:
    print(_table([[s["name"], s["mode"], f'{s["running"]}/{s["replicas"]}', ",".join(s["ports"]) or "-",
                   ",".join(f"{n}={a}" for n, a in s["vips"].items()) or "-"] for s in services],
                 ["SERVICE", "MODE", "RUNNING", "PORTS", "VIPS"]))


def _print_service_tasks(service: dict) -> None:
    rows = [[t["name"], t["node"] or "-", t["state"], t.get("health", "none"),
             ",".join(f"{n}={a}" for n, a in t["addresses"].items()) or "-", ""] for t in service["tasks"]]
    rows += [[p["name"], "-", "pending", "-", "-", p["reason"]] for p in service["pending"]]
    print(_table(rows, ["TASK", "NODE", "STATE", "HEALTH", "ADDRESSES", "WHY PENDING"]))


def cmd_service(args, api: Api) -> int:
    if args.action == "ls":
        _emit(args, api.checked("GET", "/v1/services"), _print_services)
        return 0
    if args.action == "ps":
        found = [s for s in api.checked("GET", "/v1/services") if s["name"] == args.service]
        if not found:
            raise MeshError(f"no service named '{args.service}' (mesh service ls lists them)")
        _emit(args, found[0], _print_service_tasks)
        return 0
    if args.action == "scale":
        for item in args.pairs:
            name, sep, count = item.partition("=")
            if not sep or not count.isdigit():
                raise MeshError(f"mesh service scale: expected SERVICE=REPLICAS, got '{item}'")
            api.checked("POST", f"/v1/services/{name}/scale", {"replicas": int(count)})
            print(f"{name} scaled to {count}")
        return 0
    for name in args.services:
        api.checked("POST", f"/v1/services/{name}/rm")
        print(f"{name} removed")
    return 0


def cmd_inspect(args, api: Api) -> int:
    print(json.dumps(api.checked("GET", f"/v1/tasks/{args.task}"), indent=2))
    return 0


def cmd_logs(args, api: Api) -> int:
    sys.stdout.write(api.checked("GET", f"/v1/tasks/{args.task}/logs"))
    return 0


def cmd_exec(args, api: Api) -> int:
    command = args.command
    if "--" in command:                       # options may stand between TASK and --
        cut = command.index("--")
        _common(defaults=False).parse_args(command[:cut], namespace=args)
        command, api = command[cut + 1:], Api(args.host_netns)
    if not command:
        raise MeshError("mesh exec: give a command after the task name, e.g. mesh exec web.1 -- ip addr")
    info = api.checked("GET", f"/v1/tasks/{args.task}")
    task = TaskState(name=info["name"], id=info["id"], service=info["service"], slot=info["slot"],
                     netmode=info["network_mode"], sandbox=info["sandbox"], owns_sandbox=False,
                     hostname=info["hostname"], environment=tuple(info["environment"].items()))
    argv = exec_argv(task, api.host, info["pid"], command)
    if os.path.isdir(info.get("workdir") or ""):
        os.chdir(info["workdir"])
    os.execvpe(argv[0], argv, task_env(task))


def cmd_run(args, api: Api) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    task = api.checked("POST", "/v1/run", {"name": args.name, "network": args.network,
                                           "command": command, "node": args.node})
    _emit(args, [task], _print_tasks)
    return 0


def _serve(serve, *args) -> int:
    """Run a daemon's `serve(*args)`, logging to stderr; kill -USR1 logs what it waits on."""
    from mesh import dumps

    async def main():
        dumps.install()
        await serve(*args)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main())
    return 0


def cmd_daemon(args, api: Api) -> int:
    from mesh.daemon import serve
    return _serve(serve, args.host_netns, args.nodes, args.lb)


def cmd_manager(args, api: Api) -> int:
    from mesh.manager import serve_manager
    return _serve(serve_manager, args.store, args.node_name, args.host_netns)


def cmd_agent(args, api: Api) -> int:
    from mesh.nodeagent import serve_agent
    return _serve(serve_agent, args.store, args.node_name, args.address, args.role, args.label)


def _label(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    return text


def _address(text: str) -> str:
    import ipaddress
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IPv4 address, got '{text}'") from None


def _cluster_commands(sub, common) -> None:
    """`mesh manager` and `mesh agent`: the daemons of a cluster that shares an etcd."""
    import socket
    store_help = "the cluster store, etcd://HOST:PORT[,HOST:PORT...]"
    manager = sub.add_parser("manager", parents=[common], help="run a cluster manager daemon")
    manager.add_argument("--store", required=True, help=store_help)
    manager.add_argument("--node-name", default=socket.gethostname(),
                         help="this manager's name (default: the host name)")
    manager.set_defaults(func=cmd_manager)
    agent = sub.add_parser("agent", parents=[common], help="run a node's agent daemon")
    agent.add_argument("--store", required=True, help=store_help)
    agent.add_argument("--node-name", default=socket.gethostname(),
                       help="the node's name (node.hostname; default: the host name)")
    agent.add_argument("--address", required=True, type=_address,
                       help="the node's underlay address (VXLAN endpoint), reachable from the other nodes")
    agent.add_argument("--role", choices=("manager", "worker"), default="worker",
                       help="node.role in placement constraints")
    agent.add_argument("--label", type=_label, action="append", default=[], metavar="KEY=VALUE",
                       help="a node label (node.labels.KEY in constraints); repeatable")
    agent.set_defaults(func=cmd_agent)


def _common(defaults: bool) -> argparse.ArgumentParser:
    """Options taken before or after the command (the copy on subcommands must not reset them)."""
    common = argparse.ArgumentParser(add_help=False)
    host = os.environ.get("MESH_HOST_NETNS") or None
    common.add_argument("--host-netns", default=host if defaults else argparse.SUPPRESS,
                        help="run the stack inside this network namespace (created if missing) "
                             "instead of the root namespace; env MESH_HOST_NETNS")
    common.add_argument("--json", action="store_true",
                        default=False if defaults else argparse.SUPPRESS,
                        help="machine-readable output")
    return common


def _node_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 250:
        raise argparse.ArgumentTypeError(f"expected a number of nodes from 1 to 250, got '{text}'")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    common = _common(defaults=False)
    parser = argparse.ArgumentParser(prog="mesh", parents=[_common(defaults=True)],
                                     description="A Swarm-style service mesh for Linux.")
    sub = parser.add_subparsers(dest="command_name", required=True)
    up = sub.add_parser("up", parents=[common], help="apply a stack file and start its tasks")
    up.add_argument("-f", "--file", required=True)
    up.add_argument("--nodes", type=_node_count, default=None,
                    help="run a local lab of N nodes (network namespaces) instead of this host alone "
                         "(default: the running daemon's, else this host alone)")
    up.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                    help="show progress until every task runs and is healthy, at most this long")
    up.add_argument("--lb", choices=LB_CHOICES, default=os.environ.get("MESH_LB"),
                    help="the kernel load balancer: ipvs, nftables, or auto (IPVS when the kernel "
                         "has ip_vs); env MESH_LB (default: the running daemon's, else auto)")
    up.add_argument("--store", metavar="etcd://HOST:PORT",
                    help="with --nodes: the lab's manager and agents as separate processes on this "
                         "etcd (it must answer there from the host namespace and every node, e.g. "
                         "etcd in the host namespace and etcd://10.97.0.254:PORT)")
    up.set_defaults(func=cmd_up)
    for name, func, helptext in (("down", cmd_down, "remove everything mesh made"),
                                 ("ps", cmd_ps, "list tasks")):
        sub.add_parser(name, parents=[common], help=helptext).set_defaults(func=func)
    daemon = sub.add_parser("daemon", parents=[common], help="run the daemon (mesh up starts it)")
    daemon.add_argument("--nodes", type=_node_count, default=0)
    daemon.add_argument("--lb", choices=LB_CHOICES, default="auto")
    daemon.set_defaults(func=cmd_daemon)
    node = sub.add_parser("node", parents=[common], help="lab nodes")
    node.add_subparsers(dest="action", required=True).add_parser("ls", parents=[common])
    node.set_defaults(func=cmd_node)
    svc = sub.add_parser("service", parents=[common], help="services")
    ssub = svc.add_subparsers(dest="action", required=True)
    ssub.add_parser("ls", parents=[common])
    ssub.add_parser("ps", parents=[common]).add_argument("service")
    ssub.add_parser("scale", parents=[common]).add_argument("pairs", nargs="+", metavar="SERVICE=N")
    ssub.add_parser("rm", parents=[common]).add_argument("services", nargs="+", metavar="SERVICE")
    svc.set_defaults(func=cmd_service)
    for name, func in (("inspect", cmd_inspect), ("logs", cmd_logs)):
        p = sub.add_parser(name, parents=[common], help=f"{name} a task")
        p.add_argument("task")
        p.set_defaults(func=func)
    ex = sub.add_parser("exec", parents=[common], help="run a command in a task's sandbox")
    ex.add_argument("task")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_exec)
    run = sub.add_parser("run", parents=[common],
                         help="start a standalone container on a network of the stack")
    run.add_argument("--name", required=True)
    run.add_argument("--network", required=True,
                     help="a network of the stack (an overlay must be attachable: true)")
    run.add_argument("--node", help="the lab node to run it on (default: the scheduler's choice)")
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_run)
    net = sub.add_parser("network", parents=[common], help="networks")
    nsub = net.add_subparsers(dest="action", required=True)
    nsub.add_parser("ls", parents=[common])
    nsub.add_parser("inspect", parents=[common]).add_argument("network")
    for action in ("connect", "disconnect"):
        p = nsub.add_parser(action, parents=[common])
        p.add_argument("network")
        p.add_argument("task")
    net.set_defaults(func=cmd_network)
    _cluster_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, Api(args.host_netns))
    except MeshError as exc:
        print(f"mesh: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mesh: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
