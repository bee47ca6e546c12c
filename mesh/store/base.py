"""The cluster store's contract: the `Store` Protocol, its data types and its errors.

Standard library only. Two adapters implement it with identical semantics: `MemoryStore`
(mesh.store.memory, in-process, the embedded default and the store of unit tests) and `EtcdStore`
(mesh.store.etcd, etcd v3). The model is etcd's:

- One store-wide revision. Every write that changes something (a put, a delete that found its key,
  a delete_prefix that found keys, a lease expiry or revoke that removed keys) takes the next
  revision; all keys it touches carry that revision. A fresh store is at revision 1.
- A key's `create_revision` is the revision that created it (since its last delete), `mod_revision`
  the revision of its last write, `version` the number of writes since it was created.
- Compare-and-swap on `mod_revision`: `expect=None` is unconditional, `expect=0` means "the key must
  not exist", `expect=N` means "the key's mod_revision must be N". A mismatch raises `CasFailed`
  carrying the current `KeyValue` (or None), read atomically with the comparison.
- Keys are non-empty str (UTF-8, ordered as bytes, which is code-point order); values are bytes
  (callers JSON-encode).

Watch contract (the part callers must get right):

    items, rev = await store.list(prefix)          # a snapshot at revision `rev`
    async with contextlib.aclosing(store.watch(prefix, start_revision=rev + 1)) as events:
        async for ev in events: ...                # every change after the snapshot, in order

`watch` yields every event with revision >= start_revision under the prefix, in revision order
(events of one revision in key order), forever. It survives reconnects: after the backend comes
back it resumes from the revision after the last one it delivered, so nothing is lost or repeated.
If start_revision is older than the store's compaction horizon, the iterator raises
`Compacted(compact_revision)` (at the first `__anext__`, or later if the watcher fell that far
behind); the caller must then re-list and watch again from the new snapshot. The iterator ends
(StopAsyncIteration) when the store is closed or the watch is `aclose()`d (or left through
`contextlib.aclosing`). Cancelling a pending `__anext__` (a timeout around it, say) leaves the
watch usable: the next call goes on from where it was, without loss.

Leases: `grant(ttl)` returns a lease id; keys put with `lease=id` are deleted (with delete events)
when the lease expires or is revoked. `keepalive` renews the TTL or raises `LeaseExpired`.
Deletes carry a `KeyValue` with the key, an empty value, `mod_revision` = the delete's revision
and zero `create_revision`/`version`, as etcd reports them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key as stored, or as reported by a delete event (then value=b"", version=0)."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One change: a put (kv is the new value) or a delete (kv carries the key)."""

    kind: Literal["put", "delete"]
    kv: KeyValue
    revision: int


class StoreError(Exception):
    """Base class of every error the store raises."""


class CasFailed(StoreError):
    """A put or delete with `expect=` found another mod_revision; `current` is what is there."""

    def __init__(self, key: str, expected: int, current: KeyValue | None):
        self.key, self.expected, self.current = key, expected, current
        found = current.mod_revision if current is not None else 0
        super().__init__(f"{key}: expected mod_revision {expected}, found {found}")


class Compacted(StoreError):
    """A watch asked for history older than the compaction horizon: re-list, then watch again."""

    def __init__(self, compact_revision: int):
        self.compact_revision = compact_revision
        super().__init__(f"revisions before {compact_revision} have been compacted")


class LeaseExpired(StoreError):
    """The lease does not exist (expired, revoked or never granted)."""

    def __init__(self, lease: int):
        self.lease = lease
        super().__init__(f"lease {lease:x} has expired or does not exist")


class StoreUnavailable(StoreError):
    """The backend could not be reached within the operation's deadline."""


class StoreClosed(StoreError):
    """The store was used after close()."""


@runtime_checkable
class Watch(Protocol):
    """What `Store.watch` returns: an async iterator of Events that can be closed early."""

    def __aiter__(self) -> "Watch": ...

    async def __anext__(self) -> Event: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Store(Protocol):
    """A revisioned key-value store with compare-and-swap, prefix watches and leases."""

    async def get(self, key: str) -> KeyValue | None:
        """The key's current value, or None."""

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under prefix ("" = all), sorted by key, and the revision they were read at."""

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  lease: int | None = None) -> int:
        """Write the key (attached to `lease`, or to none); return the new store revision.
        Raises CasFailed on an `expect` mismatch, LeaseExpired for an unknown lease."""

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        """Delete the key; True if it existed. `expect` as for put (raises CasFailed)."""

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under a non-empty prefix in one revision; return how many."""

    def watch(self, prefix: str, *, start_revision: int) -> Watch:
        """Events under prefix from start_revision on, forever (see the module docstring)."""

    async def compact(self, revision: int) -> None:
        """Drop history before revision (a no-op if already compacted that far)."""

    async def grant(self, ttl: float) -> int:
        """A new lease living ttl seconds unless kept alive (etcd rounds up to whole seconds)."""

    async def keepalive(self, lease: int) -> None:
        """Renew the lease's TTL; raises LeaseExpired if it is gone."""

    async def revoke(self, lease: int) -> None:
        """End the lease now, deleting its keys; a no-op if it is already gone."""

    async def close(self) -> None:
        """Release resources; open watches end. Leases are left to expire on their own."""


def check_key(key: str) -> bytes:
    """The key as UTF-8 bytes; refuses the empty key and non-str keys."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a key must be a non-empty str, not {key!r}")
    return key.encode()


def check_value(value: bytes) -> bytes:
    """Values are bytes; refuses str (callers encode, e.g. JSON) and other types."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"a value must be bytes, not {type(value).__name__}")
    return bytes(value)


def check_expect(expect: int | None) -> None:
    """`expect` is None or a revision >= 0."""
    if expect is not None and (not isinstance(expect, int) or expect < 0):
        raise ValueError(f"expect must be None or a revision >= 0, not {expect!r}")


def check_start(start_revision: int) -> None:
    """Watches start at a concrete revision >= 1 (list first, then watch from its revision + 1)."""
    if not isinstance(start_revision, int) or start_revision < 1:
        raise ValueError(f"start_revision must be an int >= 1, not {start_revision!r}")
