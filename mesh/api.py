"""The HTTP API (aiohttp) the daemon and the manager serve on their unix socket; it calls a
Controller (mesh.controller) or a ClusterController (mesh.manager) and knows nothing else.

    app = build_app(ctl, stop, finish=cluster.stop, about={"nodes": 3, "lb": "nftables"})

GET /v1/ping, POST /v1/up {stack}, GET /v1/tasks, GET /v1/tasks/{name}, GET /v1/tasks/{name}/logs,
GET /v1/services, POST /v1/services/{name}/scale {replicas}, POST /v1/services/{name}/rm,
GET /v1/nodes (a cluster: mesh.manager.cluster_middleware answers it), GET /v1/networks,
GET /v1/networks/{name}, POST /v1/networks/{name}/connect|disconnect {task},
POST /v1/run {name, network, command, node} (a standalone container), POST /v1/down (the stack
down, then the server stops). Errors: {"error": text}, 404 not found, 409 conflict, 400 invalid.
"""
from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from mesh.errors import Conflict, MeshError, NotFound
from mesh.spec import stack_from_dict
from mesh.views import network_list, service_list, task_view

log = logging.getLogger("mesh.api")
STATUS = {NotFound: 404, Conflict: 409}


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


def build_app(ctl, stop: asyncio.Event, finish=None, about: dict | None = None) -> web.Application:
    """The API over `ctl` (a Controller or ClusterController). `finish` (async) runs on
    /v1/down after the stack is down, before the answer; then `stop` is set. `about` adds to
    /v1/ping's answer (nodes, lb)."""
    routes = web.RouteTableDef()

    def tasks_json():
        waiting = ctl.waiting()
        return [task_view(t, ctl.status(t.name), ctl.desired, waiting.get(t.name))
                for t in ctl.desired.tasks.values()]

    def one_task(t):
        return task_view(t, ctl.status(t.name), ctl.desired, ctl.waiting().get(t.name))

    @routes.get("/v1/ping")
    async def ping(_):
        return web.json_response({"host_netns": ctl.host, "pid": os.getpid(), "nodes": 0,
                                  "lb": ctl.lb_name, **(about or {})})

    @routes.get("/v1/nodes")
    async def nodes(_):
        raise Conflict("this daemon runs a single host, not a cluster (mesh up --nodes N)")

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
        return web.json_response(one_task(t))

    @routes.get("/v1/tasks")
    async def tasks(_):
        return web.json_response(tasks_json())

    @routes.get("/v1/tasks/{name}")
    async def task(request):
        t = ctl.task(request.match_info["name"])
        return web.json_response({**one_task(t),
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
        return web.json_response(one_task(t))

    @routes.post("/v1/down")
    async def down(_):
        await ctl.down()
        try:
            if finish is not None:
                await finish()
        finally:                         # the daemon stops even when removing what is left failed
            stop.set()
        return web.json_response({"down": True})

    app = web.Application(middlewares=[errors])
    app.add_routes(routes)
    return app
