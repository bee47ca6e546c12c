"""Cancelling a task at a chosen turn of the loop, and checking that it ended (tests/unit/test_cancel).

    landed = cancel_after(task, 2)        # cancel it two rounds of callbacks from now
    await ended(task, landed, "the loop") # a cancel that landed ended it within a second
"""
from __future__ import annotations

import asyncio

import pytest

TURNS = range(6)        # the turns after a completion at which the tests cancel


def cancel_after(task: asyncio.Task, turns: int) -> list[bool]:
    """Cancel `task` once the loop has run `turns` more rounds of callbacks; the list returned
    gets whether the cancel landed (False: the task had ended by itself before)."""
    loop, landed = asyncio.get_running_loop(), []

    def step(left: int) -> None:
        if left:
            loop.call_soon(step, left - 1)
        else:
            landed.append(task.cancel())
    step(turns)
    return landed


async def ended(task: asyncio.Task, landed: list[bool], what: str) -> bool:
    """`task` ended within a second, cancelled if the cancel landed (otherwise it is stopped and
    the test fails naming `what`). Returns whether the cancel landed."""
    done, _ = await asyncio.wait([task], timeout=1.0)
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        pytest.fail(f"{what} ran on after it was cancelled")
    assert landed, f"{what}: the task ended before the cancel was due"
    if landed[0]:
        assert task.cancelled(), f"{what} returned {task.result()!r} instead of ending cancelled"
    return landed[0]
