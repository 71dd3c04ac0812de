"""An ASGI streaming response that is safe to cancel and aborts, never truncates, on error.

It watches the connection while it streams: when the client disconnects, the stream is
cancelled at once, whatever the server does about it, and the body iterator is closed in a
`finally` so the synthesis behind it releases its slot. An exception from the body iterator after
the first byte propagates, so the server drops the connection without ending the response: the
client sees an incomplete stream, never a short one that looks complete.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from worker.disconnect import until_disconnected

logger = logging.getLogger(__name__)


class AudioStreamResponse(Response):
    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        *,
        headers: Mapping[str, str],
        on_close: Callable[[], Awaitable[None]],
        status_code: int = 200,
    ) -> None:
        """`on_close` runs after the stream ends, however it ends (even if it never started)."""
        self.body_iterator = body
        self.on_close = on_close
        self.status_code = status_code
        self.background = None
        self.init_headers(dict(headers))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("AudioStreamResponse must run inside a task")
        state = {"finished": False, "disconnected": False}

        async def watch_disconnect() -> None:
            await until_disconnected(receive)
            if not state["finished"]:
                state["disconnected"] = True
                task.cancel()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self.body_iterator:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            state["finished"] = True
        except asyncio.CancelledError:
            if not state["disconnected"]:
                raise
            task.uncancel()
            logger.info("Client disconnected; stream cancelled")
        finally:
            watcher.cancel()
            try:
                await self.body_iterator.aclose()
            finally:
                await self.on_close()
