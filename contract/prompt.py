"""The one rule for a prompt recording (voice cloning), applied by the gateway and the worker.

A usable prompt is audio that libsndfile reads (WAV, FLAC, MP3, Ogg), lasting `min_s` to
`max_s` seconds, whose RMS level is at least `silence_rms` (about -60 dBFS; a single click
in silence does not pass, as it would with a peak test). Each failure has its own code:
`prompt_not_audio` (415), `prompt_too_short`, `prompt_too_long`, `prompt_silent` (422).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile

from contract.errors import ErrorCode, ServiceError

PROMPT_MIN_S = 2.0
PROMPT_MAX_S = 30.0
PROMPT_SILENCE_RMS = 1e-3

Samples = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True)
class PromptRule:
    min_s: float = PROMPT_MIN_S
    max_s: float = PROMPT_MAX_S
    silence_rms: float = PROMPT_SILENCE_RMS


DEFAULT_PROMPT_RULE = PromptRule()


def read_prompt(data: bytes, rule: PromptRule = DEFAULT_PROMPT_RULE) -> tuple[Samples, int]:
    """Decode a prompt upload to mono float32 and check it; returns (samples, sample rate).

    At most one frame past `rule.max_s` is decoded, so an oversized upload costs no more
    than a legal one (a streamed header may state no length).
    """
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as decoded:
            rate = int(decoded.samplerate)
            limit = int(rule.max_s * rate) + 1
            frames = decoded.read(limit, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise ServiceError(
            ErrorCode.PROMPT_NOT_AUDIO,
            "The prompt upload is not audio in a format soundfile reads (WAV, FLAC, MP3, Ogg).",
        ) from error
    mono: Samples = frames.mean(axis=1, dtype=np.float32)
    return check_prompt_samples(mono, rate, rule), rate


def check_prompt_samples(
    samples: Samples, sample_rate: int, rule: PromptRule = DEFAULT_PROMPT_RULE
) -> Samples:
    """Mono float32 of a usable prompt (2-D input is averaged to mono), or the 4xx error."""
    wav = np.asarray(samples, dtype=np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=1, dtype=np.float32)
    if wav.ndim != 1 or sample_rate <= 0 or not bool(np.all(np.isfinite(wav))):
        raise ServiceError(ErrorCode.PROMPT_NOT_AUDIO, "The prompt audio is not a mono signal.")
    seconds = wav.size / sample_rate
    if seconds < rule.min_s:
        raise ServiceError(
            ErrorCode.PROMPT_TOO_SHORT,
            f"The prompt recording lasts {seconds:.2f} s; at least {rule.min_s} s are needed.",
        )
    if seconds > rule.max_s:
        raise ServiceError(
            ErrorCode.PROMPT_TOO_LONG,
            f"The prompt recording lasts {seconds:.2f} s; at most {rule.max_s} s are allowed.",
        )
    if float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) < rule.silence_rms:
        raise ServiceError(ErrorCode.PROMPT_SILENT, "The prompt recording is silent.")
    return wav
