"""Our resolver in a process of its own, for bench/dns/run.py: `python serve.py VIEW.json`.

VIEW.json: {"a": {"name": ["addr", ...], ...}, "ttl": 600, "upstreams": ["127.0.0.1:PORT"]}.
Builds that View, serves it on 127.0.0.1 (free ports) with mesh.dns.server.serve_on, prints one JSON
line {"udp_port": .., "tcp_port": ..}, and runs until SIGTERM or SIGINT; then prints one JSON line
{"stats": resolver.stats()} and closes the resolver.
"""
from __future__ import annotations

import asyncio
import json
import signal
import sys

from mesh.dns.server import serve_on
from mesh.dns.view import View


def load_view(path: str) -> View:
    with open(path) as f:
        spec = json.load(f)
    ttl = int(spec["ttl"])
    a = {name: (tuple(addrs), ttl) for name, addrs in spec["a"].items()}
    return View(a=a, ptr={}, srv={}, forward=True, upstreams=tuple(spec["upstreams"]))


async def main(path: str) -> None:
    view = load_view(path)
    resolver, udp_port, tcp_port = await serve_on("127.0.0.1", 0, view, upstream_timeout=4.0,
                                                  max_inflight=100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(json.dumps({"udp_port": udp_port, "tcp_port": tcp_port}), flush=True)
        await stop.wait()
        print(json.dumps({"stats": resolver.stats()}), flush=True)
    finally:
        await resolver.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: serve.py VIEW.json")
    asyncio.run(main(sys.argv[1]))
