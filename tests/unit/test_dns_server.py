"""The resolver on real loopback sockets: answers, cache, set_view, forwarding to a stub upstream
started here on 127.0.0.1 (never the machine's own resolver), REFUSED past the bound, TCP framing."""
import asyncio
import functools
import socket
import struct
import time

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rrset

from mesh.dns import server
from mesh.dns.server import Resolver, serve_on
from mesh.dns.view import View

HOST = "127.0.0.1"
MANY = tuple(f"10.0.1.{i}" for i in range(1, 41))
VIEW = View(a={"web": (("10.0.0.5",), 600), "tasks.web": (("10.0.0.7", "10.0.0.8"), 5),
               "big": (MANY, 5)}, forward=False)


def run(coro_fn):
    @functools.wraps(coro_fn)
    def wrapper(*args, **kw):
        asyncio.run(asyncio.wait_for(coro_fn(*args, **kw), 30))
    return wrapper


class Stub:
    """A tiny upstream on 127.0.0.1 (UDP and TCP on one port): known names -> A, else NXDOMAIN;
    `silent` answers nothing; `tc` names come back truncated over UDP; `noise` sends a reply with
    a wrong ID before the right one; `forger` (a socket) sends a forged copy with the right ID from
    another port first, and the real reply comes 50 ms later."""

    def __init__(self, records=None, silent=False, noise=False, forger=None):
        self.records = records or {}
        self.silent, self.noise, self.forger = silent, noise, forger
        self.udp_seen, self.tcp_seen = [], []

    async def start(self):
        loop = asyncio.get_running_loop()
        stub = self

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                stub.udp_seen.append(data)
                for reply in stub.replies(data, tcp=False):
                    if stub.forger is None:
                        self.transport.sendto(reply, addr)
                        continue
                    forged = dns.message.from_wire(reply)
                    forged.answer = [dns.rrset.from_text(forged.question[0].name, 60, "IN", "A",
                                                         "6.6.6.6")]
                    stub.forger.sendto(forged.to_wire(), addr)
                    loop.call_later(0.05, self.transport.sendto, reply, addr)

        for _ in range(20):                       # a port free for both UDP and TCP
            self.udp, _ = await loop.create_datagram_endpoint(Proto, local_addr=(HOST, 0))
            self.port = self.udp.get_extra_info("sockname")[1]
            try:
                self.tcp = await asyncio.start_server(self._serve_tcp, HOST, self.port)
                return self
            except OSError:
                self.udp.close()
        raise RuntimeError("no port free for both UDP and TCP")

    def replies(self, data, tcp):
        if self.silent:
            return []
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        name = q.question[0].name.to_text().rstrip(".")
        if name in self.records:
            r.answer.append(dns.rrset.from_text_list(q.question[0].name, 60, "IN", "A",
                                                     self.records[name]))
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
        if name.startswith("tc.") and not tcp:
            r.answer.clear()
            r.flags |= dns.flags.TC
        wire = r.to_wire()
        wrong = struct.pack("!H", q.id ^ 0x5555) + wire[2:]
        return [wrong, wire] if self.noise else [wire]

    async def _serve_tcp(self, reader, writer):
        try:
            while True:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(n)
                self.tcp_seen.append(data)
                for reply in self.replies(data, tcp=True):
                    writer.write(struct.pack("!H", len(reply)) + reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self):
        self.udp.close()
        self.tcp.close()
        await self.tcp.wait_closed()


async def udp(name, port, rdtype="A", **kw):
    return await dns.asyncquery.udp(dns.message.make_query(name, rdtype, **kw), HOST, port=port,
                                    timeout=5)


async def tcp(name, port, rdtype="A"):
    return await dns.asyncquery.tcp(dns.message.make_query(name, rdtype), HOST, port=port, timeout=5)


def addresses(msg):
    return sorted(rd.address for rrset in msg.answer for rd in rrset)


