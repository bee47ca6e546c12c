"""Forwarding of queries the View does not know to upstream servers, on the running asyncio loop.

Sockets come from the owner's `socket_factory(family, type)` (the agent makes them inside the right
network namespace). Over UDP there is one long-lived non-blocking socket per upstream address, made
when first needed (or after it broke), connected (the kernel drops datagrams from any other address
or port) and registered once with the loop. A query goes out with a fresh unpredictable ID, unique
among that socket's queries in flight, and is matched on it and on its question; the client's ID is
put back. A query is a small state object with a callback, not a task; timeouts are a deadline queue
swept by one timer. With one source port per upstream, an off-path forger has the ID and the question
to guess: upstreams are meant to be near and trusted (the host's resolvers).

Upstreams are tried in order (at most 3), each with its own timeout; the first usable reply wins.
SERVFAIL and REFUSED mean "try the next one"; anything else (NXDOMAIN included) is relayed. A UDP
reply with TC set is asked again over TCP on that upstream (within what is left of its timeout); a
TCP query goes over TCP (a task per attempt: TCP is rare). An ICMP "port unreachable" on an upstream
socket sends every query waiting on it on to its next upstream at once.

    fwd = Forwarder(timeout=4.0, socket_factory=None)
    job = fwd.submit(query, q, ("10.0.0.2", "10.0.0.3:5353"), tcp=False, done=callback)
    # then once: callback(job, reply), the reply with the query's own ID or None when every upstream
    # failed; after job.cancel(), no callback
    reply = await fwd.forward(query, q, upstreams, tcp=False)      # the same as a coroutine
    fwd.close()
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
from collections import deque
from functools import lru_cache
from typing import Callable

from mesh.dns import packet

log = logging.getLogger(__name__)

SocketFactory = Callable[[int, int], socket.socket]
Done = Callable[["Job", "bytes | None"], None]
MAX_UPSTREAMS = 3
BURST = 256                         # replies read per readiness callback of an upstream socket
RCVBUF = 1 << 20
TICK = 0.01                         # seconds: timeouts fire up to this late (fewer timer wake-ups)
_TC_BYTE = packet.TC >> 8


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


class _Ids:
    """Unpredictable 16-bit query IDs, drawn from os.urandom a few hundred at a time."""

    def __init__(self):
        self._left: list[int] = []

    def next(self) -> int:
        if not self._left:
            self._left = list(memoryview(os.urandom(512)).cast("H"))
        return self._left.pop()


class _Link:
    """The long-lived UDP socket to one upstream address and the queries waiting on it by ID."""
    __slots__ = ("key", "sock", "waiting")

    def __init__(self, key: tuple, sock: socket.socket):
        self.key, self.sock = key, sock
        self.waiting: dict[int, Job] = {}


class Job:
    """One forwarded query on its way through the upstreams; `finished` once answered or cancelled."""
    __slots__ = ("fwd", "query", "question", "limit", "upstreams", "tcp", "done", "index", "attempt",
                 "finished", "link", "qid", "target", "deadline", "task")

    def __init__(self, fwd: Forwarder, query: bytes, q: packet.Question, upstreams: tuple[str, ...],
                 tcp: bool, done: Done):
        self.fwd, self.query, self.done, self.tcp = fwd, query, done, tcp
        self.question, self.limit = query[12:q.end], q.limit
        self.upstreams = upstreams[:MAX_UPSTREAMS]
        self.index = self.attempt = self.qid = 0
        self.finished, self.deadline = False, 0.0
        self.link: _Link | None = None
        self.target: tuple | None = None            # (family, address) of the current upstream
        self.task: asyncio.Task | None = None       # a TCP attempt

    def next(self) -> None:
        """Ask the next upstream, or end with None when none is left."""
        while not self.finished and self.index < len(self.upstreams):
            text = self.upstreams[self.index]
            self.index += 1
            self.attempt += 1
            try:
                self.target = parse_upstream(text)
            except ValueError:
                continue
            if self.tcp:
                self.task = self.fwd.spawn(self._over_tcp(self.attempt))
                return
            if self.fwd.send_udp(self):
                return
        self.finish(None)

    def answered(self, reply: bytes) -> None:
        """A reply that matches (ID and question) came from the current upstream."""
        if _unusable(reply):
            self.next()
        elif not self.tcp and reply[2] & _TC_BYTE:
            self.attempt += 1               # the UDP deadline no longer applies; TCP has its own
            self.task = self.fwd.spawn(self._over_tcp(self.attempt, reply))
        else:
            self.finish(self.query[:2] + reply[2:])

    def timed_out(self, attempt: int) -> None:
        if attempt == self.attempt and not self.finished:
            self.fwd.unlink(self)
            self.next()

    def finish(self, reply: bytes | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.fwd.jobs.discard(self)
        self.done(self, reply)

    def cancel(self) -> bool:
        """Forget this query (no callback); False when it had already finished."""
        if self.finished:
            return False
        self.finished = True
        self.fwd.jobs.discard(self)
        self.fwd.unlink(self)
        if self.task is not None:
            self.task.cancel()
        return True

    async def _over_tcp(self, attempt: int, truncated: bytes | None = None) -> None:
        """This upstream over TCP: for a TCP query, or again for a UDP reply that came `truncated`
        (within what is left of the timeout; that reply is relayed when TCP fails or is too big)."""
        fwd, (family, addr), qid = self.fwd, self.target, self.fwd.ids.next()
        now = fwd.loop.time()
        when = now + fwd.timeout if truncated is None else max(self.deadline, now + TICK)
        try:
            async with asyncio.timeout_at(when):
                reply = await fwd.ask_tcp(family, addr, qid.to_bytes(2, "big") + self.query[2:],
                                          qid, self.question)
        except (OSError, TimeoutError, EOFError, struct.error):
            reply = None
        if attempt != self.attempt or self.finished:
            return
        self.task = None
        if truncated is None:
            self.next() if reply is None else self.answered(reply)
        elif reply is None or len(reply) > self.limit or _unusable(reply):
            self.finish(self.query[:2] + truncated[2:])
        else:
            self.finish(self.query[:2] + reply[2:])


def _unusable(reply: bytes) -> bool:
    return packet.rcode_of(reply) in (packet.SERVFAIL, packet.REFUSED)


class Forwarder:
    """Asks upstream servers; one per Resolver, shared by its sandboxes."""

    def __init__(self, *, timeout: float = 4.0, socket_factory: SocketFactory | None = None):
        self.timeout = timeout
        self._factory = socket_factory or socket.socket
        self.ids = _Ids()
        self.jobs: set[Job] = set()                 # in flight
        self.loop: asyncio.AbstractEventLoop | None = None
        self.errors = 0                             # unexpected exceptions (bugs), logged
        self._links: dict[tuple, _Link] = {}
        self._deadlines: dict[float, deque] = {}    # timeout -> (deadline, job, attempt), in order
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def submit(self, query: bytes, q: packet.Question, upstreams: tuple[str, ...], *, tcp: bool,
               done: Done) -> Job:
        """Start forwarding `query` (read as `q`); `done(job, reply)` is called once, maybe at once."""
        self.loop = asyncio.get_running_loop()
        job = Job(self, query, q, upstreams, tcp, done)
        self.jobs.add(job)
        try:
            job.next()
        except Exception:                           # noqa: BLE001 - a bug: that query fails alone
            self._bug(job)
        return job

    async def forward(self, query: bytes, q: packet.Question, upstreams: tuple[str, ...], *,
                      tcp: bool = False) -> bytes | None:
        """The first usable reply (with `query`'s ID) from `upstreams` in order, or None."""
        future = asyncio.get_running_loop().create_future()

        def done(_job: Job, reply: bytes | None) -> None:
            if not future.done():
                future.set_result(reply)
        job = self.submit(query, q, upstreams, tcp=tcp, done=done)
        try:
            return await future
        finally:
            job.cancel()

    def spawn(self, coro) -> asyncio.Task:
        return self.loop.create_task(coro)

    # --- UDP -------------------------------------------------------------------------------------
    def send_udp(self, job: Job) -> bool:
        """Send `job`'s query to its target over that upstream's socket; False if it cannot go."""
        try:
            link = self._links.get(job.target) or self._open(*job.target)
        except OSError as err:
            log.debug("dns: no socket for upstream %s: %s", job.target[1], err)
            return False
        except Exception:                           # noqa: BLE001 - e.g. the factory failed oddly
            log.exception("dns: no socket for upstream %s", job.target[1])
            self.errors += 1
            return False
        waiting, draw = link.waiting, self.ids.next
        qid = draw()
        while qid in waiting:
            if len(waiting) >= 0xFFFF:
                return False
            qid = draw()
        try:
            link.sock.send(qid.to_bytes(2, "big") + job.query[2:])
        except (BlockingIOError, InterruptedError):
            return False                        # send buffer full: this upstream, not the socket
        except OSError as err:                  # a stale ICMP error, or the socket is broken
            self._failed(link, err)
            return False
        waiting[qid] = job
        job.link, job.qid = link, qid
        self._arm(job)
        return True

    def _open(self, family: int, addr: tuple) -> _Link:
        sock = self._factory(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.connect(addr)
            link = _Link((family, addr), sock)
            self.loop.add_reader(sock.fileno(), self._drain, link)
        except BaseException:
            sock.close()
            raise
        self._links[link.key] = link
        return link

    def _drain(self, link: _Link) -> None:
        recv, waiting, matches = link.sock.recv, link.waiting, packet.matches
        for _ in range(BURST):
            try:
                data = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self._failed(link, err)
                return
            if len(data) < 12:
                continue
            qid = (data[0] << 8) | data[1]
            job = waiting.get(qid)
            if job is None or not matches(data, qid, job.question):
                continue                            # late (timed out), stray or forged: ignored
            del waiting[qid]
            job.link = None
            try:
                job.answered(data)
            except Exception:                       # noqa: BLE001 - a bug: that query fails alone
                self._bug(job)

    def _failed(self, link: _Link, err: OSError) -> None:
        """ICMP unreachable (ECONNREFUSED) fails the waiting queries; other errors drop the socket."""
        log.debug("dns: upstream %s: %s", link.key[1], err)
        if not isinstance(err, ConnectionRefusedError):
            self._close_link(link)
        jobs = list(link.waiting.values())
        link.waiting.clear()
        for job in jobs:
            job.link = None
            try:
                job.next()
            except Exception:                       # noqa: BLE001
                self._bug(job)

    def unlink(self, job: Job) -> None:
        link = job.link
        if link is not None:
            if link.waiting.get(job.qid) is job:
                del link.waiting[job.qid]
            job.link = None

    def _close_link(self, link: _Link) -> None:
        if self._links.get(link.key) is link:
            del self._links[link.key]
        try:
            if link.sock.fileno() >= 0 and self.loop is not None and not self.loop.is_closed():
                self.loop.remove_reader(link.sock.fileno())
        finally:
            link.sock.close()

    def _bug(self, job: Job) -> None:
        log.exception("dns: forwarding failed")
        self.errors += 1
        job.finish(None)

    # --- timeouts --------------------------------------------------------------------------------
    def _arm(self, job: Job) -> None:
        timeout = self.timeout
        job.deadline = deadline = self.loop.time() + timeout
        queue = self._deadlines.get(timeout)
        if queue is None:
            queue = self._deadlines[timeout] = deque()
        queue.append((deadline, job, job.attempt))
        if self._timer is None or deadline < self._timer_at:
            self._schedule(deadline)

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = self.loop.time()
        expired = []
        for timeout, queue in list(self._deadlines.items()):
            while queue and queue[0][0] <= now:
                _, job, attempt = queue.popleft()
                if attempt == job.attempt and not job.finished:
                    expired.append((job, attempt))
            if not queue:
                del self._deadlines[timeout]
        for job, attempt in expired:
            try:
                job.timed_out(attempt)
            except Exception:                       # noqa: BLE001
                self._bug(job)
        if self._deadlines:
            when = max(now + TICK, min(queue[0][0] for queue in self._deadlines.values()))
            if self._timer is None or when < self._timer_at:
                self._schedule(when)

    # --- TCP -------------------------------------------------------------------------------------
    async def ask_tcp(self, family: int, addr: tuple, message: bytes, qid: int,
                      question: bytes) -> bytes:
        loop = self.loop
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

    def close(self) -> None:
        """Forget every query in flight (no callbacks) and close the upstream sockets."""
        for job in list(self.jobs):
            job.cancel()
        for link in list(self._links.values()):
            self._close_link(link)
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = await loop.sock_recv(sock, n - got)
        if not chunk:
            raise EOFError("upstream closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
