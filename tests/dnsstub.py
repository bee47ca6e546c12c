"""A stub upstream DNS server for tests: `python3 dnsstub.py ADDRESS [PORT]`.

Answers A queries for any name under `ext.test` with 192.0.2.1 (documentation address: data only,
never contacted), NXDOMAIN for everything else; UDP and TCP. It never forwards anything anywhere.
"""
import socket
import socketserver
import struct
import sys
import threading

from dnslib import QTYPE, RCODE, RR, A, DNSRecord


def answer(data: bytes) -> bytes:
    query = DNSRecord.parse(data)
    reply = query.reply()
    name = str(query.q.qname).lower().rstrip(".")
    if name == "ext.test" or name.endswith(".ext.test"):
        if query.q.qtype == QTYPE.A:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    else:
        reply.header.rcode = RCODE.NXDOMAIN
    return reply.pack()


class Udp(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(answer(data), self.client_address)


class Tcp(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            reply = answer(self.rfile.read(struct.unpack("!H", head)[0]))
            self.wfile.write(struct.pack("!H", len(reply)) + reply)


if __name__ == "__main__":
    address, port = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 53
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    tcp = socketserver.ThreadingTCPServer((address, port), Tcp)
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    socketserver.ThreadingUDPServer((address, port), Udp).serve_forever()
