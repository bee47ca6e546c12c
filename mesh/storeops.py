"""The cluster store as the manager and agent daemons use it: its keys, opening it with clear
errors, a lease kept alive, watching a prefix with re-list on compaction, counting round trips.

Keys (all under /mesh/):
    /mesh/nodes/<node>            NodeInfo JSON, put with the node agent's lease (its heartbeat)
    /mesh/desired                 the ClusterDoc JSON (mesh.codec), written by the leading manager only
    /mesh/status/<node>/<task>    a task's state as its agent reports it, put with the agent's lease
    /mesh/managers/leader         the leading manager, put with expect=0 and its lease (mesh.election)

    store = await connect("etcd://10.0.0.5:2379")      # MeshError naming the URL if unusable
    async for kind, item in follow(store, "/mesh/"): ...   # a snapshot, then every event

MESH_STORE_COUNTS=DIR makes every daemon count its store calls and write them to
DIR/<role>-<name>-<pid>.json (bench/converge reads them): unary calls are round trips; a watch
is one call that then streams events.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter

from mesh.errors import MeshError
from mesh.store import Compacted, KeyValue, LeaseExpired, Store, StoreError, open_store

log = logging.getLogger("mesh.storeops")

PREFIX = "/mesh/"
NODES = "/mesh/nodes/"
DESIRED = "/mesh/desired"
STATUS = "/mesh/status/"
LEADER = "/mesh/managers/leader"
LEASE_TTL = float(os.environ.get("MESH_LEASE_TTL", "5"))   # seconds: how fast a dead node or manager is noticed
CONNECT_TIMEOUT = 5.0
UNARY = ("get", "list", "put", "delete", "delete_prefix", "compact", "grant", "keepalive", "revoke")


def status_key(node: str, task: str) -> str:
    return f"{STATUS}{node}/{task}"


async def connect(url: str, role: str = "", name: str = "") -> Store:
    """Open the store at `url` and check that it answers; MeshError with the reason otherwise."""
    if url.startswith("memory:"):
        raise MeshError(f"--store {url}: the embedded store lives inside one process; separate "
                        f"manager and agent daemons share an etcd: --store etcd://HOST:PORT")
    try:
        store = open_store(url, timeout=CONNECT_TIMEOUT)
    except (ValueError, ImportError) as exc:
        raise MeshError(f"--store {url}: {exc}") from None
    try:
        await store.get(DESIRED)
    except (StoreError, OSError) as exc:
        await store.close()
        raise MeshError(f"--store {url}: etcd does not answer ({type(exc).__name__}: {exc})") from None
    return counted(store, role, name)


def counted(store: Store, role: str, name: str) -> Store:
    """`store`, counting its calls into MESH_STORE_COUNTS/<role>-<name>-<pid>.json when that
    variable names a directory (bench/converge's round trips per change)."""
    directory = os.environ.get("MESH_STORE_COUNTS")
    if directory:
        return CountingStore(store, os.path.join(directory, f"{role}-{name}-{os.getpid()}.json"))
    return store


class CountingStore:
    """A Store that counts calls by method (and watch events) and writes the counts to a file."""

    def __init__(self, inner: Store, path: str | None = None):
        self.inner, self.path = inner, path
        self.counts: Counter = Counter()
        self._flush: asyncio.Task | None = None

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in UNARY:
            return attr

        async def counted(*args, **kwargs):
            self._count(name)
            return await attr(*args, **kwargs)
        return counted

    def watch(self, prefix: str, *, start_revision: int):
        self._count("watch")
        return _CountingWatch(self, self.inner.watch(prefix, start_revision=start_revision))

    def round_trips(self) -> int:
        return sum(v for k, v in self.counts.items() if k in UNARY or k == "watch")

    def _count(self, name: str) -> None:
        self.counts[name] += 1
        if self.path and (self._flush is None or self._flush.done()):
            self._flush = asyncio.get_running_loop().create_task(self._write_soon())

    async def _write_soon(self) -> None:
        await asyncio.sleep(0.1)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"counts": dict(self.counts), "round_trips": self.round_trips(),
                       "at": time.time()}, f)
        os.replace(tmp, self.path)

    async def close(self) -> None:
        if self._flush is not None:
            await asyncio.gather(self._flush, return_exceptions=True)
        await self.inner.close()


class _CountingWatch:
    def __init__(self, owner: CountingStore, inner):
        self.owner, self.inner = owner, inner

    def __aiter__(self):
        return self

    async def __anext__(self):
        event = await self.inner.__anext__()
        self.owner._count("watch_event")
        return event

    async def aclose(self) -> None:
        await self.inner.aclose()


async def follow(store: Store, prefix: str):
    """Yield ("snapshot", [KeyValue, ...]) and then ("event", Event) for every change under
    `prefix`, in order, forever; after a compaction, a fresh ("snapshot", ...) and on from there.
    Ends when the store is closed."""
    while True:
        items, rev = await store.list(prefix)
        yield "snapshot", items
        try:
            async with contextlib.aclosing(store.watch(prefix, start_revision=rev + 1)) as events:
                async for ev in events:
                    yield "event", ev
            return
        except Compacted:
            log.warning("watch on %s fell behind a compaction: re-listing", prefix)


class LeaseKeeper:
    """A lease kept alive every ttl/3. `lost` is set when it expired or could not be renewed for
    longer than its ttl (the store was unreachable): the keys put with it are to be counted gone."""

    def __init__(self, store: Store, ttl: float = LEASE_TTL):
        self.store, self.ttl = store, ttl
        self.lease: int | None = None
        self.lost = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        self.lease = await self.store.grant(self.ttl)
        self.lost.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(self.lease))
        return self.lease

    async def _run(self, lease: int) -> None:
        renewed = time.monotonic()
        pause = self.ttl / 3
        while True:
            await asyncio.sleep(pause)
            try:
                async with asyncio.timeout(self.ttl / 3):     # not wait_for: see mesh.nodeagent
                    await self.store.keepalive(lease)
                renewed, pause = time.monotonic(), self.ttl / 3
            except LeaseExpired:
                log.warning("lease %x expired", lease)
                break
            except (StoreError, OSError, TimeoutError) as exc:
                log.warning("lease %x not renewed: %s", lease, repr(exc))
                if time.monotonic() - renewed > self.ttl:
                    break
                pause = 0.1                     # try again at once: the lease is running out
        self.lost.set()

    async def stop(self, revoke: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if revoke and self.lease is not None:
            with contextlib.suppress(StoreError, OSError, TimeoutError):
                async with asyncio.timeout(2):
                    await self.store.revoke(self.lease)
        self.lease = None


def kv_text(kv: KeyValue | None) -> str:
    return kv.value.decode() if kv is not None else ""
