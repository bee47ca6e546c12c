"""The resolver's answer logic, pure: records, shuffling, NODATA, errors, EDNS and truncation."""
import itertools
import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

from mesh.dns import packet
from mesh.dns.answer import DROP, FORWARD, REPLY, orders, respond
from mesh.dns.view import View

MANY = tuple(f"10.0.1.{i}" for i in range(1, 41))
VIEW = View(
    a={"web": (("10.0.0.5",), 600), "tasks.web": (("10.0.0.7", "10.0.0.8", "10.0.0.9"), 5),
       "web.1.front": (("10.0.0.5",), 600), "big": (MANY, 5)},
    ptr={"5.0.0.10.in-addr.arpa": ("web.1.front", 600)},
    srv={"_http._tcp.web": (((0, 5, 80, "web"), (1, 5, 8080, "elsewhere")), 600)},
    forward=True, upstreams=("127.0.0.1:5399",))


def query(name, rdtype="A", **kw) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()


def ask(name, rdtype="A", view=VIEW, tcp=False, **kw):
    data = query(name, rdtype, **kw)
    r = respond(data, view, tcp=tcp)
    assert r.action == REPLY, r
    msg = dns.message.from_wire(r.replies[0])
    assert msg.id == struct.unpack("!H", data[:2])[0]
    return r, msg


def addresses(msg):
    return [rd.address for rrset in msg.answer for rd in rrset]


def test_a_record_with_ttl_and_flags():
    r, msg = ask("web")
    assert addresses(msg) == ["10.0.0.5"]
    assert msg.answer[0].ttl == 600 and msg.rcode() == dns.rcode.NOERROR
    assert msg.flags & dns.flags.QR and msg.flags & dns.flags.RA and msg.flags & dns.flags.RD
    assert r.cacheable
    _, msg = ask("web", want_dnssec=False, flags=0)      # RD not asked: not set in the reply
    assert not msg.flags & dns.flags.RD


def test_names_are_case_insensitive_and_take_a_trailing_dot():
    for name in ("WEB", "Web.", "web.", "wEb.1.FRONT"):
        _, msg = ask(name)
        assert addresses(msg) == ["10.0.0.5"]
        assert msg.question[0].name.to_text().rstrip(".") == name.rstrip(".")   # asked case kept


def test_multi_a_answers_are_shuffled_through_every_order():
    seen = set()
    for _ in range(1000):
        _, msg = ask("tasks.web")
        seen.add(tuple(addresses(msg)))
        if len(seen) == 6:
            break
    assert seen == set(itertools.permutations(("10.0.0.7", "10.0.0.8", "10.0.0.9")))


def test_variants_for_the_cache():
    r = respond(query("tasks.web"), VIEW, variants=8)
    got = {tuple(addresses(dns.message.from_wire(x))) for x in r.replies}
    assert len(r.replies) == 6 and len(got) == 6               # every order of 3
    assert len(orders(10, 8)) == 8 and len({o[0] for o in orders(10, 8)}) == 8   # distinct firsts
    assert sorted(orders(5, 8)[0]) == list(range(5)) and len(orders(5, 8)) == 5
    assert orders(1, 8) == [(0,)]


@pytest.mark.parametrize("rdtype", ["AAAA", "MX", "TXT", "ANY", "SRV", "PTR"])
def test_other_types_of_a_known_name_are_nodata_never_forwarded(rdtype):
    r, msg = ask("web", rdtype)
    assert msg.rcode() == dns.rcode.NOERROR and not msg.answer and not msg.authority
    assert r.cacheable


def test_ptr():
    _, msg = ask("5.0.0.10.in-addr.arpa", "PTR")
    assert [rd.target.to_text() for rd in msg.answer[0]] == ["web.1.front."]
    _, msg = ask("5.0.0.10.in-addr.arpa", "A")
    assert not msg.answer and msg.rcode() == dns.rcode.NOERROR


def test_srv_with_additional_a_of_known_targets():
    _, msg = ask("_http._tcp.web", "SRV")
    got = sorted((rd.priority, rd.weight, rd.port, rd.target.to_text()) for rd in msg.answer[0])
    assert got == [(0, 5, 80, "web."), (1, 5, 8080, "elsewhere.")]
    assert [(rrset.name.to_text(), [rd.address for rd in rrset]) for rrset in msg.additional] \
        == [("web.", ["10.0.0.5"])]


def test_unknown_names_forward_or_servfail():
    r = respond(query("example.org"), VIEW)
    assert r.action == FORWARD and r.question.key == "example.org" and not r.cacheable
    r, msg = ask("example.org", view=View(a=VIEW.a, forward=False, upstreams=("1.2.3.4",)))
    assert msg.rcode() == dns.rcode.SERVFAIL and r.cacheable
    _, msg = ask("example.org", view=View(a=VIEW.a, forward=True, upstreams=()))
    assert msg.rcode() == dns.rcode.SERVFAIL


def test_opcode_other_than_query_is_notimp():
    data = query("web")
    notify = data[:2] + bytes([data[2] | (dns.opcode.NOTIFY << 3), data[3]]) + data[4:]
    r = respond(notify, VIEW)
    msg = dns.message.from_wire(r.replies[0])
    assert msg.rcode() == dns.rcode.NOTIMP and msg.opcode() == dns.opcode.NOTIFY
    assert len(r.replies[0]) == 12 and not r.cacheable


