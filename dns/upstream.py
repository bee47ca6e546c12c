"""Forwarding of queries the View does not know to upstream servers, on the running asyncio loop.

Every socket comes from the `socket_factory(family, type)` given by the owner (the agent makes them
inside the right network namespace), is non-blocking and driven by the loop's sock_* calls. Upstreams
are tried in order (at most 3), each with its own timeout; the first usable reply wins. A UDP query
goes over UDP (retried over TCP on that upstream when the reply comes back with TC set), a TCP query
over TCP. Replies are matched on a fresh random ID and the question; UDP sockets are connected, so the
kernel drops datagrams from any other address or port. SERVFAIL and REFUSED from an upstream mean
"try the next one"; anything else (NXDOMAIN included) is relayed as is.

    fwd = Forwarder(timeout=4.0, socket_factory=None)
    reply = await fwd.forward(query, q, ("10.0.0.2", "10.0.0.3:5353"), tcp=False)  # q: packet.Question
    # -> the upstream's reply carrying the query's own ID, or None when every upstream failed
    fwd.close()
"""
from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import struct
from functools import lru_cache
from typing import Callable

from mesh.dns import packet

SocketFactory = Callable[[int, int], socket.socket]
MAX_UPSTREAMS = 3
POOL_SIZE = 32                      # idle UDP sockets kept per address family


@lru_cache(maxsize=256)
def parse_upstream(text: str) -> tuple[int, tuple]:
    """("10.0.0.2:5353") -> (AF_INET, ("10.0.0.2", 5353)); "addr", "addr:port", "[v6]:port", "v6"."""
    host, port = text.strip(), 53
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif host.count(":") == 1:
        host, _, p = host.partition(":")
        port = int(p)
    address = ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"bad port in upstream {text!r}")
    if address.version == 6:
        return socket.AF_INET6, (str(address), port, 0, 0)
    return socket.AF_INET, (str(address), port)


class Forwarder:
    """Asks upstream servers; one per Resolver, shared by its sandboxes."""

    def __init__(self, *, timeout: float = 4.0, socket_factory: SocketFactory | None = None):
        self.timeout = timeout
        self._factory = socket_factory or socket.socket
        self._idle: dict[int, list[socket.socket]] = {}
        self._closed = False

    async def forward(self, query: bytes, q: packet.Question, upstreams: tuple[str, ...], *,
                      tcp: bool = False) -> bytes | None:
        """The first usable reply (with `query`'s ID) from `upstreams` in order, or None. `q` is the
        query as read by packet.read_query (its question end, its UDP size)."""
        for text in upstreams[:MAX_UPSTREAMS]:
            try:
                family, addr = parse_upstream(text)
            except ValueError:
                continue
            reply = await self._ask(family, addr, query, q, tcp)
            if reply is not None and packet.rcode_of(reply) not in (packet.SERVFAIL, packet.REFUSED):
                return query[:2] + reply[2:]
        return None

    async def _ask(self, family: int, addr: tuple, query: bytes, q: packet.Question,
                   tcp: bool) -> bytes | None:
        qid = secrets.randbits(16)
        message = struct.pack("!H", qid) + query[2:]
        question = query[12:q.end]
        try:
            async with asyncio.timeout(self.timeout):
                if tcp:
                    return await self._tcp(family, addr, message, qid, question)
                reply = await self._udp(family, addr, message, qid, question)
                if not reply[2] & (packet.TC >> 8):
                    return reply
                try:                # truncated: the same upstream over TCP, if it fits the client
                    full = await self._tcp(family, addr, message, qid, question)
                except (OSError, EOFError, struct.error):
                    return reply
                return full if len(full) <= q.limit else reply
        except (OSError, TimeoutError, EOFError, struct.error):
            return None

    async def _udp(self, family: int, addr: tuple, message: bytes, qid: int,
                   question: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        sock = self._take(family)
        healthy = False
        try:
            sock.connect(addr)
            await loop.sock_sendall(sock, message)
            while True:
                data = await loop.sock_recv(sock, 65535)
                if packet.matches(data, qid, question):
                    healthy = True
                    return data
        finally:
            self._give(family, sock, healthy)

    async def _tcp(self, family: int, addr: tuple, message: bytes, qid: int,
                   question: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        sock = self._factory(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
            await loop.sock_sendall(sock, struct.pack("!H", len(message)) + message)
            while True:
                (length,) = struct.unpack("!H", await _recv_exactly(loop, sock, 2))
                data = await _recv_exactly(loop, sock, length)
                if packet.matches(data, qid, question):
                    return data
        finally:
            sock.close()

    def _take(self, family: int) -> socket.socket:
        idle = self._idle.get(family)
        if idle:
            return idle.pop()
        sock = self._factory(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        return sock

    def _give(self, family: int, sock: socket.socket, healthy: bool) -> None:
        """Back to the pool when it worked (stale datagrams are filtered by ID anyway), else closed."""
        idle = self._idle.setdefault(family, [])
        if healthy and not self._closed and len(idle) < POOL_SIZE:
            idle.append(sock)
        else:
            sock.close()

    def close(self) -> None:
        """Close the idle sockets; queries still in flight close theirs when they end."""
        self._closed = True
        for idle in self._idle.values():
            for sock in idle:
                sock.close()
            idle.clear()


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = await loop.sock_recv(sock, n - got)
        if not chunk:
            raise EOFError("upstream closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
