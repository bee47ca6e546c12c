"""One contract for both stores (mesh.store.base): every test runs against MemoryStore and against
EtcdStore on a real etcd that this file starts (tests/store_etcd.py: Debian's etcd-server binary,
free loopback ports, a temporary data dir, stopped by PID). If etcd is not installed the etcd half
fails with a clear message. Each test works under its own key prefix.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import tempfile
from pathlib import Path

import pytest

from mesh.store import (CasFailed, Compacted, Event, LeaseExpired, MemoryStore, Store,
                        StoreClosed, StoreUnavailable, open_store)
from mesh.store.etcd import EtcdStore, grpc_target
from store_etcd import MISSING, EtcdServer, etcd_binary

TIMEOUT = 30
_serial = itertools.count()


@pytest.fixture(scope="session")
def etcd_server():
    if etcd_binary() is None:
        pytest.fail(MISSING, pytrace=False)
    server = EtcdServer(Path(tempfile.mkdtemp(prefix="etcd-test-")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Kit:
    """A test's view of one backend: `store`, a key `prefix` of its own, and more clients."""

    def __init__(self, kind: str, server: EtcdServer | None):
        self.kind, self.server = kind, server
        self.prefix = f"/test/{next(_serial)}/"
        self.stores: list[Store] = []
        self.store = self.client()

    def client(self, **options) -> Store:
        """Another client of the same store (for memory: the same object)."""
        if self.kind == "memory":
            if not self.stores:
                self.stores.append(MemoryStore(**options))
            return self.stores[0]
        store = EtcdStore(self.server.endpoint, **options)
        self.stores.append(store)
        return store

    def k(self, name: str) -> str:
        return self.prefix + name

    async def aclose(self) -> None:
        if self.kind == "etcd" and self.server.proc.poll() is None:
            with contextlib.suppress(Exception):
                await self.store.delete_prefix(self.prefix)
        for store in self.stores:
            await store.close()


@pytest.fixture(params=["memory", "etcd"])
def kit(request):
    server = request.getfixturevalue("etcd_server") if request.param == "etcd" else None
    return Kit(request.param, server)


def run(coro_fn):
    """Run an async test in its own loop (with a deadline); close the kit's stores in that loop."""
    @functools.wraps(coro_fn)
    def wrapper(*args, **kw):
        async def main():
            try:
                await asyncio.wait_for(coro_fn(*args, **kw), TIMEOUT)
            finally:
                if isinstance(kw.get("kit"), Kit):
                    await kw["kit"].aclose()
        asyncio.run(main())
    return wrapper


async def take(events, n: int, timeout: float = 10) -> list[Event]:
    """The next n events of a watch iterator."""
    async def go():
        return [await anext(events) for _ in range(n)]
    return await asyncio.wait_for(go(), timeout)


async def nothing_more(events, wait: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(events), wait)


def summary(events: list[Event]) -> list[tuple[str, str, bytes]]:
    return [(e.kind, e.kv.key.rsplit("/", 1)[1], e.kv.value) for e in events]


# -- keys, revisions, compare-and-swap ---------------------------------------------------------


@run
async def test_put_get_list_delete(kit):
    s = kit.store
    assert isinstance(s, Store)
    assert await s.get(kit.k("a")) is None
    for name in ("c", "a", "b"):
        await s.put(kit.k(name), name.encode() * 2)
    await s.put(kit.prefix.rstrip("/") + "x/other", b"not under the prefix")
    kv = await s.get(kit.k("a"))
    assert (kv.key, kv.value, kv.version, kv.lease) == (kit.k("a"), b"aa", 1, None)
    items, rev = await s.list(kit.prefix)
    assert [i.key for i in items] == [kit.k("a"), kit.k("b"), kit.k("c")]
    assert rev >= max(i.mod_revision for i in items)
    assert await s.delete(kit.k("b")) is True
    assert await s.delete(kit.k("b")) is False
    assert await s.get(kit.k("b")) is None
    assert [i.key for i in (await s.list(kit.prefix))[0]] == [kit.k("a"), kit.k("c")]
    assert await s.delete(kit.prefix.rstrip("/") + "x/other")


