"""Checks on an uploaded prompt recording: bounded size, then the contract's rule
(`contract.prompt`: real audio, bounded length, not silent)."""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import ErrorCode, ServiceError
from contract.prompt import PromptRule, read_prompt


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
    samples, sample_rate = read_prompt(data, PromptRule(min_s=limits.min_s, max_s=limits.max_s))
    return PromptAudio(data=data, sample_rate=sample_rate, duration_s=samples.size / sample_rate)
