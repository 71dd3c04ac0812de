"""`python -m worker`: serve the worker app with Hypercorn on uvloop.

Exits 0 after SIGTERM/SIGINT, and 1 when the engine fails to load (so a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config

from contract.hypercorn_eof import install_close_on_eof
from contract.status_line import install_reason_phrases
from worker.app import create_app
from worker.logging_setup import configure_logging
from worker.settings import WorkerSettings

logger = logging.getLogger("worker")


def hypercorn_config(settings: WorkerSettings) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.worker_class = "uvloop"
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.graceful_timeout = settings.shutdown_grace_s
    return config


async def serve_worker(settings: WorkerSettings) -> int:
    install_reason_phrases()
    install_close_on_eof()
    app = create_app(settings)
    state = app.state.worker
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def shutdown_trigger() -> None:
        stop_wait = asyncio.create_task(stop.wait())
        fatal_wait = asyncio.create_task(state.fatal.wait())
        await asyncio.wait({stop_wait, fatal_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        fatal_wait.cancel()

    await serve(app, hypercorn_config(settings), shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
    if state.fatal.is_set():
        logger.critical("Exiting: the engine could not be loaded")
        return 1
    return 0


def main() -> int:
    settings = WorkerSettings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    return uvloop.run(serve_worker(settings))


if __name__ == "__main__":
    sys.exit(main())
