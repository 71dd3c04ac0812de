"""Even loudness for every engine: a fixed gain per voice to a target (ITU-R BS.1770 integrated
loudness, measured with pyloudnorm), then a look-ahead peak limiter under a ceiling.

The gain of a built-in voice is calibrated once, at start-up: the worker synthesizes the first
six seconds of a fixed text with it (seed 0) and measures them, so every worker of one model
version applies the same gain and equal requests still give equal bytes. A cloned voice
(prompt audio or registered features) has no calibration: its gain comes from the request's
first chunk (which the worker holds before answering anyway), or the default voice's gain when
that chunk is too short to measure. The gain is fixed for the whole request, so loudness
follows the speech and sentences are never levelled one by one.

The limiter keeps every sample under the ceiling with a smooth gain: the gain each sample
needs is spread over a short window by a sliding minimum followed by a moving average of the
same width, which never exceeds the needed gain (each averaged value is the minimum of a window
holding the sample), so the ceiling holds exactly while a peak is turned down over a few
milliseconds instead of being clipped. It works within each chunk, adding no latency.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pyloudnorm
import soxr

from worker.engines.base import Audio, Capabilities, Engine, EngineRequest

logger = logging.getLogger(__name__)

CALIBRATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. A calm voice reads the news at an even pace, "
    "with numbers like 42 and questions such as: is it ready yet?"
)
MAX_CALIBRATED_VOICES = 16
CALIBRATION_MAX_S = 6.0
GAIN_LIMIT_DB = 30.0
LOOKAHEAD_S = 0.004
QUANTIZATION_MARGIN = 2 / 32768
CEILING_MARGIN_DB = 0.1
TRUE_PEAK_HEADROOM = 0.7  # samples under 70 % of the ceiling cannot hide peaks over it
TRUE_PEAK_SLICE_S = 1
TRUE_PEAK_MARGIN = 256  # samples of context on each side of a slice, for the resampling filter
MIN_MEASURABLE_S = 0.4  # BS.1770 gates 400 ms blocks: shorter audio has no loudness


def db_to_gain(db: float) -> float:
    return float(10.0 ** (db / 20.0))


@dataclass
class LoudnessStage:
    """Brings one engine's output to `target_lufs` with peaks under `ceiling_dbfs`."""

    sample_rate: int
    target_lufs: float = -18.0
    ceiling_dbfs: float = -1.0
    voice_gains: dict[str, float] = field(default_factory=dict)
    default_gain: float = 1.0

    def __post_init__(self) -> None:
        self._meter = pyloudnorm.Meter(self.sample_rate)
        # A little under the ceiling: an output resampler's own overshoot and rounding to
        # int16 must not cross it.
        self._ceiling = db_to_gain(self.ceiling_dbfs - CEILING_MARGIN_DB) - QUANTIZATION_MARGIN
        self._half_window = max(1, round(LOOKAHEAD_S * self.sample_rate))

    def measure(self, audio: Audio) -> float | None:
        """Integrated loudness in LUFS, or None for audio too short or too quiet to measure."""
        if len(audio) < MIN_MEASURABLE_S * self.sample_rate:
            return None
        loudness = float(self._meter.integrated_loudness(np.asarray(audio, dtype=np.float64)))
        return loudness if math.isfinite(loudness) else None

    def gain_for(self, loudness: float) -> float:
        change = max(-GAIN_LIMIT_DB, min(GAIN_LIMIT_DB, self.target_lufs - loudness))
        return db_to_gain(change)

    async def calibrate(self, engine: Engine) -> None:
        """Measure every built-in voice (at most `MAX_CALIBRATED_VOICES`) on a fixed text.

        An engine with no voice at all (default voice ""; CosyVoice3 without spk2info.pt
        speaks only cloned voices) calibrates nothing, and its default gain is 1."""
        capabilities = engine.capabilities()
        voices = [voice.id for voice in capabilities.voices][:MAX_CALIBRATED_VOICES]
        if capabilities.default_voice and capabilities.default_voice not in voices:
            voices.insert(0, capabilities.default_voice)
        for voice in voices:
            audio = await self._calibration_audio(engine, voice)
            loudness = self.measure(audio)
            if loudness is None:
                logger.warning("Voice %s: calibration audio has no measurable loudness", voice)
                continue
            self.voice_gains[voice] = self.gain_for(loudness)
            logger.info(
                "Voice %s: %.1f LUFS, gain %+.1f dB to %.1f LUFS",
                voice,
                loudness,
                20 * math.log10(self.voice_gains[voice]),
                self.target_lufs,
            )
        self.default_gain = self.voice_gains.get(capabilities.default_voice, 1.0)

    async def _calibration_audio(self, engine: Engine, voice: str) -> Audio:
        """The first `CALIBRATION_MAX_S` seconds of the calibration text in `voice` (the same
        prefix every time; the stream is closed there, so a slow engine stops early)."""
        request = EngineRequest(text=CALIBRATION_TEXT, voice=voice, speed=1.0, seed=0)
        pieces: list[Audio] = []
        wanted = int(CALIBRATION_MAX_S * self.sample_rate)
        chunks = engine.stream(request)
        try:
            async for chunk in chunks:
                pieces.append(np.asarray(chunk, dtype=np.float32))
                if sum(len(piece) for piece in pieces) >= wanted:
                    break
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return audio[:wanted]

    async def stream(
        self, chunks: AsyncIterator[Audio], request: EngineRequest
    ) -> AsyncIterator[Audio]:
        """`chunks` levelled: one gain for the request, then the limiter on each chunk."""
        try:
            gain: float | None = None
            if request.prompt_audio is None and request.voice_features is None:
                gain = self.voice_gains.get(request.voice)
            async for chunk in chunks:
                if gain is None:
                    loudness = self.measure(chunk)
                    gain = self.default_gain if loudness is None else self.gain_for(loudness)
                yield self.limit(np.asarray(chunk, dtype=np.float32) * np.float32(gain))
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def _true_peaks(self, audio: Audio) -> npt.NDArray[np.float32]:
        """Each sample's magnitude, or the highest one between it and the next when 4x
        oversampling shows more (resampling to another output rate may reveal those).

        Oversampled one second at a time (with a margin for the filter), so a long chunk costs
        a bounded working set rather than four float64 copies of itself.
        """
        n = len(audio)
        peaks: npt.NDArray[np.float32] = np.abs(audio).astype(np.float32)
        for start in range(0, n, TRUE_PEAK_SLICE_S * self.sample_rate):
            end = min(n, start + TRUE_PEAK_SLICE_S * self.sample_rate)
            lo, hi = max(0, start - TRUE_PEAK_MARGIN), min(n, end + TRUE_PEAK_MARGIN)
            oversampled = soxr.resample(audio[lo:hi], self.sample_rate, 4 * self.sample_rate,
                                        quality="HQ")
            blocks = np.zeros(4 * (hi - lo), dtype=np.float32)
            used = min(len(oversampled), len(blocks))
            blocks[:used] = np.abs(oversampled[:used])
            between = blocks.reshape(hi - lo, 4).max(axis=1)[start - lo : end - lo]
            np.maximum(peaks[start:end], between, out=peaks[start:end])
        return peaks

    def limit(self, audio: Audio) -> Audio:
        """`audio` with every sample's magnitude at most the ceiling, turned down smoothly."""
        if not len(audio) or float(np.abs(audio).max()) <= self._ceiling * TRUE_PEAK_HEADROOM:
            return audio
        magnitude = self._true_peaks(audio)
        if float(magnitude.max()) <= self._ceiling:
            return audio
        needed = np.minimum(
            np.float32(1.0), np.float32(self._ceiling) / np.maximum(magnitude, np.float32(1e-12))
        )
        half = self._half_window
        width = 2 * half + 1
        limited: Audio = np.asarray(audio, dtype=np.float32).copy()
        # A sample's gain depends on `needed` within two half-windows of it: smoothing one
        # second at a time with that much context gives the same gains in a bounded working set.
        step = TRUE_PEAK_SLICE_S * self.sample_rate
        for start in range(0, len(audio), step):
            end = min(len(audio), start + step)
            lo, hi = max(0, start - 2 * half), min(len(audio), end + 2 * half)
            segment = needed[lo:hi]
            if float(segment.min()) >= 1.0:
                continue
            padded = np.pad(segment, half, constant_values=1.0)
            window_min = np.lib.stride_tricks.sliding_window_view(padded, width).min(axis=1)
            padded_min = np.pad(window_min, half, constant_values=1.0)
            sums = np.cumsum(np.concatenate(([0.0], padded_min)))
            smooth = (sums[width:] - sums[:-width]) / width
            # Rounding in the average must not cross the ceiling.
            gain = np.minimum(smooth, segment)[start - lo : end - lo]
            limited[start:end] = (limited[start:end] * gain).astype(np.float32)
        return limited


