"""Batch items run in order, a bounded number at a time, and stop when the client hangs up."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.batch import BatchAbandonedError, run_batch


class Items:
    def __init__(self, count: int, hold: float = 0.01) -> None:
        self.count = count
        self.hold = hold
        self.running = 0
        self.most = 0
        self.started: list[int] = []
        self.cancelled: list[int] = []

    def calls(self) -> list[Callable[[], Awaitable[int]]]:
        return [lambda index=index: self.run(index) for index in range(self.count)]

    async def run(self, index: int) -> int:
        self.started.append(index)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.hold)
        except asyncio.CancelledError:
            self.cancelled.append(index)
            raise
        finally:
            self.running -= 1
        return index * 10


def connected() -> Callable[[], Awaitable[dict[str, str]]]:
    async def receive() -> dict[str, str]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


async def test_items_run_in_order_never_more_than_the_bound_at_once() -> None:
    items = Items(32)
    results = await run_batch(items.calls(), concurrency=4, receive=connected())
    assert results == [index * 10 for index in range(32)]
    assert items.most == 4
    assert items.started == list(range(32))


async def test_a_hang_up_cancels_running_and_pending_items() -> None:
    items = Items(32, hold=10.0)
    gone = asyncio.Event()

    async def receive() -> dict[str, str]:
        await gone.wait()
        return {"type": "http.disconnect"}

    batch = asyncio.ensure_future(run_batch(items.calls(), concurrency=4, receive=receive))
    await asyncio.sleep(0.05)
    assert items.running == 4
    gone.set()
    with pytest.raises(BatchAbandonedError):
        await asyncio.wait_for(batch, 1.0)
    assert items.running == 0
    assert sorted(items.cancelled) == [0, 1, 2, 3]
    assert items.started == [0, 1, 2, 3], "no pending item started after the hang-up"


async def test_an_item_error_is_raised_to_the_caller_only_if_the_item_raises() -> None:
    async def fine() -> int:
        return 1

    async def broken() -> int:
        raise RuntimeError("item")

    with pytest.raises(RuntimeError):
        await run_batch([fine, broken, fine], concurrency=2, receive=connected())
