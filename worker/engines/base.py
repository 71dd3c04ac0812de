"""The protocol every engine implements, and the request and capabilities it speaks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from contract.info import EngineInfo, VoiceInfo

Audio = npt.NDArray[np.float32]
"""Mono float32 samples in [-1, 1] at the engine's sample rate."""

Capabilities = EngineInfo
"""What an engine can serve: the contract's `GET /v1/info` model, built by the engine."""

__all__ = ["Audio", "Capabilities", "Engine", "EngineRequest", "VoiceInfo"]


@dataclass(frozen=True)
class EngineRequest:
    """A validated request: text normalized, voice resolved, prompt decoded, seed fixed.

    `voice_features` are a registered voice's prompt features, as this engine's
    `compute_voice` made them; when set, the engine speaks with them instead of a built-in
    speaker, and `voice` is only the registered voice's id.
    """

    text: str
    voice: str
    speed: float
    seed: int
    instruction: str | None = None
    prompt_audio: Audio | None = None
    prompt_sample_rate: int | None = None
    prompt_text: str | None = None
    voice_features: bytes | None = None
    deadline: float | None = None
    """`time.monotonic()` after which the request is dropped rather than started."""


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

    def compute_voice(self, audio: Audio, sample_rate: int, text: str) -> bytes:
        """A prompt recording's features, once, as a self-describing blob for storage.

        Any worker running the same engine and model version accepts the blob as
        `EngineRequest.voice_features`. Blocking (call it off the event loop); raises
        `ServiceError` (4xx) for an unusable prompt, and `prompt_unsupported` on engines whose
        capabilities say `supports_cloning=False`.
        """
        ...
