from __future__ import annotations

import asyncio

import pytest

from contract.errors import ErrorCode, ServiceError
from worker.admission import Admission


async def test_admits_up_to_the_limit_then_queues_then_refuses() -> None:
    admission = Admission(max_concurrency=2, max_queue=1, retry_after_s=3)
    assert await admission.acquire(1.0) == 0.0
    assert await admission.acquire(1.0) == 0.0
    queued = asyncio.create_task(admission.acquire(5.0))
    await asyncio.sleep(0)
    assert admission.waiting == 1
    with pytest.raises(ServiceError) as refused:
        await admission.acquire(5.0)
    assert refused.value.code is ErrorCode.BUSY
    assert refused.value.headers == {"Retry-After": "3"}
    admission.release()
    assert await queued >= 0.0
    assert admission.active == 2
    admission.release()
    admission.release()
    assert admission.active == 0


async def test_queue_timeout_is_busy_and_leaves_no_waiter() -> None:
    admission = Admission(max_concurrency=1, max_queue=2, retry_after_s=1)
    await admission.acquire(1.0)
    with pytest.raises(ServiceError) as timed_out:
        await admission.acquire(0.01)
    assert timed_out.value.code is ErrorCode.BUSY
    assert admission.waiting == 0
    admission.release()
    assert admission.active == 0


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    admission = Admission(max_concurrency=1, max_queue=2, retry_after_s=1)
    await admission.acquire(1.0)
    waiter = asyncio.create_task(admission.acquire(5.0))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    admission.release()
    assert admission.active == 0
    assert await admission.acquire(1.0) == 0.0


async def test_slots_pass_in_arrival_order() -> None:
    admission = Admission(max_concurrency=1, max_queue=3, retry_after_s=1)
    await admission.acquire(1.0)
    order: list[int] = []

    async def take(n: int) -> None:
        await admission.acquire(5.0)
        order.append(n)
        admission.release()

    tasks = [asyncio.create_task(take(n)) for n in range(3)]
    await asyncio.sleep(0)
    admission.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert admission.active == 0


def test_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        Admission(max_concurrency=0, max_queue=1, retry_after_s=1)
