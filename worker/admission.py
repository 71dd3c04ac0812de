"""Bounded admission: at most N syntheses at once and a short, bounded wait queue.

A request that finds every slot taken and the queue full is refused at once (503 `busy` with
`Retry-After`), so nginx or the gateway can try another worker; nothing queues without bound.
A queued request that waits past its timeout is dropped the same way. Slots pass to waiters in
arrival order.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from contract.errors import ErrorCode, ServiceError


class Admission:
    def __init__(self, *, max_concurrency: int, max_queue: int, retry_after_s: int) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self._max_concurrency = max_concurrency
        self._max_queue = max_queue
        self._retry_after_s = retry_after_s
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    def limit_to(self, max_concurrency: int) -> None:
        """Lower the slot count (e.g. to what the engine says it can hold); never raises it."""
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self._max_concurrency = min(self._max_concurrency, max_concurrency)

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def acquire(self, max_wait: float) -> float:
        """Take a slot, waiting at most `max_wait` seconds in the queue; return the wait.

        Raises ServiceError(BUSY) at once when the queue is full, or after `max_wait`.
        The caller must call `release()` exactly once after a successful acquire.
        """
        if self._active < self._max_concurrency and not self._waiters:
            self._active += 1
            return 0.0
        if self.waiting >= self._max_queue:
            raise self._busy("The worker is at capacity; try again or elsewhere.")
        started = time.monotonic()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max_wait):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                self.release()
            raise self._busy("No synthesis slot became free in time.") from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return time.monotonic() - started

    def release(self) -> None:
        """Free a slot: hand it to the oldest live waiter, or return it to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._active -= 1

    def _busy(self, message: str) -> ServiceError:
        return ServiceError(
            ErrorCode.BUSY, message, headers={"Retry-After": str(self._retry_after_s)}
        )
