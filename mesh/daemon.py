"""The daemon, mesh's composition root: wires Netlink, NftCli, Supervisor, the DNS resolver and
a node's Agent, with a Controller (one host) or the local lab on the embedded store (mesh.cluster:
a ClusterController and one NodeAgent per lab node around a MemoryStore), and serves the API
(mesh.api) on a unix socket. `mesh up` starts it when none runs for the host namespace.

    mesh daemon [--host-netns NAME] [--nodes N] [--lb auto|ipvs|nftables]   # started by mesh up

`mesh down` (POST /v1/down) takes the stack down, removes the lab, and the daemon exits.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from mesh.agent import Agent, host_resolv
from mesh.api import build_app
from mesh.cluster import LocalCluster
from mesh.manager import cluster_middleware
from mesh.controller import Controller
from mesh.dns.server import Resolver
from mesh.dnsagent import DnsAgent, HostSockets
from mesh.etcfiles import upstream_servers
from mesh.lb.base import make_lb, resolve_choice
from mesh.netlink import Netlink
from mesh.nft import NftCli
from mesh.paths import Paths
from mesh.runtime import Supervisor

log = logging.getLogger("mesh.daemon")


def _resync_interval(text: str) -> float:
    """MESH_LB_RESYNC: seconds between full resyncs of the balancers (0.5 at least; default 60)."""
    try:
        return max(float(text), 0.5)
    except ValueError:
        log.warning("MESH_LB_RESYNC=%r is not a number of seconds: using 60", text)
        return 60.0


RESYNC_INTERVAL = _resync_interval(os.environ.get("MESH_LB_RESYNC", "60"))


def node_agent(host: str | None, node: str, nl: Netlink, nft: NftCli, paths: Paths,
               lb: str = "auto") -> Agent:
    """One node's agent with its own resolver (upstream sockets made in that node's namespace)
    and its own load balancer (`lb`: auto, ipvs or nftables). mesh agent builds its own the same way."""
    resolver = Resolver(socket_factory=HostSockets(host))
    dns = DnsAgent(host, resolver, nft, upstream_servers(host_resolv(host)), node=node)
    return Agent(host, nl, nft, Supervisor(paths.logs, host), dns, node=node, lb=make_lb(resolve_choice(lb), nft))


class OneHost:
    """This host as the one node: a Controller over one agent (node "")."""

    def __init__(self, host_netns: str | None, paths: Paths, lb: str):
        nl = Netlink()
        agent = node_agent(host_netns, "", nl, NftCli(), paths, lb)
        # the host namespace it makes goes with `mesh down`, also after a killed daemon
        agent.made_marker = paths.made_host_marker
        agent.created_host = bool(host_netns) and os.path.exists(agent.made_marker)
        self.ctl = Controller([agent], nl, host_netns)
        self.ctl.lb_name = lb
        self.ping = {"nodes": 0}
        self.middlewares = []
        self.resyncer: asyncio.Task | None = None
        self.stopped = False

    async def start(self) -> None:
        self.resyncer = asyncio.create_task(resync_forever(self.ctl))

    def jobs(self) -> list[asyncio.Future]:
        return [self.resyncer]

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.resyncer is not None:
            self.resyncer.cancel()
        await self.ctl.down()
        for agent in self.ctl.agents.values():
            await agent.dns.resolver.close()


def compose(host_netns: str | None, nodes: int, paths: Paths, lb: str = "auto"):
    """One host (OneHost), or a lab of `nodes` nodes on the embedded store (mesh.cluster)."""
    lb = resolve_choice(lb)
    if not nodes:
        return OneHost(host_netns, paths, lb)
    nl, nft = Netlink(), NftCli()
    cluster = LocalCluster(host_netns, nodes, paths,
                           lambda netns, node, own: node_agent(netns, node, nl, nft, own, lb), lb)
    cluster.middlewares = [cluster_middleware(cluster.ctl, cluster.ping)]
    return cluster


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
    whole = await asyncio.to_thread(compose, host_netns, nodes, paths, lb)
    stop = asyncio.Event()

    def on_signal(sig: int) -> None:
        log.info("received %s: removing the stack and stopping", signal.Signals(sig).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, on_signal, sig)
    runner = None
    try:
        starting = asyncio.ensure_future(whole.start())
        await asyncio.wait([starting, asyncio.ensure_future(stop.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():                  # a signal while the lab starts
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return
        starting.result()
        app = build_app(whole.ctl, stop, whole.stop, whole.ping)
        app.middlewares.extend(whole.middlewares)
        runner = web.AppRunner(app)
        await runner.setup()
        if os.path.exists(paths.socket):
            os.unlink(paths.socket)
        await web.UnixSite(runner, paths.socket).start()
        with open(paths.pid_file, "w") as f:
            f.write(str(os.getpid()))
        log.info("mesh daemon serving %s (host namespace: %s, nodes: %s)", paths.socket,
                 host_netns or "root", nodes or "this host")
        waiter = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([waiter, *whole.jobs()], return_when=asyncio.FIRST_COMPLETED)
        if whole.stopped:                       # mesh down under way: it sets `stop` when done
            await waiter
        for job in done - {waiter}:
            if not job.cancelled() and not whole.stopped:   # a part of the daemon ended: stop
                log.error("stopping: part of the daemon ended: %r", job.exception())
        waiter.cancel()
        await asyncio.sleep(0.05)      # let the response to /v1/down go out
    finally:
        await whole.stop()
        if runner is not None:
            await runner.cleanup()
        for path in (paths.socket, paths.pid_file):
            if os.path.exists(path):
                os.unlink(path)