@run
async def test_revisions_and_versions(kit):
    s = kit.store
    r1 = await s.put(kit.k("x"), b"1")
    r2 = await s.put(kit.k("x"), b"2")
    r3 = await s.put(kit.k("y"), b"1")
    assert r1 < r2 < r3
    x = await s.get(kit.k("x"))
    assert (x.create_revision, x.mod_revision, x.version, x.value) == (r1, r2, 2, b"2")
    assert (await s.list(kit.prefix))[1] >= r3
    assert await s.delete(kit.k("x"))
    after_delete = (await s.list(kit.prefix))[1]
    assert after_delete > r3
    assert not await s.delete(kit.k("x"))                       # nothing changed: no new revision
    assert (await s.list(kit.prefix))[1] == after_delete
    r5 = await s.put(kit.k("x"), b"again")
    x = await s.get(kit.k("x"))
    assert (x.create_revision, x.mod_revision, x.version) == (r5, r5, 1)


@run
async def test_delete_prefix_is_one_revision(kit):
    s = kit.store
    for name in ("a", "b", "c"):
        await s.put(kit.k(name), b"v")
    sibling = kit.prefix.rstrip("/") + "z"                     # shares the text, not the prefix
    await s.put(sibling, b"v")
    _, start = await s.list(kit.prefix)
    events = s.watch(kit.prefix, start_revision=start + 1)
    assert await s.delete_prefix(kit.prefix) == 3
    assert await s.delete_prefix(kit.prefix) == 0
    got = await take(events, 3)
    assert summary(got) == [("delete", "a", b""), ("delete", "b", b""), ("delete", "c", b"")]
    assert len({e.revision for e in got}) == 1 and got[0].revision == start + 1
    assert (await s.list(kit.prefix))[0] == []
    assert await s.get(sibling) is not None
    await s.delete(sibling)
    await events.aclose()
    with pytest.raises(ValueError):
        await s.delete_prefix("")


@run
async def test_compare_and_swap(kit):
    s = kit.store
    key = kit.k("cas")
    r1 = await s.put(key, b"first", expect=0)                  # must not exist: it does not
    with pytest.raises(CasFailed) as info:
        await s.put(key, b"again", expect=0)
    assert info.value.current.value == b"first" and info.value.current.mod_revision == r1
    r2 = await s.put(key, b"second", expect=r1)
    with pytest.raises(CasFailed) as info:
        await s.put(key, b"stale", expect=r1)
    assert info.value.current.mod_revision == r2 and info.value.expected == r1
    with pytest.raises(CasFailed) as info:
        await s.put(kit.k("missing"), b"x", expect=r2)
    assert info.value.current is None
    with pytest.raises(CasFailed):
        await s.delete(key, expect=r1)
    assert (await s.get(key)).value == b"second"
    assert await s.delete(key, expect=r2) is True
    assert await s.delete(key, expect=0) is False              # absent, as expected
    assert await s.get(key) is None


@run
async def test_bad_arguments(kit):
    s = kit.store
    with pytest.raises(TypeError):
        await s.put(kit.k("s"), "a str")
    with pytest.raises(ValueError):
        await s.put("", b"x")
    with pytest.raises(ValueError):
        await s.put(kit.k("s"), b"x", expect=-1)
    with pytest.raises(ValueError):
        s.watch(kit.prefix, start_revision=0)


# -- watches -------------------------------------------------------------------------------------


@run
async def test_watch_replays_history_then_follows_live(kit):
    s = kit.store
    first = await s.put(kit.k("a"), b"1")
    await s.put(kit.k("b"), b"1")
    await s.put(kit.k("a"), b"2")
    await s.put("/elsewhere/" + kit.prefix, b"not watched")
    events = s.watch(kit.prefix, start_revision=first)
    got = await take(events, 3)
    assert summary(got) == [("put", "a", b"1"), ("put", "b", b"1"), ("put", "a", b"2")]
    assert [e.revision for e in got] == sorted({e.revision for e in got})
    assert got[2].kv.version == 2 and got[2].kv.create_revision == first
    await nothing_more(events)

    async def writer():
        for i in range(5):
            await s.put(kit.k("live"), str(i).encode())
    await asyncio.gather(writer(), asyncio.sleep(0))
    live = await take(events, 5)
    assert [e.kv.value for e in live] == [b"0", b"1", b"2", b"3", b"4"]
    assert live[0].revision > got[-1].revision
    await events.aclose()
    await s.delete("/elsewhere/" + kit.prefix)


