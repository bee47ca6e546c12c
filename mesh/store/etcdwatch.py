"""The etcd side of `Store.watch`, and the conversions from etcd's protobuf messages.

One gRPC Watch stream per `watch()` call (aetcd's generated stubs, our own stream handling:
aetcd's shared Watcher neither resumes after a disconnect nor reports a compacted start revision
reliably). The stream is created with `wait_for_ready`, so while etcd is down the (re)creation
waits for the channel, which reconnects with gRPC's own backoff. When the stream breaks (etcd
killed or restarted, a network error, etcd cancelling the watch) it is created again from the
revision after the last one received, after a growing pause (0.05 s doubling to 2 s, reset once
a stream works), so events are neither lost nor repeated. A compacted start revision arrives as a
response carrying `compact_revision` and is raised as `Compacted`; that ends the iterator.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Callable

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from .base import Compacted, Event, KeyValue

PAUSE_MIN, PAUSE_MAX = 0.05, 2.0
log = logging.getLogger(__name__)


def key_range(prefix: str) -> tuple[bytes, bytes]:
    """etcd's (key, range_end) for every key under prefix; "" means every key."""
    if not prefix:
        return b"\0", b"\0"
    raw = prefix.encode()
    end = prefix_range_end(raw)
    return raw, (end if end != raw else b"\0")


def to_kv(pb) -> KeyValue:
    """An etcd mvccpb.KeyValue as our KeyValue."""
    return KeyValue(pb.key.decode(), bytes(pb.value), pb.create_revision, pb.mod_revision,
                    pb.version, pb.lease or None)


def to_event(pb) -> Event:
    """An etcd mvccpb.Event as our Event (a delete's kv carries key and mod_revision only)."""
    kind = "delete" if pb.type == rpc.Event.DELETE else "put"
    kv = to_kv(pb.kv)
    if kind == "delete":
        kv = KeyValue(kv.key, b"", 0, kv.mod_revision, 0, None)
    return Event(kind, kv, pb.kv.mod_revision)


class EtcdWatch:
    """Follows one prefix from a revision on, across reconnects (see the module docstring).

    `stub` gives the current WatchStub (or raises once the store is closed); `closed` tells whether
    the store was closed, which ends the iteration. All state lives here, so a cancelled
    `__anext__` only drops the stream (gRPC cancels an RPC whose read is cancelled); the next call
    creates it again from `next_revision`.
    """

    def __init__(self, stub: Callable[[], rpc.WatchStub], closed: Callable[[], bool],
                 prefix: str, start_revision: int):
        self._stub, self._closed = stub, closed
        self._key, self._range_end = key_range(prefix)
        self.next_revision = start_revision
        self.reconnects = 0
        self._call = None
        self._pending: deque[Event] = deque()
        self._pause = 0.0
        self._done = False

    def __aiter__(self) -> EtcdWatch:
        return self

    async def __anext__(self) -> Event:
        while not self._pending:
            if self._done or self._closed():
                self._drop()
                raise StopAsyncIteration
            try:
                resp = await self._read()
            except grpc.aio.AioRpcError:
                resp = None                               # broken stream: reconnect
            except asyncio.CancelledError:
                self._drop()
                if self._closed() and not _cancelling():
                    raise StopAsyncIteration from None    # the store's channel closed under us
                raise
            broken = resp is None or resp is grpc.aio.EOF
            if broken or (resp.canceled and not resp.compact_revision):
                if not broken:
                    log.warning("etcd cancelled a watch from %d: %s", self.next_revision,
                                resp.cancel_reason or "no reason given")
                self._drop()
                self._pause = min(max(self._pause * 2, PAUSE_MIN), PAUSE_MAX)
                continue
            if resp.compact_revision:
                self._done = True
                self._drop()
                raise Compacted(resp.compact_revision)
            self._pause = 0.0
            self._take(resp.events)
        return self._pending.popleft()

    async def _read(self):
        """The next response, (re)creating the stream first if there is none."""
        if self._call is None:
            if self._pause:
                self.reconnects += 1
                await asyncio.sleep(self._pause)
            self._call = self._stub().Watch(wait_for_ready=True)
            await self._call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=self._key, range_end=self._range_end, start_revision=self.next_revision)))
        return await self._call.read()

    def _take(self, events) -> None:
        for pb in events:
            if pb.kv.mod_revision >= self.next_revision:
                self._pending.append(to_event(pb))
        if events:
            self.next_revision = max(self.next_revision, events[-1].kv.mod_revision + 1)

    def _drop(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def aclose(self) -> None:
        self._done = True
        self._pending.clear()
        self._drop()


def _cancelling() -> bool:
    """Whether the current task itself is being cancelled (then CancelledError must propagate)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
