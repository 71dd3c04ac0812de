"""What a worker's engine can serve, as `GET /v1/info` reports it: one model for both sides.

The worker builds it from its engine (`worker.engines.base.Capabilities` is this model), and
the gateway parses the workers' answer with it, so a field added or renamed here changes both.
Unknown fields are ignored rather than refused: during a rolling upgrade an older gateway must
still read a newer worker's answer.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from contract.requests import SPEED_MAX, SPEED_MIN

INFO_PATH = "/v1/info"


class VoiceInfo(BaseModel):
    """A built-in voice of the engine."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    language: str
    description: str = ""


class EngineInfo(BaseModel):
    """An engine's capabilities; the worker validates requests against them, and the gateway
    keys its cache with `engine` and `model_version`."""

    model_config = ConfigDict(frozen=True)

    engine: str = Field(description="Registry name of the engine (e.g. piper, cosyvoice).")
    model: str = Field(description="The model the engine runs.")
    model_version: str = Field(
        description="Digest of the model's contents; every change changes the cache keys."
    )
    sample_rate: int = Field(gt=0, description="The engine's native output rate, in Hz.")
    modes: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    voices: tuple[VoiceInfo, ...] = ()
    default_voice: str
    supports_cloning: bool = False
    supports_instructions: bool = False
    speed_range: tuple[float, float] = (SPEED_MIN, SPEED_MAX)
    extras: dict[str, str] = Field(default_factory=dict)
    max_streams: int | None = Field(
        default=None, ge=1,
        description="Streams the engine serves at once (none: no limit of its own); the "
        "worker admits no more than this.",
    )

    def has_voice(self, voice_id: str) -> bool:
        return any(voice.id == voice_id for voice in self.voices)
