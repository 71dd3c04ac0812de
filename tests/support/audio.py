"""Decode audio responses in tests, whatever the format, and describe them."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import soundfile

RAW_DTYPES = {"pcm_f32le": "<f4", "pcm": "<i2"}


@dataclass(frozen=True)
class DecodedAudio:
    samples: npt.NDArray[np.float32]
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def rms(self) -> float:
        return float(np.sqrt(np.mean(np.square(self.samples, dtype=np.float64))))


def decode(data: bytes, audio_format: str, sample_rate: int | None = None) -> DecodedAudio:
    """Decode a whole response body.

    Raw formats need `sample_rate` (from X-Sample-Rate). Containers go through libsndfile frame
    by frame with `sf_readf_float`: a streamed FLAC says "total samples unknown", and
    `soundfile.read` (which trusts the total, then seeks past the end) cannot read it.
    """
    if audio_format in RAW_DTYPES:
        if sample_rate is None:
            raise ValueError("raw PCM needs the sample rate")
        raw = np.frombuffer(data, dtype=RAW_DTYPES[audio_format])
        scale = 32768.0 if audio_format == "pcm" else 1.0
        return DecodedAudio(raw.astype(np.float32) / np.float32(scale), sample_rate)
    with soundfile.SoundFile(io.BytesIO(data)) as sound:
        if sound.channels != 1:
            raise ValueError(f"expected mono audio, got {sound.channels} channels")
        blocks = []
        while True:
            block = np.empty(16384, dtype=np.float32)
            pointer = soundfile._ffi.cast("float *", block.ctypes.data)
            count = soundfile._snd.sf_readf_float(sound._file, pointer, len(block))
            if count <= 0:
                break
            blocks.append(block[:count])
        samples = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
        return DecodedAudio(samples, int(sound.samplerate))
