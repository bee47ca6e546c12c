"""A cancelled wait ends, also when what it waited for completes in the same turn of the loop.

Python 3.11's asyncio.wait_for returns the result instead of raising CancelledError when the
awaited thing completes just as the cancel comes. A loop around it then runs on, and whoever
cancelled it and awaits its end (Supervisor stopping a health probe loop, a LeaseKeeper stopping,
NodeAgent.run stopping its report loop) waits for ever: `mesh down` hung in CI that way. Each test
here cancels at each of the first few turns after the completion; a swallowed cancel fails it.
The node agent's report loop has its test in test_manager.
"""
from __future__ import annotations

import asyncio

from mesh import health as hc
from mesh.store import MemoryStore
from mesh.storeops import LeaseKeeper

from cancelling import TURNS, cancel_after, ended


def test_a_health_probe_cancelled_as_it_exits_ends_cancelled(monkeypatch):
    async def main():
        exited = hc._Probe.process_exited
        probe, landed = None, []

        def exited_then_cancel(self):        # a spy: the real callback, then the cancel
            exited(self)
            landed.append(cancel_after(probe, turns))
        monkeypatch.setattr(hc._Probe, "process_exited", exited_then_cancel)
        cancelled = 0
        for turns in TURNS:
            landed.clear()
            probe = asyncio.ensure_future(hc.run_probe(["true"], 5.0))
            await asyncio.wait([probe], timeout=5.0)
            cancelled += await ended(probe, landed[0], f"a probe cancelled {turns} turns after "
                                                       "its process exited")
        assert cancelled >= 2, f"only {cancelled} cancels came before the probe returned"
    asyncio.run(main())


def test_a_lease_keeper_stopped_as_it_renews_stops():
    async def main():
        store = MemoryStore()
        keepalive = store.keepalive
        for turns in TURNS:
            keeper = LeaseKeeper(store, ttl=0.03)
            landed: list = []

            async def renew_then_cancel(lease):   # a spy: the real renewal, then the cancel
                await keepalive(lease)
                if not landed:
                    landed.append(cancel_after(keeper._task, turns))
            store.keepalive = renew_then_cancel
            await keeper.start()
            await asyncio.wait([keeper._task], timeout=1.0)
            assert await ended(keeper._task, landed[0], f"a lease keeper cancelled {turns} turns "
                                                       "after a renewal")
        await store.close()
    asyncio.run(main())


def test_a_bounded_wait_that_hangs_is_cancelled_and_logged_with_what_runs(caplog):
    from mesh.dumps import bounded

    async def stuck_in_its_stop():
        await asyncio.Event().wait()

    async def main():
        stuck = asyncio.ensure_future(stuck_in_its_stop())
        assert await bounded("the quick one", asyncio.sleep(0.01), 1.0) is True
        assert await bounded("the agents stopping", asyncio.gather(stuck), 0.2) is False
        await asyncio.sleep(0)
        assert stuck.cancelled()
    asyncio.run(main())
    logged = caplog.text
    assert "the agents stopping took over 0 s: going on without it" in logged
    assert "stuck_in_its_stop" in logged and "the quick one" not in logged