@run
async def test_answers_over_udp_and_tcp():
    r, up, tp = await serve_on(HOST, 0, VIEW)
    try:
        assert addresses(await udp("web", up)) == ["10.0.0.5"]
        assert addresses(await tcp("WEB.", tp)) == ["10.0.0.5"]
        assert addresses(await udp("tasks.web", up)) == ["10.0.0.7", "10.0.0.8"]
        nodata = await udp("web", up, "AAAA")
        assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
        assert (await udp("nowhere", up)).rcode() == dns.rcode.SERVFAIL      # forward=False
        st = r.stats()
        assert st["queries"] == 5 and st["answered"] == 5 and st["servfail"] == 1
    finally:
        await r.close()


@run
async def test_cache_hits_patch_the_id():
    r, up, _ = await serve_on(HOST, 0, VIEW)
    try:
        for qid in (0x1234, 0xABCD, 0x0001):
            q = dns.message.make_query("web", "A")
            q.id = qid
            reply = await dns.asyncquery.udp(q, HOST, port=up, timeout=5)  # checks the ID itself
            assert reply.id == qid and addresses(reply) == ["10.0.0.5"]
        assert r.stats()["cache_hits"] == 2 and r.stats()["answered"] == 1
    finally:
        await r.close()


@run
async def test_set_view_changes_answers_at_once():
    r, up, tp = await serve_on(HOST, 0, VIEW)
    try:
        assert addresses(await udp("web", up)) == ["10.0.0.5"]
        assert addresses(await tcp("web", tp)) == ["10.0.0.5"]
        r.set_view("bench", View(a={"web": (("10.0.0.99",), 600)}, forward=False))
        assert addresses(await udp("web", up)) == ["10.0.0.99"]
        assert addresses(await tcp("web", tp)) == ["10.0.0.99"]
        assert (await udp("tasks.web", up)).rcode() == dns.rcode.SERVFAIL
    finally:
        await r.close()


def _forwarding(*upstreams, a=None):
    return View(a=a or {"web": (("10.0.0.5",), 600)}, forward=True,
                upstreams=tuple(f"{HOST}:{s.port}" for s in upstreams))


@run
async def test_forwarding_relays_answers_and_nxdomain_over_the_clients_protocol():
    calls = []

    def factory(family, type_):
        calls.append((family, type_))
        return socket.socket(family, type_)

    stub = await Stub({"example.org": ["192.0.2.1"]}, noise=True).start()
    r, up, tp = await serve_on(HOST, 0, _forwarding(stub), socket_factory=factory)
    try:
        got = await udp("example.org", up)
        assert addresses(got) == ["192.0.2.1"] and got.rcode() == dns.rcode.NOERROR
        assert (await udp("missing.example", up)).rcode() == dns.rcode.NXDOMAIN
        assert len(stub.udp_seen) == 2 and not stub.tcp_seen
        assert addresses(await tcp("example.org", tp)) == ["192.0.2.1"]
        assert (await tcp("missing.example", tp)).rcode() == dns.rcode.NXDOMAIN
        assert len(stub.tcp_seen) == 2 and len(stub.udp_seen) == 2
        assert addresses(await udp("web", up)) == ["10.0.0.5"]           # known: never forwarded
        assert len(stub.udp_seen) == 2
        assert (socket.AF_INET, socket.SOCK_DGRAM) in calls
        assert (socket.AF_INET, socket.SOCK_STREAM) in calls
        st = r.stats()
        assert st["forwarded"] == 4 and st["relayed"] == 4 and st["cache_hits"] == 0
    finally:
        await r.close()
        await stub.stop()


@run
async def test_truncated_upstream_udp_reply_is_retried_over_tcp():
    stub = await Stub({"tc.example": ["192.0.2.7"]}).start()
    r, up, _ = await serve_on(HOST, 0, _forwarding(stub))
    try:
        got = await udp("tc.example", up)
        assert addresses(got) == ["192.0.2.7"] and not got.flags & dns.flags.TC
        assert len(stub.udp_seen) == 1 and len(stub.tcp_seen) == 1
    finally:
        await r.close()
        await stub.stop()


