"""Coalescing: run an async job soon after a kick; kicks that arrive while it runs make exactly
one more run, none is lost and none runs twice at once.

    resync = Coalescing(agent.sync_dataplane, "data-plane resync")
    resync.kick()        # from any callback on the event loop's thread
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("mesh.coalesce")


class Coalescing:
    def __init__(self, job, what: str):
        self.job, self.what = job, what
        self.dirty = False
        self.task: asyncio.Task | None = None

    def kick(self) -> None:
        self.dirty = True
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.dirty:
            self.dirty = False
            try:
                await self.job()
            except Exception:
                log.exception("%s failed", self.what)
