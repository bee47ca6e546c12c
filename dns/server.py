"""The embedded resolver's sockets: serves each sandbox's UDP and TCP socket on the running loop.

The owner (the agent) binds the sockets, maybe inside another network namespace, and hands them over
with the sandbox's View; answers come from mesh.dns.answer, forwarding from mesh.dns.upstream.

    resolver = Resolver(upstream_timeout=4.0, max_inflight=100, socket_factory=None)
    await resolver.add_sandbox("mesh-h-web.1", udp_sock, tcp_sock, view)
    resolver.set_view("mesh-h-web.1", new_view)      # on the loop's thread; drops that cache
    await resolver.remove_sandbox("mesh-h-web.1")    # closes both sockets
    resolver.stats()    # counters; queries == cache_hits + answered + formerr + forwarded
                        #                      + refused + dropped (between two loop callbacks)
    await resolver.close()

    resolver, udp_port, tcp_port = await serve_on("127.0.0.1", 0, view)   # benchmarks and tests

Hot path: a reader callback drains the UDP socket, BATCH datagrams per recvmmsg (BURST per call),
and answers a query whose bytes after the ID are in the sandbox's cache with a cached reply (one of
its shuffled variants) written after the query's own ID in its receive slot; the replies leave
together by sendmmsg (_Batch; recvfrom / sendto where libc lacks them). Only misses are read and
built (one that means the same as an earlier query is rebuilt from answer's memo without dnslib).
bench/dns (dnsperf on loopback, a core each): ~6.2 us of server CPU per query at 135k qps, as
dnsmasq 2.90 (the per-datagram loop with recvfrom / sendto took ~10.5); peaks of 155-170k qps, where
dnsperf's core is the limit for both.

Forwarded replies are cached too (answer.RelayCache), per sandbox and protocol, keyed like the local
ones, within their TTL (at most 300 s; NXDOMAIN / NODATA by the SOA, else 5 s; TTL 0: not cached),
served with their TTLs decremented: unlike Docker's embedded DNS, which asks upstream every time, we
cache upstream answers, as dnsmasq does. set_view drops both caches (a forwarded name may be local).

Counters: `servfail` counts every SERVFAIL sent from a miss or a failed forward (a cached SERVFAIL
counts as a cache hit only); `relayed` counts forwarded queries an upstream answered; `relay_hits`
the cache hits that were forwarded replies; `errors` counts exceptions while handling a query (a bug:
0 in the fuzz test): that query was dropped, or answered SERVFAIL when forwarding raised.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import os
import random
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from mesh.dns import answer
from mesh.dns.packet import FORMERR, REFUSED, SERVFAIL, Question
from mesh.dns.upstream import Forwarder, Job, SocketFactory
from mesh.dns.view import View

log = logging.getLogger(__name__)
_rng = random.Random()

BURST = 512                  # datagrams read per readiness callback before yielding to the loop
BATCH = 64                   # datagrams per recvmmsg / sendmmsg
SLOT = 1 << 16               # bytes per receive slot: any UDP datagram fits
CACHE_MAX = 10_000           # entries per sandbox and protocol; the cache is cleared when full
VARIANTS = 8                 # shuffled replies kept per multi-record answer
RESHUFFLE = 5.0              # seconds: caches holding answers of >= VARIANTS records are rebuilt,
                             # so that every record of a big set gets its turn first
RCVBUF = 4 << 20
TCP_IDLE = 10.0              # seconds to receive one whole framed message (or to flush a reply)
TCP_MAX_CONNS = 256          # per sandbox; further connections are closed at once
COUNTERS = ("queries", "cache_hits", "answered", "forwarded", "relayed", "refused", "servfail",
            "formerr", "dropped", "errors", "relay_hits")


@dataclass(eq=False)
class _Sandbox:
    key: str
    view: View
    udp: socket.socket
    tcp: socket.socket
    udp_cache: dict[bytes, tuple[bytes, ...]] = field(default_factory=dict)
    tcp_cache: dict[bytes, tuple[bytes, ...]] = field(default_factory=dict)
    udp_relay: answer.RelayCache = field(default_factory=lambda: answer.RelayCache(CACHE_MAX))
    tcp_relay: answer.RelayCache = field(default_factory=lambda: answer.RelayCache(CACHE_MAX))
    memo: dict = field(default_factory=dict)          # answers by meaning (mesh.dns.answer)
    many: bool = False                                # caches hold a big set's limited orders
    server: asyncio.AbstractServer | None = None
    conns: dict[asyncio.Task, asyncio.StreamWriter] = field(default_factory=dict)
    forwards: set[Job] = field(default_factory=set)


class Resolver:
    """Serves any number of sandboxes on the running event loop, each from its own View."""

    def __init__(self, *, upstream_timeout: float = 4.0, max_inflight: int = 100,
                 socket_factory: SocketFactory | None = None):
        self.max_inflight = max_inflight
        self._forwarder = Forwarder(timeout=upstream_timeout, socket_factory=socket_factory)
        self._sandboxes: dict[str, _Sandbox] = {}
        self._c = dict.fromkeys(COUNTERS, 0)
        self._inflight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._batch = _Batch.make()               # None: one datagram per system call

    async def add_sandbox(self, key: str, udp_sock: socket.socket, tcp_sock: socket.socket,
                          view: View) -> None:
        """Serve a bound UDP socket and a bound, listening TCP socket from now on."""
        if key in self._sandboxes:
            raise ValueError(f"sandbox {key!r} is already served")
        loop = asyncio.get_running_loop()
        udp_sock.setblocking(False)
        _set_rcvbuf(udp_sock)
        sb = _Sandbox(key, view, udp_sock, tcp_sock)
        sb.server = await asyncio.start_server(partial(self._serve_tcp, sb), sock=tcp_sock,
                                              backlog=1024)
        loop.add_reader(udp_sock.fileno(), self._drain if self._batch is None else self._drain_batch,
                        sb)
        self._sandboxes[key] = sb
        if self._timer is None:
            self._timer = loop.call_later(RESHUFFLE, self._reshuffle)

    def configure(self, *, upstream_timeout: float, max_inflight: int) -> None:
        """Change the forwarding limits; queries already in flight keep the old timeout."""
        self._forwarder.timeout = upstream_timeout
        self.max_inflight = max_inflight

    def set_view(self, key: str, view: View) -> None:
        """Answer from `view` from the next query on; that sandbox's cached replies (local and
        forwarded) are dropped."""
        sb = self._sandboxes[key]
        sb.view, sb.udp_cache, sb.tcp_cache, sb.memo = view, {}, {}, {}
        sb.udp_relay, sb.tcp_relay = answer.RelayCache(CACHE_MAX), answer.RelayCache(CACHE_MAX)

    async def remove_sandbox(self, key: str) -> None:
        """Stop serving a sandbox and close both its sockets (and its open TCP connections)."""
        sb = self._sandboxes.pop(key, None)
        if sb is None:
            return
        loop = asyncio.get_running_loop()
        if sb.udp.fileno() >= 0:
            loop.remove_reader(sb.udp.fileno())
        sb.udp.close()
        if sb.server is not None:
            sb.server.close()
        for job in sb.forwards:
            if job.cancel():
                self._inflight -= 1
        sb.forwards.clear()
        for writer in sb.conns.values():        # the handlers see the connection lost and end
            writer.transport.abort()
        await asyncio.gather(*sb.conns, return_exceptions=True)
        sb.tcp.close()
        if sb.server is not None:
            try:
                async with asyncio.timeout(1.0):
                    await sb.server.wait_closed()
            except TimeoutError:
                pass

    async def close(self) -> None:
        """Remove every sandbox and cancel the work in flight."""
        for key in list(self._sandboxes):
            await self.remove_sandbox(key)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._forwarder.close()

    def _reshuffle(self) -> None:
        """Every RESHUFFLE seconds: rebuild caches of big sets, forget expired forwarded replies."""
        now = time.monotonic()
        for sb in self._sandboxes.values():
            if sb.many:
                sb.udp_cache, sb.tcp_cache, sb.memo, sb.many = {}, {}, {}, False
            sb.udp_relay.prune(now)
            sb.tcp_relay.prune(now)
        self._timer = asyncio.get_running_loop().call_later(RESHUFFLE, self._reshuffle)

    def stats(self) -> dict:
        """Counters since start, plus `inflight` (forwarded queries not answered yet), `sandboxes`."""
        c = dict(self._c)
        c["errors"] += self._forwarder.errors
        return {**c, "inflight": self._inflight, "sandboxes": len(self._sandboxes)}

    # --- UDP -------------------------------------------------------------------------------------
    def _drain_batch(self, sb: _Sandbox) -> None:
        """Hits are answered in their receive slots and sent together; a miss first sends the hits
        before it, so that replies keep the order of the queries."""
        b, fd, family = self._batch, sb.udp.fileno(), sb.udp.family
        area, lengths, cache, relay, pick = b.area, b.lengths, sb.udp_cache, sb.udp_relay, _rng.choice
        n = hits = 0
        try:
            for _ in range(BURST // BATCH):
                got = b.receive(fd, family)
                n += len(got)
                start = 0
                for i, size in enumerate(got):
                    off = i * SLOT
                    key = area[off + 2:off + size]
                    variants = cache.get(key)
                    if variants is not None:
                        body = variants[0] if len(variants) == 1 else pick(variants)
                    elif not relay or (body := self._relayed(relay, key)) is None:
                        b.send(fd, start, i)
                        start = i + 1
                        send = partial(_udp_send, sb.udp, b.address(i, family))
                        self._miss(sb, area[off:off + size], send, tcp=False)
                        continue
                    hits += 1
                    area[off + 2:off + 2 + len(body)] = body
                    lengths[i] = 2 + len(body)
                b.send(fd, start, len(got))
                if len(got) < BATCH:
                    break
        except OSError as err:                    # the socket itself failed (closed under us)
            log.debug("dns %s: udp receive failed: %s", sb.key, err)
        finally:
            self._c["queries"] += n
            self._c["cache_hits"] += hits

    def _drain(self, sb: _Sandbox) -> None:
        """_drain_batch with one recvfrom / sendto per datagram (where _Batch cannot be made)."""
        sock, c = sb.udp, self._c
        try:
            for _ in range(BURST):
                data, addr = sock.recvfrom(SLOT)
                c["queries"] += 1
                reply = self._hit(sb.udp_cache, sb.udp_relay, data)
                if reply is None:
                    self._miss(sb, data, partial(_udp_send, sock, addr), tcp=False)
                else:
                    _udp_send(sock, addr, reply)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as err:
            log.debug("dns %s: udp receive failed: %s", sb.key, err)

    def _hit(self, cache: dict, relay: answer.RelayCache, data: bytes) -> bytes | None:
        """The cached reply (local, else forwarded) to `data`, with its ID, counted; or None."""
        key = data[2:]
        variants = cache.get(key)
        if variants is not None:
            body = variants[0] if len(variants) == 1 else _rng.choice(variants)
        elif not relay or (body := self._relayed(relay, key)) is None:
            return None
        self._c["cache_hits"] += 1
        return data[:2] + body

    def _relayed(self, relay: answer.RelayCache, key: bytes) -> bytes | None:
        """A cached forwarded reply after the ID, if one is still alive (counted in relay_hits)."""
        body = relay.get(key, time.monotonic())
        self._c["relay_hits"] += body is not None
        return body

    # --- both protocols --------------------------------------------------------------------------
    def _miss(self, sb: _Sandbox, data: bytes, send: Callable[[bytes], None], *, tcp: bool) -> None:
        """Read, answer, cache or forward one query that was not in the cache; never raises."""
        c, cache = self._c, sb.tcp_cache if tcp else sb.udp_cache
        try:
            r = answer.respond(data, sb.view, tcp=tcp, variants=VARIANTS, memo=sb.memo)
            if r.action == answer.REPLY:
                if r.cacheable:
                    if len(cache) >= CACHE_MAX:
                        cache.clear()
                    cache[data[2:]] = tuple(reply[2:] for reply in r.replies)
                    sb.many = sb.many or len(r.replies) >= VARIANTS
                send(r.replies[0] if len(r.replies) == 1 else _rng.choice(r.replies))
                if r.rcode == FORMERR:
                    c["formerr"] += 1
                else:
                    c["answered"] += 1
                    c["servfail"] += r.rcode == SERVFAIL
            elif r.action == answer.FORWARD:
                self._forward(sb, data, r.question, send, tcp)
            else:
                c["dropped"] += 1
        except Exception:                         # noqa: BLE001 - one packet must not hurt the rest
            log.exception("dns %s: query dropped", sb.key)
            c["dropped"] += 1
            c["errors"] += 1

    def _forward(self, sb: _Sandbox, data: bytes, q: Question, send: Callable[[bytes], None],
                 tcp: bool) -> None:
        if self._inflight >= self.max_inflight:
            self._c["refused"] += 1
            send(answer.error_reply(data, q, REFUSED))
            return
        self._c["forwarded"] += 1
        self._inflight += 1
        done = partial(self._relay, sb, data, q, send, tcp, sb.tcp_relay if tcp else sb.udp_relay)
        job = self._forwarder.submit(data, q, sb.view.upstreams, tcp=tcp, done=done)
        if not job.finished:
            sb.forwards.add(job)

    def _relay(self, sb: _Sandbox, data: bytes, q: Question, send: Callable[[bytes], None],
               tcp: bool, relay: answer.RelayCache, job: Job, reply: bytes | None) -> None:
        """A forward ended: send the reply (cached in `relay`, the cache of the View it was asked
        under: one dropped by set_view meanwhile takes it harmlessly), or SERVFAIL."""
        self._inflight -= 1
        sb.forwards.discard(job)
        c = self._c
        try:
            if reply is None:
                c["servfail"] += 1
                send(answer.error_reply(data, q, SERVFAIL))
                return
            c["relayed"] += 1
            out = answer.fit(reply, q, tcp)
            if out is reply:                      # not cut to fit the client: may be cached
                relay.put(data[2:], reply, time.monotonic())
            send(out)
        except Exception:                         # noqa: BLE001 - one packet must not hurt the rest
            log.exception("dns %s: relaying failed", sb.key)
            c["errors"] += 1

    # --- TCP -------------------------------------------------------------------------------------
    async def _serve_tcp(self, sb: _Sandbox, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        """Framed queries (2-byte length) one after another until EOF, a bad frame or idleness."""
        task = asyncio.current_task()
        if len(sb.conns) >= TCP_MAX_CONNS or task is None:
            writer.close()
            return
        sb.conns[task] = writer
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(length) if length else b""
                self._tcp_message(sb, data, writer)
                if not length:
                    break                         # a zero-length frame: nothing sane follows
                async with asyncio.timeout(TCP_IDLE):
                    await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            pass
        finally:
            sb.conns.pop(task, None)
            writer.close()

    def _tcp_message(self, sb: _Sandbox, data: bytes, writer: asyncio.StreamWriter) -> None:
        self._c["queries"] += 1
        reply = self._hit(sb.tcp_cache, sb.tcp_relay, data) if len(data) >= 12 else None
        if reply is None:
            self._miss(sb, data, partial(_tcp_send, writer), tcp=True)
        else:
            _tcp_send(writer, reply)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.c_void_p), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _anonymous_ = ("hdr",)
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


class _Batch:
    """recvmmsg and sendmmsg (libc, through ctypes) over buffers made once: BATCH receive slots of
    SLOT bytes (any datagram fits) in an anonymous mapping, the senders' addresses beside them, and
    send headers that point at the same slots and addresses; `lengths[i]` is the length of the reply
    to send from slot i. One per Resolver: its reader callbacks run one at a time."""

    def __init__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        self._recv, self._send = libc.recvmmsg, libc.sendmmsg
        self._recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                               ctypes.c_void_p]
        self._send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
        self._recv.restype = self._send.restype = ctypes.c_int
        self.area = mmap.mmap(-1, BATCH * SLOT)             # pages appear only where written
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.area))
        self._names = ctypes.create_string_buffer(BATCH * 32)
        self._riov, self._siov = (_Iovec * BATCH)(), (_Iovec * BATCH)()
        self._rmsg, self._smsg = (_Mmsghdr * BATCH)(), (_Mmsghdr * BATCH)()
        for i in range(BATCH):
            self._riov[i].base = self._siov[i].base = base + i * SLOT
            self._riov[i].len = SLOT
            for msgs, iov in ((self._rmsg, self._riov), (self._smsg, self._siov)):
                msgs[i].name, msgs[i].namelen = ctypes.addressof(self._names) + 32 * i, 28
                msgs[i].iov, msgs[i].iovlen = ctypes.addressof(iov[i]), 1
        stride, at = ctypes.sizeof(_Mmsghdr) // 4, _Mmsghdr.len.offset // 4
        self._got = memoryview(self._rmsg).cast("B").cast("I")[at::stride]
        self.lengths = memoryview(self._siov).cast("B").cast("N")[1::2]
        self._rptr, self._sptr = ctypes.addressof(self._rmsg), ctypes.addressof(self._smsg)
        self._size, self._family = ctypes.sizeof(_Mmsghdr), 0

    @classmethod
    def make(cls) -> _Batch | None:
        try:
            return cls()
        except (AttributeError, OSError, TypeError, ValueError) as err:     # libc or ctypes lack it
            log.info("dns: no recvmmsg/sendmmsg (%s): one datagram per system call", err)
            return None

    def receive(self, fd: int, family: int) -> list[int]:
        """The sizes of the datagrams now in slots 0.. (none when nothing waits)."""
        if family != self._family:
            for rmsg, smsg in zip(self._rmsg, self._smsg):
                rmsg.namelen, smsg.namelen = 28, 16 if family == socket.AF_INET else 28
            self._family = family
        n = self._recv(fd, self._rptr, BATCH, socket.MSG_DONTWAIT, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return []
            raise OSError(err, os.strerror(err))
        return self._got[:n].tolist()

    def address(self, i: int, family: int) -> tuple:
        """Slot i's sender as socket.recvfrom gives it."""
        name = ctypes.string_at(ctypes.addressof(self._names) + 32 * i, 28)
        port = int.from_bytes(name[2:4], "big")
        if family == socket.AF_INET:
            return socket.inet_ntop(family, name[4:8]), port
        return (socket.inet_ntop(family, name[8:24]), port, int.from_bytes(name[4:8], "big"),
                int.from_bytes(name[24:28], sys.byteorder))

    def send(self, fd: int, start: int, end: int) -> None:
        """Send the replies in slots start..end-1 to their senders; one that cannot go is lost."""
        while start < end:
            sent = self._send(fd, self._sptr + start * self._size, end - start, 0)
            start += sent if sent > 0 else 1


