"""What a running daemon is doing, on demand: `kill -USR1 <pid>` logs the stack of every asyncio
task and of every thread (py-spy shows only the threads, and an idle loop's tasks are where a hang
waits).

    async def main():
        dumps.install()          # on the running loop; the daemons (mesh daemon, manager, agent) do
        ...
    done = await dumps.bounded("the agents stopping", gather(...), 30)   # False: it hung (logged)
"""
from __future__ import annotations

import asyncio
import io
import logging
import signal
import sys
import threading
import traceback

log = logging.getLogger("mesh.dumps")


def describe() -> str:
    """Every task of the running loop with where it waits, then every thread's stack."""
    out = io.StringIO()
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    out.write(f"{len(tasks)} asyncio tasks\n")
    for task in tasks:
        task.print_stack(limit=30, file=out)
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        out.write(f"--- thread {names.get(ident, ident)}\n")
        out.write("".join(traceback.format_stack(frame, limit=30)))
    return out.getvalue()


def install() -> None:
    """Log describe() on SIGUSR1 (call from inside the running loop)."""
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGUSR1, lambda: log.warning("SIGUSR1: what runs now\n%s", describe()))


async def bounded(what: str, awaitable, seconds: float) -> bool:
    """Await `awaitable` for at most `seconds` (its error, if it fails, is raised); past that, log
    what every task waits on, cancel it and return False: a stop that must finish (mesh down)
    goes on and removes the rest."""
    job = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait([job], timeout=seconds)
    except asyncio.CancelledError:
        job.cancel()
        raise
    if done:
        job.result()
        return True
    log.error("%s took over %.0f s: going on without it. What runs now:\n%s", what, seconds,
              describe())
    job.cancel()
    await asyncio.wait([job], timeout=1.0)
    return False
