"""The protocol every engine implements, and the request and capabilities it speaks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

Audio = npt.NDArray[np.float32]
"""Mono float32 samples in [-1, 1] at the engine's sample rate."""


@dataclass(frozen=True)
class VoiceInfo:
    id: str
    name: str
    language: str
    description: str = ""


@dataclass(frozen=True)
class Capabilities:
    """What an engine can serve; the worker validates requests against it."""

    engine: str
    model: str
    model_version: str
    sample_rate: int
    modes: tuple[str, ...]
    languages: tuple[str, ...]
    voices: tuple[VoiceInfo, ...]
    default_voice: str
    supports_cloning: bool
    supports_instructions: bool
    speed_range: tuple[float, float] = (0.25, 4.0)
    extras: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineRequest:
    """A validated request: text normalized, voice resolved, prompt decoded, seed fixed."""

    text: str
    voice: str
    speed: float
    seed: int
    instruction: str | None = None
    prompt_audio: Audio | None = None
    prompt_sample_rate: int | None = None
    prompt_text: str | None = None


class Engine(Protocol):
    """A speech engine. A worker runs exactly one, chosen by name from the registry.

    `load` and `warm_up` run once at start-up, before the worker reports ready. `stream`
    yields audio chunks as they are synthesized; cancelling the iterator must free whatever the
    request held.
    """

    def load(self) -> None: ...

    def warm_up(self) -> None: ...

    def capabilities(self) -> Capabilities: ...

    def stream(self, request: EngineRequest) -> AsyncIterator[Audio]: ...
