"""The daemon, mesh's composition root: wires Netlink, NftCli, Supervisor, the DNS resolver, Agent
and Controller, and serves the API (aiohttp) on a unix socket. `mesh up` starts it when none runs for the host namespace.

    mesh daemon [--host-netns NAME]          # normally started for you by `mesh up`

API (JSON): GET /v1/ping, POST /v1/up {stack}, GET /v1/tasks, GET /v1/tasks/{name},
GET /v1/tasks/{name}/logs, GET /v1/networks, GET /v1/networks/{name},
POST /v1/networks/{name}/connect|disconnect {task}, POST /v1/run {name, network, command, node}
(a standalone container), POST /v1/down (tears down, then exits).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from mesh.agent import Agent, host_resolv
from mesh.cluster import UNDERLAY_NET, lab_placer, node_list
from mesh.controller import Controller
from mesh.dns.server import Resolver
from mesh.dnsagent import DnsAgent, HostSockets
from mesh.etcfiles import upstream_servers
from mesh.errors import Conflict, MeshError, NotFound
from mesh.lab import make_lab, remove_lab
from mesh.lb.base import make_lb, resolve_choice
from mesh.netlink import Netlink
from mesh.nft import NftCli
from mesh.paths import Paths
from mesh.runtime import Supervisor
from mesh.spec import stack_from_dict
from mesh.views import network_list, service_list, task_view

log = logging.getLogger("mesh.daemon")
STATUS = {NotFound: 404, Conflict: 409}


def _resync_interval(text: str) -> float:
    """MESH_LB_RESYNC: seconds between full resyncs of the balancers (0.5 at least; default 60)."""
    try:
        return max(float(text), 0.5)
    except ValueError:
        log.warning("MESH_LB_RESYNC=%r is not a number of seconds: using 60", text)
        return 60.0


RESYNC_INTERVAL = _resync_interval(os.environ.get("MESH_LB_RESYNC", "60"))


@web.middleware
async def errors(request, handler):
    try:
        return await handler(request)
    except MeshError as exc:
        return web.json_response({"error": str(exc)}, status=STATUS.get(type(exc), 400))
    except web.HTTPException:
        raise
    except Exception as exc:           # a bug or an unexpected kernel answer: say what, not just 500
        log.exception("request %s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {type(exc).__name__}: {exc} "
                                           f"(the daemon's log has the details)"}, status=500)


def build_app(ctl: Controller, stop: asyncio.Event, lab=(), remove=lambda: None) -> web.Application:
    routes = web.RouteTableDef()

    def tasks_json():
        return [task_view(t, ctl.status(t.name), ctl.desired) for t in ctl.desired.tasks.values()]

    @routes.get("/v1/ping")
    async def ping(_):
        return web.json_response({"host_netns": ctl.host, "pid": os.getpid(), "nodes": len(lab),
                                  "lb": ctl.lb_name})

    @routes.get("/v1/nodes")
    async def nodes(_):
        if not lab:
            raise Conflict("this daemon runs a single host, not a cluster (mesh up --nodes N)")
        return web.json_response(node_list(lab, ctl.desired))

    @routes.get("/v1/services")
    async def services(_):
        return web.json_response(service_list(ctl.desired, ctl.status))

    @routes.post("/v1/services/{name}/scale")
    async def scale(request):
        await ctl.scale(request.match_info["name"], (await request.json())["replicas"])
        return web.json_response(service_list(ctl.desired, ctl.status))

    @routes.post("/v1/services/{name}/rm")
    async def remove_service(request):
        await ctl.remove_service(request.match_info["name"])
        return web.json_response(service_list(ctl.desired, ctl.status))

    @routes.post("/v1/up")
    async def up(request):
        stack = stack_from_dict((await request.json())["stack"])
        await ctl.up(stack)
        return web.json_response({"tasks": tasks_json()})

    @routes.post("/v1/run")
    async def run(request):
        body = await request.json()
        t = await ctl.run(body.get("name", ""), body.get("network", ""), list(body.get("command") or []),
                          body.get("node"))
        return web.json_response(task_view(t, ctl.status(t.name), ctl.desired))

    @routes.get("/v1/tasks")
    async def tasks(_):
        return web.json_response(tasks_json())

    @routes.get("/v1/tasks/{name}")
    async def task(request):
        t = ctl.task(request.match_info["name"])
        return web.json_response({**task_view(t, ctl.status(t.name), ctl.desired),
                                  "log": ctl.log_path(t.name)})

    @routes.get("/v1/tasks/{name}/logs")
    async def logs(request):
        path = ctl.log_path(request.match_info["name"])
        text = open(path, errors="replace").read() if os.path.exists(path) else ""
        return web.Response(text=text)

    @routes.get("/v1/networks")
    async def networks(_):
        return web.json_response(network_list(ctl.desired))

    @routes.get("/v1/networks/{name}")
    async def network(request):
        found = [n for n in network_list(ctl.desired) if n["name"] == request.match_info["name"]]
        if not found:
            raise NotFound(f"no network named '{request.match_info['name']}' (mesh network ls)")
        return web.json_response(found[0])

    @routes.post("/v1/networks/{name}/{action:connect|disconnect}")
    async def connect(request):
        body = await request.json()
        action = getattr(ctl, request.match_info["action"])
        t = await action(request.match_info["name"], body["task"])
        return web.json_response(task_view(t, ctl.status(t.name), ctl.desired))

    @routes.post("/v1/down")
    async def down(_):
        await ctl.down()
        await asyncio.to_thread(remove)
        stop.set()
        return web.json_response({"down": True})

    app = web.Application(middlewares=[errors])
    app.add_routes(routes)
    return app


def node_agent(host: str | None, node: str, nl: Netlink, nft: NftCli, paths: Paths,
               lb: str = "auto") -> Agent:
    """One node's agent with its own resolver (upstream sockets made in that node's namespace)
    and its own load balancer (`lb`: auto, ipvs or nftables). mesh agent builds its own the same way."""
    resolver = Resolver(socket_factory=HostSockets(host))
    dns = DnsAgent(host, resolver, nft, upstream_servers(host_resolv(host)), node=node)
    return Agent(host, nl, nft, Supervisor(paths.logs, host), dns, node=node, lb=make_lb(resolve_choice(lb), nft))


def compose(host_netns: str | None, nodes: int, paths: Paths, lb: str = "auto"):
    """(controller, lab nodes, cleanup) — one agent on the host, or a lab of `nodes` nodes."""
    nl, nft = Netlink(), NftCli()
    lb = resolve_choice(lb)
    if not nodes:
        ctl = Controller([node_agent(host_netns, "", nl, nft, paths, lb)], nl, host_netns)
        ctl.lb_name = lb
        return ctl, [], lambda: None
    made_host = bool(host_netns) and not nl.netns_exists(host_netns)
    lab = make_lab(host_netns, nodes, nl)
    agents = [node_agent(n.netns, n.name, nl, nft, paths, lb) for n in lab]
    ctl = Controller(agents, nl, host_netns, placer=lab_placer(lab), extra_routes=[UNDERLAY_NET])
    ctl.lb_name = lb

    def remove() -> None:
        remove_lab(host_netns, lab, nl)
        if made_host:                    # the lab made the host namespace: it goes with the lab
            nl.delete_netns(host_netns)
    return ctl, lab, remove


async def resync_forever(ctl: Controller, every: float = RESYNC_INTERVAL) -> None:
    """The balancers' periodic full resync (repairs anything changed behind mesh's back)."""
    while True:
        await asyncio.sleep(every)
        try:
            await ctl.resync()
        except Exception:
            log.exception("periodic load-balancer resync failed")


async def serve(host_netns: str | None, nodes: int = 0, lb: str = "auto") -> None:
    paths = Paths.for_host(host_netns)
    os.makedirs(paths.root, exist_ok=True)
    ctl, lab, remove = await asyncio.to_thread(compose, host_netns, nodes, paths, lb)
    resyncer = asyncio.create_task(resync_forever(ctl))
    stop = asyncio.Event()

    def on_signal(sig: int) -> None:
        log.info("received %s: removing the stack and stopping", signal.Signals(sig).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, on_signal, sig)
    runner = web.AppRunner(build_app(ctl, stop, lab, remove))
    await runner.setup()
    if os.path.exists(paths.socket):
        os.unlink(paths.socket)
    await web.UnixSite(runner, paths.socket).start()
    with open(paths.pid_file, "w") as f:
        f.write(str(os.getpid()))
    log.info("mesh daemon serving %s (host namespace: %s, nodes: %s)", paths.socket,
             host_netns or "root", len(lab) or "this host")
    try:
        await stop.wait()
        await asyncio.sleep(0.05)      # let the response to /v1/down go out
    finally:
        resyncer.cancel()
        await ctl.down()
        for agent in ctl.agents.values():
            await agent.dns.resolver.close()
        await asyncio.to_thread(remove)
        await runner.cleanup()
        for path in (paths.socket, paths.pid_file):
            if os.path.exists(path):
                os.unlink(path)
