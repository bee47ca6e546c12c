"""What to do with one query, given a sandbox's View: pure (no sockets, no asyncio).

`respond` reads the query strictly (mesh.dns.packet), then either answers it from the View (packed
with dnslib, truncated with TC when a UDP reply is bigger than the client takes), or says it must be
forwarded, or that it must be dropped. The server caches `Result.replies` keyed on the query bytes
after the ID; several replies are shuffled variants of the same answer, one picked per query.

    r = respond(query, view, tcp=False, variants=8, memo=memo)
    r.action      # REPLY (send one of r.replies), FORWARD (ask the upstreams), DROP (say nothing)
    r.replies     # complete packed replies carrying the query's ID
    r.cacheable   # same query bytes + same View -> same replies (never for malformed queries)
    r.question    # the packet.Question read (None when the query could not be read)

    cache = RelayCache(10_000)    # forwarded replies (see Relayed), by query bytes after the ID
    cache.put(query[2:], reply, now)   # kept if cacheable; .get(query[2:], later): reply after ID

`memo` (optional, a dict the caller owns per View and drops with it) keeps built answers by meaning
(name, type, class, size, EDNS, RD) rather than by bytes, so that queries differing only in case,
EDNS options or other bytes the answer does not depend on are not built again with dnslib: the
reply is the query's ID + the cached header + the query's own question + the cached records (the
records' compression pointers into the question stay valid, as a name differing only in case has
the same layout). Bounded by MEMO_MAX entries, cleared when full.

Rules (Docker's embedded DNS, then further): names are case-insensitive; A from view.a, shuffled;
AAAA, MX and any other type of a known name -> NOERROR without answer, never forwarded; PTR from
view.ptr; SRV from view.srv with the A records of known targets as additional; unknown names ->
FORWARD, or SERVFAIL when the View may not forward or has no upstream; opcode other than QUERY ->
NOTIMP; a question count other than 1 or unreadable bytes -> FORMERR (12 bytes, no amplification);
a header shorter than 12 bytes or a packet with QR set (a response: answering it could loop) -> DROP.
"""
from __future__ import annotations

import itertools
import random
import struct
from dataclasses import dataclass

from dnslib import A, DNSHeader, DNSLabel, DNSQuestion, DNSRecord, EDNS0, PTR, RR, SRV

from mesh.dns import packet
from mesh.dns.packet import (BADVERS, FORMERR, NOERROR, NOTIMP, OPCODE, QR, SERVFAIL, TCP_MAX,
                             Malformed, Question)
from mesh.dns.view import View

REPLY, FORWARD, DROP = "reply", "forward", "drop"
QTYPE_A, QTYPE_PTR, QTYPE_SRV = 1, 12, 33
CLASS_IN, CLASS_ANY = 1, 255
MAX_VARIANTS = 16
MEMO_MAX = 10_000
RELAY_TTL_MAX = 300          # seconds a forwarded reply is cached at most
RELAY_NEGATIVE_TTL = 5       # for NXDOMAIN / NODATA without an authority SOA to say how long
_TTL = struct.Struct("!I")
_rng = random.Random()       # our own: tests' libraries may reseed the global one


@dataclass(frozen=True, slots=True)
class Result:
    action: str
    replies: tuple[bytes, ...] = ()
    cacheable: bool = False
    rcode: int = NOERROR
    question: Question | None = None


_DROP = Result(DROP)


def respond(query: bytes, view: View, *, tcp: bool = False, variants: int = 1,
            memo: dict | None = None) -> Result:
    """Decide about one query; `variants` > 1 asks for up to that many shuffled orders of an answer."""
    if len(query) < 12:
        return _DROP
    flags = (query[2] << 8) | query[3]
    if flags & QR:
        return _DROP
    if flags & OPCODE:
        return Result(REPLY, (packet.header_reply(query, NOTIMP),), rcode=NOTIMP)
    try:
        q = packet.read_query(query)
    except Malformed:
        return Result(REPLY, (packet.header_reply(query, FORMERR),), rcode=FORMERR)
    if q.edns_version != 0:
        return Result(REPLY, (packet.short_reply(query, q, BADVERS),), rcode=BADVERS, question=q)
    if q.key is not None and view.knows(q.key):
        limit = TCP_MAX if tcp else q.limit
        return Result(REPLY, _remembered(query, q, view, limit, variants, memo), True, NOERROR, q)
    if not view.forward or not view.upstreams:
        return Result(REPLY, (packet.short_reply(query, q, SERVFAIL),), True, SERVFAIL, q)
    return Result(FORWARD, question=q)


