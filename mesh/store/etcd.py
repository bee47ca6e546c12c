"""EtcdStore: the `Store` on etcd v3, through aetcd's generated gRPC stubs (aetcd.rpc).

We drive the stubs ourselves rather than aetcd's high-level Client, because the contract needs
what that layer hides: the response header's revision on every call, a compare-and-swap whose
failure branch reads the current value atomically, `wait_for_ready` calls, and watches that resume
(mesh.store.etcdwatch).

Connection handling: one gRPC channel, created on first use, reconnects by itself with backoff
(100 ms doubling to 2 s). Every call waits for the channel to be ready (`wait_for_ready`) for at
most `timeout` seconds, then raises `StoreUnavailable`. Reads, lease calls and unconditional
writes are retried within that deadline when the connection drops mid-call; a conditional write
(`expect=`) is not, since its outcome is then unknown: it raises `StoreUnavailable` and the caller
re-reads. etcd's errors map to ours: "lease not found" → `LeaseExpired`, a compacted watch start →
`Compacted`.
"""
from __future__ import annotations

import asyncio
import ipaddress
import math
from typing import Awaitable, Callable, TypeVar

import grpc
from aetcd import rpc

from .base import (CasFailed, KeyValue, LeaseExpired, StoreClosed, StoreError,
                   StoreUnavailable, check_expect, check_key, check_start, check_value)
from .etcdwatch import EtcdWatch, key_range, to_kv

T = TypeVar("T")

CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 10_000),          # etcd allows pings every 5 s with open streams
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 64 << 20),
)


