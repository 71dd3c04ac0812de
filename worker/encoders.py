"""Streaming audio encoders: float32 chunks in, bytes of the requested format out, chunk by chunk.

Every encoder takes mono float32 chunks at the engine's rate and returns the bytes that are
final so far; `finish()` returns the rest. Resampling (soxr, streaming) happens first when the
format's output rate differs (`contract.audio.output_sample_rate`).

- `pcm_f32le` / `pcm`: raw little-endian float32 / int16 samples.
- `wav`: a 44-byte header whose RIFF and data sizes are 0xFFFFFFFF ("until the end of the
  stream"), then int16 samples. soundfile, Python's `wave` and browsers read it.
- `flac`, `mp3`, `opus`: libsndfile (soundfile) writing into a sink that hands out bytes as they
  are written. At close libsndfile seeks back to rewrite headers it could not know at the start
  (FLAC's STREAMINFO totals, MP3's LAME tag); those bytes are gone already, so rewrites of sent
  bytes are dropped and the first header stands. That keeps every stream valid: a FLAC stream says
  "total samples unknown" (readers that need a length up front, like `soundfile.read`, must read
  by blocks), MP3 is constant bitrate (so its length estimate is right without the LAME tag), and
  Ogg/Opus never seeks.
"""

from __future__ import annotations

import logging
import struct
from typing import Protocol

import numpy as np
import numpy.typing as npt
import soundfile
import soxr

from contract.audio import AudioFormat, output_sample_rate
from worker.engines.base import Audio

logger = logging.getLogger(__name__)

WAV_UNKNOWN_SIZE = 0xFFFFFFFF
MP3_BITRATE_MODE = "CONSTANT"
MP3_COMPRESSION_LEVEL = 0.5  # about 64 kbit/s mono at 22.05/24 kHz

_LIBSNDFILE_FORMATS: dict[AudioFormat, tuple[str, str]] = {
    AudioFormat.FLAC: ("FLAC", "PCM_16"),
    AudioFormat.MP3: ("MP3", "MPEG_LAYER_III"),
    AudioFormat.OPUS: ("OGG", "OPUS"),
}


class StreamEncoder(Protocol):
    sample_rate: int
    """The rate of the encoded stream."""

    def encode(self, audio: Audio) -> bytes: ...

    def finish(self) -> bytes: ...


def create_encoder(audio_format: AudioFormat, engine_sample_rate: int) -> StreamEncoder:
    """An encoder for `audio_format` fed at `engine_sample_rate`, resampling when needed."""
    rate = output_sample_rate(audio_format, engine_sample_rate)
    encoder: StreamEncoder
    if audio_format is AudioFormat.PCM_F32LE:
        encoder = RawEncoder(rate, dtype="<f4")
    elif audio_format is AudioFormat.PCM:
        encoder = RawEncoder(rate, dtype="<i2")
    elif audio_format is AudioFormat.WAV:
        encoder = WavEncoder(rate)
    else:
        encoder = SoundFileEncoder(audio_format, rate)
    if rate != engine_sample_rate:
        return ResamplingEncoder(encoder, engine_sample_rate)
    return encoder


def to_int16(audio: Audio) -> bytes:
    scaled = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * np.float32(32767.0)
    samples: npt.NDArray[np.int16] = np.rint(scaled).astype("<i2")
    return samples.tobytes()


class RawEncoder:
    """Headerless little-endian samples, float32 or int16."""

    def __init__(self, sample_rate: int, *, dtype: str) -> None:
        if dtype not in ("<f4", "<i2"):
            raise ValueError(f"Unsupported raw sample type {dtype}")
        self.sample_rate = sample_rate
        self._dtype = dtype

    def encode(self, audio: Audio) -> bytes:
        if self._dtype == "<i2":
            return to_int16(audio)
        return np.asarray(audio, dtype="<f4").tobytes()

    def finish(self) -> bytes:
        return b""