def _records(q: Question, view: View) -> tuple[list[RR], list[RR]]:
    """(answer, additional) records for a name the View knows; both empty for NODATA."""
    if q.qclass not in (CLASS_IN, CLASS_ANY):
        return [], []
    name, key = DNSLabel(q.labels), q.key
    if q.qtype == QTYPE_A and key in view.a:
        return _a_records(name, *view.a[key]), []
    if q.qtype == QTYPE_PTR and key in view.ptr:
        target, ttl = view.ptr[key]
        return [RR(name, QTYPE_PTR, rdata=PTR(_fqdn(target)), ttl=ttl)], []
    if q.qtype == QTYPE_SRV and key in view.srv:
        targets, ttl = view.srv[key]
        answer = [RR(name, QTYPE_SRV, rdata=SRV(p, w, port, _fqdn(t)), ttl=ttl)
                  for p, w, port, t in targets]
        additional: list[RR] = []
        for target in dict.fromkeys(t.lower().rstrip(".") for _, _, _, t in targets):
            if target in view.a:
                additional += _a_records(DNSLabel(_fqdn(target)), *view.a[target])
        return answer, additional
    return [], []


def _a_records(name: DNSLabel, addresses: tuple[str, ...], ttl: int) -> list[RR]:
    return [RR(name, QTYPE_A, rdata=A(a), ttl=ttl) for a in addresses if ":" not in a]


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def orders(n: int, variants: int) -> list[tuple[int, ...]]:
    """Orders of n records: one random shuffle, or up to `variants` distinct ones (every order when
    n! fits, else rotations of a random shuffle starting at distinct records)."""
    base = list(range(n))
    _rng.shuffle(base)
    if n < 2 or variants <= 1:
        return [tuple(base)]
    if n <= 3:
        every = list(itertools.permutations(base))
        return every if len(every) <= variants else _rng.sample(every, variants)
    starts = range(n) if n <= variants else _rng.sample(range(n), variants)
    return [tuple(base[s:] + base[:s]) for s in starts]


def _local(q: Question, view: View, limit: int, variants: int) -> tuple[bytes, ...]:
    """Packed replies (one per order of the answer records), truncated to `limit` with TC."""
    answer, additional = _records(q, view)
    header = DNSHeader(id=q.id, qr=1, ra=1, rd=int(q.rd))
    record = DNSRecord(header, q=DNSQuestion(DNSLabel(q.labels), q.qtype, q.qclass))
    opt = [EDNS0(udp_len=packet.OUR_UDP_SIZE)] if q.edns is not None else []
    out: list[bytes] = []
    for order in orders(len(answer), min(variants, MAX_VARIANTS)):
        record.rr = [answer[i] for i in order]
        record.ar = additional + opt
        data = bytes(record.pack())
        if len(data) > limit:
            record.rr, record.auth, record.ar = [], [], list(opt)
            record.header.tc = 1
            return (bytes(record.pack()),)
        out.append(data)
    return tuple(out)


def _remembered(query: bytes, q: Question, view: View, limit: int, variants: int,
                memo: dict | None) -> tuple[bytes, ...]:
    """_local's replies, from `memo` when it has them for the same meaning (see the module doc)."""
    plain = q.end - 16 == sum(len(label) + 1 for label in q.labels) + 1    # no pointer in the name
    if memo is None or not plain:
        return _local(q, view, limit, variants)
    key = (q.key, q.qtype, q.qclass, limit, q.edns is not None, q.flags & packet.RD)
    parts = memo.get(key)
    if parts is None:
        replies = _local(q, view, limit, variants)
        if len(memo) >= MEMO_MAX:
            memo.clear()
        memo[key] = tuple((reply[2:12], reply[q.end:]) for reply in replies)
        return replies
    qid, question = query[:2], query[12:q.end]
    return tuple(qid + head + question + tail for head, tail in parts)


