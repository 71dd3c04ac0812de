from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from starlette.types import Message

from worker.disconnect import ClientDisconnectedError, unless_disconnected
from worker.responses import AudioStreamResponse


class Connection:
    """An ASGI receive that reports a disconnect once `hang_up()` is called."""

    def __init__(self) -> None:
        self._gone = asyncio.Event()

    def hang_up(self) -> None:
        self._gone.set()

    async def receive(self) -> Message:
        await self._gone.wait()
        return {"type": "http.disconnect"}


async def test_work_that_finishes_first_is_returned() -> None:
    async def work() -> int:
        return 7

    discarded: list[int] = []

    async def discard(value: int) -> None:
        discarded.append(value)

    assert await unless_disconnected(work(), Connection().receive, discard) == 7
    assert discarded == []


async def test_disconnect_cancels_the_work() -> None:
    connection = Connection()
    cancelled = asyncio.Event()

    async def work() -> int:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    async def discard(value: int) -> None:
        raise AssertionError("nothing to discard")

    asyncio.get_running_loop().call_later(0.01, connection.hang_up)
    with pytest.raises(ClientDisconnectedError):
        await unless_disconnected(work(), connection.receive, discard)
    assert cancelled.is_set()


async def test_a_result_made_as_the_client_left_is_discarded() -> None:
    connection = Connection()
    connection.hang_up()
    discarded: list[str] = []

    async def work() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "made anyway"  # ignores the cancellation, as a finishing step might
        return "never"

    async def discard(value: str) -> None:
        discarded.append(value)

    with pytest.raises(ClientDisconnectedError):
        await unless_disconnected(work(), connection.receive, discard)
    assert discarded == ["made anyway"]


async def test_stream_is_closed_even_if_it_never_started() -> None:
    closed: list[str] = []

    async def body() -> AsyncGenerator[bytes, None]:
        yield b"never sent"

    async def on_close() -> None:
        closed.append("closed")

    async def failing_send(message: Message) -> None:
        raise OSError("connection reset")

    response = AudioStreamResponse(body(), headers={}, on_close=on_close)
    with pytest.raises(OSError, match="reset"):
        await response({"type": "http"}, Connection().receive, failing_send)
    assert closed == ["closed"]


async def test_disconnect_mid_stream_ends_quietly_and_closes() -> None:
    connection = Connection()
    closed: list[str] = []
    sent: list[Message] = []

    async def body() -> AsyncGenerator[bytes, None]:
        yield b"first"
        connection.hang_up()
        await asyncio.sleep(30)
        yield b"never"

    async def on_close() -> None:
        closed.append("closed")

    async def send(message: Message) -> None:
        sent.append(message)

    response = AudioStreamResponse(body(), headers={}, on_close=on_close)
    await response({"type": "http"}, connection.receive, send)
    assert [m.get("body") for m in sent[1:]] == [b"first"]
    assert closed == ["closed"]