@run
async def test_watch_from_a_later_revision_and_deletes(kit):
    s = kit.store
    await s.put(kit.k("a"), b"1")
    r2 = await s.put(kit.k("a"), b"2")
    events = s.watch(kit.prefix, start_revision=r2)
    assert summary(await take(events, 1)) == [("put", "a", b"2")]
    deleted_at = None
    other = kit.client()
    assert await other.delete(kit.k("a"))
    ev = (await take(events, 1))[0]
    deleted_at = (await s.list(kit.prefix))[1]
    assert (ev.kind, ev.kv.key, ev.kv.value, ev.kv.version, ev.revision, ev.kv.mod_revision) == \
        ("delete", kit.k("a"), b"", 0, deleted_at, deleted_at)
    await events.aclose()


@run
async def test_two_watchers_see_the_same_events(kit):
    s = kit.store
    _, rev = await s.list(kit.prefix)
    w1 = s.watch(kit.prefix, start_revision=rev + 1)
    w2 = kit.client().watch(kit.prefix + "b", start_revision=rev + 1)
    for name in ("a", "b1", "b2"):
        await s.put(kit.k(name), b"v")
    assert summary(await take(w1, 3)) == [("put", n, b"v") for n in ("a", "b1", "b2")]
    assert summary(await take(w2, 2)) == [("put", n, b"v") for n in ("b1", "b2")]
    await w1.aclose()
    await w2.aclose()


@run
async def test_compaction_raises_compacted_for_an_older_start(kit):
    s = kit.store
    old = await s.put(kit.k("c"), b"1")
    await s.put(kit.k("c"), b"2")
    horizon = await s.put(kit.k("c"), b"3")
    await s.compact(horizon)
    await s.compact(horizon)                                    # already done: a no-op
    with pytest.raises(Compacted) as info:
        await anext(s.watch(kit.prefix, start_revision=old))
    assert info.value.compact_revision == horizon
    events = s.watch(kit.prefix, start_revision=horizon)       # the horizon itself is kept
    assert summary(await take(events, 1)) == [("put", "c", b"3")]
    await events.aclose()
    items, rev = await s.list(kit.prefix)                       # re-list after Compacted works
    assert [i.value for i in items] == [b"3"] and rev >= horizon
    with pytest.raises(ValueError):
        await s.compact(rev + 1000)


@run
async def test_a_watch_that_falls_behind_compaction_raises_compacted(kit):
    s = kit.store
    start = await s.put(kit.k("w"), b"0")
    events = s.watch(kit.prefix, start_revision=start)
    assert summary(await take(events, 1)) == [("put", "w", b"0")]
    await nothing_more(events, 0.2)         # a cancelled read: the watch must stay usable (etcd:
    for i in range(1, 4):                   # its stream is dropped and made again on next read)
        last = await s.put(kit.k("w"), str(i).encode())
    await s.compact(last)
    with pytest.raises(Compacted) as info:
        await take(events, 1)
    assert info.value.compact_revision == last
    with pytest.raises(StopAsyncIteration):
        await anext(events)


@run
async def test_close_ends_watches_and_refuses_calls(kit):
    s = kit.client() if kit.kind == "etcd" else kit.store
    _, rev = await s.list(kit.prefix)
    events = s.watch(kit.prefix, start_revision=rev + 1)
    waiter = asyncio.create_task(anext(events, None))
    await asyncio.sleep(0.2)
    await s.close()
    assert await asyncio.wait_for(waiter, 5) is None
    with pytest.raises(StoreClosed):
        await s.get(kit.k("a"))


# -- leases --------------------------------------------------------------------------------------


@run
async def test_lease_expiry_deletes_keys_with_delete_events(kit):
    s = kit.store
    lease = await s.grant(1)
    r = await s.put(kit.k("eph"), b"v", lease=lease)
    await s.put(kit.k("eph2"), b"v", lease=lease)
    await s.put(kit.k("kept"), b"v")
    assert (await s.get(kit.k("eph"))).lease == lease
    events = s.watch(kit.prefix, start_revision=r)
    assert [e.kind for e in await take(events, 3)] == ["put"] * 3
    gone = await take(events, 2, timeout=8)                     # etcd: TTL >= 2 s, checked twice/s
    assert summary(gone) == [("delete", "eph", b""), ("delete", "eph2", b"")]
    assert gone[0].revision == gone[1].revision
    assert [i.key for i in (await s.list(kit.prefix))[0]] == [kit.k("kept")]
    with pytest.raises(LeaseExpired):
        await s.keepalive(lease)
    with pytest.raises(LeaseExpired):
        await s.put(kit.k("late"), b"v", lease=lease)
    await events.aclose()