@pytest.mark.parametrize("qdcount", [0, 2, 65535])
def test_question_count_other_than_one_is_formerr(qdcount):
    data = query("web")
    data = data[:4] + struct.pack("!H", qdcount) + data[6:]
    r = respond(data, VIEW)
    assert r.action == REPLY and r.rcode == packet.FORMERR and len(r.replies[0]) == 12
    assert r.replies[0][:2] == data[:2] and not r.cacheable


@pytest.mark.parametrize("data", [
    b"", b"\x12", b"\x00" * 11,                                   # no header at all
    b"\x12\x34\x81\x80" + b"\x00\x01" + b"\x00" * 6 + b"\x00\x00\x01\x00\x01",   # a response (QR)
])
def test_short_or_response_packets_are_dropped(data):
    assert respond(data, VIEW).action == DROP


@pytest.mark.parametrize("body", [
    b"\xc0\x0c\x00\x01\x00\x01",                       # pointer to itself
    b"\x01a\xc0\x0c\x00\x01\x00\x01",                  # pointer back to its own start: a loop
    b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",     # label of 64
    (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",  # name of 257
    b"\x03web",                                        # cut name
    b"\x03web\x00\x00",                                # cut question
    b"\x80abc\x00\x00\x01\x00\x01",                    # reserved label type
])
def test_malformed_questions_are_formerr_and_never_bigger(body):
    data = b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + body
    r = respond(data, VIEW)
    assert r.rcode == packet.FORMERR and r.replies[0][:2] == b"\xbe\xef"
    assert len(r.replies[0]) <= min(512, len(data))


def test_bad_records_after_the_question_are_formerr():
    data = query("web")
    bad_count = data[:10] + b"\x00\x05" + data[12:]          # 5 additional records, none there
    assert respond(bad_count, VIEW).rcode == packet.FORMERR
    two_opts = query("web", use_edns=0)
    two_opts = two_opts[:10] + b"\x00\x02" + two_opts[12:] + two_opts[-11:]
    assert respond(two_opts, VIEW).rcode == packet.FORMERR


def test_edns_size_and_opt_in_the_reply():
    _, msg = ask("web", use_edns=0, payload=1232)
    assert msg.edns == 0 and msg.payload == packet.OUR_UDP_SIZE
    q = packet.read_query(query("web", use_edns=0, payload=100000 % 65536))
    assert q.limit == 4096
    assert packet.read_query(query("web", use_edns=0, payload=100)).limit == 512
    assert packet.read_query(query("web")).limit == 512
    _, msg = ask("web", use_edns=1)
    assert msg.rcode() == dns.rcode.BADVERS


def test_truncation_at_512_and_none_within_edns_4096_or_tcp():
    _, msg = ask("big")
    assert msg.flags & dns.flags.TC and not msg.answer and msg.question
    r, msg = ask("big", use_edns=0, payload=4096)
    assert not msg.flags & dns.flags.TC and len(addresses(msg)) == 40 and msg.edns == 0
    assert len(r.replies[0]) > 512
    _, msg = ask("big", use_edns=0, payload=600)
    assert msg.flags & dns.flags.TC and not msg.answer and msg.edns == 0
    _, msg = ask("big", tcp=True)
    assert not msg.flags & dns.flags.TC and sorted(addresses(msg)) == sorted(MANY)


def test_odd_label_bytes_never_match_a_view_name():
    data = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05web.1\x05front\x00\x00\x01\x00\x01"
    r = respond(data, VIEW)
    assert r.action == FORWARD and r.question.key is None
    data = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03w\xffb\x00\x00\x01\x00\x01"
    assert respond(data, VIEW).action == FORWARD


def test_raw_helpers():
    data = query("example.org", use_edns=0)
    q = packet.read_query(data)
    refused = dns.message.from_wire(packet.short_reply(data, q, packet.REFUSED))
    assert refused.rcode() == dns.rcode.REFUSED and refused.question and refused.edns == 0
    big = packet.short_reply(data, q, packet.NOERROR) + b"\x00" * 600
    cut = packet.truncated(big, q.end)
    assert len(cut) == q.end and cut[2] & 0x02
    assert packet.matches(packet.short_reply(data, q, 0), q.id, data[12:q.end])
    assert not packet.matches(packet.short_reply(data, q, 0), q.id ^ 1, data[12:q.end])
    assert not packet.matches(data, q.id, data[12:q.end])                  # QR not set


def test_memo_answers_by_meaning_with_the_question_as_asked():
    memo = {}
    first = respond(query("tasks.web", use_edns=0), VIEW, variants=8, memo=memo)
    again = respond(query("TASKS.Web", use_edns=0), VIEW, variants=8, memo=memo)
    assert len(memo) == 1 and len(again.replies) == len(first.replies) == 6
    for wire in again.replies:
        msg = dns.message.from_wire(wire)
        assert msg.question[0].name.to_text() == "TASKS.Web."
        assert msg.answer[0].name.to_text() == "TASKS.Web." and len(addresses(msg)) == 3
        assert msg.edns == 0
    other = respond(query("tasks.web"), VIEW, variants=8, memo=memo)      # no EDNS: another entry
    assert len(memo) == 2 and dns.message.from_wire(other.replies[0]).edns == -1
    srv = respond(query("_HTTP._tcp.web", "SRV"), VIEW, memo=memo)
    srv = respond(query("_http._TCP.WEB", "SRV"), VIEW, memo=memo)
    msg = dns.message.from_wire(srv.replies[0])
    assert msg.question[0].name.to_text() == "_http._TCP.WEB." and len(msg.answer[0]) == 2
    assert [rrset.name.to_text().lower() for rrset in msg.additional] == ["web."]
