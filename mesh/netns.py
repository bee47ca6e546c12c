"""Network namespaces by name: create and delete them (iproute2's `ip netns`, which also sets up the
/var/run/netns mount), and enter one from the current thread only.

    with entered("mesh-h1"):           # this thread is in mesh-h1 inside the block
        sock = socket.socket(...)      # sockets made here stay in mesh-h1 after the block

Never call `entered` on the event-loop thread (DESIGN.md §4): use a worker thread. Nothing here
forks a Python process, so a signal sent to a helper can never reach the daemon's signal handlers
(pyroute2's netns helpers fork children that share the daemon's asyncio wakeup fd: a SIGTERM to
such a child used to stop the daemon).
"""
from __future__ import annotations

import ctypes
import os
import subprocess
from contextlib import contextmanager

from mesh.errors import MeshError

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def _ip_netns(*args: str) -> None:
    proc = subprocess.run(["ip", "netns", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MeshError(f"ip netns {' '.join(args)}: {proc.stderr.strip()}")


def create(name: str) -> None:
    _ip_netns("add", name)


def delete(name: str) -> None:
    if exists(name):
        _ip_netns("delete", name)


def listing(prefix: str = "") -> list[str]:
    if not os.path.isdir(NETNS_DIR):
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def entered(name: str):
    """Run the block with this thread inside network namespace `name`, then come back."""
    try:
        target = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MeshError(f"network namespace '{name}' does not exist") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)