@run
async def test_keepalive_keeps_keys_and_revoke_deletes_them(kit):
    s = kit.store
    lease = await s.grant(1)
    await s.put(kit.k("held"), b"v", lease=lease)
    loop = asyncio.get_running_loop()
    until = loop.time() + 3.0                                   # past etcd's 2 s minimum TTL
    while loop.time() < until:
        await s.keepalive(lease)
        await asyncio.sleep(0.3)
    assert await s.get(kit.k("held")) is not None
    _, rev = await s.list(kit.prefix)
    events = s.watch(kit.prefix, start_revision=rev + 1)
    await s.revoke(lease)
    assert await s.get(kit.k("held")) is None
    assert summary(await take(events, 1)) == [("delete", "held", b"")]
    await s.revoke(lease)                                       # already gone: a no-op
    await events.aclose()


@run
async def test_put_without_lease_detaches_the_key(kit):
    s = kit.store
    lease = await s.grant(30)
    await s.put(kit.k("k"), b"1", lease=lease)
    await s.put(kit.k("k"), b"2")
    assert (await s.get(kit.k("k"))).lease is None
    await s.revoke(lease)
    assert (await s.get(kit.k("k"))).value == b"2"


# -- one backend only ----------------------------------------------------------------------------


def test_memory_store_compacts_its_own_history():
    async def main():
        s = MemoryStore(history=10)
        first = await s.put("/k", b"0")
        for i in range(30):
            await s.put("/k", str(i).encode())
        with pytest.raises(Compacted):
            await anext(s.watch("/", start_revision=first))
        _, rev = await s.list("/")
        events = s.watch("/", start_revision=rev - 9)
        assert len(await take(events, 10)) == 10
        await s.close()
    asyncio.run(main())


def test_open_store_urls():
    assert isinstance(open_store("memory://"), MemoryStore)
    etcd = open_store("etcd://127.0.0.1:2379")
    assert isinstance(etcd, EtcdStore) and etcd.target == "127.0.0.1:2379"
    assert open_store("etcd://10.0.0.1:2379,10.0.0.2:2380").target == \
        "ipv4:10.0.0.1:2379,10.0.0.2:2380"
    assert grpc_target("etcd.local") == "etcd.local:2379"
    for bad in ("redis://x", "etcd://", "memory://host", "etcd://a:1,b:2"):
        with pytest.raises(ValueError):
            open_store(bad)


@run
async def test_etcd_watch_resumes_after_restart_without_loss_or_duplicates(etcd_server):
    kit = Kit("etcd", etcd_server)
    try:
        s = kit.store
        first = await s.put(kit.k("a"), b"before-1")
        await s.put(kit.k("b"), b"before-2")
        events = s.watch(kit.prefix, start_revision=first)
        assert summary(await take(events, 2)) == [("put", "a", b"before-1"),
                                                  ("put", "b", b"before-2")]
        pending = asyncio.ensure_future(take(events, 3, timeout=20))
        await asyncio.sleep(0.2)
        etcd_server.kill()
        down = kit.client(timeout=0.5)
        with pytest.raises(StoreUnavailable):
            await down.get(kit.k("a"))
        await asyncio.to_thread(etcd_server.start)
        other = kit.client()                                    # written before the watch is back
        await other.put(kit.k("c"), b"after-1")
        await other.delete(kit.k("a"))
        await s.put(kit.k("d"), b"after-2")                     # the first client works again
        got = await pending
        assert summary(got) == [("put", "c", b"after-1"), ("delete", "a", b""),
                                ("put", "d", b"after-2")]
        assert [e.revision for e in got] == sorted(set(e.revision for e in got))
        await nothing_more(events, 0.5)
        assert events.reconnects >= 1
        await events.aclose()
    finally:
        await kit.aclose()
