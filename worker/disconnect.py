"""Watch an ASGI connection for the client hanging up, while other work runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientDisconnectedError(Exception):
    """The client hung up before the response started."""


async def until_disconnected(receive: Receive) -> None:
    """Return when the client disconnects; call only once the request body has been read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(
    work: Coroutine[Any, Any, T],
    receive: Receive,
    discard: Callable[[T], Awaitable[None]],
) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise ClientDisconnectedError.

    Hypercorn does not cancel a request whose client has gone, so a request waiting in the
    admission queue would otherwise keep its place, and then synthesize for nobody. A result
    that `work` produced just as the client left is passed to `discard`.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(receive))
    handed_over = False
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            handed_over = True
            return task.result()
        task.cancel()
        await asyncio.wait({task})
        raise ClientDisconnectedError
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        elif not handed_over and not task.cancelled() and task.exception() is None:
            await discard(task.result())
