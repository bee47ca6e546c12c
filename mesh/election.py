"""Leader election among managers through the store (etcd's usual recipe, on mesh.store's API).

    election = Election(store, "m1")
    await election.run(on_elected, on_deposed)   # forever; the callbacks are async
    await election.resign()                      # on shutdown: a standby takes over at once

A candidate puts /mesh/managers/leader with expect=0 (the key must not exist) and its own lease.
Whoever succeeds leads while its lease lives; the others watch the key and try again when it is
deleted — by the leader's resignation (revoke) or by the lease's expiry when the leader died. A
leader that cannot renew its lease for longer than the TTL, or whose key disappears, is deposed:
on_deposed runs before it campaigns again. The lease only bounds how long two managers may both
believe they lead; writes of the desired state are compare-and-swap on its revision as well
(mesh.manager), so a deposed leader's late write fails instead of overwriting the new leader's.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets

from mesh.storeops import LEADER, LEASE_TTL, LeaseKeeper
from mesh.store import CasFailed, Store, StoreError

log = logging.getLogger("mesh.election")
RETRY = 0.5


class Election:
    def __init__(self, store: Store, name: str, key: str = LEADER, ttl: float = LEASE_TTL):
        self.store, self.name, self.key, self.ttl = store, name, key, ttl
        self.value = json.dumps({"name": name, "pid": os.getpid(),
                                 "token": secrets.token_hex(4)}).encode()
        self.leading = False
        self.resigned = False
        self.keeper: LeaseKeeper | None = None

    async def leader(self) -> str | None:
        """The name of the current leader, or None."""
        kv = await self.store.get(self.key)
        return json.loads(kv.value).get("name") if kv is not None else None

    async def run(self, on_elected, on_deposed) -> None:
        """Campaign, lead, campaign again when deposed... until resign()."""
        while not self.resigned:
            try:
                await self._campaign(on_elected, on_deposed)
            except (StoreError, OSError) as exc:
                log.warning("election: %s; trying again", exc)
                await asyncio.sleep(RETRY)

    async def _campaign(self, on_elected, on_deposed) -> None:
        self.keeper = keeper = LeaseKeeper(self.store, self.ttl)
        await keeper.start()
        try:
            while not keeper.lost.is_set() and not self.resigned:
                try:
                    revision = await self.store.put(self.key, self.value, expect=0, lease=keeper.lease)
                except CasFailed as exc:
                    if exc.current is not None:
                        log.info("standing by: %s leads", json.loads(exc.current.value).get("name"))
                        await self._wait_vacant(exc.current.mod_revision, keeper.lost)
                    continue
                await self._lead(revision, keeper, on_elected, on_deposed)
                return
        finally:
            await keeper.stop(revoke=False)

    async def _lead(self, revision: int, keeper: LeaseKeeper, on_elected, on_deposed) -> None:
        log.info("%s leads (revision %d)", self.name, revision)
        self.leading = True
        try:
            await on_elected()
            await self._wait_vacant(revision, keeper.lost)
            log.warning("%s is no longer the leader", self.name)
        finally:
            self.leading = False
            await on_deposed()

    async def _wait_vacant(self, revision: int, lost: asyncio.Event) -> None:
        """Until the key (as of `revision`) is deleted, or `lost` is set."""
        async def deleted() -> None:
            async with contextlib.aclosing(self.store.watch(self.key, start_revision=revision + 1)) as events:
                async for ev in events:
                    if ev.kind == "delete" and ev.kv.key == self.key:
                        return

        watcher = asyncio.ensure_future(deleted())
        loser = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({watcher, loser}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watcher, loser):
                task.cancel()
            # a watch error (history compacted, store closed) ends the wait too: the next put
            # tells the truth
            await asyncio.gather(watcher, loser, return_exceptions=True)

    async def resign(self) -> None:
        """Give up leadership and candidacy now: the lease and the key go, run() returns."""
        self.resigned = True
        if self.keeper is not None:
            await self.keeper.stop(revoke=True)