@run
async def test_servfail_when_every_upstream_is_silent_and_order_with_fallback():
    silent1, silent2 = await Stub(silent=True).start(), await Stub(silent=True).start()
    good = await Stub({"example.org": ["192.0.2.1"]}).start()
    other = await Stub({"example.org": ["192.0.2.2"]}).start()
    r, up, tp = await serve_on(HOST, 0, _forwarding(silent1, silent2), upstream_timeout=0.3)
    try:
        start = time.monotonic()
        assert (await udp("example.org", up)).rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - start >= 0.55                           # both were tried
        assert len(silent1.udp_seen) == 1 and len(silent2.udp_seen) == 1
        assert (await tcp("example.org", tp)).rcode() == dns.rcode.SERVFAIL
        r.set_view("bench", _forwarding(silent1, good, other))
        assert addresses(await udp("example.org", up)) == ["192.0.2.1"]   # 2nd answers, 3rd unused
        r.set_view("bench", _forwarding(other, good))
        assert addresses(await udp("example.org", up)) == ["192.0.2.2"]   # the first one wins
        assert len(good.udp_seen) == 1 and len(other.udp_seen) == 1
        assert r.stats()["servfail"] == 2
    finally:
        await r.close()
        for stub in (silent1, silent2, good, other):
            await stub.stop()


@run
async def test_empty_or_unreachable_upstreams_give_servfail():
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind((HOST, 0))
    port = dead.getsockname()[1]
    dead.close()                                           # nothing listens there any more
    view = View(forward=True, upstreams=(f"{HOST}:{port}", "not-an-address"))
    # (the ICMP "port unreachable" usually ends the wait at once, but the kernel rate-limits ICMP,
    # so this asserts the answer, not how fast it came)
    r, up, _ = await serve_on(HOST, 0, view, upstream_timeout=1.0)
    try:
        assert (await udp("example.org", up)).rcode() == dns.rcode.SERVFAIL
        r.set_view("bench", View(forward=True, upstreams=()))
        assert (await udp("example.org", up)).rcode() == dns.rcode.SERVFAIL
    finally:
        await r.close()


@run
async def test_refused_past_max_inflight():
    silent = await Stub(silent=True).start()
    r, up, _ = await serve_on(HOST, 0, _forwarding(silent), upstream_timeout=1.0, max_inflight=2)
    try:
        replies = await asyncio.gather(*(udp(f"n{i}.example", up) for i in range(5)))
        codes = sorted(dns.rcode.to_text(m.rcode()) for m in replies)
        assert codes == ["REFUSED"] * 3 + ["SERVFAIL"] * 2
        st = r.stats()
        assert st["refused"] == 3 and st["forwarded"] == 2 and st["inflight"] == 0
    finally:
        await r.close()
        await silent.stop()


@run
async def test_big_answer_truncated_over_udp_complete_over_tcp():
    r, up, tp = await serve_on(HOST, 0, VIEW)
    try:
        cut = await udp("big", up)
        assert cut.flags & dns.flags.TC and not cut.answer
        assert addresses(await tcp("big", tp)) == sorted(MANY)
        assert len(addresses(await udp("big", up, use_edns=0, payload=4096))) == 40
    finally:
        await r.close()


async def _framed(reader):
    (n,) = struct.unpack("!H", await reader.readexactly(2))
    return dns.message.from_wire(await reader.readexactly(n))


@run
async def test_tcp_several_queries_on_one_connection_and_bad_frames():
    r, _, tp = await serve_on(HOST, 0, VIEW)
    try:
        reader, writer = await asyncio.open_connection(HOST, tp)
        queries = [dns.message.make_query(n, "A") for n in ("web", "tasks.web", "web", "nowhere")]
        writer.write(b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries)))
        for q in queries:
            reply = await _framed(reader)
            assert reply.id == q.id
        writer.write(b"\x00\x00")                           # a zero-length frame ends it
        assert await reader.read() == b""
        writer.close()
        reader, writer = await asyncio.open_connection(HOST, tp)
        writer.write(b"\x00\x30" + b"\x00" * 5)             # a cut frame, then gone
        writer.close()
        assert addresses(await tcp("web", tp)) == ["10.0.0.5"]
        st = r.stats()
        assert st["queries"] == st["cache_hits"] + st["answered"] + st["dropped"] + st["formerr"]
    finally:
        await r.close()


