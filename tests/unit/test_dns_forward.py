"""Forwarding through the long-lived upstream sockets and the cache of forwarded replies: on real
loopback sockets with stub upstreams started here on 127.0.0.1 (never the machine's own resolver),
and the pure cache (mesh.dns.answer.RelayCache) with a clock of our own."""
import asyncio
import functools
import socket
import struct
import time
import types

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from mesh.dns import answer, packet, server
from mesh.dns.server import serve_on
from mesh.dns.upstream import Forwarder
from mesh.dns.view import View

HOST = "127.0.0.1"


def run(coro_fn):
    @functools.wraps(coro_fn)
    def wrapper(*args, **kw):
        asyncio.run(asyncio.wait_for(coro_fn(*args, **kw), 30))
    return wrapper


def reply_to(query: bytes, *, ttl=60, addresses=("192.0.2.1",), rcode=dns.rcode.NOERROR, soa=None,
             tc=False) -> bytes:
    q = dns.message.from_wire(query)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if addresses and rcode == dns.rcode.NOERROR:
        r.answer.append(dns.rrset.from_text_list(q.question[0].name, ttl, "IN", "A", list(addresses)))
    if soa is not None:                               # (ttl, minimum)
        r.authority.append(dns.rrset.from_text("example.", soa[0], "IN", "SOA",
                                               f"ns.example. host.example. 1 2 3 4 {soa[1]}"))
    if tc:
        r.answer.clear()
        r.flags |= dns.flags.TC
    return r.to_wire()


class Upstream(asyncio.DatagramProtocol):
    """A stub upstream on 127.0.0.1: `answer(query) -> reply bytes or None` (None: silent), after
    `delay` seconds; remembers every query and the address it came from."""

    def __init__(self, answer=reply_to, delay=0.0):
        self.answer, self.delay = answer, delay
        self.seen: list[tuple[bytes, tuple]] = []

    async def start(self):
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(HOST, 0))
        self.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                           1 << 20)
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    def datagram_received(self, data, addr):
        self.seen.append((data, addr))
        reply = self.answer(data)
        if reply is not None:
            asyncio.get_running_loop().call_later(self.delay, self.transport.sendto, reply, addr)

    def close(self):
        self.transport.close()


def forwarding(*upstreams, a=None):
    return View(a=a or {"web": (("10.0.0.5",), 600)}, forward=True,
                upstreams=tuple(f"{HOST}:{u.port}" for u in upstreams))


async def udp(name, port, qid=None):
    q = dns.message.make_query(name, "A")
    if qid is not None:
        q.id = qid
    return await dns.asyncquery.udp(q, HOST, port=port, timeout=5)   # checks ID and question


def addresses(msg):
    return sorted(rd.address for rrset in msg.answer for rd in rrset)


def ttls(msg):
    return [rrset.ttl for rrset in msg.answer]


