"""`python -m gateway`: serve the gateway with Hypercorn on uvloop, settings from GATEWAY_*."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys

import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config

from contract.hypercorn_eof import install_close_on_eof
from contract.status_line import install_reason_phrases
from gateway.app import create_app
from gateway.errors import AbortedStreamFilter
from gateway.settings import GatewaySettings, load_settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: GatewaySettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


async def run(settings: GatewaySettings) -> None:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.errorlog.addFilter(AbortedStreamFilter())
    config.keep_alive_timeout = 75
    config.graceful_timeout = settings.shutdown_grace_s
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    install_reason_phrases()
    install_close_on_eof()
    app = create_app(settings)
    # Everything built so far lives as long as the process: keep it out of the collector's
    # full passes, whose pauses otherwise show up in the latency tail.
    gc.collect()
    gc.freeze()
    await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def main() -> None:
    settings = load_settings()
    configure_logging(settings)
    uvloop.run(run(settings))


if __name__ == "__main__":
    main()
