"""Running the items of one POST /synthesize_batch: bounded, in order, cancelled on hang-up.

A batch must not fan out past what the workers admit: 32 items dispatched at once on an idle
two-worker cluster found 12 places and 20 refusals. The items start in order, at most
`concurrency` at a time (GATEWAY_BATCH_CONCURRENCY), so a batch on an idle cluster completes;
each item's result, error included, is its own.

A client that hangs up must not leave the workers busy with audio nobody will read: the
connection is watched while the items run, and on `http.disconnect` every pending and running
item is cancelled (a running one closes its worker stream, which frees the worker's slot;
an item whose synthesis other requests share leaves that synthesis to them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.types import Receive

T = TypeVar("T")


class BatchAbandonedError(Exception):
    """The client hung up before the batch finished; its items were cancelled."""


async def run_batch(
    items: Sequence[Callable[[], Awaitable[T]]], *, concurrency: int, receive: Receive
) -> list[T]:
    """Every item's result, in order; raises BatchAbandonedError if the client hangs up.

    Call only once the request body has been read: `receive` then yields only the disconnect.
    """
    slots = asyncio.Semaphore(concurrency)

    async def bounded(item: Callable[[], Awaitable[T]]) -> T:
        async with slots:  # waiters acquire in arrival order: items start in order
            return await item()

    tasks = [asyncio.ensure_future(bounded(item)) for item in items]
    hang_up = asyncio.ensure_future(_until_disconnected(receive))
    try:
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(
                pending | {hang_up}, return_when=asyncio.FIRST_COMPLETED
            )
            if hang_up in done:
                raise BatchAbandonedError("the client hung up during the batch")
            pending.discard(hang_up)
        return [task.result() for task in tasks]
    finally:
        hang_up.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(hang_up, *tasks, return_exceptions=True)


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