@run
async def test_tcp_idle_clients_are_closed():
    old = server.TCP_IDLE
    server.TCP_IDLE = 0.3
    r, _, tp = await serve_on(HOST, 0, VIEW)
    try:
        reader, writer = await asyncio.open_connection(HOST, tp)
        writer.write(b"\x00\x20\x00")                      # slowloris: a length and one byte
        start = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - start < 3
        writer.close()
    finally:
        server.TCP_IDLE = old
        await r.close()


@run
async def test_remove_sandbox_closes_the_sockets():
    r = Resolver()
    udp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_sock.bind((HOST, 0))
    tcp_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp_sock.bind((HOST, 0))
    tcp_sock.listen(16)
    up, tp = udp_sock.getsockname()[1], tcp_sock.getsockname()[1]
    await r.add_sandbox("a", udp_sock, tcp_sock, VIEW)
    reader, writer = await asyncio.open_connection(HOST, tp)   # an open connection too
    assert addresses(await udp("web", up)) == ["10.0.0.5"]
    await r.remove_sandbox("a")
    assert udp_sock.fileno() == -1 and tcp_sock.fileno() == -1
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    try:
        await asyncio.open_connection(HOST, tp)
        raise AssertionError("the TCP port still accepts")
    except ConnectionRefusedError:
        pass
    assert r.stats()["sandboxes"] == 0
    await r.remove_sandbox("a")                                # twice is fine
    await r.close()


@run
async def test_replies_from_another_address_or_port_are_never_trusted():
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    forger.bind((HOST, 0))
    stub = await Stub({"example.org": ["192.0.2.1"]}, forger=forger).start()
    r, up, _ = await serve_on(HOST, 0, _forwarding(stub))
    try:
        assert addresses(await udp("example.org", up)) == ["192.0.2.1"]
    finally:
        await r.close()
        await stub.stop()
        forger.close()


@run
async def test_failing_socket_factory_gives_servfail_and_close_cancels_work_in_flight():
    def broken(family, type_):
        raise OSError("no namespace")

    good = await Stub({"example.org": ["192.0.2.1"]}).start()
    r, up, _ = await serve_on(HOST, 0, _forwarding(good), socket_factory=broken)
    try:
        assert (await udp("example.org", up)).rcode() == dns.rcode.SERVFAIL
        assert r.stats()["servfail"] == 1
    finally:
        await r.close()
    silent = await Stub(silent=True).start()
    r, up, _ = await serve_on(HOST, 0, _forwarding(silent), upstream_timeout=10)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        for i in range(3):
            client.sendto(dns.message.make_query(f"n{i}.example", "A").to_wire(), (HOST, up))
        while r.stats()["forwarded"] < 3:
            await asyncio.sleep(0.01)
        assert r.stats()["inflight"] == 3
        await r.close()
        assert r.stats()["inflight"] == 0 and r.stats()["sandboxes"] == 0
    await good.stop()
    await silent.stop()


def test_upstream_addresses():
    from mesh.dns.upstream import parse_upstream
    assert parse_upstream("10.0.0.2") == (socket.AF_INET, ("10.0.0.2", 53))
    assert parse_upstream("10.0.0.2:5353") == (socket.AF_INET, ("10.0.0.2", 5353))
    assert parse_upstream("::1") == (socket.AF_INET6, ("::1", 53, 0, 0))
    assert parse_upstream("[fd00::1]:5300") == (socket.AF_INET6, ("fd00::1", 5300, 0, 0))
    for bad in ("nowhere", "10.0.0.1:0", "10.0.0.1:x"):
        try:
            parse_upstream(bad)
            raise AssertionError(bad)
        except ValueError:
            pass


@run
async def test_every_address_of_a_big_set_comes_first_in_time():
    old = server.RESHUFFLE
    server.RESHUFFLE = 0.1
    twenty = tuple(f"10.0.2.{i}" for i in range(1, 21))
    r, up, _ = await serve_on(HOST, 0, View(a={"many": (twenty, 5)}, forward=False))
    try:
        firsts = set()
        for _ in range(8):
            for _ in range(20):
                reply = await udp("many", up, use_edns=0, payload=1232)
                firsts.add(reply.answer[0][0].address)
            await asyncio.sleep(0.15)
        assert len(firsts) > server.VARIANTS
        assert r.stats()["cache_hits"] > 100
    finally:
        server.RESHUFFLE = old
        await r.close()