class Clock:
    """Stands in for the server's `time` module: monotonic() is what the test says."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(server, "time", types.SimpleNamespace(monotonic=c.monotonic))
    return c


# --- the cache of forwarded replies, through the server ---------------------------------------------
@run
async def test_forwarded_reply_is_cached_with_ttls_decremented_then_expires(clock):
    up = await Upstream(functools.partial(reply_to, ttl=30)).start()
    r, port, _ = await serve_on(HOST, 0, forwarding(up))
    try:
        first = await udp("example.org", port, qid=0x1111)
        assert addresses(first) == ["192.0.2.1"] and ttls(first) == [30]
        clock.now += 0.5
        again = await udp("EXAMPLE.org", port)             # other bytes: another cache entry
        assert len(up.seen) == 2
        clock.now += 11.0                                   # 11.5 s after the first
        hit = await udp("example.org", port, qid=0x2222)    # the client's own ID, patched in
        assert addresses(hit) == ["192.0.2.1"] and ttls(hit) == [19] and len(up.seen) == 2
        assert ttls(await udp("EXAMPLE.org", port)) == [19] and ttls(again) == [30]
        clock.now += 18.4                                   # 29.9 s: 1 s left
        assert ttls(await udp("example.org", port)) == [1] and len(up.seen) == 2
        clock.now += 0.1                                    # 30 s: expired, asked again
        assert ttls(await udp("example.org", port)) == [30] and len(up.seen) == 3
        st = r.stats()
        assert st["relay_hits"] == 3 and st["forwarded"] == 3 and st["relayed"] == 3
        assert st["queries"] == st["cache_hits"] + st["forwarded"]
    finally:
        await r.close()
        up.close()


@run
async def test_ttl_zero_servfail_and_truncated_replies_are_not_cached(clock):
    def answer(query):
        name = dns.message.from_wire(query).question[0].name.to_text()
        if name.startswith("zero."):
            return reply_to(query, ttl=0)
        if name.startswith("tc."):
            return reply_to(query, tc=True)                 # and no TCP there: relayed with TC
        return reply_to(query, rcode=dns.rcode.SERVFAIL)

    up = await Upstream(answer).start()
    r, port, _ = await serve_on(HOST, 0, forwarding(up), upstream_timeout=0.5)
    try:
        for name in ("zero.example", "tc.example", "fail.example"):
            for _ in range(2):
                await udp(name, port)
        assert len(up.seen) == 6 and r.stats()["relay_hits"] == 0
    finally:
        await r.close()
        up.close()


@run
async def test_nxdomain_is_cached_by_the_soa_else_five_seconds(clock):
    def answer(query):
        name = dns.message.from_wire(query).question[0].name.to_text()
        soa = (120, 40) if name.startswith("soa.") else None
        return reply_to(query, rcode=dns.rcode.NXDOMAIN, soa=soa)

    up = await Upstream(answer).start()
    r, port, _ = await serve_on(HOST, 0, forwarding(up))
    try:
        for name in ("soa.example", "bare.example"):
            assert (await udp(name, port)).rcode() == dns.rcode.NXDOMAIN
        clock.now += 4.5
        hit = await udp("soa.example", port)
        assert hit.rcode() == dns.rcode.NXDOMAIN and hit.authority[0].ttl == 116
        assert (await udp("bare.example", port)).rcode() == dns.rcode.NXDOMAIN
        assert len(up.seen) == 2
        clock.now += 1.0                                    # 5.5 s: the bare one is gone
        await udp("bare.example", port)
        await udp("soa.example", port)
        assert len(up.seen) == 3
        clock.now += 35.0                                   # 40.5 s: min(SOA TTL, MINIMUM) = 40
        await udp("soa.example", port)
        assert len(up.seen) == 4
    finally:
        await r.close()
        up.close()


@run
async def test_set_view_drops_forwarded_replies_a_forwarded_name_may_become_local(clock):
    up = await Upstream().start()
    r, port, _ = await serve_on(HOST, 0, forwarding(up))
    try:
        assert addresses(await udp("db", port)) == ["192.0.2.1"]
        assert addresses(await udp("db", port)) == ["192.0.2.1"] and len(up.seen) == 1
        r.set_view("bench", forwarding(up, a={"db": (("10.0.0.9",), 600)}))
        assert addresses(await udp("db", port)) == ["10.0.0.9"]
        r.set_view("bench", forwarding(up))
        assert addresses(await udp("db", port)) == ["192.0.2.1"] and len(up.seen) == 2
    finally:
        await r.close()
        up.close()


@run
async def test_a_reply_arriving_after_set_view_does_not_fill_the_new_cache(clock):
    up = await Upstream(delay=0.2).start()
    r, port, _ = await serve_on(HOST, 0, forwarding(up))
    try:
        asked = asyncio.ensure_future(udp("late.example", port))
        while not up.seen:
            await asyncio.sleep(0.01)
        r.set_view("bench", forwarding(up))                  # while the upstream is thinking
        assert addresses(await asked) == ["192.0.2.1"]
        await udp("late.example", port)
        assert len(up.seen) == 2
    finally:
        await r.close()
        up.close()


# --- the cache, pure --------------------------------------------------------------------------------
def test_relay_cache_rewrites_every_ttl_but_the_opts_and_drops_expired_entries():
    q = dns.message.make_query("example.org", "A", use_edns=0, want_dnssec=True)
    r = dns.message.make_response(q)
    r.use_edns(0, dns.flags.DO, 1232)
    r.answer.append(dns.rrset.from_text_list(q.question[0].name, 20, "IN", "A", ["192.0.2.1"]))
    r.authority.append(dns.rrset.from_text("org.", 100, "IN", "NS", "ns.org."))
    wire, key = r.to_wire(), q.to_wire()[2:]
    cache = answer.RelayCache(2)
    assert cache.put(key, wire, 50.0) and len(cache) == 1
    assert cache.get(key, 50.9) == wire[2:]
    later = dns.message.from_wire(wire[:2] + cache.get(key, 57.2))
    assert later.answer[0].ttl == 13 and later.authority[0].ttl == 93
    assert later.ednsflags & dns.flags.DO and later.edns == 0      # the OPT's "TTL" untouched
    assert cache.get(key, 70.0) is None and len(cache) == 0
    for i in range(3):                                              # cleared when full
        cache.put(bytes([i]) + key, wire, 50.0)
    assert len(cache) == 1
    cache.put(b"x", wire, 60.0)
    cache.prune(70.0)
    assert len(cache) == 1 and cache.get(b"x", 70.0) is not None


def test_relayed_refuses_what_must_not_be_cached():
    query = dns.message.make_query("example.org", "A").to_wire()
    assert answer.relayed(reply_to(query, ttl=0), 0.0) is None
    assert answer.relayed(reply_to(query, tc=True), 0.0) is None
    assert answer.relayed(reply_to(query, rcode=dns.rcode.REFUSED), 0.0) is None
    assert answer.relayed(reply_to(query)[:-3], 0.0) is None          # a record cut short
    assert answer.relayed(reply_to(query, ttl=10 ** 6), 0.0).expires == answer.RELAY_TTL_MAX
    assert answer.relayed(reply_to(query, ttl=2 ** 31 + 5), 0.0) is None   # RFC 2181: that is 0
    nodata = answer.relayed(reply_to(query, addresses=(), soa=(50, 9)), 0.0)
    assert nodata.expires == 9


# --- the long-lived upstream sockets ----------------------------------------------------------------
def counting_factory():
    made = []

    def factory(family, kind):
        made.append(kind)
        return socket.socket(family, kind)
    return factory, made


@run
async def test_many_concurrent_forwards_share_one_upstream_socket_with_random_ids():
    up = await Upstream(delay=0.05).start()
    factory, made = counting_factory()
    r, port, _ = await serve_on(HOST, 0, forwarding(up), socket_factory=factory, max_inflight=500)
    try:
        names = [f"n{i}.example" for i in range(300)]
        replies = await asyncio.gather(*(udp(n, port, qid=0x4242) for n in names))
        assert all(addresses(m) == ["192.0.2.1"] and m.id == 0x4242 for m in replies)
        assert [m.question[0].name.to_text() for m in replies] == [n + "." for n in names]
        assert made == [socket.SOCK_DGRAM]                      # one socket for all of them
        assert len({addr for _, addr in up.seen}) == 1          # all from one source port
        ids = {struct.unpack("!H", data[:2])[0] for data, _ in up.seen}
        assert len(ids) >= 290                                  # fresh random IDs, not 0x4242
        st = r.stats()
        assert st["forwarded"] == 300 and st["relayed"] == 300 and st["inflight"] == 0
        assert st["refused"] == 0
    finally:
        await r.close()
        up.close()


@run
async def test_timeouts_and_a_late_reply_after_the_timeout_is_ignored():
    slow = await Upstream(functools.partial(reply_to, addresses=("6.6.6.6",)), delay=0.4).start()
    good = await Upstream().start()
    factory, made = counting_factory()
    r, port, _ = await serve_on(HOST, 0, forwarding(slow, good), socket_factory=factory,
                                upstream_timeout=0.15)
    try:
        start = time.monotonic()
        got = await udp("example.org", port)
        assert addresses(got) == ["192.0.2.1"] and time.monotonic() - start > 0.14   # waited the timeout
        await asyncio.sleep(0.5)                                # the slow reply has come and gone
        r.set_view("bench", forwarding(slow))
        start = time.monotonic()
        assert (await udp("other.example", port)).rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - start > 0.14                  # gave up only after the timeout
        await asyncio.sleep(0.5)
        st = r.stats()
        assert st["relayed"] == 1 and st["servfail"] == 1 and st["errors"] == 0
        assert st["inflight"] == 0
        assert made == [socket.SOCK_DGRAM] * 2                  # one per upstream, kept
    finally:
        await r.close()
        slow.close()
        good.close()


@run
async def test_forwarder_calls_back_once_and_not_after_cancel():
    slow = await Upstream(delay=0.2).start()
    fwd = Forwarder(timeout=0.1)
    upstreams = (f"{HOST}:{slow.port}",)
    query = dns.message.make_query("example.org", "A").to_wire()
    q = packet.read_query(query)
    calls = []
    job = fwd.submit(query, q, upstreams, tcp=False, done=lambda j, reply: calls.append(reply))
    await asyncio.sleep(0.4)
    assert calls == [None] and job.finished and not fwd.jobs
    fwd.timeout = 1.0
    job = fwd.submit(query, q, upstreams, tcp=False, done=lambda j, reply: calls.append(reply))
    assert job.cancel() and not job.cancel()
    await asyncio.sleep(0.4)
    assert calls == [None]
    reply = await fwd.forward(query, q, upstreams)
    assert reply[:2] == query[:2] and dns.message.from_wire(reply).answer
    fwd.close()
    slow.close()


@run
async def test_a_broken_upstream_socket_is_made_again():
    up = await Upstream().start()
    factory, made = counting_factory()
    r, port, _ = await serve_on(HOST, 0, forwarding(up), socket_factory=factory)
    try:
        await udp("a.example", port)
        link = next(iter(r._forwarder._links.values()))
        r._forwarder._failed(link, OSError("broken"))           # as when recv fails on it
        assert link.sock.fileno() == -1
        assert addresses(await udp("b.example", port)) == ["192.0.2.1"]
        assert made == [socket.SOCK_DGRAM] * 2
    finally:
        await r.close()
        up.close()


# --- the plain path and IPv6 ------------------------------------------------------------------------
@run
async def test_without_recvmmsg_the_same_answers(monkeypatch):
    monkeypatch.setattr(server._Batch, "make", classmethod(lambda cls: None))
    up = await Upstream().start()
    r, port, _ = await serve_on(HOST, 0, forwarding(up))
    try:
        assert r._batch is None
        assert addresses(await udp("web", port)) == ["10.0.0.5"]
        assert addresses(await udp("web", port)) == ["10.0.0.5"]
        assert addresses(await udp("example.org", port)) == ["192.0.2.1"]
        assert addresses(await udp("example.org", port)) == ["192.0.2.1"]
        st = r.stats()
        assert st["cache_hits"] == 2 and st["relay_hits"] == 1 and len(up.seen) == 1
    finally:
        await r.close()
        up.close()


@run
async def test_ipv6_clients_get_their_replies():
    try:
        r, port, _ = await serve_on("::1", 0, View(a={"web": (("10.0.0.5",), 600)}, forward=False))
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        q = dns.message.make_query("web", "A")
        for _ in range(2):                                      # a miss, then a hit
            got = await dns.asyncquery.udp(q, "::1", port=port, timeout=5)
            assert addresses(got) == ["10.0.0.5"]
        got = await dns.asyncquery.udp(dns.message.make_query("nowhere", "A"), "::1", port=port,
                                       timeout=5)
        assert got.rcode() == dns.rcode.SERVFAIL
    finally:
        await r.close()