class WavEncoder:
    """16-bit mono WAV with a streaming header (sizes 0xFFFFFFFF), written before the samples."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._header_sent = False

    def encode(self, audio: Audio) -> bytes:
        body = to_int16(audio)
        if self._header_sent:
            return body
        self._header_sent = True
        return wav_header(self.sample_rate) + body

    def finish(self) -> bytes:
        if self._header_sent:
            return b""
        self._header_sent = True
        return wav_header(self.sample_rate)


def wav_header(sample_rate: int, *, channels: int = 1, bits: int = 16) -> bytes:
    block_align = channels * bits // 8
    return b"".join(
        [
            b"RIFF",
            struct.pack("<I", WAV_UNKNOWN_SIZE),
            b"WAVEfmt ",
            struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align,
                        block_align, bits),
            b"data",
            struct.pack("<I", WAV_UNKNOWN_SIZE),
        ]
    )


class StreamSink:
    """A write-mostly file object for libsndfile that releases bytes as soon as they are written.

    `take()` returns the bytes written since the last call. Writes into bytes already taken
    (libsndfile's header rewrites at close) are dropped and counted in `dropped_bytes`.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._base = 0  # stream offset of _pending[0]; everything before it was taken
        self._position = 0
        self._size = 0
        self.dropped_bytes = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        length = len(view)
        start = self._position
        if start < self._base:
            cut = min(length, self._base - start)
            self.dropped_bytes += cut
            view = view[cut:]
            start += cut
        offset = start - self._base
        if offset > len(self._pending):
            self._pending.extend(bytes(offset - len(self._pending)))
        self._pending[offset : offset + len(view)] = view
        self._position += length
        self._size = max(self._size, self._position)
        return length

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self._position = offset
        elif whence == 1:
            self._position += offset
        elif whence == 2:
            self._position = self._size + offset
        else:
            raise ValueError(f"Invalid whence {whence}")
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        offset = self._position - self._base
        if offset < 0:
            return b""
        end = len(self._pending) if size < 0 else offset + size
        data = bytes(self._pending[offset:end])
        self._position += len(data)
        return data

    def take(self) -> bytes:
        data = bytes(self._pending)
        self._base += len(data)
        self._pending.clear()
        return data


class SoundFileEncoder:
    """FLAC, MP3 or Ogg/Opus through libsndfile, streamed via `StreamSink`."""

    def __init__(self, audio_format: AudioFormat, sample_rate: int) -> None:
        container, subtype = _LIBSNDFILE_FORMATS[audio_format]
        self.sample_rate = sample_rate
        self._sink = StreamSink()
        options: dict[str, object] = {}
        if audio_format is AudioFormat.MP3:
            options = {
                "bitrate_mode": MP3_BITRATE_MODE,
                "compression_level": MP3_COMPRESSION_LEVEL,
            }
        self._file = soundfile.SoundFile(
            self._sink,
            mode="w",
            samplerate=sample_rate,
            channels=1,
            format=container,
            subtype=subtype,
            **options,
        )

    def encode(self, audio: Audio) -> bytes:
        if len(audio):
            self._file.write(np.asarray(audio, dtype=np.float32))
        return self._sink.take()

    def finish(self) -> bytes:
        self._file.close()
        if self._sink.dropped_bytes:
            logger.debug("Dropped %d bytes of header rewrites", self._sink.dropped_bytes)
        return self._sink.take()

    def close(self) -> None:
        """Release libsndfile's handle without producing more output (aborted streams)."""
        if not self._file.closed:
            self._file.close()


class ResamplingEncoder:
    """Resample with soxr's streaming resampler, then hand the audio to `inner`."""

    def __init__(self, inner: StreamEncoder, input_rate: int) -> None:
        self.sample_rate = inner.sample_rate
        self._inner = inner
        self._resampler = soxr.ResampleStream(
            input_rate, inner.sample_rate, 1, dtype="float32", quality="HQ"
        )

    def encode(self, audio: Audio) -> bytes:
        resampled = self._resampler.resample_chunk(np.asarray(audio, dtype=np.float32))
        return self._inner.encode(resampled)

    def finish(self) -> bytes:
        tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        return self._inner.encode(tail) + self._inner.finish()

    def close(self) -> None:
        close_encoder(self._inner)


def close_encoder(encoder: StreamEncoder) -> None:
    """Free an encoder's resources without finishing it (the stream was aborted)."""
    close = getattr(encoder, "close", None)
    if close is not None:
        close()
