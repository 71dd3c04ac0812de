"""A stand-in worker that answers the worker API with fixed audio at once, run as a process.

`python -m testbed.stub_worker` (WORKER_HOST, WORKER_PORT from the environment; other
`WORKER_*` variables are ignored) serves /livez, /readyz, /v1/info, /metrics and
POST /v1/synthesize on Hypercorn + uvloop, like the real worker, with no engine behind it:
synthesis takes no time and the same bytes come back every time (CHUNKS chunks of a tone, or
n chunks for a text that starts with `chunks=<n> `). Benchmarks use it to measure
what the stack in front of a worker adds, without synthesis time and its spread.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config

from contract.audio import AudioFormat, output_sample_rate, stream_headers

SAMPLE_RATE = 22050
CHUNKS = 3
CHUNK_SECONDS = 0.1
INFO = {
    "engine": "stub",
    "model": "stub",
    "model_version": "stub-1",
    "sample_rate": SAMPLE_RATE,
    "modes": ["sft"],
    "languages": ["en"],
    "voices": [{"id": "stub", "name": "Stub", "language": "en", "description": "fixed audio"}],
    "default_voice": "stub",
    "supports_cloning": False,
    "supports_instructions": False,
    "speed_range": [0.25, 4.0],
}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _chunk(audio_format: AudioFormat) -> tuple[bytes, int]:
    rate = output_sample_rate(audio_format, SAMPLE_RATE)
    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(int(rate * CHUNK_SECONDS)) / rate)
    if audio_format is AudioFormat.PCM_F32LE:
        return tone.astype("<f4").tobytes(), rate
    return (tone * 32767).astype("<i2").tobytes(), rate


async def _json(send: Send, status: int, payload: object) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"]
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if path in ("/livez", "/readyz"):
        await _json(send, 200, {"status": "ok"})
    elif path == "/v1/info":
        await _json(send, 200, INFO)
    elif path == "/metrics":
        await _json(send, 200, {})
    elif path == "/v1/synthesize" and scope["method"] == "POST":
        requested = json.loads(body or b"{}").get("format", AudioFormat.PCM_F32LE.value)
        audio_format = AudioFormat(requested)
        if audio_format not in (AudioFormat.PCM, AudioFormat.PCM_F32LE):
            await _json(send, 422, {"error": {"code": "unsupported_format", "message": "stub"}})
            return
        chunk, rate = _chunk(audio_format)
        chunks = _chunk_count(json.loads(body or b"{}").get("text", ""))
        headers = [
            (name.lower().encode(), value.encode())
            for name, value in stream_headers(audio_format, rate).items()
        ]
        # Like a real worker: the gateway caches only audio of the model version in its key.
        headers += [(b"x-engine", b"stub"), (b"x-model-version", INFO["model_version"].encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    else:
        await _json(send, 404, {"error": {"code": "not_found", "message": "stub"}})


def _chunk_count(text: str) -> int:
    """CHUNKS, or n for a text that starts with `chunks=<n> ` (tests that need long audio)."""
    first, _, _ = text.partition(" ")
    if first.startswith("chunks=") and first[len("chunks=") :].isdigit():
        return int(first[len("chunks=") :])
    return CHUNKS


async def main() -> None:
    config = Config()
    config.bind = [f"{os.environ.get('WORKER_HOST', '127.0.0.1')}:{os.environ['WORKER_PORT']}"]
    config.accesslog = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


if __name__ == "__main__":
    uvloop.run(main())
