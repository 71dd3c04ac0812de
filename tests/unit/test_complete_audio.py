"""Streamed WAV and FLAC bodies become files with true lengths; other bodies stay as they are."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile

from contract.audio import AudioFormat
from contract.complete_audio import complete_file, flac_total_samples
from worker.encoders import create_encoder

RATE = 22050


def _streamed(audio_format: AudioFormat, frames: int) -> tuple[bytes, np.ndarray]:
    audio = (0.3 * np.sin(np.arange(frames) / 7.0)).astype(np.float32)
    encoder = create_encoder(audio_format, RATE)
    pieces = [encoder.encode(audio[i : i + 3000]) for i in range(0, frames, 3000)]
    return b"".join([*pieces, encoder.finish()]), audio


@pytest.mark.parametrize("audio_format", [AudioFormat.WAV, AudioFormat.FLAC])
def test_complete_files_state_their_length_and_keep_every_sample(
    audio_format: AudioFormat,
) -> None:
    body, audio = _streamed(audio_format, RATE * 3 + 17)
    complete = complete_file(body, audio_format)
    samples, rate = soundfile.read(io.BytesIO(complete), dtype="int16")
    assert rate == RATE
    assert len(samples) == len(audio)
    if audio_format is AudioFormat.WAV:
        expected = np.frombuffer(body[44:], dtype="<i2")  # the streamed samples themselves
    else:  # the samples libsndfile makes of this audio in a FLAC written as a whole file
        reference = io.BytesIO()
        soundfile.write(reference, audio, RATE, format="FLAC", subtype="PCM_16")
        expected, _ = soundfile.read(io.BytesIO(reference.getvalue()), dtype="int16")
    assert np.array_equal(samples, expected)
    assert complete_file(complete, audio_format) == complete  # already complete: unchanged


def test_streamed_headers_are_what_gets_completed() -> None:
    wav, _ = _streamed(AudioFormat.WAV, 1000)
    assert struct.unpack_from("<I", wav, 4)[0] == 0xFFFFFFFF
    assert struct.unpack_from("<I", complete_file(wav, AudioFormat.WAV), 40)[0] == 2000
    flac, _ = _streamed(AudioFormat.FLAC, 5000)
    assert flac_total_samples(flac) == 0
    assert flac_total_samples(complete_file(flac, AudioFormat.FLAC)) == 5000


@pytest.mark.parametrize(
    ("body", "audio_format"),
    [
        (b"not a riff file at all", AudioFormat.WAV),
        (b"fLaC" + bytes(60), AudioFormat.FLAC),
        (b"\x00\x01" * 100, AudioFormat.PCM),
        (b"ID3 whatever", AudioFormat.MP3),
    ],
)
def test_other_bodies_are_left_alone(body: bytes, audio_format: AudioFormat) -> None:
    assert complete_file(body, audio_format) == body
