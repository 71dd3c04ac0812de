"""What the workers serve: their engine's capabilities (GET /v1/info) and whether any is ready.

The cache key needs the engine name and model version, so they come from the workers rather
than from configuration: a worker fleet that moves to a new model version changes every key.
The directory polls in the background and refreshes on demand while nothing is known.
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import ValidationError

from contract.errors import ErrorCode, ServiceError
from contract.info import EngineInfo, VoiceInfo
from gateway.metrics import GatewayMetrics
from gateway.upstream import PassThroughError, Upstream

logger = logging.getLogger(__name__)

BuiltinVoice = VoiceInfo
__all__ = ["BuiltinVoice", "EngineInfo", "WorkerDirectory", "parse_info"]


def parse_info(data: object) -> EngineInfo:
    """Parse GET /v1/info with the contract's model; ValueError when a field is missing or
    mistyped."""
    try:
        return EngineInfo.model_validate(data)
    except ValidationError as error:
        raise ValueError(f"unreadable worker capabilities: {error}") from error


class WorkerDirectory:
    def __init__(self, upstream: Upstream, metrics: GatewayMetrics, refresh_s: float) -> None:
        self._upstream = upstream
        self._metrics = metrics
        self._refresh_s = refresh_s
        self._info: EngineInfo | None = None
        self._ready = False
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    async def refresh(self) -> bool:
        """Poll the workers once; True when one is ready and its capabilities are known."""
        async with self._lock:
            try:
                ready = await self._upstream.ready()
                if ready:
                    info = parse_info(await self._upstream.info())
                    if self._info is None or info != self._info:
                        self._info = info
            except (ServiceError, PassThroughError, ValueError) as error:
                logger.warning("worker capabilities unavailable: %s", error)
                ready = False
            self._ready = ready and self._info is not None
            self._metrics.worker_ready.set(1 if self._ready else 0)
            return self._ready

    async def current(self) -> EngineInfo:
        """The engine's capabilities; refreshes now when unknown, 503 when no worker answers."""
        if self._info is None:
            await self.refresh()
        if self._info is None:
            raise ServiceError(
                ErrorCode.NOT_READY,
                "No worker is ready yet.",
                headers={"Retry-After": "1"},
            )
        return self._info

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _poll(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_s)
