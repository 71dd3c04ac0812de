"""Checks on an uploaded prompt recording: bounded size, real audio, bounded length, not silent."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from contract.errors import ErrorCode, ServiceError

SILENCE_PEAK = 1e-3


@dataclass(frozen=True)
class PromptLimits:
    max_bytes: int
    min_s: float
    max_s: float


@dataclass(frozen=True)
class PromptAudio:
    """The upload's exact bytes (what the worker and the cache key see) and what they hold."""

    data: bytes
    sample_rate: int
    duration_s: float


def check_prompt(data: bytes, limits: PromptLimits) -> PromptAudio:
    """Decode the upload with soundfile and raise the matching 4xx error if it is unusable."""
    if len(data) > limits.max_bytes:
        raise ServiceError(
            ErrorCode.PROMPT_TOO_LARGE,
            f"The prompt recording has {len(data)} bytes; the limit is {limits.max_bytes}.",
        )
    try:
        with sf.SoundFile(io.BytesIO(data)) as decoded:
            sample_rate = decoded.samplerate
            # A streamed header may carry no length: read at most one frame past the limit.
            limit = int(limits.max_s * sample_rate) + 1
            samples = decoded.read(limit, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise ServiceError(
            ErrorCode.PROMPT_NOT_AUDIO,
            "The prompt upload is not audio in a format soundfile reads (WAV, FLAC, MP3, Ogg).",
        ) from error
    duration = samples.shape[0] / sample_rate if sample_rate else 0.0
    if duration < limits.min_s:
        raise ServiceError(
            ErrorCode.PROMPT_TOO_SHORT,
            f"The prompt recording lasts {duration:.2f} s; at least {limits.min_s} s are needed.",
        )
    if duration > limits.max_s:
        raise ServiceError(
            ErrorCode.PROMPT_TOO_LONG,
            f"The prompt recording lasts {duration:.2f} s; at most {limits.max_s} s are allowed.",
        )
    if float(np.max(np.abs(samples))) < SILENCE_PEAK:
        raise ServiceError(ErrorCode.PROMPT_SILENT, "The prompt recording is silent.")
    return PromptAudio(data=data, sample_rate=int(sample_rate), duration_s=duration)
