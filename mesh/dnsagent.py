"""The agent's DNS part: one resolver (mesh.dns.server.Resolver) in the daemon serves every sandbox
on a user-defined network, through sockets opened inside each sandbox.

For each such sandbox: UDP and TCP sockets bound to 127.0.0.11 on random ports, made by a worker
thread that visits the sandbox (mesh.netns.entered); the sandbox's own `mesh` table DNATs
127.0.0.11:53 to them, so the container may still bind port 53 itself. Views (mesh.dns.records) are
rebuilt on every change and swapped whole; upstream sockets are made in the host namespace.

    dns = DnsAgent(host_netns, Resolver(...), NftCli(), upstreams=("10.0.0.2",))
    dns.configure(stack.dns)                 # the stack's x-mesh.dns options
    await dns.sync(desired, live_tasks)      # after every change of tasks or their state
    await dns.close()
"""
from __future__ import annotations

import asyncio
import logging
import socket
from concurrent.futures import ThreadPoolExecutor

from mesh import netns
from mesh.dns.records import DEFAULT_TTL, build_views
from mesh.dns.view import View
from mesh.model import DnsOptions
from mesh.nft import Nft
from mesh.state import DesiredState

log = logging.getLogger("mesh.dnsagent")
RESOLVER_IP = "127.0.0.11"


def render_sandbox_table(udp_port: int, tcp_port: int) -> str:
    """The sandbox's `mesh` table: 127.0.0.11:53 -> the resolver's sockets (pure)."""
    return (f"table ip mesh\ndelete table ip mesh\ntable ip mesh {{\n"
            f"  chain output {{\n    type nat hook output priority -100; policy accept;\n"
            f"    ip daddr {RESOLVER_IP} udp dport 53 dnat to {RESOLVER_IP}:{udp_port}\n"
            f"    ip daddr {RESOLVER_IP} tcp dport 53 dnat to {RESOLVER_IP}:{tcp_port}\n  }}\n}}\n")


def open_sockets(sandbox: str) -> tuple[socket.socket, socket.socket]:
    """UDP and listening TCP sockets on 127.0.0.11, random ports, inside `sandbox` (worker thread)."""
    with netns.entered(sandbox):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        udp.bind((RESOLVER_IP, 0))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((RESOLVER_IP, 0))
        tcp.listen(128)
        udp.setblocking(False)
        tcp.setblocking(False)
    except OSError:
        udp.close()
        tcp.close()
        raise
    return udp, tcp


class HostSockets:
    """socket_factory for upstream queries: sockets made in the host namespace by a helper thread,
    so the event-loop thread never switches namespaces."""

    def __init__(self, host_netns: str | None):
        self.host = host_netns
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mesh-hostsock")

    def _make(self, family: int, kind: int) -> socket.socket:
        if not self.host:
            return socket.socket(family, kind)
        with netns.entered(self.host):
            return socket.socket(family, kind)

    def __call__(self, family: int, kind: int) -> socket.socket:
        return self.pool.submit(self._make, family, kind).result()


class DnsAgent:
    def __init__(self, host_netns: str | None, resolver, nft: Nft, upstreams: tuple[str, ...],
                 ttl: int = DEFAULT_TTL, node: str = ""):
        self.host = host_netns
        self.node = node
        self.resolver = resolver
        self.nft = nft
        self.host_upstreams = upstreams
        self.upstreams = upstreams
        self.ttl = ttl
        self.views: dict[str, View] = {}
        self.lock = asyncio.Lock()

    def configure(self, options: DnsOptions) -> None:
        """The stack's `x-mesh.dns`: TTL, default upstreams (else the host's), forwarding limits."""
        self.ttl = options.ttl
        self.upstreams = options.upstreams or self.host_upstreams
        self.resolver.configure(upstream_timeout=options.upstream_timeout,
                                max_inflight=options.max_inflight)

    async def sync(self, desired: DesiredState, live: set[str]) -> None:
        async with self.lock:
            views = build_views(desired, live, self.upstreams, self.ttl, self.node)
            for sandbox in [s for s in self.views if s not in views]:
                await self.resolver.remove_sandbox(sandbox)
                del self.views[sandbox]
            for sandbox, view in views.items():
                if sandbox not in self.views:
                    await self._add(sandbox, view)
                elif self.views[sandbox] != view:
                    self.resolver.set_view(sandbox, view)
                    self.views[sandbox] = view

    async def _add(self, sandbox: str, view: View) -> None:
        udp, tcp = await asyncio.to_thread(open_sockets, sandbox)
        text = render_sandbox_table(udp.getsockname()[1], tcp.getsockname()[1])
        await asyncio.to_thread(self.nft.apply, sandbox, text)
        await self.resolver.add_sandbox(sandbox, udp, tcp, view)
        self.views[sandbox] = view

    async def close(self) -> None:
        async with self.lock:
            for sandbox in list(self.views):
                await self.resolver.remove_sandbox(sandbox)
            self.views.clear()