def error_reply(query: bytes, q: Question, rcode: int) -> bytes:
    """SERVFAIL, REFUSED...: header + question (+ OPT), for queries the server could not answer."""
    return packet.short_reply(query, q, rcode)


def fit(reply: bytes, q: Question, tcp: bool) -> bytes:
    """An upstream's reply made to fit the client: as is when small enough, else header + question
    with TC (UDP; the client retries over TCP)."""
    limit = TCP_MAX if tcp else q.limit
    return reply if len(reply) <= limit else packet.truncated(reply, q.end)


class Relayed:
    """A forwarded reply in the cache: its bytes after the ID, kept for the least TTL of its answer
    records (NXDOMAIN / NODATA: the authority SOA's min(TTL, MINIMUM), else RELAY_NEGATIVE_TTL),
    at most RELAY_TTL_MAX seconds. Served with every TTL (OPT's aside) decremented by the whole
    seconds elapsed; the bytes are rebuilt at most once a second; None once the least TTL is 0."""
    __slots__ = ("body", "fields", "born", "expires", "_elapsed", "_body")

    def __init__(self, body: bytes, fields: tuple[tuple[int, int], ...], ttl: int, now: float):
        self.body, self.fields, self.born, self.expires = body, fields, now, now + ttl
        self._elapsed, self._body = 0, body

    def at(self, now: float) -> bytes | None:
        elapsed = int(now - self.born)
        if elapsed == self._elapsed:
            return self._body
        if now >= self.expires or elapsed < 0:
            return None
        buf = bytearray(self.body)
        pack = _TTL.pack_into
        for offset, ttl in self.fields:
            pack(buf, offset, ttl - elapsed if ttl > elapsed else 0)
        self._elapsed, self._body = elapsed, bytes(buf)
        return self._body


def relayed(reply: bytes, now: float) -> Relayed | None:
    """The cache entry for an upstream's reply (complete, with any ID), or None when it must not be
    cached: TC set, an rcode other than NOERROR / NXDOMAIN, unreadable records, or a TTL of 0."""
    if len(reply) < 12 or reply[2] & (packet.TC >> 8):
        return None
    rcode = packet.rcode_of(reply)
    if rcode not in (NOERROR, packet.NXDOMAIN):
        return None
    try:
        fields, least, soa = packet.reply_ttls(reply)
    except Malformed:
        return None
    if rcode == NOERROR and least is not None:
        ttl = least
    else:
        ttl = RELAY_NEGATIVE_TTL if soa is None else soa
        ttl = ttl if least is None else min(ttl, least)
    ttl = min(ttl, RELAY_TTL_MAX)
    if ttl <= 0:
        return None
    return Relayed(reply[2:], tuple((offset - 2, t) for offset, t in fields), ttl, now)


class RelayCache:
    """Forwarded replies (Relayed) by query bytes after the ID; cleared when it holds `size`."""

    def __init__(self, size: int):
        self.size, self._entries = size, {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> bytes | None:
        """The reply after the ID, TTLs as of `now`, to the query whose bytes after the ID are `key`."""
        entry = self._entries.get(key)
        body = None if entry is None else entry.at(now)
        if body is None and entry is not None:
            del self._entries[key]
        return body

    def put(self, key: bytes, reply: bytes, now: float) -> bool:
        """Keep `reply` (an upstream's, complete) for `key` if it may be cached (see relayed)."""
        entry = relayed(reply, now)
        if entry is not None:
            if len(self._entries) >= self.size:
                self._entries.clear()
            self._entries[key] = entry
        return entry is not None

    def prune(self, now: float) -> None:
        """Forget the expired entries."""
        for key in [k for k, entry in self._entries.items() if entry.expires <= now]:
            del self._entries[key]