def _udp_send(sock: socket.socket, addr, reply: bytes) -> None:
    try:
        sock.sendto(reply, addr)
    except OSError:
        pass                                      # full send buffer or closed socket: UDP may lose it


def _tcp_send(writer: asyncio.StreamWriter, reply: bytes) -> None:
    if not writer.is_closing():
        writer.write(struct.pack("!H", len(reply)) + reply)


def _set_rcvbuf(sock: socket.socket) -> None:
    """4 MB receive buffer: past the kernel's cap when we may (CAP_NET_ADMIN), else up to it."""
    for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            return sock.setsockopt(socket.SOL_SOCKET, option, RCVBUF)
        except OSError:
            pass


async def serve_on(host: str, port: int, view: View, **kw) -> tuple[Resolver, int, int]:
    """A Resolver serving `view` under key "bench" on `host`:`port` (0: any free port), UDP and TCP
    (on the same port when it is free for both); returns it with the UDP and the TCP port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    tcp = socket.socket(family, socket.SOCK_STREAM)
    try:
        udp.bind((host, port))
        udp_port = udp.getsockname()[1]
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, udp_port))
        except OSError:
            if port:
                raise
            tcp.bind((host, 0))
        tcp.listen(128)
        resolver = Resolver(**kw)
        await resolver.add_sandbox("bench", udp, tcp, view)
    except BaseException:
        udp.close()
        tcp.close()
        raise
    return resolver, udp_port, tcp.getsockname()[1]
