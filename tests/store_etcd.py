"""A throwaway etcd for tests: Debian's `etcd` binary (package etcd-server) on free loopback ports
with a temporary data dir. Never a system etcd: the packaged service is not used, nothing reads
/etc/default/etcd, and ETCD_* variables are removed from the child's environment.

    server = EtcdServer(tmp_dir); server.start()   # waits until /health answers
    server.kill(); server.start()                  # a crash and a restart: same data dir and ports
    server.stop()                                  # SIGTERM by PID, then SIGKILL; data dir removed
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

MISSING = ("the etcd binary was not found: the etcd contract tests need Debian's etcd-server "
           "package (`make test` installs it; by hand: apt-get install -y etcd-server)")


def etcd_binary() -> str | None:
    """Path of the etcd binary, or None."""
    return shutil.which("etcd") or next(
        (p for p in ("/usr/bin/etcd", "/usr/local/bin/etcd") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One single-member etcd cluster owned by the test run."""

    def __init__(self, workdir: Path, binary: str | None = None):
        self.binary = binary or etcd_binary()
        if self.binary is None:
            raise RuntimeError(MISSING)
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "etcd.log"
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [self.binary, "--name", "default", "--data-dir", str(self.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}", "--initial-cluster-state", "new",
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"]

    def start(self, timeout: float = 20.0) -> None:
        """Start etcd (again, on the same data dir and ports) and wait until it is healthy."""
        assert self.proc is None or self.proc.poll() is not None, "etcd is already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.endpoint}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as reply:
                    if json.loads(reply.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"etcd did not become healthy in {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL by PID (a crash); the data dir stays for a restart."""
        self._signal(signal.SIGKILL, 10)

    def stop(self) -> None:
        """SIGTERM by PID (SIGKILL after 10 s), then remove the data dir."""
        self._signal(signal.SIGTERM, 10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _signal(self, sig: int, wait: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(wait)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
