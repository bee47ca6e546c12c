"""Compose `healthcheck`s, Docker-style: a pure state machine, and the loop that runs the probes.

    health = Health(check, started_at=time.time())      # "starting"
    changed = health.record(result)                      # a ProbeResult -> True when the status moved
    await watch(health, argv_of, env=..., cwd=..., on_change=...)   # probes every interval, until cancelled

Docker's rules: the first probe runs one `interval` after the process started, then one `interval`
after the previous probe ended. A probe that exits 0 makes the task healthy at once (also during
`start_period`). Any other outcome (non-zero exit, not finished within `timeout`, could not start)
is a failure; failures while the task is still "starting" and inside `start_period` do not count;
`retries` consecutive counted failures make it unhealthy; one success makes it healthy again.

A probe runs in its own session (process group): at its timeout, or when the loop is cancelled,
the whole group is killed with SIGKILL and reaped; after it exits, whatever it left in its group is
killed too, so probes leave no processes behind.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from mesh.model import Healthcheck

log = logging.getLogger("mesh.health")

NONE, STARTING, HEALTHY, UNHEALTHY = "none", "starting", "healthy", "unhealthy"
LOG_ENTRIES = 5                  # probe results kept, as Docker's State.Health.Log
OUTPUT_LIMIT = 4096              # bytes of a probe's output kept, as Docker
READ_GRACE = 1.0                 # seconds to drain a probe's output after its group was killed


@dataclass(frozen=True)
class ProbeResult:
    start: float                     # wall-clock seconds (time.time())
    end: float
    exit_code: int | None            # None: killed at its timeout, or could not start
    output: str = ""
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def view(self) -> dict:
        return {"start": self.start, "end": self.end, "exit_code": self.exit_code,
                "timed_out": self.timed_out, "output": self.output}


@dataclass
class Health:
    """One run of a task's process under a healthcheck (a restart begins a new one)."""
    check: Healthcheck
    started_at: float                # when the process started (start_period counts from here)
    status: str = STARTING
    failing_streak: int = 0
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_ENTRIES))

    def in_start_period(self, at: float) -> bool:
        return at - self.started_at < self.check.start_period

    def record(self, result: ProbeResult) -> bool:
        """Apply one probe's result; True when the status changed."""
        before = self.status
        self.log.append(result)
        if result.ok:
            self.failing_streak, self.status = 0, HEALTHY
        elif not (self.status == STARTING and self.in_start_period(result.start)):
            self.failing_streak += 1
            if self.failing_streak >= self.check.retries:
                self.status = UNHEALTHY
        return self.status != before

    def stopped(self) -> bool:
        """The process exited: until a new run starts over, it cannot pass its check."""
        before, self.status = self.status, UNHEALTHY
        return self.status != before

    def view(self) -> dict:
        return {"health": self.status, "health_failing_streak": self.failing_streak,
                "health_log": [r.view() for r in self.log]}


NO_HEALTH = {"health": NONE, "health_failing_streak": 0, "health_log": []}


# ---- the probes: processes ----------------------------------------------------------------------

async def run_probe(argv: list[str], timeout: float, *, env: dict[str, str] | None = None,
                    cwd: str | None = None) -> ProbeResult:
    """Run one probe; kill its process group at `timeout` (and on cancellation); never raises OSError.

    The probe's exit is taken from the child watcher, not from its output pipe closing: something
    it started in the background may hold the pipe (killed with the group right after)."""
    start, loop = time.time(), asyncio.get_running_loop()
    proto, transport, timed_out = _Probe(loop), None, False
    spawn = loop.create_task(loop.subprocess_exec(
        lambda: proto, *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True))
    try:
        try:
            transport, _ = await asyncio.shield(spawn)
        except asyncio.CancelledError:   # cancelled while it starts: let it start, then kill it
            transport = await _started(spawn)
            raise
        except OSError as exc:
            return ProbeResult(start, time.time(), None, f"the probe could not start: {exc}")
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when a cancel
        # comes as the probe exits, and watch() would probe on after Supervisor cancelled it (a
        # task's stop, and with it mesh down, then waited for ever)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(proto.exited)
        except TimeoutError:
            timed_out = True
    finally:
        if transport is not None:        # kill the probe at its timeout, or what it left behind
            _kill_group(transport.get_pid())
            await asyncio.shield(_reap(proto, transport))
    output = proto.output.decode(errors="replace")
    if timed_out:
        return ProbeResult(start, time.time(), None,
                           f"health check exceeded its timeout ({timeout:g}s)\n{output}".rstrip("\n"),
                           timed_out=True)
    return ProbeResult(start, time.time(), transport.get_returncode(), output)


class _Probe(asyncio.SubprocessProtocol):
    """Keeps the first OUTPUT_LIMIT bytes of output; `exited` when the process is reaped, `closed`
    when, besides, every holder of its output pipe is gone."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.output = bytearray()
        self.exited, self.closed = loop.create_future(), loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.output += data[:max(0, OUTPUT_LIMIT - len(self.output))]

    def process_exited(self) -> None:
        _settle(self.exited)

    def connection_lost(self, exc: Exception | None) -> None:
        _settle(self.exited)
        _settle(self.closed)


async def _started(spawn: asyncio.Task) -> asyncio.SubprocessTransport | None:
    try:
        return (await spawn)[0]
    except OSError:
        return None


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def _reap(proto: _Probe, transport: asyncio.SubprocessTransport) -> None:
    try:
        async with asyncio.timeout(READ_GRACE * 10):
            await asyncio.shield(proto.exited)
        async with asyncio.timeout(READ_GRACE):
            await asyncio.shield(proto.closed)
    except TimeoutError:         # a holder of the pipe left the group: stop reading
        pass
    finally:
        transport.close()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def watch(health: Health, argv_of: Callable[[Healthcheck], list[str]], *,
                on_change: Callable[[], None], env: dict[str, str] | None = None,
                cwd: str | None = None) -> None:
    """Probe `health.check` every interval until cancelled, calling on_change() on each transition."""
    while True:
        await asyncio.sleep(health.check.interval)
        try:
            result = await run_probe(argv_of(health.check), health.check.timeout, env=env, cwd=cwd)
        except asyncio.CancelledError:
            raise
        except Exception as exc:         # a bug must not end the checks silently
            log.exception("health probe failed to run")
            result = ProbeResult(time.time(), time.time(), None, f"the probe failed to run: {exc}")
        if health.record(result):
            on_change()
