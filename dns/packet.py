"""Strict reading of untrusted DNS queries in wire format, and tiny raw replies; pure (no sockets).

The resolver never hands a client's bytes to a general parser: `read_query` walks the header, the one
question and the skeleton of every other record itself, with hard limits (labels <= 63 bytes, names
<= 255, compression pointers only backwards and at most MAX_HOPS of them, every record inside the
packet), so compression loops, overlong labels and bad counts cost a few microseconds and raise
`Malformed`. dnslib then only ever builds replies (mesh.dns.answer).

    q = read_query(data)                  # Question, or raises Malformed
    q.key, q.qtype, q.limit, q.end        # "web.front" (lower-case), 1, 512 or the EDNS size, ...
    header_reply(data, FORMERR)           # 12 bytes: the ID, QR, the opcode and RD copied, no records
    short_reply(data, q, SERVFAIL)        # header + the question (+ an OPT when the query had one)
    truncated(reply, end)                 # a reply cut to header + question, with TC set
    reply_ttls(reply)                     # an upstream reply's TTL fields, for caching it
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
FIXED = struct.Struct("!HHIH")                 # type, class, ttl, rdlength of a resource record
QR, TC, RD, RA = 0x8000, 0x0200, 0x0100, 0x0080
OPCODE = 0x7800
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 2, 3, 4, 5, 16
OPT, SOA = 41, 6
UDP_MIN, UDP_MAX, TCP_MAX = 512, 4096, 65535
OUR_UDP_SIZE = 4096                            # advertised in the OPT of our replies
MAX_HOPS = 32                                  # compression pointers followed in one name
_OPT_RR = b"\x00" + struct.pack("!HHIH", OPT, OUR_UDP_SIZE, 0, 0)


class Malformed(ValueError):
    """The bytes are not a well-formed DNS query."""


@dataclass(frozen=True, slots=True)
class Question:
    """What a query asks, read strictly. `key` is None when no View name could match it."""
    id: int
    flags: int
    labels: tuple[bytes, ...]       # the name as asked (case kept), without the root label
    key: str | None                 # lower-case, dot-joined, no trailing dot
    qtype: int
    qclass: int
    end: int                        # offset just past the question in the query
    edns: int | None                # the client's UDP payload size when it sent an OPT record
    edns_version: int = 0

    @property
    def rd(self) -> bool:
        return bool(self.flags & RD)

    @property
    def limit(self) -> int:
        """Largest UDP reply the client takes: 512 without EDNS, else its size within 512..4096."""
        return UDP_MIN if self.edns is None else max(UDP_MIN, min(UDP_MAX, self.edns))


def read_name(data: bytes, offset: int) -> tuple[tuple[bytes, ...], int]:
    """Labels of the name at `offset` and the offset just past it in the stream (pointers followed)."""
    labels: list[bytes] = []
    size, hops, end, pos, n = 1, 0, -1, offset, len(data)
    while True:
        if pos >= n:
            raise Malformed("name runs past the end")
        length = data[pos]
        if length == 0:
            return tuple(labels), (pos + 1 if end < 0 else end)
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= n:
                raise Malformed("cut pointer")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            hops += 1
            if target >= pos or target < 12 or hops > MAX_HOPS:
                raise Malformed("bad compression pointer")
            if end < 0:
                end = pos + 2
            pos = target
            continue
        if kind:
            raise Malformed("label type not supported")
        size += length + 1
        if size > 255:
            raise Malformed("name longer than 255")
        if pos + 1 + length > n:
            raise Malformed("label runs past the end")
        labels.append(data[pos + 1:pos + 1 + length])
        pos += 1 + length


def skip_name(data: bytes, offset: int) -> int:
    """Offset just past a record owner name, checked for bounds and label types, not followed."""
    pos, size, n = offset, 1, len(data)
    while True:
        if pos >= n:
            raise Malformed("name runs past the end")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > n:
                raise Malformed("cut pointer")
            return pos + 2
        if length & 0xC0:
            raise Malformed("label type not supported")
        size += length + 1
        if size > 255:
            raise Malformed("name longer than 255")
        pos += 1 + length


def _name_key(labels: tuple[bytes, ...]) -> str | None:
    if any(b"." in label for label in labels):
        return None
    try:
        return b".".join(labels).decode("ascii").lower()
    except UnicodeDecodeError:
        return None


def _read_records(data: bytes, pos: int, count: int, additional_from: int) -> tuple[int | None, int]:
    """Walk `count` records from `pos`; returns (EDNS size or None, EDNS version). One OPT at most."""
    edns, version, n = None, 0, len(data)
    for i in range(count):
        owner = pos
        pos = skip_name(data, pos)
        if pos + 10 > n:
            raise Malformed("record header runs past the end")
        rtype, rclass, ttl, rdlength = FIXED.unpack_from(data, pos)
        pos += 10 + rdlength
        if pos > n:
            raise Malformed("record data runs past the end")
        if rtype == OPT:
            if i < additional_from or edns is not None or data[owner] != 0:
                raise Malformed("misplaced or repeated OPT record")
            edns, version = rclass, (ttl >> 16) & 0xFF
    return edns, version


def read_query(data: bytes) -> Question:
    """The question of a standard query; Malformed unless header, question and records all check."""
    if len(data) < 12:
        raise Malformed("shorter than a header")
    qid, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if qd != 1:
        raise Malformed("question count is not 1")
    labels, pos = read_name(data, 12)
    if pos + 4 > len(data):
        raise Malformed("question runs past the end")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    end = pos + 4
    edns, version = _read_records(data, end, an + ns + ar, an + ns)
    return Question(qid, flags, labels, _name_key(labels), qtype, qclass, end, edns, version)


def header_reply(data: bytes, rcode: int) -> bytes:
    """A 12-byte reply to the query in `data` (>= 12 bytes): no records, never bigger than the query."""
    flags = (data[2] << 8) | data[3]
    return data[:2] + HEADER.pack(0, QR | RA | (flags & (OPCODE | RD)) | (rcode & 0xF), 0, 0, 0, 0)[2:]


def short_reply(data: bytes, q: Question, rcode: int) -> bytes:
    """Header + the question as asked, and an OPT (carrying the extended rcode) if the query had one."""
    flags = QR | RA | (q.flags & RD) | (rcode & 0xF)
    head = HEADER.pack(q.id, flags, 1, 0, 0, 0 if q.edns is None else 1)
    if q.edns is None:
        return head + data[12:q.end]
    opt = _OPT_RR if rcode < 16 else _OPT_RR[:5] + bytes([rcode >> 4]) + _OPT_RR[6:]
    return head + data[12:q.end] + opt


def truncated(reply: bytes, end: int) -> bytes:
    """`reply` cut to its header and question (which ends at `end`), counts fixed, TC set."""
    qid, flags = struct.unpack_from("!HH", reply)
    return HEADER.pack(qid, flags | TC, 1, 0, 0, 0) + reply[12:end]


def matches(reply: bytes, qid: int, question: bytes) -> bool:
    """True when `reply` answers the query with this ID and question section (case-insensitive)."""
    if len(reply) < 12 + len(question):
        return False
    rid, flags, qd = struct.unpack_from("!HHH", reply)
    if rid != qid or not flags & QR or qd != 1:
        return False
    got = reply[12:12 + len(question)]
    return got == question or got.lower() == question.lower()


def rcode_of(reply: bytes) -> int:
    """The header rcode (low 4 bits) of a reply of at least 4 bytes."""
    return reply[3] & 0xF


def reply_ttls(reply: bytes) -> tuple[list[tuple[int, int]], int | None, int | None]:
    """Walk an (upstream's) reply: ([(offset, ttl)] of every record's TTL field but OPT's, least
    TTL of the answer records or None without any, min(TTL, MINIMUM) of an authority SOA or None);
    Malformed when any record runs past the end or a name is bad."""
    if len(reply) < 12:
        raise Malformed("shorter than a header")
    _, _, qd, an, ns, ar = HEADER.unpack_from(reply)
    pos, n = 12, len(reply)
    for _ in range(qd):
        pos = skip_name(reply, pos) + 4
    fields, least, soa = [], None, None
    for i in range(an + ns + ar):
        pos = skip_name(reply, pos)
        if pos + 10 > n:
            raise Malformed("record header runs past the end")
        rtype, _, ttl, rdlength = FIXED.unpack_from(reply, pos)
        ttl = 0 if ttl & 0x80000000 else ttl           # RFC 2181 8: such a TTL means zero
        end = pos + 10 + rdlength
        if end > n:
            raise Malformed("record data runs past the end")
        if rtype != OPT:
            fields.append((pos + 4, ttl))
            if i < an:
                least = ttl if least is None else min(least, ttl)
            elif i < an + ns and rtype == SOA and rdlength >= 22:
                (minimum,) = struct.unpack_from("!I", reply, end - 4)
                soa = min(ttl, minimum) if soa is None else min(soa, ttl, minimum)
        pos = end
    return fields, least, soa
