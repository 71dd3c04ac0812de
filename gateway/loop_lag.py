"""How late the event loop runs its callbacks: the gateway's own queueing delay.

The cache budget is meant for Redis's wait, not for time a request spends queued behind
others in a saturated gateway; without this, an overloaded gateway would time out its own
Redis calls, count them as Redis faults and send cache hits to the workers as misses.
"""

from __future__ import annotations

import asyncio
import time


class LoopLagMonitor:
    """Samples the loop's lateness every `interval_s`; `lag_s` is the recent worst, decaying."""

    def __init__(self, interval_s: float = 0.02, decay: float = 0.8) -> None:
        self._interval_s = interval_s
        self._decay = decay
        self._lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def lag_s(self) -> float:
        return self._lag_s

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _sample(self) -> None:
        while True:
            expected = time.monotonic() + self._interval_s
            await asyncio.sleep(self._interval_s)
            late = max(0.0, time.monotonic() - expected)
            self._lag_s = max(late, self._lag_s * self._decay)
