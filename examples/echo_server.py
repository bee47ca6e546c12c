"""A tiny server for the examples and the tests: `python3 echo_server.py PORT [tcp|udp|lines]`.

TCP: answers every HTTP request with `host=<hostname> client=<peer address>`.
UDP: answers every datagram with the same line.
lines: a long-lived TCP connection; every line received is answered with that line too.
Runs until killed.
"""
import socket
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"host={socket.gethostname()} client={self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve_udp(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(f"host={socket.gethostname()} client={peer[0]}\n".encode(), peer)


class LineHandler(socketserver.StreamRequestHandler):
    def handle(self):
        for _ in self.rfile:
            self.wfile.write(f"host={socket.gethostname()} client={self.client_address[0]}\n".encode())


if __name__ == "__main__":
    port = int(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "udp":
        serve_udp(port)
    elif len(sys.argv) > 2 and sys.argv[2] == "lines":
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer(("0.0.0.0", port), LineHandler).serve_forever()
    else:
        ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
