"""The loudness stage: every voice at the target (±2 LU), peaks under the ceiling, one gain per
request (sentences keep their own dynamics), and the model version names the level."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pyloudnorm
import pytest

from worker.engines.base import Audio, Capabilities, EngineRequest, VoiceInfo
from worker.loudness import LevelledEngine, LoudnessStage

RATE = 16000
LEVELS = {"quiet": 0.02, "loud": 0.5}


def _speechlike(seconds: float, level: float, seed: int) -> Audio:
    """Noise shaped by syllable-rate bursts, with a few sharp peaks: level-checkable speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t), 0.0, None) ** 2
    audio = level * envelope * rng.standard_normal(t.size)
    audio[rng.integers(0, t.size, 5)] = 4 * level  # transients well above the body
    return audio.astype(np.float32)


class TwoVoices:
    def __init__(self) -> None:
        self.closed = 0

    def load(self) -> None:
        return None

    def warm_up(self) -> None:
        return None

    def capabilities(self) -> Capabilities:
        return Capabilities(
            engine="fake",
            model="fake",
            model_version="7",
            sample_rate=RATE,
            voices=tuple(VoiceInfo(id=v, name=v, language="en") for v in LEVELS),
            default_voice="quiet",
        )

    async def stream(self, request: EngineRequest) -> AsyncIterator[Audio]:
        try:
            for sentence in range(3):
                yield _speechlike(2.0, LEVELS[request.voice], request.seed + sentence)
        finally:
            self.closed += 1

    def compute_voice(self, audio: Audio, sample_rate: int, text: str) -> bytes:
        return b""


async def _speak(engine: LevelledEngine, voice: str, seed: int) -> list[Audio]:
    request = EngineRequest(text="x", voice=voice, speed=1.0, seed=seed)
    return [chunk async for chunk in engine.stream(request)]


def _lufs(audio: Audio) -> float:
    return float(pyloudnorm.Meter(RATE).integrated_loudness(audio.astype(np.float64)))


async def test_every_voice_reaches_the_target_under_the_ceiling() -> None:
    engine = LevelledEngine(TwoVoices(), target_lufs=-18.0, ceiling_dbfs=-1.0)
    engine.warm_up()
    for voice in LEVELS:
        for seed in (1, 2):
            chunks = await _speak(engine, voice, seed)
            audio = np.concatenate(chunks)
            assert abs(_lufs(audio) + 18.0) <= 2.0, voice
            assert float(np.abs(audio).max()) < 10 ** (-1 / 20)


async def test_one_gain_per_request_not_per_sentence() -> None:
    inner = TwoVoices()
    engine = LevelledEngine(inner, target_lufs=-18.0, ceiling_dbfs=-1.0)
    engine.warm_up()
    request = EngineRequest(text="x", voice="loud", speed=1.0, seed=5)
    raw = [chunk async for chunk in inner.stream(request)]
    levelled = await _speak(engine, "loud", 5)
    # Away from the limited peaks, every sentence is scaled by the same factor.
    ratios = []
    for before, after in zip(raw, levelled, strict=True):
        body = (np.abs(before) > 1e-3) & (np.abs(before) < 0.3)
        ratios.append(float(np.median(after[body] / before[body])))
    assert max(ratios) - min(ratios) < 1e-4


def test_the_limiter_holds_the_ceiling_smoothly() -> None:
    stage = LoudnessStage(sample_rate=RATE, ceiling_dbfs=-1.0)
    audio = np.zeros(RATE, dtype=np.float32)
    audio[8000] = 1.6
    audio[7990:8010] += 0.9
    limited = stage.limit(audio)
    assert float(np.abs(limited).max()) <= 10 ** (-1 / 20) + 1e-7
    assert np.array_equal(limited[:7000], audio[:7000])  # far from the peak: untouched
    quiet = _speechlike(1.0, 0.05, 3)
    assert np.array_equal(stage.limit(quiet * 0.1), quiet * 0.1)


def test_the_model_version_names_the_level() -> None:
    one = LevelledEngine(TwoVoices(), target_lufs=-18.0, ceiling_dbfs=-1.0)
    two = LevelledEngine(TwoVoices(), target_lufs=-16.0, ceiling_dbfs=-1.0)
    assert one.capabilities().model_version.startswith("7+")
    assert one.capabilities().model_version != two.capabilities().model_version


async def test_cloned_voices_take_their_gain_from_the_first_chunk() -> None:
    engine = LevelledEngine(TwoVoices(), target_lufs=-18.0, ceiling_dbfs=-1.0)
    engine.warm_up()
    request = EngineRequest(
        text="x", voice="loud", speed=1.0, seed=9, voice_features=b"registered"
    )
    audio = np.concatenate([chunk async for chunk in engine.stream(request)])
    assert abs(_lufs(audio) + 18.0) <= 2.0


def test_stream_before_warm_up_is_an_error() -> None:
    engine = LevelledEngine(TwoVoices(), target_lufs=-18.0, ceiling_dbfs=-1.0)
    with pytest.raises(RuntimeError):
        engine.stream(EngineRequest(text="x", voice="quiet", speed=1.0, seed=0))
