"""What the workers serve: their engine's capabilities (GET /v1/info) and whether any is ready.

The cache key needs the engine name and model version, so they come from the workers rather
than from configuration: a worker fleet that moves to a new model version changes every key.
The directory polls in the background and refreshes on demand while nothing is known.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from contract.errors import ErrorCode, ServiceError
from gateway.metrics import GatewayMetrics
from gateway.upstream import PassThroughError, Upstream

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinVoice:
    id: str
    name: str
    language: str
    description: str


@dataclass(frozen=True)
class EngineInfo:
    """The worker's Capabilities, as GET /v1/info reports them."""

    engine: str
    model: str
    model_version: str
    sample_rate: int
    modes: tuple[str, ...]
    languages: tuple[str, ...]
    voices: tuple[BuiltinVoice, ...]
    default_voice: str
    supports_cloning: bool
    supports_instructions: bool
    speed_range: tuple[float, float]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineInfo:
        """Parse GET /v1/info; raises ValueError when a field is missing or mistyped."""
        try:
            low, high = data.get("speed_range", (0.25, 4.0))
            return cls(
                engine=str(data["engine"]),
                model=str(data["model"]),
                model_version=str(data["model_version"]),
                sample_rate=int(data["sample_rate"]),
                modes=tuple(str(mode) for mode in data.get("modes", ())),
                languages=tuple(str(lang) for lang in data.get("languages", ())),
                voices=tuple(
                    BuiltinVoice(
                        id=str(voice["id"]),
                        name=str(voice.get("name", voice["id"])),
                        language=str(voice.get("language", "")),
                        description=str(voice.get("description", "")),
                    )
                    for voice in data.get("voices", ())
                ),
                default_voice=str(data["default_voice"]),
                supports_cloning=bool(data.get("supports_cloning", False)),
                supports_instructions=bool(data.get("supports_instructions", False)),
                speed_range=(float(low), float(high)),
                raw=data,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"unreadable worker capabilities: {error}") from error

    def has_voice(self, voice_id: str) -> bool:
        return any(voice.id == voice_id for voice in self.voices)


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
                    info = EngineInfo.from_json(await self._upstream.info())
                    if self._info is None or info.raw != self._info.raw:
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
