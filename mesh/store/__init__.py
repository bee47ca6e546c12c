"""The cluster store: desired state with revisions, compare-and-swap, prefix watches and leases.

`open_store(url)` picks the implementation:

    memory://                       MemoryStore, in-process (the embedded default)
    etcd://HOST:PORT[,HOST:PORT]    EtcdStore, etcd v3 (several endpoints: IP addresses, failover)

The contract (revisions, CAS with `expect=`, the watch/Compacted protocol, leases) is in
mesh.store.base; both implementations pass one contract test suite
(tests/unit/test_store_contract.py). The etcd adapter is imported only when asked for, so the
embedded store works without grpc.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from .base import (CasFailed, Compacted, Event, KeyValue, LeaseExpired, Store, StoreClosed,
                   StoreError, StoreUnavailable)
from .memory import MemoryStore

__all__ = ["CasFailed", "Compacted", "Event", "KeyValue", "LeaseExpired", "MemoryStore", "Store",
           "StoreClosed", "StoreError", "StoreUnavailable", "open_store"]


def open_store(url: str, **options) -> Store:
    """A Store for `memory://` or `etcd://HOST:PORT[,HOST:PORT...]`; options go to its class."""
    parts = urlsplit(url)
    if parts.scheme == "memory":
        if parts.netloc or parts.path.strip("/"):
            raise ValueError(f"memory:// takes no address: {url!r}")
        return MemoryStore(**options)
    if parts.scheme == "etcd":
        if not parts.netloc or parts.path.strip("/") or parts.query:
            raise ValueError(f"expected etcd://HOST:PORT[,HOST:PORT...], not {url!r}")
        from .etcd import EtcdStore
        return EtcdStore(parts.netloc, **options)
    raise ValueError(f"unknown store URL {url!r}: use memory:// or etcd://HOST:PORT")