class LevelledEngine:
    """An engine whose output goes through a `LoudnessStage`; otherwise the engine itself.

    Calibration runs at the end of `warm_up`, so readiness includes it. The model version it
    reports names the target and ceiling too: other levels are other bytes, hence other keys.
    """

    def __init__(self, inner: Engine, *, target_lufs: float, ceiling_dbfs: float) -> None:
        self._inner = inner
        self._target_lufs = target_lufs
        self._ceiling_dbfs = ceiling_dbfs
        self._stage: LoudnessStage | None = None
        self._capabilities: Capabilities | None = None

    def load(self) -> None:
        self._inner.load()

    def warm_up(self) -> None:
        self._inner.warm_up()
        stage = LoudnessStage(
            sample_rate=self._inner.capabilities().sample_rate,
            target_lufs=self._target_lufs,
            ceiling_dbfs=self._ceiling_dbfs,
        )
        # A private loop, as the engines' own warm-up: start-up may run inside a loop.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, stage.calibrate(self._inner)).result()
        self._stage = stage

    def capabilities(self) -> Capabilities:
        inner = self._inner.capabilities()
        if self._capabilities is None or self._capabilities.engine != inner.engine:
            level = f"ln{self._target_lufs:g}/{self._ceiling_dbfs:g}"
            self._capabilities = inner.model_copy(
                update={"model_version": f"{inner.model_version}+{level}"}
            )
        return self._capabilities

    def stream(self, request: EngineRequest) -> AsyncIterator[Audio]:
        if self._stage is None:
            raise RuntimeError("The engine is not warmed up")
        return self._stage.stream(self._inner.stream(request), request)

    def compute_voice(self, audio: Audio, sample_rate: int, text: str) -> bytes:
        return self._inner.compute_voice(audio, sample_rate, text)
