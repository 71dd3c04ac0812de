"""A timeout for cache calls that blames Redis only for Redis's delays.

`asyncio.timeout` cancels when its timer runs, even when the reply is already waiting in the
socket: after the process was descheduled, or the loop ran one long iteration, timers run
before I/O is polled. This timeout checks how late its timer ran; if the loop itself stalled,
it grants one grace period so that pending I/O is read first. A Redis that really does not
answer is still cut off at the budget (plus, at worst, one grace period under a stall).
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class CallBudget:
    """`async with CallBudget(0.1):` raises TimeoutError when the body overruns the budget."""

    __slots__ = ("_budget_s", "_due", "_fired", "_grace_s", "_handle", "_stall_s", "_task", "_used")

    def __init__(self, budget_s: float, *, stall_s: float = 0.02, grace_s: float = 0.05) -> None:
        self._budget_s = budget_s
        self._stall_s = stall_s
        self._grace_s = grace_s
        self._fired = False
        self._used = False
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None

    async def __aenter__(self) -> CallBudget:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._due = loop.time() + self._budget_s
        self._handle = loop.call_at(self._due, self._on_timer)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._fired and exc_type is asyncio.CancelledError:
            assert self._task is not None
            if self._task.uncancel() == 0:
                raise TimeoutError("the cache call ran past its budget") from exc

    def _on_timer(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._used and now - self._due > self._stall_s:
            self._used = True
            self._due = now + self._grace_s
            self._handle = loop.call_at(self._due, self._on_timer)
            return
        self._fired = True
        assert self._task is not None
        self._task.cancel()
