from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile

from contract.audio import AudioFormat
from tests.support.audio import decode
from worker.encoders import StreamSink, create_encoder, wav_header

RATE = 22050


def tone(seconds: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def encode_in_chunks(audio_format: AudioFormat, chunks: int = 4) -> tuple[list[bytes], int]:
    encoder = create_encoder(audio_format, RATE)
    parts = [encoder.encode(tone(0.75)) for _ in range(chunks)]
    parts.append(encoder.finish())
    return parts, encoder.sample_rate


@pytest.mark.parametrize("audio_format", list(AudioFormat))
def test_streamed_chunks_decode_to_the_whole_signal(audio_format: AudioFormat) -> None:
    parts, rate = encode_in_chunks(audio_format)
    decoded = decode(b"".join(parts), audio_format.value, rate)
    assert decoded.sample_rate == rate
    # MP3 adds encoder padding; everything else keeps the length (resampling within a few ms).
    assert 3.0 - 0.01 <= decoded.duration <= 3.0 * 1.06
    assert decoded.rms == pytest.approx(0.4 / np.sqrt(2), rel=0.15)


@pytest.mark.parametrize("audio_format", list(AudioFormat))
def test_bytes_leave_before_the_end(audio_format: AudioFormat) -> None:
    parts, _ = encode_in_chunks(audio_format)
    assert sum(len(part) for part in parts[:-1]) > len(parts[-1])


def test_output_rates_follow_the_contract() -> None:
    assert create_encoder(AudioFormat.PCM, RATE).sample_rate == 24000
    assert create_encoder(AudioFormat.OPUS, RATE).sample_rate == 24000
    assert create_encoder(AudioFormat.OPUS, 48000).sample_rate == 48000
    assert create_encoder(AudioFormat.FLAC, RATE).sample_rate == RATE


def test_wav_header_says_unknown_length() -> None:
    header = wav_header(RATE)
    assert len(header) == 44
    assert struct.unpack("<I", header[4:8])[0] == 0xFFFFFFFF
    assert struct.unpack("<I", header[40:44])[0] == 0xFFFFFFFF
    data, rate = soundfile.read(io.BytesIO(header + b"\x00\x01" * 100), dtype="int16")
    assert rate == RATE
    assert len(data) == 100


def test_empty_wav_stream_is_still_a_header() -> None:
    encoder = create_encoder(AudioFormat.WAV, RATE)
    assert encoder.finish() == wav_header(RATE)


def test_pcm_is_int16_and_clipped() -> None:
    encoder = create_encoder(AudioFormat.PCM_F32LE, 24000)
    assert encoder.encode(np.array([0.5, -2.0], dtype=np.float32)) == struct.pack("<2f", 0.5, -2.0)
    pcm = create_encoder(AudioFormat.PCM, 24000)
    assert pcm.encode(np.array([1.5, -1.5, 0.0], dtype=np.float32)) == struct.pack(
        "<3h", 32767, -32767, 0
    )


def test_sink_drops_rewrites_of_bytes_already_sent() -> None:
    sink = StreamSink()
    sink.write(b"HEADER--")
    sink.write(b"body1")
    assert sink.take() == b"HEADER--body1"
    sink.seek(0)
    sink.write(b"REWRITE!")
    assert sink.dropped_bytes == 8
    sink.seek(0, 2)
    sink.write(b"body2")
    assert sink.tell() == 18
    assert sink.take() == b"body2"


def test_sink_keeps_rewrites_of_bytes_not_yet_sent() -> None:
    sink = StreamSink()
    sink.write(b"sent")
    sink.take()
    sink.write(b"xxxx-tail")
    sink.seek(4)
    sink.write(b"HEAD")
    sink.seek(2)
    sink.write(b"ABCDEF")  # straddles the sent boundary: the first two bytes are dropped
    assert sink.dropped_bytes == 2
    assert sink.take() == b"CDEF-tail"


def test_flac_header_rewrite_does_not_corrupt_the_stream() -> None:
    parts, rate = encode_in_chunks(AudioFormat.FLAC)
    stream = b"".join(parts)
    assert stream.startswith(b"fLaC")
    decoded = decode(stream, "flac", rate)
    assert decoded.duration == pytest.approx(3.0, abs=1e-3)
    np.testing.assert_allclose(decoded.samples, np.tile(tone(0.75), 4), atol=2e-4)
