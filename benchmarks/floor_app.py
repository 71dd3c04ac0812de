"""The floor for the gateway's hit path: the least a Hypercorn app can do to serve cached bytes.

A raw ASGI app (no framework, no middleware) that answers every request with one Redis GET of
a fixed key, on Hypercorn + uvloop like the gateway. `bench_gateway_hits.py` runs it beside the
gateway; what the gateway costs beyond it is validation, routing, keying and headers.

    FLOOR_PORT=9100 FLOOR_REDIS_URL=redis://127.0.0.1:6379/0 FLOOR_KEY=floor:audio \\
        .venv/bin/python benchmarks/floor_app.py
"""

from __future__ import annotations

import asyncio
import os
import signal

import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config
from redis.asyncio import Redis

Scope = dict[str, object]


def make_app(redis: Redis, key: str) -> object:
    async def app(scope: Scope, receive: object, send: object) -> None:
        assert callable(receive)
        assert callable(send)
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"]
                await send({"type": kind + ".complete"})
                if kind == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/readyz":
            body, status = b"ready", 200
        else:
            value = await redis.get(key)
            body, status = (value, 200) if value is not None else (b"missing", 404)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"audio/wav"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


async def main() -> None:
    redis = Redis.from_url(os.environ["FLOOR_REDIS_URL"])
    config = Config()
    config.bind = [f"127.0.0.1:{os.environ['FLOOR_PORT']}"]
    config.accesslog = None
    config.keep_alive_timeout = 75
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    app = make_app(redis, os.environ.get("FLOOR_KEY", "floor:audio"))
    await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    await redis.aclose()


if __name__ == "__main__":
    uvloop.run(main())
