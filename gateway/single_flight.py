"""Single flight: concurrent identical misses on one gateway share one worker synthesis.

The first miss for a key starts a producer task that relays the worker's stream into a
`Flight`; every request for the same key that arrives while the flight is registered joins it
and reads the whole stream from its first byte: a late joiner gets the bytes so far at once,
then the rest as they arrive. The producer runs apart from any one client, so a client that
hangs up does not break the stream for the others; when the last subscriber leaves before the
end, the producer is cancelled, which closes the worker stream and frees its slot.

A flight stays registered until its producer returns, which includes writing the cache entry,
so no request falls between "flight finished" and "entry stored". This coalesces misses
within one gateway only; across gateways, two may synthesize the same key at once (both
results are identical because sampling is seeded from the request; the last write wins).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.memory_cap import ByteBudget

logger = logging.getLogger(__name__)


class FlightAbortedError(Exception):
    """The shared stream failed after it had started; every reader must abort."""


class Flight:
    def __init__(self, key: str | None, memory: ByteBudget | None = None) -> None:
        self.key = key
        self._memory = memory
        self._counted = 0
        self._producer_done = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._error: BaseException | None = None
        self._headers: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._headers.add_done_callback(_retrieve)
        self._changed = asyncio.Event()
        self._subscribers = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def done(self) -> bool:
        return self._done

    def body(self) -> bytes:
        return b"".join(self._chunks)

    def finished_headers(self) -> dict[str, str] | None:
        """The headers of a flight that finished cleanly, else None."""
        if not self._done or self._error is not None or not self._headers.done():
            return None
        if self._headers.exception() is not None:
            return None
        return self._headers.result()

    # Producer side.

    def set_headers(self, headers: dict[str, str]) -> None:
        self._headers.set_result(headers)

    def append(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._memory is not None:
            self._memory.add(len(chunk))
            self._counted += len(chunk)
        self._wake()

    def _release_memory(self) -> None:
        """Uncount the body once nobody can read it any more: producer done, no subscriber."""
        if self._producer_done and self._subscribers <= 0 and self._memory is not None:
            self._memory.release(self._counted)
            self._counted = 0

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        """End the flight with `error`: raised by `headers()` if no header was sent yet."""
        if self._done:
            return
        if not self._headers.done():
            self._headers.set_exception(error)
        self._error = error
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # Subscriber side.

    def subscribe(self) -> None:
        self._subscribers += 1

    def unsubscribe(self) -> None:
        """Leave the flight; the last subscriber to leave an unfinished flight cancels it."""
        self._subscribers -= 1
        if self._subscribers <= 0 and not self._done and self._task is not None:
            self._task.cancel()
        self._release_memory()

    async def headers(self) -> dict[str, str]:
        """The worker's audio headers once it has accepted, or the error that stopped it."""
        return await asyncio.shield(self._headers)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Every byte of the stream from the start; raises FlightAbortedError if it breaks."""
        index = 0
        while True:
            while index < len(self._chunks):
                yield self._chunks[index]
                index += 1
            if self._error is not None:
                raise FlightAbortedError("the synthesis stream broke") from self._error
            if self._done:
                return
            await self._changed.wait()


Producer = Callable[[Flight], Coroutine[Any, Any, None]]


class SingleFlight:
    def __init__(self, memory: ByteBudget | None = None) -> None:
        """`memory` counts every flight's body, from its first chunk until it is let go."""
        self._memory = memory
        self._flights: dict[str, Flight] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._flights)

    def get(self, key: str) -> Flight | None:
        """The registered flight for `key`, without subscribing to it."""
        return self._flights.get(key)

    def join(self, key: str) -> Flight | None:
        """The running flight for `key`, already subscribed, or None."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.subscribe()
        return flight

    def start(self, key: str | None, produce: Producer) -> Flight:
        """Run `produce(flight)` in its own task and return the flight, subscribed once.

        With a key, later `join(key)` calls share it until `produce` returns; without one
        (a cache bypass) the flight is private. `produce` must call `set_headers`, `append`
        and `finish`; an exception it raises fails the flight.
        """
        flight = Flight(key, self._memory)
        flight.subscribe()
        if key is not None:
            self._flights[key] = flight
        task = asyncio.create_task(self._run(flight, produce))
        flight._task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flight

    async def _run(self, flight: Flight, produce: Producer) -> None:
        try:
            await produce(flight)
        except asyncio.CancelledError:
            flight.fail(FlightAbortedError("the synthesis was cancelled"))
            raise
        except Exception as error:
            flight.fail(error)
        finally:
            if flight.key is not None and self._flights.get(flight.key) is flight:
                del self._flights[flight.key]
            if not flight.done and flight._error is None:
                flight.fail(RuntimeError("the synthesis ended without finishing"))
            flight._producer_done = True
            flight._release_memory()

    async def aclose(self) -> None:
        """Cancel every running flight (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _retrieve(future: asyncio.Future[dict[str, str]]) -> None:
    if not future.cancelled():
        future.exception()
