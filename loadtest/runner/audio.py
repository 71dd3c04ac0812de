"""Audio in a response body: its duration and peak, from its bytes and the stream headers.

Raw formats are read from their bytes and `X-Sample-Rate`; containers are decoded (WAV by its
chunk layout, since a streamed WAV header carries no true length; FLAC, MP3 and Ogg/Opus
through libsndfile). The peak lets a benchmark refuse to count silence as speech.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import soundfile

OPENAI_PCM_RATE = 24000
RAW_DTYPES = {"pcm_f32le": "<f4", "pcm": "<i2"}
WAV_DTYPES = {(1, 16): "<i2", (3, 32): "<f4"}


class AudioDecodeError(ValueError):
    """A body that does not hold audio of the announced format."""


@dataclass(frozen=True)
class AudioStats:
    seconds: float
    peak: float  # largest absolute sample, full scale = 1.0


def audio_stats(body: bytes, audio_format: str, headers: dict[str, str]) -> AudioStats:
    """Duration and peak of the mono audio in `body`, sent in `audio_format`.

    `headers` must have lower-case keys. Raises AudioDecodeError when the body cannot be
    audio of that format (an odd byte count for raw PCM, a broken container).
    """
    if audio_format in RAW_DTYPES:
        rate = _header_rate(headers, default=OPENAI_PCM_RATE if audio_format == "pcm" else None)
        return _raw_stats(body, RAW_DTYPES[audio_format], rate)
    if audio_format == "wav":
        return _wav_stats(body)
    try:
        data, rate = soundfile.read(io.BytesIO(body), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as e:
        raise AudioDecodeError(f"cannot decode {audio_format}: {e}") from e
    peak = float(np.max(np.abs(data))) if data.size else 0.0
    return AudioStats(seconds=data.shape[0] / float(rate), peak=peak)


def audio_seconds(body: bytes, audio_format: str, headers: dict[str, str]) -> float:
    """Seconds of audio in `body`; see audio_stats."""
    return audio_stats(body, audio_format, headers).seconds


def _raw_stats(body: bytes, dtype: str, rate: int) -> AudioStats:
    width = np.dtype(dtype).itemsize
    if len(body) % width:
        raise AudioDecodeError(f"{len(body)} bytes is not a whole number of samples")
    samples: npt.NDArray[np.generic] = np.frombuffer(body, dtype=dtype)
    scale = 32768.0 if dtype == "<i2" else 1.0
    peak = float(np.max(np.abs(samples.astype(np.float32)))) / scale if samples.size else 0.0
    return AudioStats(seconds=samples.size / rate, peak=peak)


def _header_rate(headers: dict[str, str], default: int | None) -> int:
    value = headers.get("x-sample-rate")
    if value is None:
        if default is None:
            raise AudioDecodeError("raw audio without an X-Sample-Rate header")
        return default
    try:
        rate = int(value)
    except ValueError as e:
        raise AudioDecodeError(f"bad X-Sample-Rate {value!r}") from e
    if rate <= 0:
        raise AudioDecodeError(f"bad X-Sample-Rate {value!r}")
    return rate


def _wav_stats(body: bytes) -> AudioStats:
    """Reads the fmt chunk, then every byte after the data chunk's header as samples."""
    if len(body) < 12 or body[:4] != b"RIFF" or body[8:12] != b"WAVE":
        raise AudioDecodeError("not a RIFF/WAVE body")
    offset = 12
    fmt: tuple[int, int, int, int] | None = None
    while offset + 8 <= len(body):
        chunk_id = body[offset : offset + 4]
        (size,) = struct.unpack_from("<I", body, offset + 4)
        if chunk_id == b"fmt " and offset + 24 <= len(body):
            tag, channels, rate = struct.unpack_from("<HHI", body, offset + 8)
            (bits,) = struct.unpack_from("<H", body, offset + 22)
            fmt = (tag, channels, rate, bits)
        if chunk_id == b"data":
            if fmt is None:
                raise AudioDecodeError("WAV data before a fmt chunk")
            tag, channels, rate, bits = fmt
            dtype = WAV_DTYPES.get((tag, bits))
            if dtype is None or channels != 1 or rate <= 0:
                raise AudioDecodeError(f"unsupported WAV: format {tag}, {bits} bit, {channels} ch")
            data = body[offset + 8 :]
            width = bits // 8
            return _raw_stats(data[: len(data) - len(data) % width], dtype, rate)
        offset += 8 + size + (size & 1)
    raise AudioDecodeError("WAV body without a data chunk")
