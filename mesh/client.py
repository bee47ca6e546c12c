"""The CLI's side of the API: find or start the daemon of a host namespace and call it.

    api = Api(host_netns)
    started = api.ensure_daemon()            # True when this call started it
    status, body = api.call("GET", "/v1/tasks")
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import aiohttp

from mesh.errors import MeshError
from mesh.lb.base import resolve_choice
from mesh.paths import Paths

START_TIMEOUT = float(os.environ.get("MESH_START_TIMEOUT", "60"))   # an emulated VM is slow
GONE_TIMEOUT = 30.0      # mesh down: the daemon exits this soon after it answered


class Api:
    def __init__(self, host_netns: str | None):
        self.host = host_netns
        self.paths = Paths.for_host(host_netns)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        return asyncio.run(self._call(method, path, body))

    async def _call(self, method, path, body):
        conn = aiohttp.UnixConnector(path=self.paths.socket)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            async with session.request(method, f"http://mesh{path}", json=body) as resp:
                if resp.content_type == "application/json":
                    return resp.status, await resp.json()
                return resp.status, await resp.text()

    def running(self) -> bool:
        if not os.path.exists(self.paths.socket):
            return False
        try:
            return self.call("GET", "/v1/ping")[0] == 200
        except (aiohttp.ClientError, OSError) as exc:
            self.last_error = exc
            return False

    def _why(self) -> str:
        err = getattr(self, "last_error", None)
        return f" [{self.paths.socket}: {err}]" if err else f" [no socket at {self.paths.socket}]"

    def ensure_daemon(self, nodes: int | None = 0, lb: str | None = "auto") -> bool:
        """Start the daemon (a lab of `nodes` nodes, or 0 = this host) unless one runs already;
        True when this call started it. None: whatever the running daemon has (to start one:
        this host alone, `auto`)."""
        wanted_lb = resolve_choice(lb or "auto")   # a clear error before anything starts
        if self.running():
            ping = self.call("GET", "/v1/ping")[1]
            running = ping.get("nodes", 0)
            if nodes is not None and running != nodes:
                raise MeshError(f"a mesh daemon already runs here with {running or 'no'} lab nodes; "
                                f"`mesh down` first to start it with {nodes or 'no'} nodes")
            if lb is not None and ping.get("lb", wanted_lb) != wanted_lb:
                raise MeshError(f"a mesh daemon already runs here with --lb {ping['lb']}; "
                                f"`mesh down` first to start it with --lb {wanted_lb}")
            return False
        os.makedirs(self.paths.root, exist_ok=True)
        argv = [sys.executable, "-m", "mesh", "daemon"]
        if self.host:
            argv += ["--host-netns", self.host]
        if nodes:
            argv += ["--nodes", str(nodes)]
        argv += ["--lb", lb or "auto"]
        with open(self.paths.daemon_log, "ab") as out:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.running():
                return True
            time.sleep(0.05)
        raise MeshError(f"the mesh daemon did not start within {START_TIMEOUT:.0f}s; "
                        f"see {self.paths.daemon_log}")

    def wait_gone(self, timeout: float = GONE_TIMEOUT) -> bool:
        """Wait for the daemon to finish its teardown and exit (its socket goes last); False when
        it is still there after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while os.path.exists(self.paths.socket) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not os.path.exists(self.paths.socket)

    def not_gone(self) -> str:
        """What to tell when wait_gone() returned False."""
        return (f"the daemon answered mesh down but has not exited after {GONE_TIMEOUT:.0f} s "
                f"(see {self.paths.daemon_log}); run mesh down again once it has")

    def checked(self, method: str, path: str, body: dict | None = None):
        """call(), raising MeshError with the daemon's message unless it answered 2xx."""
        if not self.running():
            raise MeshError(f"no mesh daemon runs for this host namespace (start one with mesh up)"
                            f"{self._why()}")
        status, data = self.call(method, path, body)
        if status >= 300:
            raise MeshError(data["error"] if isinstance(data, dict) else str(data))
        return data
