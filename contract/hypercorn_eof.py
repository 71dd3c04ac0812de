"""Close a connection as soon as its client has closed it (no CLOSE-WAIT for minutes).

Hypercorn (0.18) reads a connection until EOF, then waits for the connection's task group to
finish before it closes the socket; that group also holds the keep-alive timer. A client that
closes an idle keep-alive connection (nginx retiring an upstream connection, a health probe,
any short-lived client) therefore leaves the socket in CLOSE-WAIT until `keep_alive_timeout`
(75 s here) runs out: gateways and workers kept 9-19 such sockets at any time, more right
after start-up, when readiness probes arrive every 50 ms. Both services call
`install_close_on_eof()` before serving: once the read loop has seen EOF (or a read error),
the keep-alive timer is stopped, so the connection closes at once; a response still being
sent keeps the group open and is cancelled by Hypercorn's own disconnect handling, as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from hypercorn.asyncio.tcp_server import TCPServer

_PATCHED = "_tts_close_on_eof"


def install_close_on_eof() -> None:
    """Patch Hypercorn's asyncio TCP server (idempotent)."""
    if getattr(TCPServer, _PATCHED, False):
        return
    read_data: Callable[[TCPServer], Awaitable[None]] = TCPServer._read_data

    async def read_data_then_stop_idle_timer(self: TCPServer) -> None:
        await read_data(self)
        await self.idle_task.stop()

    TCPServer._read_data = read_data_then_stop_idle_timer  # type: ignore[method-assign]
    setattr(TCPServer, _PATCHED, True)
