"""MemoryStore: the embedded, in-process `Store` with etcd's revision, watch and lease semantics.

Everything happens on one asyncio loop and no operation awaits half-way, so each write is atomic.
A global revision counter (1 for a fresh store) is bumped once per write that changes something;
the history of events since the compaction horizon feeds watches, which replay it from their start
revision and then follow live writes. `compact(revision)` drops older history, so a later watch
from before it raises `Compacted`. To bound memory the store also compacts by itself, keeping at
least the last `history` events. Leases are timers on the loop clock: keys attached to a lease are
deleted in one revision when its TTL runs out (precise to the loop's timer resolution) or when it is
revoked.
"""
from __future__ import annotations

import asyncio
import itertools
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field

from .base import (CasFailed, Compacted, Event, KeyValue, LeaseExpired, StoreClosed, check_expect,
                   check_key, check_start, check_value)


@dataclass
class _Lease:
    ttl: float
    timer: asyncio.TimerHandle | None = None
    keys: set[str] = field(default_factory=set)


def _revision_of(event: Event) -> int:
    return event.revision


class MemoryStore:
    """In-process Store (see mesh.store.base for the contract)."""

    def __init__(self, *, history: int | None = 100_000):
        if history is not None and history < 1:
            raise ValueError("history must be None or >= 1")
        self._history_limit = history
        self._rev = 1
        self._compacted = 0
        self._kv: dict[str, KeyValue] = {}
        self._history: list[Event] = []
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x6d657368_0001)
        self._wakeup = asyncio.Event()
        self._closed = False

    # -- reads -----------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The current store revision."""
        return self._rev

    async def get(self, key: str) -> KeyValue | None:
        self._check_open()
        check_key(key)
        return self._kv.get(key)

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        self._check_open()
        keys = sorted(k for k in self._kv if k.startswith(prefix))
        return [self._kv[k] for k in keys], self._rev

    # -- writes ----------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  lease: int | None = None) -> int:
        self._check_open()
        check_key(key)
        value = check_value(value)
        check_expect(expect)
        self._check_cas(key, expect)
        lease = lease or None
        if lease is not None and lease not in self._leases:
            raise LeaseExpired(lease)
        rev = self._rev + 1
        old = self._kv.get(key)
        kv = KeyValue(key, value, old.create_revision if old else rev, rev,
                      old.version + 1 if old else 1, lease)
        self._detach(old)
        if lease is not None:
            self._leases[lease].keys.add(key)
        self._kv[key] = kv
        self._commit([Event("put", kv, rev)])
        return rev

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        self._check_open()
        check_key(key)
        check_expect(expect)
        self._check_cas(key, expect)
        return bool(self._remove([key]))

    async def delete_prefix(self, prefix: str) -> int:
        self._check_open()
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix")
        return self._remove(sorted(k for k in self._kv if k.startswith(prefix)))

    async def compact(self, revision: int) -> None:
        self._check_open()
        if revision > self._rev:
            raise ValueError(f"cannot compact to {revision}: the store is at {self._rev}")
        if revision <= self._compacted:
            return
        self._compacted = revision
        del self._history[:bisect_left(self._history, revision, key=_revision_of)]

    def _check_cas(self, key: str, expect: int | None) -> None:
        if expect is None:
            return
        current = self._kv.get(key)
        if (current.mod_revision if current else 0) != expect:
            raise CasFailed(key, expect, current)

    def _detach(self, kv: KeyValue | None) -> None:
        if kv is not None and kv.lease is not None and kv.lease in self._leases:
            self._leases[kv.lease].keys.discard(kv.key)

    def _remove(self, keys: list[str]) -> int:
        """Delete the existing ones among keys (sorted) in one revision; return how many."""
        gone = [self._kv[k] for k in keys if k in self._kv]
        if not gone:
            return 0
        rev = self._rev + 1
        for kv in gone:
            self._detach(kv)
            del self._kv[kv.key]
        self._commit([Event("delete", KeyValue(kv.key, b"", 0, rev, 0, None), rev) for kv in gone])
        return len(gone)

    def _commit(self, events: list[Event]) -> None:
        self._rev = events[0].revision
        self._history.extend(events)
        limit = self._history_limit
        if limit is not None and len(self._history) > 2 * limit:
            horizon = self._history[-limit].revision
            self._compacted = max(self._compacted, horizon)
            del self._history[:bisect_left(self._history, horizon, key=_revision_of)]
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    # -- watch -----------------------------------------------------------------------------------

    def watch(self, prefix: str, *, start_revision: int) -> "MemoryWatch":
        self._check_open()
        check_start(start_revision)
        return MemoryWatch(self, prefix, start_revision)

    def _since(self, revision: int, prefix: str) -> list[Event]:
        first = bisect_left(self._history, revision, key=_revision_of)
        return [e for e in self._history[first:] if e.kv.key.startswith(prefix)]

    # -- leases ----------------------------------------------------------------------------------

    async def grant(self, ttl: float) -> int:
        self._check_open()
        if ttl <= 0:
            raise ValueError(f"a lease needs a positive ttl, not {ttl!r}")
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(float(ttl))
        self._arm(lease_id)
        return lease_id

    async def keepalive(self, lease: int) -> None:
        self._check_open()
        if lease not in self._leases:
            raise LeaseExpired(lease)
        self._arm(lease)

    async def revoke(self, lease: int) -> None:
        self._check_open()
        self._expire(lease)

    def _arm(self, lease_id: int) -> None:
        state = self._leases[lease_id]
        if state.timer is not None:
            state.timer.cancel()
        loop = asyncio.get_running_loop()
        state.timer = loop.call_later(state.ttl, self._expire, lease_id)

    def _expire(self, lease_id: int) -> None:
        state = self._leases.pop(lease_id, None)
        if state is None:
            return
        if state.timer is not None:
            state.timer.cancel()
        if not self._closed:
            self._remove(sorted(state.keys))

    # -- lifecycle -------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for state in self._leases.values():
            if state.timer is not None:
                state.timer.cancel()
        self._leases.clear()
        self._wakeup.set()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the store is closed")


class MemoryWatch:
    """A MemoryStore watch: replays the history from its start revision, then follows writes.

    All its state lives here, not in a suspended generator, so a cancelled `__anext__` loses
    nothing and the next call goes on where it was.
    """

    def __init__(self, store: MemoryStore, prefix: str, start_revision: int):
        self._store, self._prefix = store, prefix
        self.next_revision = start_revision
        self._pending: deque[Event] = deque()
        self._done = False

    def __aiter__(self) -> MemoryWatch:
        return self

    async def __anext__(self) -> Event:
        store = self._store
        while not self._pending:
            if self._done or store._closed:
                raise StopAsyncIteration
            if self.next_revision < store._compacted:
                self._done = True
                raise Compacted(store._compacted)
            wake = store._wakeup
            self._pending.extend(store._since(self.next_revision, self._prefix))
            self.next_revision = max(self.next_revision, store._rev + 1)
            if not self._pending:
                await wake.wait()
        return self._pending.popleft()

    async def aclose(self) -> None:
        self._done = True
        self._pending.clear()