def grpc_target(endpoints: str | list[str] | tuple[str, ...]) -> str:
    """A gRPC target for "host:port" or several comma-separated IP:port endpoints (failover)."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    items = [e.strip().removeprefix("http://") for e in items if e.strip()]
    if not items:
        raise ValueError("no etcd endpoint given")
    items = [e if e.rpartition(":")[2].isdigit() else f"{e}:2379" for e in items]
    if len(items) == 1:
        return items[0]
    try:
        families = {ipaddress.ip_address(e.rpartition(":")[0].strip("[]")).version for e in items}
    except ValueError:
        raise ValueError(f"several etcd endpoints must be IP addresses: {items}") from None
    if len(families) != 1:
        raise ValueError(f"etcd endpoints mix IPv4 and IPv6: {items}")
    return f"ipv{families.pop()}:" + ",".join(items)


class EtcdStore:
    """Store on etcd v3 (see mesh.store.base for the contract)."""

    def __init__(self, endpoints: str | list[str] = "127.0.0.1:2379", *, timeout: float = 5.0):
        self.target = grpc_target(endpoints)
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._kv: rpc.KVStub | None = None
        self._lease: rpc.LeaseStub | None = None
        self._watch: rpc.WatchStub | None = None
        self._closed = False

    def _open(self) -> None:
        if self._closed:
            raise StoreClosed("the store is closed")
        if self._channel is None:
            self._channel = rpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            self._kv = rpc.KVStub(self._channel)
            self._lease = rpc.LeaseStub(self._channel)
            self._watch = rpc.WatchStub(self._channel)

    async def _call(self, make: Callable[[float], Awaitable[T]], *, retry: bool = True) -> T:
        """Run make(remaining_timeout) until it succeeds, mapping etcd's errors to ours."""
        self._open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        pause = 0.05
        while True:
            try:
                return await make(max(deadline - loop.time(), 0.001))
            except grpc.aio.AioRpcError as e:
                code, details = e.code(), e.details() or ""
                if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
                    raise LeaseExpired(0) from e
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise StoreError(f"etcd: {code.name}: {details}") from e
                if not retry or loop.time() + pause >= deadline:
                    raise StoreUnavailable(f"etcd at {self.target}: {code.name}: {details}") from e
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _unary(self, method, request, *, retry: bool = True) -> Awaitable:
        return self._call(lambda t: method(request, timeout=t, wait_for_ready=True), retry=retry)

    # -- keys ------------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        raw = check_key(key)
        self._open()
        resp = await self._unary(self._kv.Range, rpc.RangeRequest(key=raw))
        return to_kv(resp.kvs[0]) if resp.kvs else None

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        key, end = key_range(prefix)
        self._open()
        req = rpc.RangeRequest(key=key, range_end=end, sort_order=rpc.RangeRequest.ASCEND,
                               sort_target=rpc.RangeRequest.KEY)
        resp = await self._unary(self._kv.Range, req)
        return [to_kv(kv) for kv in resp.kvs], resp.header.revision

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  lease: int | None = None) -> int:
        raw, value = check_key(key), check_value(value)
        check_expect(expect)
        put = rpc.PutRequest(key=raw, value=value, lease=lease or 0)
        self._open()
        try:
            if expect is None:
                return (await self._unary(self._kv.Put, put)).header.revision
            resp = await self._txn(key, expect, rpc.RequestOp(request_put=put))
        except LeaseExpired:
            raise LeaseExpired(lease or 0) from None
        return resp.header.revision

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        raw = check_key(key)
        check_expect(expect)
        delete = rpc.DeleteRangeRequest(key=raw)
        self._open()
        if expect is None:
            return (await self._unary(self._kv.DeleteRange, delete)).deleted > 0
        resp = await self._txn(key, expect, rpc.RequestOp(request_delete_range=delete))
        return resp.responses[0].response_delete_range.deleted > 0

    async def _txn(self, key: str, expect: int, op: rpc.RequestOp) -> rpc.TxnResponse:
        """op if the key's mod_revision is `expect` (0: absent), else CasFailed with the current."""
        raw = key.encode()
        compare = rpc.Compare(key=raw, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                              mod_revision=expect)
        read = rpc.RequestOp(request_range=rpc.RangeRequest(key=raw))
        req = rpc.TxnRequest(compare=[compare], success=[op], failure=[read])
        resp = await self._unary(self._kv.Txn, req, retry=False)
        if not resp.succeeded:
            kvs = resp.responses[0].response_range.kvs
            raise CasFailed(key, expect, to_kv(kvs[0]) if kvs else None)
        return resp

    async def delete_prefix(self, prefix: str) -> int:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix")
        key, end = key_range(prefix)
        self._open()
        req = rpc.DeleteRangeRequest(key=key, range_end=end)
        resp = await self._unary(self._kv.DeleteRange, req)
        return resp.deleted

    async def compact(self, revision: int) -> None:
        self._open()
        try:
            await self._unary(self._kv.Compact, rpc.CompactionRequest(revision=revision))
        except StoreError as e:
            if "required revision has been compacted" in str(e):
                return
            if "future revision" in str(e):
                raise ValueError(f"cannot compact to {revision}: {e}") from None
            raise

    # -- watch -----------------------------------------------------------------------------------

    def watch(self, prefix: str, *, start_revision: int) -> EtcdWatch:
        check_start(start_revision)
        self._open()
        return EtcdWatch(self._watch_stub, lambda: self._closed, prefix, start_revision)

    def _watch_stub(self) -> rpc.WatchStub:
        self._open()
        return self._watch

    # -- leases ----------------------------------------------------------------------------------

    async def grant(self, ttl: float) -> int:
        if ttl <= 0:
            raise ValueError(f"a lease needs a positive ttl, not {ttl!r}")
        self._open()
        req = rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))
        resp = await self._unary(self._lease.LeaseGrant, req)
        if resp.error:
            raise StoreError(f"etcd: lease grant: {resp.error}")
        return resp.ID

    async def keepalive(self, lease: int) -> None:
        self._open()
        req = rpc.LeaseKeepAliveRequest(ID=lease)

        async def once(timeout: float):
            call = self._lease.LeaseKeepAlive(iter([req]), timeout=timeout, wait_for_ready=True)
            try:
                async for resp in call:
                    return resp
            finally:
                call.cancel()
            return None

        resp = await self._call(once)
        if resp is None or resp.TTL <= 0:
            raise LeaseExpired(lease)

    async def revoke(self, lease: int) -> None:
        self._open()
        try:
            await self._unary(self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease))
        except LeaseExpired:
            pass

    # -- lifecycle -------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()
